"`md-probe` writes each image's outputs whole or not at all, never lets two inputs write one file, and counts what exists."
import io, os, sys, json, shutil, signal, subprocess, contextlib
from pathlib import Path
import pytest
import torch
torch.set_num_threads(1)

from md_probe.cli import main, write_together, heatmap_file_names
from md_probe.segment import Segmentation

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
SCENE = ROOT / "examples" / "shapes_scene.png"
C = ["--classes", "circle,square,background"]
OUTS = lambda stem: {f"{stem}.json", f"{stem}_labels.png", f"{stem}_overlay.png"}


def attempt(*argv):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out): code = main([str(a) for a in argv])
    return code, err.getvalue(), out.getvalue()

def names(folder): return {p.name for p in Path(folder).iterdir()}   # hidden temporary files included

def tree(folder:Path)->dict:
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(Path(folder).rglob("*"))}

@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for d in ("a", "b"): Path(d).mkdir(); shutil.copy(SCENE, f"{d}/x.png")
    shutil.copy(SCENE, "scene.png"); shutil.copy(SCENE, "x.jpg")
    return tmp_path


# --- collisions, refused before any work -------------------------------------------------------------------------

def test_same_stem_in_two_folders_is_refused_naming_both(work):
    "OUT-06: three inputs with stem x used to print `wrote 9 files` while 3 existed; now exit 2 naming both paths."
    before = tree(work)
    code, err, _ = attempt("segment", "a/x.png", "b/x.png", "x.jpg", *C, "--out", "o")
    assert code == 2 and err.count("\n") == 1
    assert "a/x.png and b/x.png would both write o/x_labels.png (same name stem 'x')" in err
    assert tree(work) == before and not Path("o").exists()

def test_names_differing_only_in_case_are_refused(work):
    "One output file on a case-insensitive file system (macOS, Windows): refused everywhere."
    shutil.copy(SCENE, "X.png")
    code, err, _ = attempt("segment", "a/x.png", "X.png", *C, "--out", "o")
    assert code == 2 and "would both write" in err and not Path("o").exists()

def test_an_output_may_not_overwrite_an_input(work):
    Path("o").mkdir(); shutil.copy(SCENE, "o/x_overlay.png")
    before = tree(work)
    code, err, _ = attempt("segment", "x.jpg", "o/x_overlay.png", *C, "--out", "o")
    assert code == 2 and "would overwrite an input image" in err and tree(work) == before

@pytest.mark.parametrize("taken", ["scene.json", "scene_labels.png", "scene_overlay.png"])
def test_output_name_taken_by_a_folder_is_refused_up_front(work, taken):
    "OUT-05: a folder at an output's name used to give a traceback and half an image's files; now exit 2, nothing written."
    Path("o", taken).mkdir(parents=True); Path("o", "keep.txt").write_text("mine")
    before = tree(work)
    code, err, _ = attempt("segment", "scene.png", *C, "--out", "o")
    assert code == 2 and f"o/{taken} is a folder" in err and tree(work) == before

def test_probe_cache_over_a_folder_is_refused(work):
    for taken in ("c.safetensors", "c.json"):
        Path(taken).mkdir()
        before = tree(work)
        code, err, _ = attempt("probe", "scene.png", "--layers", "up_blocks.1", "--out", "c")
        assert code == 2 and f"{taken} is a folder" in err and tree(work) == before
        Path(taken).rmdir()


# --- complete output sets, counted -------------------------------------------------------------------------------

def test_two_images_give_exactly_six_files_and_say_so(work):
    Path("o").mkdir(); Path("o/mine.txt").write_text("kept")
    code, err, out = attempt("segment", "a/x.png", "scene.png", *C, "--out", "o", "--quiet")
    assert code == 0 and names("o") == OUTS("x") | OUTS("scene") | {"mine.txt"}
    code, err, out = attempt("segment", "a/x.png", "scene.png", *C, "--out", "o")
    assert code == 0 and out.strip() == "wrote 6 files (2 images) to o"
    info = json.loads(Path("o/x.json").read_text())
    assert info["image"] == "a/x.png" and set(info["shares"]) == {"circle", "square", "background"}


class Boom(Exception): pass

def test_an_error_between_files_leaves_the_image_out_and_earlier_images_whole(work, monkeypatch):
    "An image whose overlay fails to write has none of its files; the image before it is complete; no temporary file stays."
    real, calls = Segmentation.overlay, []
    def second_fails(self, path, *a, **k):
        calls.append(path)
        if len(calls) == 2: raise Boom
        return real(self, path, *a, **k)
    monkeypatch.setattr(Segmentation, "overlay", second_fails)
    with pytest.raises(Boom): attempt("segment", "a/x.png", "scene.png", *C, "--out", "o", "--quiet")
    assert names("o") == OUTS("x")

def test_ctrl_c_between_files_exits_130_with_complete_images_only(work, monkeypatch):
    "OUT-10: Ctrl-C while an image is written: that image's files are removed, the one line says what is complete."
    real, calls = Segmentation.overlay, []
    def interrupted(self, path, *a, **k):
        calls.append(path)
        if len(calls) == 2: raise KeyboardInterrupt
        return real(self, path, *a, **k)
    monkeypatch.setattr(Segmentation, "overlay", interrupted)
    code, err, out = attempt("segment", "a/x.png", "scene.png", *C, "--out", "o", "--quiet")
    assert code == 130 and err.strip().splitlines() == [
        "md-probe segment: interrupted: 1 of 2 images done, 3 files in o (each image's complete); the rest not written"]
    assert names("o") == OUTS("x")

def test_ctrl_c_before_the_first_image_leaves_no_folder(work, monkeypatch):
    def interrupted(self, path, *a, **k): raise KeyboardInterrupt
    monkeypatch.setattr(Segmentation, "to_png", interrupted)
    code, err, _ = attempt("segment", "scene.png", *C, "--out", "new/o", "--quiet")
    assert code == 130 and "0 of 1 images done" in err and not Path("new").exists()

def test_a_name_taken_while_writing_removes_the_files_already_renamed(work, monkeypatch):
    "A folder appearing at the summary's name mid-run: the labels and overlay already renamed are removed again."
    real = Segmentation.to_png
    def sneaky(self, path):
        Path("o/scene.json").mkdir(exist_ok=True)
        return real(self, path)
    monkeypatch.setattr(Segmentation, "to_png", sneaky)
    with pytest.raises(IsADirectoryError): attempt("segment", "scene.png", *C, "--out", "o", "--quiet")
    assert names("o") == {"scene.json"} and Path("o/scene.json").is_dir()


# --- write_together ----------------------------------------------------------------------------------------------

def test_write_together_renames_data_first_sidecar_last(tmp_path, monkeypatch):
    order, real = [], os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (order.append(Path(b).name), real(a, b)))
    with write_together([tmp_path / "x_labels.png", tmp_path / "x_overlay.png", tmp_path / "x.json"]) as tmps:
        for t in tmps: Path(t).write_text("x")
    assert order == ["x_labels.png", "x_overlay.png", "x.json"]

def test_write_together_leaves_nothing_on_error(tmp_path):
    with pytest.raises(Boom):
        with write_together([tmp_path / "a", tmp_path / "b"]) as (a, b):
            Path(a).write_text("x"); Path(b).write_text("y"); raise Boom
    assert names(tmp_path) == set()

def test_write_together_replaces_old_files_whole(tmp_path):
    (tmp_path / "a").write_text("old a"); (tmp_path / "b").write_text("old b")
    with write_together([tmp_path / "a", tmp_path / "b"]) as (a, b): Path(a).write_text("new a"); Path(b).write_text("new b")
    assert [(tmp_path / n).read_text() for n in "ab"] == ["new a", "new b"] and names(tmp_path) == {"a", "b"}

@pytest.fixture
def python_sigint():
    "Python's own Ctrl-C handler, whatever this process inherited: bash starts a background job with SIGINT ignored."
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)

def test_ctrl_c_during_the_renames_is_held_until_the_group_is_whole(tmp_path, monkeypatch, python_sigint):
    "SIGINT arriving between two renames: both files are placed, then KeyboardInterrupt."
    real, n = os.replace, []
    def replace(a, b):
        real(a, b); n.append(b)
        if len(n) == 1: os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with write_together([tmp_path / "a", tmp_path / "b"]) as (a, b): Path(a).write_text("x"); Path(b).write_text("y")
    assert names(tmp_path) == {"a", "b"}


# --- heat-map file names ------------------------------------------------------------------------------------------

def test_heatmap_names_are_safe_and_distinct():
    words = ["circle/square", "circle_square", "..", "../escape", "a\\b", "NUL", "círculo", "🐱", "Circle", "circle", "and"]
    got = heatmap_file_names(words)
    assert got == {"circle/square": "circle_square.png", "circle_square": "circle_square-2.png", "escape": "escape.png",
                   "a\\b": "a_b.png", "nul": "_nul.png", "círculo": "círculo.png", "circle": "circle.png", "and": "and.png"}
    for name in got.values(): assert "/" not in name and "\\" not in name and not name.startswith(".")

def test_probe_heatmaps_from_awkward_words_stay_in_their_folder(work):
    "PRB-11 (`circle/square` gave a traceback after the cache was written), PRB-12: every map inside DIR, named safely."
    code, err, _ = attempt("probe", "scene.png", "--model", "tiny", "--prompt", "circle/square and ../escape a\\b círculo 🐱",
                           "--layers", "up_blocks.1", "--out", "c.safetensors", "--heatmaps", "maps", "--quiet")
    assert code == 0, err
    assert names("maps") == {"circle_square.png", "and.png", "escape.png", "a_b.png", "círculo.png"}
    assert names(".") == {"a", "b", "scene.png", "x.jpg", "c.safetensors", "c.json", "maps"}

def test_probe_cache_and_heatmaps_are_written_as_one(work, monkeypatch):
    "A heat map that fails to draw leaves neither the cache nor any map."
    from md_probe import viz
    def fails(*a, **k): raise Boom
    monkeypatch.setattr(viz, "heatmap_rgb", fails)
    with pytest.raises(Boom):
        attempt("probe", "scene.png", "--prompt", "circle and square", "--out", "c.safetensors", "--heatmaps", "maps", "--quiet")
    assert names(".") == {"a", "b", "scene.png", "x.jpg"}


def test_subprocess_same_stem(work):
    "The collision through the real process: exit 2, one line, no folder."
    r = subprocess.run([sys.executable, "-m", "md_probe.cli", "segment", "a/x.png", "b/x.png", *C, "--out", "o"], cwd=work,
                       env=ENV, capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and not Path("o").exists()
