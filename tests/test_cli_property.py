"Property: every `md-probe segment` run ends with exit 0 and a complete output set, or exit 2, one line, and the folder unchanged."
import io, shutil, tempfile, contextlib
from pathlib import Path
import torch
from hypothesis import given, settings, example, HealthCheck, strategies as st
torch.set_num_threads(1)

from md_probe.cli import main

SCENE = Path(__file__).resolve().parent.parent / "examples" / "shapes_scene.png"
OUTPUTS = {"scene.json", "scene_labels.png", "scene_overlay.png"}
CUDA = torch.cuda.is_available()

# Each option: values the shapes model takes, and values it must refuse (None: the option is left out).
TIMESTEPS = {None: True, "0": True, "50": True, "999": True, "1000": False, "5000": False, "-1": False, "2.5": False}
CLASSES = {None: None, "circle,square,background": True, "circle, square": True, "circle": False, "circle,,square": False,
           ",".join(f"c{i}" for i in range(256)): False, "circle and square,background": False,
           "supercalifragilistic,background": False, "circle,🐱": False}
SEGMENTS = {None: None, "2": True, "eigengap": True, "255": True, "256": False, "0": False, "-3": False}
SIZES = {None: True, "32": True, "8": True, "0": False, "33": False, "-4": False}
DTYPES = {None: True, "fp32": True, "bf16": True, "fp64": False}
DEVICES = {None: True, "cpu": True, "cuda": CUDA, "banana": False}
FOLDERS = {"missing": True, "empty": True, "other file": True, "previous run": True, "summary taken by a folder": False,
           "is a file": False}


def make_out(root:Path, state:str)->Path:
    "The --out folder in one of the states of FOLDERS."
    out = root / "o"
    if state == "is a file": out.write_text("a file, not a folder")
    elif state != "missing": out.mkdir()
    if state == "other file": (out / "mine.txt").write_text("kept")
    if state == "previous run":
        for n in OUTPUTS: (out / n).write_text("old")
    if state == "summary taken by a folder": (out / "scene.json").mkdir()
    return out

def tree(root:Path)->dict:
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}

def expected_ok(t, classes, k, size, dtype, device, folder)->bool:
    "Written from the rules, not from the code: exactly one of --classes / --unsupervised, each value in its range."
    named, unnamed = classes is not None, k is not None
    return (named != unnamed and (CLASSES[classes] if named else SEGMENTS[k]) and TIMESTEPS[t] and SIZES[size]
            and DTYPES[dtype] and DEVICES[device] and FOLDERS[folder])


def mostly_good(table:dict):
    "A value of `table`, a good one 7 times in 8: so that runs which should succeed are drawn often too."
    good, bad = [v for v, ok in table.items() if ok], [v for v, ok in table.items() if ok is False]
    return st.sampled_from([True] * 7 + [False]).flatmap(lambda g: st.sampled_from(good if g else bad))

@st.composite
def methods(draw):
    "(--classes, --unsupervised): one of the two mostly, sometimes both or neither."
    mode = draw(st.sampled_from(["named"] * 9 + ["unnamed"] * 9 + ["both", "neither"]))
    classes = draw(mostly_good(CLASSES)) if mode in ("named", "both") else None
    k = draw(mostly_good(SEGMENTS)) if mode in ("unnamed", "both") else None
    return classes, k

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mostly_good(TIMESTEPS), methods(), mostly_good(SIZES), mostly_good(DTYPES), mostly_good(DEVICES), mostly_good(FOLDERS))
@example(None, ("circle,square,background", None), None, None, None, "missing")
@example("999", (None, "255"), "8", "bf16", "cpu", "previous run")
@example("1000", ("circle,square,background", None), None, None, None, "missing")
def test_segment_runs_whole_or_refuses_cleanly(t, method, size, dtype, device, folder):
    classes, k = method
    root = Path(tempfile.mkdtemp())
    try:
        shutil.copy(SCENE, root / "scene.png")
        out = make_out(root, folder)
        argv = ["segment", str(root / "scene.png"), "--out", str(out), "--quiet"]
        for flag, v in (("--timestep", t), ("--classes", classes), ("--unsupervised", k), ("--image-size", size),
                        ("--dtype", dtype), ("--device", device)):
            if v is not None: argv += [flag, v]
        before, err = tree(root), io.StringIO()
        with contextlib.redirect_stderr(err): code = main(argv)
        ok = expected_ok(t, classes, k, size, dtype, device, folder)
        assert code == (0 if ok else 2), (argv, err.getvalue())
        if ok:
            kept = {n: v for n, v in before.items() if n.startswith("o/") and Path(n).name not in OUTPUTS}
            after = tree(root)
            assert {Path(n).name for n in after if n.startswith("o/")} == OUTPUTS | {Path(n).name for n in kept}
            assert all(after[n] == v for n, v in kept.items()) and all(after[f"o/{n}"] != b"old" for n in OUTPUTS)
        else:
            lines = err.getvalue().strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("md-probe segment: error: "), lines
            assert tree(root) == before
    finally:
        shutil.rmtree(root, ignore_errors=True)
