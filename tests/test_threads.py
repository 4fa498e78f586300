"""One model, many callers (issue 17): probes and segmentations of ONE model from several threads at once are
serialised by the capture engine's per-UNet lock. Each thread gets exactly what it would get alone, and the model is
left as it was (no processor or hook behind). Before the lock, two threads x 6 probes raised in 11 of 12 calls,
returned wrong tensors in one, and left 7 of 14 attention processors replaced (audit FLT-09)."""
import threading
import numpy as np, pytest, torch
from md_probe.models import load_model
from md_probe.probe import probe, attached
from md_probe.segment import MaskDiffusion
from md_probe.shapes import make_scenes

torch.set_num_threads(1)

@pytest.fixture(scope="module")
def shapes(): return load_model("shapes")

def _run_threads(work, n):
    results, errors = {}, []
    def run(i):
        try: results[i] = work(i)
        except BaseException as e: errors.append(e)
    ts = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in ts: t.start()
    for t in ts: t.join(timeout=300)
    assert not errors, errors
    return results

def test_threads_probing_one_model_get_what_they_would_alone(shapes):
    scenes = make_scenes(4, seed=3)
    kw = dict(timesteps=[0, 50], layers=["up_blocks.1"], cross_attention=True, self_attention=True)
    alone = [probe(shapes, s.image, s.prompt(), **kw) for s in scenes]
    before, procs = attached(shapes.denoiser), {k: id(v) for k, v in shapes.denoiser.attn_processors.items()}
    got = _run_threads(lambda i: [probe(shapes, scenes[i % 4].image, scenes[i % 4].prompt(), **kw) for _ in range(3)], 4)
    for i, caches in got.items():
        for c in caches:
            assert list(c) == list(alone[i % 4])
            for k in c: torch.testing.assert_close(c[k], alone[i % 4][k], rtol=0, atol=0)
    assert attached(shapes.denoiser) == before
    assert {k: id(v) for k, v in shapes.denoiser.attn_processors.items()} == procs

def test_threads_segmenting_one_model(shapes):
    scenes = make_scenes(3, seed=5)
    md = MaskDiffusion(shapes)
    classes = ["circle", "square", "triangle", "background"]
    alone = [md(s.image, classes).labels for s in scenes]
    got = _run_threads(lambda i: md(scenes[i].image, classes).labels, 3)
    for i, labels in got.items(): assert torch.equal(torch.as_tensor(labels), torch.as_tensor(alone[i]))

def test_probe_arguments_are_checked(shapes):
    img = make_scenes(1, seed=1)[0].image
    a = probe(shapes, img, "a circle", timesteps=torch.tensor([5, 50]), layers=["mid_block"])
    b = probe(shapes, img, "a circle", timesteps=(5, 50), layers=["mid_block"])
    c = probe(shapes, img, "a circle", timesteps=np.array([5, 50]), layers=["mid_block"])
    assert a.timesteps == b.timesteps == c.timesteps == [5, 50]
    with pytest.raises(ValueError, match="is a float, not an integer"): probe(shapes, img, "", timesteps=50.0, layers=["mid_block"])
    with pytest.raises(ValueError, match="is text"): probe(shapes, img, "", timesteps="50", layers=["mid_block"])
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match="pass a positive number of rows"): probe(shapes, img, "", layers=["mid_block"], batch_size=bad)
