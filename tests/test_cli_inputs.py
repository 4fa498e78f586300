"Every bad input to `md-probe` ends with exit code 2 and one line on stderr, before any work, and writes nothing."
import io, os, sys, shutil, subprocess, contextlib
from pathlib import Path
import numpy as np
import pytest
import torch
torch.set_num_threads(1)

import md_probe.models as models
from md_probe.cli import main

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
SCENE = ROOT / "examples" / "shapes_scene.png"
C = ["--classes", "circle,square,background"]
CUDA = torch.cuda.is_available()


def attempt(*argv):
    "`main(argv)` in this process: (exit code, what it printed on stderr)."
    err = io.StringIO()
    with contextlib.redirect_stderr(err): code = main([str(a) for a in argv])
    return code, err.getvalue()

def tree(folder:Path)->dict:
    "Every path under `folder` with its bytes (None for folders): the exact state of a folder."
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


@pytest.fixture
def work(tmp_path, monkeypatch):
    "A working folder with the inputs the cases name (relative paths), as the current folder."
    monkeypatch.chdir(tmp_path)
    shutil.copy(SCENE, "scene.png")
    ckpt = (Path(models.__file__).parent / "assets" / "shapes.safetensors").read_bytes()
    Path("cut.safetensors").write_bytes(ckpt[:20000])                                   # truncated (MOD-05)
    Path("noise.safetensors").write_bytes(np.random.default_rng(0).bytes(50000))       # random bytes (MOD-06)
    Path("notpipe").mkdir(); (Path("notpipe") / "notes.txt").write_text("not a model")  # MOD-03
    (Path("halfpipe") / "unet").mkdir(parents=True); (Path("halfpipe") / "unet" / "config.json").write_text("{}")  # MOD-04
    return tmp_path


@pytest.fixture
def no_loading(monkeypatch):
    "Fail the test if any model is loaded."
    def refuse(*a, **k): raise AssertionError("a model was loaded before the mistake was reported")
    monkeypatch.setattr(models, "load_model", refuse)


@pytest.fixture
def no_unet(monkeypatch):
    "Fail the test if any UNet runs (loading is allowed)."
    from diffusers import UNet2DConditionModel
    def refuse(*a, **k): raise AssertionError("the UNet ran before the mistake was reported")
    monkeypatch.setattr(UNet2DConditionModel, "forward", refuse)


def check_refused(argv, fragment, work):
    "Exit code 2, one line `md-probe <command>: error: ...` holding `fragment`, and the folder exactly as before."
    before = tree(work)
    code, err = attempt(*argv)
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    assert lines[0].startswith(f"md-probe {argv[0]}: error: ") or lines[0].startswith("md-probe: error: "), lines
    assert fragment in lines[0], (fragment, lines[0])
    assert tree(work) == before, "the command wrote or created something"


# --- refused before any model loads --------------------------------------------------------------------------------

BEFORE_LOADING = [
    # devices (MOD-10, MOD-11): checked with torch as the arguments are parsed
    (["segment", "scene.png", *C, "--device", "banana"], "'banana' is not a device"),
    (["segment", "scene.png", *C, "--device", "meta"], "no meta device"),
    (["layers", "tiny", "--device", "banana"], "is not a device"),
    (["probe", "scene.png", "--layers", "up_blocks.1", "--device", "cuda:99"], "'cuda:99'"),
    (["eval", "--device", "banana"], "is not a device"),
    (["reproduce", "--device", "banana"], "is not a device"),
    (["segment", "scene.png", *C, "--dtype", "fp64"], "unknown dtype 'fp64'"),
    (["eval", "--dtype", "banana"], "unknown dtype"),
    # corrupt checkpoints (MOD-05, MOD-06), folders that are not pipelines (MOD-03, MOD-04), near misses (MOD-08)
    (["segment", "scene.png", *C, "--model", "cut.safetensors"], "cannot read the checkpoint cut.safetensors"),
    (["segment", "scene.png", *C, "--model", "noise.safetensors"], "cannot read the checkpoint noise.safetensors"),
    (["layers", "noise.safetensors"], "cannot read the checkpoint"),
    (["layers", "cut.safetensors"], "truncated or not a safetensors file"),
    (["probe", "scene.png", "--layers", "up_blocks.1", "--model", "cut.safetensors"], "cannot read the checkpoint"),
    (["eval", "--model", "cut.safetensors", "--n", "2"], "cannot read the checkpoint"),
    (["reproduce", "--model", "noise.safetensors", "--n", "2"], "cannot read the checkpoint"),
    (["segment", "scene.png", *C, "--model", "notpipe"], "has no unet/, vae/, text_encoder/, tokenizer/, scheduler/"),
    (["layers", "halfpipe"], "has no vae/, text_encoder/, tokenizer/, scheduler/"),
    (["layers", "SHAPES"], "did you mean 'shapes'?"),
    (["layers", "shapes", "--model", "tiny"], "two models given"),
    # class lists the label format cannot hold (CLS-08, CLS-09), and the doubtful class cases decided (CLS-06, 10, 15)
    (["segment", "scene.png", "--classes", ",".join(f"c{i}" for i in range(256))], "256 classes, but a label map holds at most 255"),
    (["segment", "scene.png", "--classes", ",".join(f"c{i}" for i in range(300))], "300 classes"),
    (["segment", "scene.png", "--classes", "circle"], "one class ('circle') would take every pixel"),
    (["segment", "scene.png", "--classes", "circle,🐱,background"], "'🐱' (position 1) has no letter or digit"),
    (["segment", "scene.png", "--classes", "circle and square,background"], "holds 'and'"),
    (["segment", "scene.png", "--classes", "circle,circle,background"], "Duplicate class names"),
    (["segment", "scene.png", "--classes", "circle,,background"], "positions [1] are empty"),
    (["segment", "scene.png"], "pass --classes"),
    (["segment", "scene.png", *C, "--unsupervised", "3"], "exclude each other"),            # OUT-08
    # numbers out of range (OUT-09, LAY-02, EVL-03, EVL-04, EVL-12, TRN-02..04) and never reinterpreted
    (["segment", "scene.png", "--unsupervised", "-3"], "--unsupervised: pass an integer in [1, 255] or 'eigengap', not '-3'"),
    (["segment", "scene.png", "--unsupervised", "0"], "not '0'"),
    (["segment", "scene.png", "--unsupervised", "500"], "not '500'"),
    (["segment", "scene.png", *C, "--timestep", "-1"], "--timestep: pass a timestep >= 0, not '-1'"),
    (["segment", "scene.png", *C, "--timestep", "nan"], "not 'nan'"),
    (["segment", "scene.png", *C, "--image-size", "0"], "--image-size/--size: pass an integer >= 1, not '0'"),
    (["probe", "scene.png", "--layers", "up_blocks.1", "--timesteps", "0", "-5"], "not '-5'"),
    (["probe", "scene.png", "--layers", "up_blocks.1", "--read", "middle"], "invalid choice: 'middle'"),
    (["layers", "shapes", "--size", "0"], "pass an integer >= 1, not '0'"),
    (["layers", "shapes", "--size", "-64"], "not '-64'"),
    (["eval", "--n", "0"], "--n: pass an integer >= 1, not '0'"),
    (["eval", "--limit", "0"], "--limit: pass an integer >= 1"),
    (["eval", "--limit", "-1"], "not '-1'"),
    (["eval", "--batch-size", "0"], "--batch-size: pass an integer >= 1"),
    (["eval", "--num-workers", "-1"], "--num-workers: pass an integer >= 0"),
    (["eval", "--tau", "nan"], "--tau: pass a finite number > 0, not 'nan'"),
    (["eval", "--seed", "-1"], "--seed: pass an integer in [0, 4294967295]"),
    (["eval", "--method", "kmeans", "--k", "0"], "--k '0'"),
    (["reproduce", "--n", "0"], "--n: pass an integer >= 1"),
    (["reproduce", "--batch-size", "0"], "--batch-size"),
    (["reproduce", "--limit", "0"], "--limit"),
    (["reproduce", "--methods", ""], "pass at least one name"),                                 # EVL-10
    (["reproduce", "--methods", "diffseg,,kmeans"], "empty name at position 1"),
    (["reproduce", "--methods", "kmeans,k-means"], "names ['kmeans'] more than once"),
    (["reproduce", "--methods", "nothing"], "Unknown method 'nothing'"),
    (["shapes-report", "--n", "0"], "--n: pass an integer >= 1"),
    (["shapes-report", "--n", "-5"], "not '-5'"),
    (["train-shapes", "--out", "t", "--steps", "0"], "--steps: pass an integer >= 1"),
    (["train-shapes", "--out", "t", "--steps", "-3"], "not '-3'"),
    (["train-shapes", "--out", "t", "--batch-size", "0"], "--batch-size: pass an integer >= 1"),
    (["train-shapes", "--out", "t", "--lr", "nan"], "--lr: pass a finite number > 0, not 'nan'"),
    (["train-shapes", "--out", "t", "--lr", "inf"], "not 'inf'"),
    (["train-shapes", "--out", "t", "--lr", "0"], "not '0'"),
    (["train-shapes", "--out", "t", "--grounding", "-0.1"], "--grounding: pass a finite number >= 0"),
    # options that do not apply are refused, not ignored
    (["eval", "--dataset", "cocostuff27", "--n", "5"], "--n is the number of shapes scenes"),
    (["eval", "--method", "diffseg", "--k", "3"], "--k does not apply to --method diffseg"),
    (["eval", "--method", "maskdiffusion", "--tau", "0.5"], "--tau does not apply"),
    (["eval", "--method", "kmeans", "--prompt-classes", "all"], "--prompt-classes does not apply"),
    (["reproduce", "--datasets", "cocostuff27"], "--datasets needs a data root"),
    # a prompt without a word to draw (PRB-13); outputs that collide or are taken (OUT-05, OUT-06)
    (["probe", "scene.png", "--cross-attention", "--heatmaps", "maps"], "the prompt '' has none"),
    (["segment", "scene.png", "scene.png", *C], "scene.png is given twice"),
    (["segment", "nothere.png", *C], "image not found: nothere.png"),
    (["nosuch"], "invalid choice: 'nosuch'"),
]

@pytest.mark.parametrize("argv,fragment", BEFORE_LOADING, ids=[" ".join(a)[:70] for a, _ in BEFORE_LOADING])
def test_refused_before_the_model_loads(argv, fragment, work, no_loading, monkeypatch):
    monkeypatch.delenv("MD_PROBE_DATA", raising=False)
    check_refused(argv, fragment, work)


def test_cuda_refused_where_there_is_none(work, no_loading):
    "MOD-10: `--device cuda` on a CPU-only torch, for every subcommand that takes a device."
    if CUDA: pytest.skip("this machine has a CUDA device")
    for argv in (["segment", "scene.png", *C], ["layers", "tiny"], ["probe", "scene.png", "--layers", "up_blocks.1"],
                 ["eval"], ["reproduce"]):
        check_refused(argv + ["--device", "cuda"], "'cuda': this torch is built without CUDA", work)


# --- refused after the model loads, before its UNet runs ----------------------------------------------------------

AFTER_LOADING = [
    (["segment", "scene.png", *C, "--timestep", "5000"], "--timestep 5000 is outside the scheduler's range of shapes"),   # SEG-01
    (["segment", "scene.png", *C, "--timestep", "1000"], "from 0 (clean) to 999"),
    # whether a fraction is a timestep depends on the model's scheduler (flow matching: yes), so it is known once loaded
    (["segment", "scene.png", *C, "--timestep", "1.5"], "--timestep 1.5 is not an integer: shapes's scheduler takes integer"),
    (["segment", "scene.png", "--unsupervised", "3", "--timestep", "1000"], "--timestep 1000 is outside"),
    (["segment", "scene.png", "--classes", "supercalifragilistic,background"], "'supercalifragilistic' alone does not fit"),  # CLS-17
    (["segment", "scene.png", *C, "--image-size", "33"], "--image-size 33 is not a multiple of shapes's stride 4: pass 36"),
    (["segment", "scene.png", "--unsupervised", "255", "--model", "tiny"], "K must be below"),
    (["probe", "scene.png", "--layers", "up_blocks.1", "--timesteps", "0", "1000"], "--timesteps 1000 is outside"),     # PRB-01
    (["probe", "scene.png", "--layers", "up_blocks.1", "--image-size", "30"], "pass 32"),
    (["probe", "scene.png", "--layers", "up_block.1.resnet.1"], "Nearest names"),
    (["probe", "scene.png", "--prompt", " ".join(["circle"] * 40), "--cross-attention"], "the text encoder's window is 16"),
    (["layers", "shapes", "--size", "33"], "not a multiple of shapes's stride 4"),                                          # LAY-03
]

@pytest.mark.parametrize("argv,fragment", AFTER_LOADING, ids=[" ".join(a)[:70] for a, _ in AFTER_LOADING])
def test_refused_before_the_unet_runs(argv, fragment, work, no_unet):
    check_refused(argv, fragment, work)


def test_layers_pattern_that_matches_nothing(work):
    "LAY-04: a pattern matching no layer is refused with the nearest names (the listing itself runs the UNet once)."
    check_refused(["layers", "shapes", "--pattern", "zzz*"], "no layer of shapes matches --pattern 'zzz*'", work)
    check_refused(["layers", "shapes", "--pattern", "up_block.1.*"], "'up_blocks.1'", work)


def test_eval_n_zero_is_not_the_default(work, monkeypatch):
    "EVL-03: `--n 0` used to score the 200 default scenes; it is refused, and `--n 2` scores exactly 2."
    check_refused(["eval", "--dataset", "shapes", "--n", "0", "--no-progress", "--out", "n0"], "--n", work)
    assert attempt("eval", "--dataset", "shapes", "--n", "2", "--no-progress", "--out", "n2")[0] == 0
    import json
    assert json.loads(Path("n2/result.json").read_text())["n_images"] == 2


def test_nothing_left_when_refused_after_the_folder_is_made(work, no_unet):
    "OUT-04: a failure after --out was created removes the folders the command created, and only those."
    Path("kept").mkdir()
    for out in ("new/deeper", "kept/new"):
        check_refused(["segment", "scene.png", *C, "--timestep", "5000", "--out", out], "outside", work)
    assert not Path("new").exists() and Path("kept").is_dir() and not any(Path("kept").iterdir())
    check_refused(["probe", "scene.png", "--layers", "nothing", "--out", "p/c.safetensors", "--heatmaps", "p/maps",
                   "--prompt", "circle"], "Nearest names", work)
    assert not Path("p").exists()


# --- the real process: exit code, one line, no traceback -----------------------------------------------------------

def cli(*argv, cwd):
    r = subprocess.run([sys.executable, "-m", "md_probe.cli", *map(str, argv)], cwd=cwd, env=ENV, capture_output=True, text=True)
    return r.returncode, r.stderr.strip().splitlines(), r.stdout

@pytest.mark.parametrize("argv,fragment", [
    (["segment", "scene.png", *C, "--timestep", "5000", "--out", "o"], "--timestep 5000 is outside"),     # after loading
    (["segment", "scene.png", *C, "--device", "banana", "--out", "o"], "is not a device"),               # as parsed
    (["layers", "noise.safetensors"], "cannot read the checkpoint"),                                      # before loading
])
def test_subprocess_exit_2_one_line(argv, fragment, work):
    before = tree(work)
    code, err, out = cli(*argv, cwd=work)
    assert code == 2 and len(err) == 1 and fragment in err[0] and "Traceback" not in err[0], err
    assert tree(work) == before


def test_readme_command_runs_clean_under_warnings_as_errors(work):
    "WRN-01: the README's main command prints no warning (and so runs under -W error::UserWarning)."
    r = subprocess.run([sys.executable, "-W", "error::UserWarning", "-m", "md_probe.cli", "segment", "scene.png", *C,
                        "--out", "outputs", "--quiet"], cwd=work, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert sorted(p.name for p in Path("outputs").iterdir()) == ["scene.json", "scene_labels.png", "scene_overlay.png"]
