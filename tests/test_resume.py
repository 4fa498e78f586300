"Long jobs refuse a folder made with other settings and read damaged records back safely: train-shapes, eval."
import io, os, sys, json, shutil, warnings, subprocess, contextlib
from pathlib import Path
import numpy as np
import pytest
import torch
torch.set_num_threads(1)

import md_probe.shapes as S
from md_probe.shapes import train_shapes, load_shapes
from md_probe.models import load_model
from md_probe.data import load_dataset
from md_probe import evaluate as ev
from md_probe.cli import main

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
TINY = dict(batch_size=2, warmup=1, progress=False)     # a few steps of a small batch: seconds


def attempt(*argv):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out): code = main([str(a) for a in argv])
    return code, err.getvalue()

def tree(folder:Path)->dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}

def steps_logged(folder:Path)->list:
    return [int(l.split(",")[0]) for l in (Path(folder) / "loss.csv").read_text().splitlines()[1:]]


# --- train-shapes ----------------------------------------------------------------------------------------------------

def test_cli_refuses_a_resume_with_other_settings_naming_them(tmp_path):
    "TRN-05: the second command used to resume silently and record its own settings for all four steps."
    run = lambda *a: subprocess.run([sys.executable, "-m", "md_probe.cli", "train-shapes", "--out", "t", "--quiet", *a],
                                    cwd=tmp_path, env=ENV, capture_output=True, text=True)
    train_shapes(tmp_path / "t", steps=2, batch_size=2, progress=False)      # what `--steps 2 --batch-size 2` runs
    before = tree(tmp_path)
    r = run("--steps", "4", "--batch-size", "2", "--seed", "9", "--lr", "0.5", "--grounding", "0")
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1, r.stderr
    assert err[0].startswith("md-probe train-shapes: error: t holds a training run with other settings")
    for name in ("'steps': (2, 4)", "'seed': (0, 9)", "'lr': (0.001, 0.5)", "'grounding': (0.1, 0.0)"): assert name in err[0]
    assert "batch_size" not in err[0] and tree(tmp_path) == before

@pytest.mark.parametrize("change", [dict(steps=3), dict(seed=1), dict(batch_size=3), dict(lr=2e-3), dict(grounding=0.0),
                                    dict(max_grounding_t=500), dict(warmup=2)])
def test_every_recipe_setting_is_checked(tmp_path, change):
    train_shapes(tmp_path, steps=2, **TINY)
    before = tree(tmp_path)
    with pytest.raises(ValueError, match=f"other settings {{'{next(iter(change))}'"):
        train_shapes(tmp_path, **({"steps": 2} | TINY | change))
    assert tree(tmp_path) == before

def test_same_settings_resume_and_log_each_step_once(tmp_path, monkeypatch):
    "Interrupted after its checkpoint at step 3 and resumed: the weights and loss.csv equal an uninterrupted run's."
    full, cut = tmp_path / "full", tmp_path / "cut"
    kw = dict(steps=6, batch_size=2, warmup=2, ckpt_every=3, progress=False)
    train_shapes(full, **kw)
    real, calls = S.make_scene, {"n": 0}
    def dying(*a, **k):                                   # dies in step 4, after the checkpoint of step 3
        calls["n"] += 1
        if calls["n"] > 4 * 2: raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(S, "make_scene", dying)
    with pytest.raises(KeyboardInterrupt): train_shapes(cut, **kw)
    monkeypatch.setattr(S, "make_scene", real)
    train_shapes(cut, **(kw | dict(ckpt_every=4)))       # how often checkpoints are written is not part of the recipe
    assert steps_logged(cut) == list(range(6))
    assert (cut / "loss.csv").read_text() == (full / "loss.csv").read_text()
    a, b = load_shapes(full / "shapes.safetensors"), load_shapes(cut / "shapes.safetensors")
    for (k, va), vb in zip(a.denoiser.state_dict().items(), b.denoiser.state_dict().values()): assert torch.equal(va, vb), k

def test_a_restart_before_the_first_checkpoint_starts_the_log_again(tmp_path):
    (tmp_path / "loss.csv").write_text("step,loss,mse,grounding,lr\n0,1,1,1,1\n1,1,1,1,1\n")   # a run killed before state.pt
    train_shapes(tmp_path, steps=2, **TINY)
    assert steps_logged(tmp_path) == [0, 1] and (tmp_path / "loss.csv").read_text().count("step,") == 1

def test_unreadable_or_old_checkpoints_are_named(tmp_path):
    train_shapes(tmp_path, steps=2, **TINY)
    state = tmp_path / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    code, err = attempt("train-shapes", "--out", tmp_path, "--steps", "2", "--batch-size", "2", "--quiet")
    assert code == 2 and f"cannot read the training checkpoint {state}" in err and "delete it" in err
    torch.save({"unet": {}, "text": {}, "opt": {}, "step": 1}, state)                      # an older md_probe's: no settings
    code, err = attempt("train-shapes", "--out", tmp_path, "--steps", "2", "--batch-size", "2", "--quiet")
    assert code == 2 and "records no training settings" in err

@pytest.mark.parametrize("bad", [dict(steps=0), dict(steps=-3), dict(batch_size=0), dict(lr=float("nan")), dict(lr=0.0),
                                 dict(grounding=-1.0), dict(seed=-1), dict(seed=2**32), dict(warmup=-1), dict(threads=0),
                                 dict(max_grounding_t=1001), dict(steps=True)])
def test_train_shapes_refuses_bad_arguments_before_writing(tmp_path, bad):
    "TRN-02..04 through the API: refused before the folder is even created."
    with pytest.raises(ValueError, match=f"{next(iter(bad))}="): train_shapes(tmp_path / "run", **(dict(steps=2) | TINY | bad))
    assert not (tmp_path / "run").exists()


# --- evaluation records -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shapes(): return load_model("shapes")

@pytest.fixture(scope="module")
def finished(shapes, tmp_path_factory):
    "A finished 4-image evaluation run on the shapes data set, and its result."
    out = tmp_path_factory.mktemp("eval") / "run"
    res = ev.evaluate("maskdiffusion", load_dataset("shapes", n=4), model=shapes, batch_size=2, out=out, progress=False,
                      prompt_classes="present")
    return out, json.loads((out / "result.json").read_text())

def _drop_rate(r): return {k: v for k, v in r.items() if k != "images_per_s"}

GOOD = '{"i": 1, "name": "shapes-12345-0001", "shape": [5, 6], "conf": [[0, 0, 3]]}'
DAMAGE = {
    "random bytes": (np.random.default_rng(0).bytes(300).replace(b"\n", b"") + b"\n", "not UTF-8 text"),     # RES-04
    "a number": (b"42\n", "not a record but int 42"),                                                         # RES-05
    "no fields": (b'{"i": 4}\n', "no 'name', 'shape', 'conf'"),                                               # RES-06
    "wrong shape": (GOOD.replace("[5, 6]", "[3, 3]").encode() + b"\n", "confusion shape [3, 3] does not fit 5 classes"),  # RES-07
    "outside": (GOOD.replace("[0, 0, 3]", "[7, 0, 3]").encode() + b"\n", "counts outside the 5 x 6 confusion"),
    "negative": (GOOD.replace("[0, 0, 3]", "[0, 0, -3]").encode() + b"\n", "counts outside the 5 x 6 confusion or negative"),
    "bad index": (GOOD.replace('"i": 1', '"i": "1"').encode() + b"\n", "index '1' is not an integer"),
    "not json": (b"{this is not json}\n", "not JSON"),
}

@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_record_is_named_skipped_and_scored_again(finished, shapes, tmp_path, kind):
    "The damaged line replaces image 1's record: a warning names file and line, image 1 is scored again, same result."
    src, expected = finished
    out = tmp_path / "run"; shutil.copytree(src, out)
    rec = out / "records-0.jsonl"
    lines = rec.read_bytes().splitlines(keepends=True)
    i = next(n for n, l in enumerate(lines) if json.loads(l)["i"] == 1)
    bad, what = DAMAGE[kind]
    rec.write_bytes(b"".join(lines[:i] + [bad] + lines[i + 1:]))
    with pytest.warns(UserWarning) as seen:
        ev.evaluate("maskdiffusion", load_dataset("shapes", n=4), model=shapes, batch_size=2, out=out, progress=False,
                    prompt_classes="present")
    msg = str(seen[0].message)
    assert f"records-0.jsonl line {i + 1}: {what}" in msg and "scored again" in msg, msg
    assert _drop_rate(json.loads((out / "result.json").read_text())) == _drop_rate(expected)

def test_a_line_cut_by_a_kill_is_skipped_quietly(finished, tmp_path):
    src, _ = finished
    out = tmp_path / "run"; shutil.copytree(src, out)
    with open(out / "records-0.jsonl", "ab") as f: f.write(b'{"i": 9, "name": "shapes-12345-0009", "sha')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sorted(ev.RecordLog(out).read(num_classes=5)) == [0, 1, 2, 3]

def test_cli_resume_warns_and_finishes(finished, tmp_path):
    "Through `md-probe eval`: exit 0, the warning names the file and line, the numbers are the uninterrupted ones."
    src, expected = finished
    out = tmp_path / "run"; shutil.copytree(src, out)
    with open(out / "records-0.jsonl", "ab") as f: f.write(b"42\n")
    r = subprocess.run([sys.executable, "-m", "md_probe.cli", "eval", "--dataset", "shapes", "--n", "4", "--batch-size", "2",
                        "--out", str(out), "--no-progress"], env=ENV, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "records-0.jsonl line" in r.stderr and "not a record but int 42" in r.stderr and "Traceback" not in r.stderr
    assert _drop_rate(json.loads((out / "result.json").read_text())) == _drop_rate(expected)

@pytest.mark.parametrize("content", [b'{"dataset": "shapes", "spl', b"", b"\xff\xfe", b"[1, 2]"])
def test_an_unreadable_run_json_is_named(finished, tmp_path, content):
    "RES-09: a cut run.json gave `Unterminated string ...` without naming the file; now the file is named, exit 2."
    src, _ = finished
    out = tmp_path / "run"; shutil.copytree(src, out)
    (out / "run.json").write_bytes(content)
    before = tree(out)
    code, err = attempt("eval", "--dataset", "shapes", "--n", "4", "--batch-size", "2", "--out", out, "--no-progress")
    assert code == 2 and err.count("\n") == 1 and f"cannot read {out / 'run.json'}" in err and "delete the folder" in err
    assert tree(out) == before

def test_eval_still_refuses_another_run_in_the_folder(finished, tmp_path):
    "RES-02 stays: another --n is refused naming the difference."
    src, _ = finished
    out = tmp_path / "run"; shutil.copytree(src, out)
    code, err = attempt("eval", "--dataset", "shapes", "--n", "5", "--out", out, "--no-progress")
    assert code == 2 and "other settings" in err
