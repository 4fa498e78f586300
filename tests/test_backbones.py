"""Every family through the same public API and CLI, on its tiny offline model: probe a real image, trace a generation
with the family's own diffusers pipeline, segment (MaskDiffusion, Unsupervised MaskDiffusion, DiffSeg), sweep,
evaluate, the explorers and `md-probe segment|probe|layers|eval --model ...`.

The family pages (tests/test_sdxl.py, test_pixart.py, test_sd3.py, test_flux.py) check each adapter against its
pipeline and the captured probabilities against independent recomputations; this file checks that everything above
the capture runs unchanged on every family and says what it did (shapes, ranges, restored models)."""
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import json
import numpy as np, pytest, torch
from PIL import Image
torch.set_num_threads(1)

from md_probe.models import load_model
from md_probe.engine import attached, list_layers
from md_probe.probe import probe
from md_probe.trace import trace
from md_probe.segment import MaskDiffusion, UnsupervisedMaskDiffusion, MaskDiffusionConfig, family_defaults
from md_probe.diffseg import DiffSeg
from md_probe.shapes import make_scenes

FAMILIES = ["tiny-sdxl", "tiny-pixart", "tiny-sd3", "tiny-flux"]
_MODELS = {}

def model(name):
    if name not in _MODELS: _MODELS[name] = load_model(name)
    return _MODELS[name]

def image(h=64, w=80, seed=0):
    "A structured RGB image (two blocks of colour and noise), not a square: the aspect must survive."
    rng = np.random.default_rng(seed)
    x = (rng.random((h, w, 3)) * 60).astype(np.uint8)
    x[: h // 2, : w // 2] += np.array([180, 20, 20], np.uint8); x[h // 2:, w // 2:] += np.array([20, 160, 30], np.uint8)
    return x


@pytest.mark.parametrize("name", FAMILIES)
def test_probe_a_real_image(name):
    m = model(name)
    d = family_defaults(m)
    before = attached(m.denoiser)
    c = probe(m, image(), "a cat and grass", timesteps=[d["timestep"]], layers=list(d["feature_layers"]), read=d["read"],
              cross_attention=True)
    assert attached(m.denoiser) == before
    assert c.meta["family"] == m.family and c.image_hw == [(64, 80)]
    L = len(c.prompts[0].tokens)
    for layer in c.attention_layers:
        a = c.attention(layer)
        h, w = c.attention_hw(layer)
        assert a.shape == (1, h * w, L)                          # heads averaged on the fly: one
        r = c.attention(layer, renormalize=True).sum(-1)
        torch.testing.assert_close(r, torch.ones_like(r), atol=1e-4, rtol=0)   # a softmax over the text keys
        assert (a.sum(-1) <= 1 + 1e-4).all()
    for layer in c.layers: assert c.features(layer).ndim == 3
    wa = c.word_attention("cat")
    assert wa.ndim == 2 and torch.isfinite(wa).all() and wa.min() >= 0
    for p in c.prompts[0].positions("cat"): assert c.prompts[0].words[c.prompts[0].token_words[p]] == "cat"


@pytest.mark.parametrize("name", FAMILIES)
def test_segmenters(name):
    m = model(name)
    img = image()
    seg = MaskDiffusion(m)(img, ["cat", "grass"])
    assert tuple(seg.labels.shape) == img.shape[:2] and seg.scores.shape[0] == 2
    un = UnsupervisedMaskDiffusion(m, k=2)(img)
    assert tuple(un.labels.shape) == img.shape[:2] and set(un.labels.unique().tolist()) <= {0, 1}
    ds = DiffSeg(m)(img)
    assert tuple(ds.labels.shape) == img.shape[:2]
    assert MaskDiffusionConfig.for_model(m).feature_layers          # the family's defaults resolve to module names


@pytest.mark.parametrize("name", FAMILIES)
def test_trace_a_generation(name):
    import diffusers
    m = model(name)
    pipe = getattr(diffusers, m.backbone.pipeline)(**m.backbone.components(m))
    pipe.set_progress_bar_config(disable=True)
    before = attached(m.denoiser)
    kw = dict(num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0), output_type="latent")
    if m.family == "pixart": kw |= dict(use_resolution_binning=False)
    if m.family == "flux":      # the tiny model's T5 window is 32, FluxPipeline pads to 512 unless told
        with pytest.raises(ValueError, match="another text length"):
            with trace(pipe): pipe("a cat and grass", **kw)
        assert attached(m.denoiser) == before
        kw |= dict(max_sequence_length=m.max_length)
    with trace(pipe) as c:
        pipe("a cat and grass", **kw)
    assert attached(m.denoiser) == before and "encode_prompt" not in vars(pipe)
    ts = [float(t) for t in pipe.scheduler.timesteps]
    assert len(c.timesteps) == 2 and np.allclose(c.timesteps, ts, atol=1e-2)
    assert c.prompts[0].prompt.lower() == "a cat and grass" and c.attention_layers
    assert c.word_attention("cat").ndim == 2


@pytest.mark.parametrize("name", FAMILIES)
def test_sweep_evaluate_and_explorers(name, tmp_path):
    from md_probe.sweep import sweep
    from md_probe.evaluate import evaluate
    from md_probe.data import load_dataset
    from md_probe.explorers import AttentionExplorer, ClusterExplorer, SegmentationExplorer
    m = model(name)
    d = family_defaults(m)
    scenes = make_scenes(2, seed=5)
    df = sweep(m, scenes, list(d["feature_layers"])[:1], [d["timestep"]], k=2, progress=False)
    assert len(df) and df["miou"].between(0, 1).all()
    res = evaluate("maskdiffusion", load_dataset("shapes", n=2), model=m, batch_size=2, progress=False)
    assert 0 <= res.miou <= 1
    img = image(64, 64)   # square: SegmentationExplorer's panels assume the model saw the image unresized (as for SD)
    AttentionExplorer(m, img, "a cat and grass")
    ClusterExplorer(m, img, k=2)
    SegmentationExplorer(m, img, classes="cat, grass")


@pytest.mark.parametrize("name", FAMILIES)
def test_cli(name, tmp_path):
    from md_probe.cli import main
    Image.fromarray(image()).save(tmp_path / "x.png")
    assert main(["layers", "--model", name]) == 0
    assert main(["segment", str(tmp_path / "x.png"), "--classes", "cat,grass", "--model", name, "--out", str(tmp_path / "seg"), "--quiet"]) == 0
    assert len(list((tmp_path / "seg").iterdir())) == 3
    assert main(["probe", str(tmp_path / "x.png"), "--prompt", "a cat", "--model", name, "--cross-attention", "--out", str(tmp_path / "pr")]) == 0
    assert main(["eval", "--dataset", "shapes", "--n", "2", "--model", name, "--method", "maskdiffusion", "--out", str(tmp_path / "ev"), "--no-progress"]) == 0
    assert json.loads(next((tmp_path / "ev").glob("*.json")).read_text())
