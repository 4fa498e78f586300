"""Methods as published and numbers that say what they are (issue 16): DiffSeg's released configuration in
`reproduce`, the float16 first merging pass against a port of the released code, the released aggregation against
a port of it, fp32 by default, the authors' open-vocabulary Cityscapes protocol, and the provenance fields of
`Result` / result.json / the tables on tiny runs."""
import argparse, dataclasses, json, math
from pathlib import Path
import numpy as np
import pytest
import torch
import torch.nn.functional as F
torch.set_num_threads(1)

import md_probe
from md_probe.models import load_model
from md_probe.data import load_dataset, make_fake_dataset, class_names
from md_probe.probe import CaptureStore
from md_probe.evaluate import evaluate, forward_batch, make_method, scoring_text, PROTOCOL_SOURCES
from md_probe import diffseg as dseg, reproduce as rp
from md_probe.cli import main, add_reproduce_args

RESULT_FIELDS = {"dataset", "method", "protocol", "model", "dtype", "image_size", "scored_at", "dataset_protocol", "class_source",
                 "prompts", "options", "config", "version", "n_images", "miou", "pixel_accuracy", "per_class_iou", "images_per_s"}


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return make_fake_dataset("cocostuff27", tmp_path_factory.mktemp("coco"), n=3, size=(40, 56), seed=5)

@pytest.fixture(scope="module")
def cs_root(tmp_path_factory):   # one Cityscapes layout serves cityscapes, cityscapes27 and cityscapes_ov
    return make_fake_dataset("cityscapes", tmp_path_factory.mktemp("cs"), n=2, size=(48, 96), seed=6)


# --- DiffSeg as published ------------------------------------------------------------------------------------------

def test_reproduce_runs_diffseg_with_the_released_configuration(tiny, coco_root, cs_root, tmp_path):
    "benchmarks.ipynb: released weighting, REFINEMENT = False, float16 first merge, tau 1.1 (COCO-Stuff) / 0.9 (Cityscapes)."
    released = dict(weighting="released", refine=False, merge_dtype="float16")
    for root, d, tau in ((coco_root, "cocostuff27", 1.1), (cs_root, "cityscapes27", 0.9)):
        rp.reproduce_rows([d], ["diffseg"], tiny, root=root, out=tmp_path, limit=1, progress=False)
        config = json.loads((tmp_path / f"{d}-diffseg" / "run.json").read_text())["config"]
        assert {k: config[k] for k in (*released, "tau", "timestep", "noise", "iterations")} == {**released, "tau": tau, "timestep": 300,
                                                                                                   "noise": False, "iterations": 3}
        assert config == json.loads(json.dumps(dataclasses.asdict(dseg.DiffSegConfig.published(tiny, d))))
    # the library default is not the published configuration (the 05a notebook says why); eval keeps it
    assert dseg.DiffSegConfig().refine and dseg.DiffSegConfig().weighting == "method" and dseg.DiffSegConfig().merge_dtype == "float32"


def test_released_aggregate_equals_a_port_of_the_released_code(tiny):
    """`weighting="released"`: diffusion_model.py sums the layers of one side (/5), segmentor.py `aggregate_weights`
    averages heads, upsamples the key axes bilinearly, renormalises, repeats the query axes and weights the sides
    by side / sum of the sides (`get_weight_rato`)."""
    hw = (256, 256)
    ds = dseg.DiffSeg(tiny, weighting="released")
    x = tiny.prepare_image(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8), 256).pixels
    agg = ds.store(hw)
    forward_batch(tiny, x, [[""]], 300, self_attention=ds.layers, noise=False, store=agg)
    store = CaptureStore(self_attention=ds.layers)
    forward_batch(tiny, x, [[""]], 300, self_attention=ds.layers, noise=False, store=store)
    G = agg.grid[0]
    by_side = {}
    for name, (m,) in store.self_attention.items():           # m: (heads, N, N) of one layer
        by_side.setdefault(int(math.isqrt(m.shape[-1])), []).append(m.double())
    assert len(by_side) > 1 and any(len(v) > 1 for v in by_side.values())   # several sides, a side with several layers
    ref = torch.zeros(G * G, G * G, dtype=torch.float64)
    sides = sorted(by_side, reverse=True)
    for s in sides:
        w = (sum(by_side[s]) / 5).mean(0).reshape(s * s, 1, s, s)   # the side's sum / 5, heads averaged
        up = F.interpolate(w, size=(G, G), mode="bilinear", align_corners=False).reshape(s, s, G, G)
        up = up / up.sum((2, 3), keepdim=True)
        r = G // s
        up = up.repeat_interleave(r, 0).repeat_interleave(r, 1).reshape(G * G, G * G)
        ref += up * s / sum(sides)
    torch.testing.assert_close(agg.maps[0].double(), ref, atol=1e-7, rtol=1e-5)
    method = dseg.SelfAttentionAggregate(agg.grid, dseg.diffseg_weights(tiny, hw, "method"))
    forward_batch(tiny, x, [[""]], 300, self_attention=ds.layers, noise=False, store=method)
    assert (method.maps[0].double() - ref).abs().max() > 1e-5              # the per-layer weighting is another aggregate


def _released_kl_float16(x:np.ndarray, Y:np.ndarray)->np.ndarray:
    "segmentor.py `DiffSeg.KL(x, Y)` on float16 casts (numpy's float16 sums accumulate in float32)."
    x, Y = x.astype(np.float16)[:, None], Y.astype(np.float16)[None]
    with np.errstate(divide="ignore", invalid="ignore"):
        quotient = np.log(x) - np.log(Y)
        return np.sum(x * quotient, -1) / np.float16(2) + -np.sum(Y * quotient, -1) / np.float16(2)


def test_float16_first_pass_equals_the_released_code(shapes):
    "The first merging pass's distances in float16 are the released code's to float16 rounding; float32 ones are not."
    from md_probe.shapes import make_scenes
    ds = dseg.DiffSeg(shapes, config=dseg.DiffSegConfig.published(shapes, "shapes"))
    store, _ = ds._aggregate([shapes.prepare_image(s.image) for s in make_scenes(2, seed=4)])
    anchors = dseg.diffseg_anchors((32, 32))
    for A in store.maps:
        ref = torch.from_numpy(_released_kl_float16(A[anchors].numpy(), A.numpy()).astype(np.float32))
        d16, d32 = dseg.sym_kl(A[anchors], A, "float16"), dseg.sym_kl(A[anchors], A)
        ulp = torch.from_numpy(np.spacing(np.abs(ref.numpy()).astype(np.float16)).astype(np.float32))
        assert ((d16 - ref).abs() <= ulp).all()                                  # equal up to one float16 rounding
        assert ((d32 - ref).abs() > ulp).any()                                   # float32 is another computation
        tau = torch.tensor(dseg.DIFFSEG_SHAPES_TAU, dtype=torch.float16).item()
        assert ((d16 < tau) == (ref < tau)).float().mean() > 0.9999
    # a map with an entry float16 rounds to 0: NaN distances, never close (the anchor keeps itself alone)
    A = torch.tensor([[.5, .5 - 1e-9, 1e-9, 0.], [.45, .55, 0., 0.], [.1, .1, .4, .4], [.1, .1, .45, .35]]) + torch.tensor([0, 1e-3, 1e-3, 1e-3])[:, None]
    A = A / A.sum(1, keepdim=True)
    ref = _released_kl_float16(A.numpy(), A.numpy())
    assert np.isnan(ref[0]).all() and np.isnan(dseg.sym_kl(A, A, "float16")[0].numpy()).all()
    torch.testing.assert_close(dseg.diffseg_merge(A, torch.tensor([0, 2]), 0.5, 1, "float16")[0], A[0])
    assert not torch.allclose(dseg.diffseg_merge(A, torch.tensor([0, 2]), 0.5, 1)[0], A[0])
    assert torch.tensor(1.1, dtype=torch.float16).item() < 1.1                 # TensorFlow compares with tau in float16
    p, q = torch.rand(9, 40).softmax(1), torch.rand(11, 40).softmax(1)    # chunks of anchors give the one-chunk result
    torch.testing.assert_close(dseg._sym_kl_float16(p, q, budget=3 * 11 * 40), dseg._sym_kl_float16(p, q), rtol=0, atol=0)


def test_published_diffseg_runs_on_the_device_it_is_given(shapes):
    "DiffSeg.head with merge_dtype='float16' on the model's device (CPU here, CUDA where the tests run on a GPU)."
    from md_probe.shapes import make_scenes
    scene = make_scenes(1, seed=9)[0]
    a = dseg.DiffSeg(shapes, config=dseg.DiffSegConfig.published(shapes, "shapes"))(scene.image)
    b = dseg.DiffSeg(shapes, config=dseg.DiffSegConfig.published(shapes, "shapes", merge_dtype="float32"))(scene.image)
    assert a.labels.shape == scene.mask.shape and (a.labels == b.labels).float().mean() > 0.99


# --- MaskDiffusion as published: precision and the authors' Cityscapes protocol -----------------------------------

def test_reproduce_defaults_to_fp32():
    args = add_reproduce_args(argparse.ArgumentParser()).parse_args([])
    assert args.dtype == rp.REPRODUCE_DTYPE == "fp32"
    assert args.datasets is None and "cityscapes_ov" in rp.REPRODUCE_DATASETS   # None: every data set (with a data root)


def test_cityscapes_ov_rows_for_named_methods_only(tiny, cs_root, tmp_path):
    rows = rp.reproduce_rows(["cityscapes", "cityscapes_ov", "cityscapes27"], ["maskdiffusion", "diffseg", "kmeans"], tiny,
                             root=cs_root, limit=1, progress=False)
    assert [(r["dataset"], r["method"]) for r in rows] == [("cityscapes", "maskdiffusion"), ("cityscapes_ov", "maskdiffusion"),
        ("cityscapes27", "maskdiffusion"), ("cityscapes27", "diffseg"), ("cityscapes27", "kmeans")]
    ov = rows[1]
    assert ov["published_miou"] is None and ov["source"].startswith("not published")
    assert ov["scored_at"] == "labels at 256x352, image as stored (resize_label)"
    assert ov["class_source"] == "md_probe class file cityscapes_ov.txt"
    assert "256x352" in ov["published_protocol"] and "light" in ov["published_protocol"]
    assert any("cityscapes_ov" in n for n in rows[0]["notes"])             # the 19-class row points to the authors' protocol
    assert rows[4]["notes"] == ["k = the number of ground-truth classes in each image: k-means is given ground-truth information"]
    missing = rp.reproduce_rows(["cityscapes_ov"], ["maskdiffusion", "unsupervised"], tiny, root=tmp_path, progress=False)
    assert [(r["method"], "error" in r) for r in missing] == [("maskdiffusion", True)]


# --- every number says what it is ----------------------------------------------------------------------------------

def test_result_json_says_what_produced_the_number(tiny, cs_root, tmp_path):
    ds = load_dataset("cityscapes_ov", cs_root, transform="protocol")
    res = evaluate("maskdiffusion", ds, model=tiny, batch_size=2, out=tmp_path, progress=False)
    r = json.loads((tmp_path / "result.json").read_text())
    assert set(r) == RESULT_FIELDS and r == json.loads(json.dumps(res.to_dict()))
    assert (r["protocol"], r["model"], r["dtype"], r["version"]) == ("supervised", "tiny", "float32", md_probe.__version__)
    assert r["image_size"] == f"{tiny.image_size}x{tiny.image_size}"
    assert r["scored_at"] == "labels at 256x352, image as stored (resize_label)" and r["dataset_protocol"] == ds.protocol
    assert r["class_source"] == "md_probe class file cityscapes_ov.txt" and r["prompts"] == class_names("cityscapes_ov")
    assert {"light", "sign"} <= set(r["prompts"]) and "traffic light" in r["per_class_iou"]   # prompts vs published names
    assert r["options"] == {"prompt_classes": "all"} and r["config"] == make_method("maskdiffusion", tiny).spec()["config"]
    md = (tmp_path / "result.md").read_text()
    for s in ("protocol **supervised**", PROTOCOL_SOURCES["supervised"], "labels scored: labels at 256x352", "`tiny` (float32)",
              f"md_probe {md_probe.__version__}", "cityscapes_ov.txt", f"input {tiny.image_size}x{tiny.image_size}"):
        assert s in md, s
    assert res.table().attrs["scored_at"] == r["scored_at"]


def test_result_fields_follow_the_run(tiny, coco_root):
    "dtype, input size, class source and transform come from what ran, not from constants."
    bf16 = load_model("tiny", dtype="bf16")
    custom = load_dataset("cocostuff27", coco_root, classes=[f"thing {i}" for i in range(27)])
    res = evaluate(make_method("kmeans", bf16, k=2, keep_aspect=True, image_size=128), custom, limit=1, progress=False)
    assert (res.dtype, res.protocol, res.scored_at, res.class_source) == ("bfloat16", "per_image", "as stored", "custom prompt names")
    assert res.image_size == f"longer side 128, aspect kept, padded to /{bf16.stride}"
    assert res.options == {"k": 2} and res.config["image_size"] == 128
    assert scoring_text(load_dataset("cocostuff27", coco_root, transform="protocol").transform) == "512x512 centre crops (resize_crop)"
    assert scoring_text(lambda image, mask: (image, mask)) == "<lambda>"
    notes = rp.comparison_notes("cocostuff27", "kmeans", res, rp.NOT_PUBLISHED)
    assert notes == ["run in bfloat16; the published pipelines ran in float32"]   # k is an int here: no ground-truth note
    dres = evaluate(make_method("diffseg", tiny, tau=1.1), load_dataset("cocostuff27", coco_root, transform="protocol"), limit=1, progress=False)
    dn = rp.comparison_notes("cocostuff27", "diffseg", dres, rp.PUBLISHED[("cocostuff27", "diffseg")])
    assert any(n.startswith("DiffSeg configuration differs") and "refine=True (published: False)" in n
               and "merge_dtype='float32' (published: 'float16')" in n for n in dn)


def test_reproduce_command_prints_published_numbers_with_protocol_source_and_notes(tiny, coco_root, tmp_path, capsys):
    rc = main(["reproduce", "--root", str(coco_root), "--model", "tiny", "--datasets", "cocostuff27", "--methods",
               "maskdiffusion,diffseg", "--limit", "1", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.strip() == (tmp_path / "table.md").read_text().strip()
    pub = rp.PUBLISHED[("cocostuff27", "diffseg")]
    for s in (f"md_probe {md_probe.__version__}", "| tiny (float32) |", "512x512 centre crops (resize_crop)", pub.protocol, pub.source,
              rp.PUBLISHED[("cocostuff27", "maskdiffusion")].source, "Not like for like:", "ODISE", "| 43.6 | 72.5 |",
              "per-image Hungarian, tau 1.1, as published (benchmarks.ipynb)"):
        assert s in out, s
    line = next(l for l in out.splitlines() if l.startswith("| cocostuff27 | MaskDiffusion"))
    assert "| no: " in line                                             # the row is marked as not like for like
    for m in ("maskdiffusion", "diffseg"):
        r = json.loads((tmp_path / f"cocostuff27-{m}" / "result.json").read_text())
        assert set(r) == RESULT_FIELDS and r["dtype"] == "float32" and r["version"] == md_probe.__version__
