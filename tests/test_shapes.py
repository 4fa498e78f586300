"The trained shapes model: training works and resumes exactly; the shipped checkpoint reaches its targets."
import json, numpy as np, pytest, torch
from md_probe.models import load_model
from md_probe.shapes import train_shapes, load_shapes, read_record, make_scenes, SHAPE_CLASSES, training_prompt, Scene
from md_probe.segment import MaskDiffusion, attention_argmax, UnsupervisedMaskDiffusion
from md_probe.metrics import confusion_matrix, miou, score_per_image

def _losses(path): return [float(l.split(",")[1]) for l in (path / "loss.csv").read_text().splitlines()[1:]]

def test_training_loss_falls(tmp_path):
    train_shapes(tmp_path, steps=40, batch_size=8, warmup=5, lr=2e-3, ckpt_every=20, progress=False)
    loss = _losses(tmp_path)
    assert len(loss) == 40 and np.mean(loss[-10:]) < 0.6 * np.mean(loss[:10]), loss
    assert json.loads(json.dumps(read_record(tmp_path / "shapes.safetensors")))["steps"] == 40

def test_resume_from_interruption(tmp_path, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    train_shapes(full, steps=6, batch_size=4, warmup=2, ckpt_every=3, progress=False)
    import md_probe.shapes as S
    real = S.make_scene
    calls = {"n": 0}
    def dying(*a, **k):  # die during step 4 (after the checkpoint at step 3)
        calls["n"] += 1
        if calls["n"] > 4 * 4: raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(S, "make_scene", dying)
    with pytest.raises(KeyboardInterrupt): train_shapes(cut, steps=6, batch_size=4, warmup=2, ckpt_every=3, progress=False)
    assert torch.load(cut / "state.pt", weights_only=False)["step"] == 3 and not (cut / "shapes.safetensors").exists()
    monkeypatch.setattr(S, "make_scene", real)
    train_shapes(cut, steps=6, batch_size=4, warmup=2, ckpt_every=3, progress=False)
    a, b = load_shapes(full / "shapes.safetensors"), load_shapes(cut / "shapes.safetensors")
    for (k, va), vb in zip(a.denoiser.state_dict().items(), b.denoiser.state_dict().values()): assert torch.equal(va, vb), k

def test_training_prompts_name_the_right_words():
    rng = np.random.default_rng(0)
    for s in make_scenes(30, seed=1):
        prompt, where = training_prompt(s, rng)
        words = prompt.split()
        assert all(words[w] == SHAPE_CLASSES[c] for c, w in where.items())
        assert {SHAPE_CLASSES[c] for c in where} >= set(s.classes)

def test_scenes_are_reproducible_and_masks_match_classes():
    a, b = make_scenes(5, seed=3), make_scenes(3, seed=3)
    for x, y in zip(a, b): assert np.array_equal(x.image, y.image) and np.array_equal(x.mask, y.mask)
    for s in a: assert sorted({SHAPE_CLASSES[k] for k in np.unique(s.mask)}) == sorted(s.classes)

# --- the shipped checkpoint: the validity fixture of the suite ---------------------------------------------------

N, SEED = 200, 12345   # held-out: training draws its scenes from default_rng([seed, 7, step])

def _score(model, method):
    cm = np.zeros((5, 5), np.int64)
    for s in make_scenes(N, seed=SEED):
        cls = s.prompt().split(" and ")
        ids = torch.tensor([SHAPE_CLASSES.index(c) for c in cls])
        seg = MaskDiffusion(model)(s.image, cls) if method == "maskdiffusion" else attention_argmax(model, s.image, cls)
        cm += confusion_matrix(ids[seg.labels].numpy(), s.mask, 5)
    return miou(cm)[0]

@pytest.fixture(scope="module")
def scores():
    trained, rand = load_model("shapes"), load_model("shapes-random")
    return {(m, name): _score(model, m) for name, model in (("trained", trained), ("random", rand))
            for m in ("maskdiffusion", "argmax")}

def test_shipped_checkpoint_is_the_final_one():
    from md_probe.shapes import shapes_model
    import md_probe, pathlib
    rec = read_record(pathlib.Path(md_probe.__file__).parent / "assets" / "shapes.safetensors")
    assert rec.get("command", "").startswith("md-probe train-shapes") and "metrics" in rec, rec

def test_shipped_records_name_no_path_of_a_machine():
    "The record in each shipped checkpoint, and the .json copy beside it, name the output folder, not its path."
    import md_probe, pathlib
    assets = pathlib.Path(md_probe.__file__).parent / "assets"
    for stem in ("shapes", "shapes-generative", "shapes-mmdit", "shapes-mmdit-generative"):
        rec = read_record(assets / f"{stem}.safetensors")
        assert rec == json.loads((assets / f"{stem}.json").read_text())
        out = rec["command"].split("--out ")[1].split()[0]
        assert out and not any(c in out for c in "/\\:~"), rec["command"]

def test_maskdiffusion_reaches_target(scores): assert scores[("maskdiffusion", "trained")] >= 0.60, scores

def test_attention_argmax_reaches_target(scores): assert scores[("argmax", "trained")] >= 0.50, scores

def test_maskdiffusion_beats_attention_argmax(scores):
    assert scores[("maskdiffusion", "trained")] > scores[("argmax", "trained")], scores

def test_random_weights_are_a_real_control(scores):
    assert scores[("maskdiffusion", "random")] <= 0.20 and scores[("argmax", "random")] <= 0.20, scores

def test_unsupervised_beats_random_weights():
    scenes = make_scenes(60, seed=SEED)
    def score(model):
        um = lambda s: UnsupervisedMaskDiffusion(model, k=len(s.classes))(s.image).labels.numpy()
        return score_per_image([um(s) for s in scenes], [s.mask for s in scenes], 5).miou
    trained, rand = score(load_model("shapes")), score(load_model("shapes-random"))
    assert trained >= rand + 0.15, (trained, rand)
