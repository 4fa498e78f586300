"md_probe.sweep: one UNet call per image, a disk cache that makes re-runs UNet-free, the grid's numbers and its heat map."
import numpy as np, pandas as pd, pytest, torch
import torch.nn.functional as F
from md_probe.models import load_model
from md_probe.probe import probe, attached
from md_probe.shapes import make_scenes, SHAPE_CLASSES
from md_probe.metrics import score_per_image, score_dataset
from md_probe.clustering import kmeans
from md_probe.sweep import (sweep, sweep_grid, sweep_figure, cluster_image, image_features, as_items, dataset_classes,
                            model_fingerprint)

torch.set_num_threads(1)
LAYERS = ["down_blocks.0", "mid_block", "up_blocks.1"]

@pytest.fixture(scope="module")
def shapes(): return load_model("shapes")

@pytest.fixture(scope="module")
def scenes(): return make_scenes(6, seed=12345)            # held out: training never uses seed 12345

class CallCounter:
    "Counts UNet forward calls (a pre-hook on model.denoiser) and the batch size of each."
    def __init__(self, unet): self.denoiser, self.batches = unet, []
    def __enter__(self):
        from md_probe.engine import _layer_info, backbone_for
        _layer_info(self.denoiser, backbone_for(self.denoiser))   # the engine's one-time measurement of a UNet (a small dummy forward) is not a probe's call
        self.h = self.denoiser.register_forward_pre_hook(lambda m, a, kw: self.batches.append((a[0] if a else kw["sample"]).shape[0]),
                                                     with_kwargs=True)
        return self
    def __exit__(self, *exc): self.h.remove()
    @property
    def n(self): return len(self.batches)

# ---------- UNet calls and the disk cache ----------
def test_one_unet_call_per_image_with_all_timesteps_batched(shapes, scenes):
    before = attached(shapes.denoiser)
    with CallCounter(shapes.denoiser) as c:
        sweep(shapes, scenes, LAYERS, [0, 50, 300], progress=False)
    assert c.n == len(scenes) and c.batches == [3] * len(scenes)
    assert attached(shapes.denoiser) == before                       # no hook left behind

def test_cached_rerun_with_another_k_makes_no_unet_call(shapes, scenes, tmp_path):
    with CallCounter(shapes.denoiser) as c:
        a = sweep(shapes, scenes, LAYERS, [0, 200], k="gt", cache_dir=tmp_path, progress=False)
    assert c.n == len(scenes)
    assert len(list(tmp_path.glob("*.safetensors"))) == len(scenes)
    with CallCounter(shapes.denoiser) as c:
        b = sweep(shapes, scenes, LAYERS, [0, 200], k=2, cache_dir=tmp_path, progress=False)
        d = sweep(shapes, scenes, LAYERS[1:], [200], k=5, protocol="dataset", cache_dir=tmp_path, progress=False)
        s = sweep(shapes, scenes, ["mid_block"], [0], method="spectral", k=None, cache_dir=tmp_path, progress=False)
    assert c.n == 0
    assert set(b.k) == {2.0} and set(d.k) == {5.0} and not np.allclose(a.miou, b.miou)   # it did re-cluster
    # the cached features give the numbers fresh features give
    fresh = sweep(shapes, scenes, LAYERS, [0, 200], k=2, progress=False)
    pd.testing.assert_frame_equal(b, fresh)

def test_cache_misses_on_other_weights_and_grows_on_new_layers(shapes, scenes, tmp_path):
    rnd = load_model("shapes-random")
    assert model_fingerprint(rnd) != model_fingerprint(shapes)
    sweep(shapes, scenes[:2], ["mid_block"], [0], cache_dir=tmp_path, progress=False)
    with CallCounter(rnd.denoiser) as c:
        sweep(rnd, scenes[:2], ["mid_block"], [0], cache_dir=tmp_path, progress=False)
    assert c.n == 2                                              # another model's features are never served
    with CallCounter(shapes.denoiser) as c:
        sweep(shapes, scenes[:2], ["mid_block", "up_blocks.2"], [0, 100], cache_dir=tmp_path, progress=False)
        sweep(shapes, scenes[:2], ["up_blocks.2"], [100], cache_dir=tmp_path, progress=False)
        sweep(shapes, scenes[:2], ["mid_block"], [0], cache_dir=tmp_path, progress=False)
    assert c.n == 2                                              # probed once for the union, then read
    assert len(list(tmp_path.glob("*.safetensors"))) == 4        # 2 images x 2 models

def test_read_and_seed_are_part_of_the_key(shapes, scenes, tmp_path):
    img = scenes[0].image
    a = image_features(shapes, img, ["up_blocks.2.resnets.1"], [50], cache_dir=tmp_path)
    b = image_features(shapes, img, ["up_blocks.2.resnets.1"], [50], read="input", cache_dir=tmp_path)
    c = image_features(shapes, img, ["up_blocks.2.resnets.1"], [50], seed=1, cache_dir=tmp_path)
    assert a.features("up_blocks.2.resnets.1", t=50).shape[0] == 32 and b.features("up_blocks.2.resnets.1", t=50).shape[0] == 64
    assert not torch.equal(a.features("up_blocks.2.resnets.1", t=50), c.features("up_blocks.2.resnets.1", t=50))
    assert len(list(tmp_path.glob("*.safetensors"))) == 3

def test_fingerprint_is_the_same_in_every_process():
    "A disk cache serves a later session only if the key does not depend on the process (hash seeds, set order)."
    import os, subprocess, sys
    code = ("import torch; torch.set_num_threads(1)\nfrom md_probe.models import load_model\n"
            "from md_probe.sweep import model_fingerprint\nprint(model_fingerprint(load_model('shapes')))")
    run = lambda seed: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                                      env={**os.environ, "PYTHONHASHSEED": str(seed), "HF_HUB_OFFLINE": "1"}).stdout.strip()
    a, b = run(1), run(2)
    assert a and a == b == model_fingerprint(load_model("shapes")), (a, b)

# ---------- the numbers ----------
def test_a_cell_equals_clustering_and_scoring_by_hand(shapes, scenes):
    df = sweep(shapes, scenes, LAYERS, [0, 200], grid=32, progress=False)
    for layer, t in [("down_blocks.0", 0), ("up_blocks.1", 200)]:
        feats = [probe(shapes, s.image, "", timesteps=[0, 200], layers=[layer]).features(layer, t=t) for s in scenes]
        labs = [cluster_image(f, len(s.classes), out_hw=s.mask.shape) for f, s in zip(feats, scenes)]
        want = score_per_image(labs, [s.mask for s in scenes], len(SHAPE_CLASSES))
        row = df[(df.layer == layer) & (df.timestep == t)].iloc[0]
        assert row.miou == pytest.approx(want.miou, abs=1e-12) and row.pixel_accuracy == pytest.approx(want.pixel_accuracy)
        np.testing.assert_allclose(row[[f"iou_{c}" for c in SHAPE_CLASSES]].to_numpy(float), want.per_class, equal_nan=True)
    # dataset protocol: k-means over pooled, normalised 32x32 features, one matching
    dd = sweep(shapes, scenes, ["mid_block"], [0], protocol="dataset", grid=32, progress=False)
    f = [F.interpolate(probe(shapes, s.image, "", timesteps=[0], layers=["mid_block"]).features("mid_block")[None], 32,
                       mode="bilinear", align_corners=False)[0] for s in scenes]
    x = torch.cat([F.normalize(g.reshape(g.shape[0], -1).T, dim=1) for g in f])
    lab = kmeans(x, 5).reshape(len(scenes), 32, 32).numpy()
    assert dd.miou.iloc[0] == pytest.approx(score_dataset(list(lab), [s.mask for s in scenes], 5, num_preds=5).miou, abs=1e-12)

def test_default_grid_is_the_segmenters_grid(shapes, scenes):
    from md_probe.segment import MaskDiffusionConfig
    g = MaskDiffusionConfig.for_model(shapes).grid                 # a sweep scores features as MaskDiffusion sees them
    assert g == 16                                                  # half the shapes model's 32x32 input
    df = sweep(shapes, scenes[:2], ["up_blocks.1"], [0], progress=False)
    assert df.attrs["grid"] == g
    feats = [probe(shapes, s.image, "", layers=["up_blocks.1"]).features("up_blocks.1") for s in scenes[:2]]
    labs = [cluster_image(f, len(s.classes), out_hw=s.mask.shape, grid=g) for f, s in zip(feats, scenes[:2])]
    assert df.miou.iloc[0] == pytest.approx(score_per_image(labs, [s.mask for s in scenes[:2]], 5).miou, abs=1e-12)

def test_per_image_gt_k_counts_classes_present(shapes, scenes):
    df = sweep(shapes, scenes, ["mid_block"], [0], progress=False)
    assert df.k.iloc[0] == pytest.approx(np.mean([len(s.classes) for s in scenes]))
    masked = [(s.image, np.where(s.mask == 0, 255, s.mask)) for s in scenes]   # background ignored: one class fewer
    dm = sweep(shapes, masked, ["mid_block"], [0], progress=False, classes=SHAPE_CLASSES)
    assert dm.k.iloc[0] == pytest.approx(np.mean([len(s.classes) - 1 for s in scenes]))
    # background is never ground truth here: no true positive, so IoU 0 (a leftover cluster matched to it, DiffSeg's
    # accounting) or NaN (nothing matched to it), never above 0
    assert not dm.iou_background.iloc[0] > 0

def test_perfect_features_give_miou_one(scenes):
    "A feature map that is the one-hot mask clusters into the mask: the scoring path can reach 1 (and fails if broken)."
    for s in scenes:
        onehot = torch.nn.functional.one_hot(torch.from_numpy(s.mask), 5).permute(2, 0, 1).float() + 0.01
        lab = cluster_image(onehot, len(s.classes), out_hw=s.mask.shape)
        assert score_per_image([lab], [s.mask], 5).miou == 1.0
        assert cluster_image(onehot, None, method="spectral", out_hw=s.mask.shape).max() + 1 == len(s.classes)

def test_inputs_scenes_pairs_and_dataset_agree(shapes, scenes):
    class DS:                                                    # md_probe.data's reader interface
        classes = list(SHAPE_CLASSES)
        def __len__(self): return len(scenes)
        def __getitem__(self, i): return scenes[i].image, scenes[i].mask, f"img{i}"
    a = sweep(shapes, scenes, ["mid_block"], [0], progress=False)
    b = sweep(shapes, [(s.image, s.mask) for s in scenes], ["mid_block"], [0], progress=False, classes=SHAPE_CLASSES)
    c = sweep(shapes, DS(), ["mid_block"], [0], progress=False)
    pd.testing.assert_frame_equal(a, b); pd.testing.assert_frame_equal(a, c)
    assert dataset_classes(as_items(DS())) == list(SHAPE_CLASSES)

def test_errors_say_what_to_pass(shapes, scenes):
    for kw, msg in [(dict(k=None), "k-means needs k"), (dict(protocol="stego"), "'dataset' (STEGO/PiCIE"),
                    (dict(k="auto"), "'gt'"), (dict(method="gmm"), "use one of"), (dict(k=0), "at least 1"),
                    (dict(protocol="supervised"), "'dataset' (STEGO/PiCIE")]:
        with pytest.raises(ValueError, match=msg.replace("(", r"\(")): sweep(shapes, scenes, ["mid_block"], **kw, progress=False)
    with pytest.raises(KeyError, match="Nearest names"): sweep(shapes, scenes, ["mid_blok"], progress=False)
    with pytest.raises(ValueError, match="at least one"): sweep(shapes, [], ["mid_block"], progress=False)

# ---------- the heat map ----------
def test_heatmap_places_each_value_at_its_cell():
    layers, ts = ["up_blocks.1", "mid_block", "down_blocks.0"], [500, 0, 50]      # not sorted on purpose
    rows = [dict(model="m", layer=l, timestep=t, method="kmeans", protocol="per_image", k=3.0, miou=0.1 * i + 0.01 * j)
            for i, l in enumerate(layers) for j, t in enumerate(ts)]
    df = pd.DataFrame(rows).sample(frac=1, random_state=0)                        # row order must not matter
    g = sweep_grid(df)
    assert list(g.columns) == [0, 50, 500]
    fig = sweep_figure(df)
    z, ys, xs = np.array(fig.data[0].z, float), list(fig.data[0].y), [int(x) for x in fig.data[0].x]
    assert xs == [0, 50, 500]
    for r in rows:
        assert z[ys.index(r["layer"]), xs.index(r["timestep"])] == pytest.approx(r["miou"])
        assert g.loc[r["layer"], r["timestep"]] == pytest.approx(r["miou"])
    assert "best miou 0.220 at down_blocks.0, t=50" in fig.layout.title.text
    with pytest.raises(ValueError, match="pass model=one of them"):
        sweep_figure(pd.concat([df, df.assign(model="other")]))

def test_heatmap_of_a_real_sweep(shapes, scenes):
    df = sweep(shapes, scenes, LAYERS, [0, 200], progress=False)
    fig = sweep_figure(df)
    z, ys, xs = np.array(fig.data[0].z, float), list(fig.data[0].y), [int(x) for x in fig.data[0].x]
    assert ys == LAYERS and xs == [0, 200]
    for _, r in df.iterrows(): assert z[ys.index(r.layer), xs.index(r.timestep)] == pytest.approx(r.miou)

# ---------- what the sweep finds ----------
@pytest.fixture(scope="module")
def trained_vs_random(shapes):
    sc = make_scenes(16, seed=12345)
    kw = dict(layers=["down_blocks.0", "mid_block", "up_blocks.0", "up_blocks.2"], timesteps=[0], protocol="dataset",
              progress=False)
    return sweep(shapes, sc, **kw), sweep(load_model("shapes-random"), sc, **kw)

def test_trained_model_has_a_layer_that_beats_random_weights(trained_vs_random):
    "Dataset protocol (one matching: a cluster must mean one shape in every scene, whatever its colour)."
    tr, rn = trained_vs_random
    assert tr.miou.max() > rn.miou.max() + 0.05, (tr.miou.max(), rn.miou.max())
