"Tests of md_probe.evaluate, .diffseg, .reproduce and their command line that need more than the notebooks' asserts: kills and resumes, two processes, the CLI."
import os, sys, json, signal, subprocess, time, dataclasses
from pathlib import Path
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
torch.set_num_threads(1)

from md_probe.models import load_model
from md_probe.data import load_dataset, make_fake_dataset
from md_probe.metrics import ConfusionAccumulator, confusion_matrix, confusion_counts, PROTOCOLS
from md_probe.segment import UnsupervisedMaskDiffusion
from md_probe.probe import CaptureStore
from md_probe import evaluate as ev, diffseg as dseg, reproduce as rp
from md_probe.cli import main

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


@pytest.fixture(scope="module")
def tiny(): return load_model("tiny")

@pytest.fixture(scope="module")
def shapes(): return load_model("shapes")

@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return make_fake_dataset("cocostuff27", tmp_path_factory.mktemp("data"), n=5, size=(40, 56), seed=3)


# --- counting ------------------------------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 9), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_confusion_counts_equal_metrics(C, P, n, seed):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, C, n); gt[rng.random(n) < 0.2] = 255
    pred = rng.integers(0, P, n)
    got = confusion_counts(torch.as_tensor(pred), torch.as_tensor(gt), C, P).numpy()
    np.testing.assert_array_equal(got, confusion_matrix(pred, gt, C, num_preds=P))


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(PROTOCOLS), st.integers(2, 5), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_add_confusion_equals_accumulator_update(protocol, C, n_images, seed):
    "Adding stored confusion counts (ConfusionAccumulator.add_confusion) gives what update gives from the label maps."
    rng = np.random.default_rng(seed)
    named = protocol == "supervised"
    ref, acc = ConfusionAccumulator(C, protocol, num_preds=C + 1 if named else None), ev._accumulator(C, protocol, named)
    for _ in range(n_images):
        gt = rng.integers(0, C, (5, 6)); gt[0, 0] = 255
        pred = rng.integers(0, C + 1 if named else C + 3, (5, 6))
        ref.update(pred, gt)
        P = C + 1 if named else max(C, int(pred.max()) + 1)
        acc.add_confusion(confusion_matrix(pred, gt, C, num_preds=P))
    a, b = acc.scores(), ref.scores()
    np.testing.assert_array_equal(a.confusion, b.confusion)
    assert a.miou == b.miou or (np.isnan(a.miou) and np.isnan(b.miou))


# --- the runner against the plain loops -------------------------------------------------------------------------

def test_unsupervised_runner_equals_segmenter_loop(shapes):
    ds = load_dataset("shapes", n=6, seed=5)
    res = ev.evaluate("unsupervised", ds, model=shapes, batch_size=3, progress=False)
    ref = ConfusionAccumulator(5, "per_image")
    um = UnsupervisedMaskDiffusion(shapes)
    for b in (0, 3):
        imgs = [ds[i] for i in range(b, b + 3)]
        for seg, (_, mask, _) in zip(um([im for im, _, _ in imgs]), imgs): ref.update(seg.labels, mask)
    np.testing.assert_array_equal(res.scores.confusion, ref.confusion)
    assert res.protocol == "per_image" and res.n_images == 6


def test_records_rescore_under_another_protocol_without_the_unet(tiny, coco_root, tmp_path):
    ds = load_dataset("cocostuff27", coco_root)
    first = ev.evaluate("kmeans", ds, model=tiny, batch_size=5, out=tmp_path, progress=False)
    calls = []
    h = tiny.denoiser.register_forward_pre_hook(lambda *a: calls.append(1))
    try: again = ev.evaluate("kmeans", ds, model=tiny, batch_size=5, out=tmp_path, protocol="dataset", progress=False)
    finally: h.remove()
    fresh = ev.evaluate("kmeans", ds, model=tiny, batch_size=5, protocol="dataset", progress=False)
    assert calls == [] and first.protocol == "per_image" and again.protocol == "dataset"
    np.testing.assert_array_equal(again.scores.confusion, fresh.scores.confusion)
    assert json.loads((tmp_path / "result.json").read_text())["protocol"] == "dataset"


# --- resuming -----------------------------------------------------------------------------------------------------

class Killed(Exception): pass

def test_interrupted_run_resumes_to_the_same_numbers(tiny, coco_root, tmp_path):
    "A run killed after k images (records flushed per batch) resumes, skips them, and ends with the uninterrupted numbers."
    ds = load_dataset("cocostuff27", coco_root)
    full = ev.evaluate("maskdiffusion", ds, model=tiny, batch_size=1, out=tmp_path / "full", progress=False)
    method = ev.make_method("maskdiffusion", tiny)
    predict, seen = method.predict, []
    def dying(*a, **kw):
        if len(seen) == 2: raise Killed
        seen.append(1); return predict(*a, **kw)
    method.predict = dying
    with pytest.raises(Killed): ev.evaluate(method, ds, batch_size=1, out=tmp_path / "run", progress=False)
    assert len(ev.RecordLog(tmp_path / "run").read()) == 2
    rows = []
    h = tiny.denoiser.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    try: resumed = ev.evaluate("maskdiffusion", ds, model=tiny, batch_size=1, out=tmp_path / "run", progress=False)
    finally: h.remove()
    assert len(rows) == 3                                  # images 2, 3, 4 only
    np.testing.assert_array_equal(resumed.scores.confusion, full.scores.confusion)
    a, b = (json.loads((p / "result.json").read_text()) for p in (tmp_path / "full", tmp_path / "run"))
    assert {k: v for k, v in a.items() if k != "images_per_s"} == {k: v for k, v in b.items() if k != "images_per_s"}


@pytest.mark.slow
def test_sigkill_then_resume(coco_root, tmp_path):
    "A real SIGKILL of `python -m md_probe.cli eval` mid-run; the rerun completes to the uninterrupted numbers."
    root = make_fake_dataset("cocostuff27", tmp_path / "data", n=30, size=(40, 56), seed=4)
    cmd = [sys.executable, "-m", "md_probe.cli", "eval", "--dataset", "cocostuff27", "--root", str(root), "--model", "tiny",
           "--batch-size", "1", "--no-progress"]
    proc = subprocess.Popen(cmd + ["--out", str(tmp_path / "run")], env=ENV, cwd=tmp_path, stdout=subprocess.DEVNULL)
    rec = tmp_path / "run" / "records-0.jsonl"
    t0 = time.time()
    while time.time() - t0 < 300 and not (rec.exists() and rec.read_text().count("\n") >= 3): time.sleep(0.02)
    proc.send_signal(signal.SIGKILL); proc.wait()
    n_done = len(ev.RecordLog(tmp_path / "run").read())
    assert 3 <= n_done < 30, f"{n_done} of 30 images done at the kill: the resume is not tested"
    subprocess.run(cmd + ["--out", str(tmp_path / "run")], env=ENV, cwd=tmp_path, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(cmd + ["--out", str(tmp_path / "full")], env=ENV, cwd=tmp_path, check=True, stdout=subprocess.DEVNULL)
    a, b = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("run", "full"))
    assert a["n_images"] == b["n_images"] == 30
    assert {k: v for k, v in a.items() if k != "images_per_s"} == {k: v for k, v in b.items() if k != "images_per_s"}


# --- several processes ----------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method", ["maskdiffusion", "diffseg"])
def test_two_cpu_processes_give_the_single_process_numbers(coco_root, tmp_path, method):
    "torch.distributed.run (what `accelerate launch` runs) with 2 CPU processes on gloo: same numbers as one process."
    args = ["eval", "--dataset", "cocostuff27", "--root", str(coco_root), "--model", "tiny", "--method", method,
            "--batch-size", "1", "--no-progress", "--device", "cpu"]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29400 + os.getpid() % 500),
           "-m", "md_probe.cli"] + args + ["--out", str(tmp_path / "two")]
    subprocess.run(two, env=ENV, cwd=tmp_path, check=True, stdout=subprocess.DEVNULL, timeout=600)
    subprocess.run([sys.executable, "-m", "md_probe.cli"] + args + ["--out", str(tmp_path / "one")], env=ENV, cwd=tmp_path,
                   check=True, stdout=subprocess.DEVNULL, timeout=600)
    files = {p.name: len(p.read_text().splitlines()) for p in (tmp_path / "two").glob("records-*.jsonl")}
    assert files == {"records-0.jsonl": 3, "records-1.jsonl": 2}   # 5 images dealt round-robin
    a, b = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("two", "one"))
    assert a["n_images"] == 5
    assert {k: v for k, v in a.items() if k != "images_per_s"} == {k: v for k, v in b.items() if k != "images_per_s"}


def test_gather_is_not_imported_for_one_process():
    code = "import md_probe.evaluate as e, sys; e.process_state(); e._gather(e.process_state(), 1); print('accelerate' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env={k: v for k, v in ENV.items() if k != "WORLD_SIZE"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- DiffSeg ----------------------------------------------------------------------------------------------------------

def test_diffseg_aggregate_on_a_non_square_grid(tiny):
    "The on-the-fly aggregate equals the definition computed from stored maps, on an 8 x 16 latent grid."
    img = (np.random.default_rng(0).random((64, 128, 3)) * 255).astype(np.uint8)
    p = tiny.prepare_image(img, image_size=128, keep_aspect=True)
    assert tuple(p.pixels.shape[-2:]) == (64, 128)
    seg = dseg.DiffSeg(tiny, image_size=128, keep_aspect=True)
    agg = seg.store((64, 128))
    ev.forward_batch(tiny, p.pixels, [[""]], 300, self_attention=seg.layers, noise=False, store=agg)
    keep = CaptureStore(self_attention=seg.layers)
    ev.forward_batch(tiny, p.pixels, [[""]], 300, self_attention=seg.layers, noise=False, store=keep)
    gh, gw = 8, 16
    slow = torch.zeros(gh * gw, gh * gw)
    for n, (m,) in keep.self_attention.items():
        r = round((gh * gw / m.shape[-1]) ** 0.5); h, w = gh // r, gw // r
        k = torch.nn.functional.interpolate(m.reshape(-1, 1, h, w), size=(gh, gw), mode="bilinear", align_corners=False)
        k = k.reshape(h, w, gh * gw); k = k / k.sum(-1, keepdim=True)
        slow += agg.weights[n] * k.repeat_interleave(r, 0).repeat_interleave(r, 1).reshape(gh * gw, gh * gw)
    torch.testing.assert_close(agg.maps[0], slow, atol=1e-6, rtol=1e-5)
    out = seg(img)
    assert out.labels.shape == (64, 128)


def test_diffseg_merge_follows_the_released_rule():
    "Later iterations: visited in order, a proposal absorbs all within tau (taken ones included in the mean)."
    N = 6
    A = torch.full((N, N), 1e-3); A[torch.arange(N), torch.arange(N)] = 1
    A = A / A.sum(1, keepdim=True)
    # anchors 0 and 1 see only themselves at tau ~ 0 -> two proposals; a huge tau merges them
    assert dseg.diffseg_merge(A, torch.tensor([0, 1]), 1e-6, 3).shape == (2, N)
    one = dseg.diffseg_merge(A, torch.tensor([0, 1]), 1e6, 3)
    torch.testing.assert_close(one, A.mean(0, keepdim=True))
    # later iterations: a chain 0 ~ 1 ~ 2 with 0 !~ 2 -> [mean(0, 1), mean(1, 2)]: 2 is not taken and absorbs 1 again
    p = torch.tensor([[.7, .2, .1], [.4, .4, .2], [.1, .3, .6]])
    d, tau = dseg.sym_kl(p, p), 0.5
    assert d[0, 1] < tau and d[1, 2] < tau < d[0, 2]
    torch.testing.assert_close(dseg.diffseg_merge_step(p, tau), torch.stack([p[[0, 1]].mean(0), p[[1, 2]].mean(0)]))
    # a proposal far from the rest stays alone; and the order of visits matters (released code: in order)
    q = torch.cat([p, torch.tensor([[.01, .01, .98]])])
    assert (dseg.sym_kl(q, q)[3, :3] > tau).all()
    torch.testing.assert_close(dseg.diffseg_merge_step(q, tau)[2], q[3])
    torch.testing.assert_close(dseg.diffseg_merge_step(p[[1, 0, 2]], tau), p.mean(0, keepdim=True))  # 1 first takes all


# --- command line -------------------------------------------------------------------------------------------------

def test_cli_eval_writes_the_result_files(tiny, coco_root, tmp_path, capsys):
    rc = main(["eval", "--dataset", "cocostuff27", "--root", str(coco_root), "--model", "tiny", "--method", "attention",
               "--limit", "3", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    r = json.loads((tmp_path / "result.json").read_text())
    assert set(r) == {"dataset", "method", "protocol", "model", "n_images", "miou", "pixel_accuracy", "per_class_iou", "images_per_s",
                      "dtype", "image_size", "scored_at", "dataset_protocol", "class_source", "prompts", "options", "config", "version"}
    assert (r["dataset"], r["method"], r["protocol"], r["model"], r["n_images"]) == ("cocostuff27", "attention", "supervised", "tiny", 3)
    assert len(r["per_class_iou"]) == 27 and "food-stuff" in r["per_class_iou"]    # the published names
    assert "| class | IoU |" in (tmp_path / "result.md").read_text()
    assert "protocol **supervised**" in capsys.readouterr().out


def test_cli_eval_usage_errors_exit_2(tmp_path, capsys):
    assert main(["eval", "--dataset", "potsdam", "--root", str(tmp_path), "--model", "tiny"]) == 2
    assert "Expected layout" in capsys.readouterr().err
    assert main(["eval", "--dataset", "shapes", "--method", "segformer", "--out", str(tmp_path)]) == 2
    assert "Unknown method" in capsys.readouterr().err
    assert main(["eval", "--dataset", "shapes", "--method", "kmeans", "--k", "many", "--out", str(tmp_path)]) == 2
    assert "--k 'many'" in capsys.readouterr().err
    assert not (tmp_path / "run.json").exists()                   # nothing ran


def test_run_json_records_the_config_as_data(tiny, coco_root, tmp_path):
    "run.json holds the method's options and its segmenter's config as data (dataclasses.asdict), and guards a resume."
    data = load_dataset("cocostuff27", coco_root)
    ev.evaluate("diffseg", data, model=tiny, batch_size=5, out=tmp_path, limit=1, progress=False, tau=0.5)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["method"] == "diffseg" and run["options"] == {}
    assert run["config"] == json.loads(json.dumps(dataclasses.asdict(dseg.DiffSegConfig(tau=0.5))))
    with pytest.raises(ValueError, match="other settings"):
        ev.evaluate("diffseg", data, model=tiny, batch_size=5, out=tmp_path, limit=1, progress=False, tau=0.6)
    ev.evaluate("kmeans", data, model=tiny, batch_size=5, out=tmp_path / "km", limit=1, progress=False, k=2)
    run = json.loads((tmp_path / "km" / "run.json").read_text())
    assert run["options"] == {"k": 2} and run["config"]["timestep"] == ev.make_method("kmeans", tiny).seg.config.timestep
    assert all(not isinstance(v, str) or not v.startswith(("(", "[", "{")) for v in run["config"].values())   # no reprs


@pytest.mark.slow
def test_module_cli_on_a_fresh_machine(tmp_path):
    "`python -m md_probe.cli eval --dataset shapes` works with nothing but the package (shapes data + model)."
    out = subprocess.run([sys.executable, "-m", "md_probe.cli", "eval", "--dataset", "shapes", "--n", "8", "--no-progress"],
                         env=ENV, cwd=tmp_path, capture_output=True, text=True, check=True)
    r = json.loads((tmp_path / "eval-runs" / "shapes-maskdiffusion-shapes" / "result.json").read_text())
    assert r["model"] == "shapes" and r["n_images"] == 8 and r["miou"] > 0.3
    assert "MaskDiffusion on shapes" in out.stdout


def test_cli_import_errors_surface():
    "A module of the evaluation stack that fails to import fails the command: `eval` and `reproduce` are never dropped silently."
    code = "import sys; sys.modules['md_probe.reproduce'] = None; import md_probe.cli"
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True)
    assert r.returncode != 0 and "import of md_probe.reproduce halted" in r.stderr   # the ImportError itself
    from md_probe.cli import build_parser
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"eval", "reproduce", "shapes-report"} <= set(sub.choices)


def test_reproduce_without_data_runs_on_shapes(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MD_PROBE_DATA", raising=False)
    rc = main(["reproduce", "--n", "4", "--out", str(tmp_path), "--no-progress", "--methods", "maskdiffusion,unsupervised,kmeans,diffseg"])
    assert rc == 0
    text = (tmp_path / "table.md").read_text()
    for s in ("shapes data set", "supervised (class-name prompts)", "per-image Hungarian, k by eigengap",
              "per-image Hungarian, k = classes present", f"tau {dseg.DIFFSEG_SHAPES_TAU}"):
        assert s in text
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [f"shapes-{m}" for m in ("diffseg", "kmeans", "maskdiffusion", "unsupervised")]


def test_reproduce_rows_beside_published_numbers(tiny, coco_root):
    rows = rp.reproduce_rows(["cocostuff27", "cityscapes27"], ["diffseg", "maskdiffusion"], tiny, root=coco_root, limit=1, progress=False)
    assert [(r["dataset"], r["method"]) for r in rows] == [("cocostuff27", "diffseg"), ("cocostuff27", "maskdiffusion"),
                                                           ("cityscapes27", "diffseg"), ("cityscapes27", "maskdiffusion")]
    assert (rows[0]["published_miou"], rows[0]["published_accuracy"]) == (43.6, 72.5)
    assert abs(rows[1]["published_miou"] - 58.4) < 1e-9 and "error" in rows[2]
    table = rp.reproduce_table(rows)
    assert "per-image Hungarian, tau 1.1" in table and "missing: Cityscapes" in table


def test_result_figure_and_markdown(shapes):
    res = ev.evaluate("maskdiffusion", load_dataset("shapes", n=4), model=shapes, batch_size=4, progress=False, prompt_classes="present")
    fig = res.figure()
    assert [t.type for t in fig.data] == ["bar", "heatmap"]
    assert res.table().index.tolist() == ["background", "circle", "square", "triangle", "cross"]
    md = res.to_markdown()
    assert "protocol **supervised**" in md and "| background |" in md


def test_shapes_report_small():
    df = rp.shapes_report(n=8, print_table=False)
    assert df.columns.tolist() == ["shapes", "shapes-random"]
    assert df.index.tolist() == [("MaskDiffusion", "supervised"), ("attention argmax", "supervised"),
                                 ("Unsupervised MaskDiffusion", "per_image")]
    assert df.loc[("MaskDiffusion", "supervised"), "shapes"] > df.loc[("MaskDiffusion", "supervised"), "shapes-random"] + 0.2


def test_md_probe_cli_runs_eval(tmp_path, capsys):
    "`md-probe eval` reaches the runner with these arguments (`--k` and its older name `--segments`)."
    assert main(["eval", "--dataset", "shapes", "--n", "4", "--method", "kmeans", "--out", str(tmp_path), "--no-progress"]) == 0
    r = json.loads((tmp_path / "result.json").read_text())
    assert (r["method"], r["protocol"], r["n_images"]) == ("kmeans", "per_image", 4)
    assert main(["eval", "--dataset", "shapes", "--n", "4", "--method", "kmeans", "--segments", "2", "--out", str(tmp_path / "k2"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "k2" / "run.json").read_text())["options"] == {"k": 2}
