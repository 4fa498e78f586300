"""Every image the CLI or the API accepts is decoded to what a viewer shows, or refused with the fix (issue 17).

Real files are written in tmp_path; expected pixels come from the definitions (EXIF orientation 6, 16-bit and float
scaling, alpha compositing over white, CMYK), not from the code under test.
"""
import json, os, subprocess, sys, warnings
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image
from md_probe import models

ROOT = Path(__file__).resolve().parent.parent
SCENE = ROOT / "examples" / "shapes_scene.png"
CLASSES = "circle,square,background"

def _u8_from_16(a):
    "round(a * 255 / 65535) with integers only: the 16-bit value scaled to 8 bits, halves rounded up."
    return ((a.astype(np.int64) * 255 * 2 + 65535) // (2 * 65535)).astype(np.uint8)

def _over(c, a, bg=255):
    "Colour `c` at alpha `a` (0..255) over the background colour `bg`: c a + bg (1 - a), rounded."
    return int(np.floor(c * a / 255 + bg * (255 - a) / 255 + 0.5))

def _exif_jpeg(path, stored, orientation=6):
    exif = Image.Exif(); exif[0x0112] = orientation
    Image.fromarray(stored).save(path, exif=exif, quality=95, subsampling=0)

def _shown_for_orientation_6(stored):
    "EXIF orientation 6: row 0 of the stored pixels is the right-hand column of what a viewer shows (turn 90 degrees clockwise)."
    H, W = stored.shape[:2]
    shown = np.empty((W, H) + stored.shape[2:], stored.dtype)
    for r in range(W):
        for c in range(H): shown[r, c] = stored[H - 1 - c, r]
    return shown

# ---------------------------------------------------------------- files: 16-bit, float, EXIF, palette, LA, CMYK, 1-bit

def test_16bit_png_scaled_from_its_range(tmp_path):
    a = np.array([[0, 1, 128, 129, 257, 32767], [32768, 40000, 65278, 65407, 65534, 65535]], np.uint16)
    a = np.kron(a, np.ones((2, 2), np.uint16))
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    got = models.load_image(tmp_path / "g16.png")
    assert got.dtype == np.uint8 and got.shape == a.shape + (3,)
    for ch in range(3): np.testing.assert_array_equal(got[..., ch], _u8_from_16(a))
    # the API reads the PIL image the same way, and a uint16 array by its range (/ 65535)
    np.testing.assert_allclose(models.image_to_tensor(Image.open(tmp_path / "g16.png"))[0].numpy(), _u8_from_16(a) / 255, atol=1e-7)
    np.testing.assert_allclose(models.image_to_tensor(a)[1].numpy(), a / 65535, atol=1e-7)

def test_float_tiff_kept_in_unit_range_and_refused_outside(tmp_path):
    f = np.linspace(0, 1, 128, dtype=np.float32).reshape(8, 16)
    Image.fromarray(f).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    got = models.load_image(tmp_path / "f.tif")
    np.testing.assert_array_equal(got[..., 2], np.floor(f.astype(np.float64) * 255 + 0.5).astype(np.uint8))
    Image.fromarray(f * 255).save(tmp_path / "f255.tif")
    with pytest.raises(ValueError) as e: models.load_image(tmp_path / "f255.tif")
    assert str(e.value) == ("Float pixels must be in [0, 1], but these span [0, 255]: if they are 0..255 values, "
                            "divide by 255 (or pass uint8); if they only overshoot, clip with x.clip(0, 1).")

def test_int32_tiff_refused(tmp_path):
    Image.fromarray(np.array([[0, 70000]], np.int32)).save(tmp_path / "i.tif")
    with pytest.raises(ValueError, match=r"^The image has 32-bit integer pixels \(mode 'I'\), whose white level is unknown: "):
        models.load_image(tmp_path / "i.tif")

def test_exif_orientation_applied(tmp_path):
    colours = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]],
                        [[255, 255, 0], [0, 0, 0], [255, 255, 255]]], np.uint8)  # no symmetry
    stored = np.kron(colours, np.ones((16, 16, 1), np.uint8))  # 32 rows, 48 columns
    _exif_jpeg(tmp_path / "phone.jpg", stored)
    got = models.load_image(tmp_path / "phone.jpg")
    assert got.shape == (48, 32, 3)
    want = _shown_for_orientation_6(stored)
    assert (want[:16, 16:] == [255, 0, 0]).all()  # the stored top-left block is shown top-right
    for r in range(0, 48, 16):
        for c in range(0, 32, 16):  # block interiors: JPEG noise only
            np.testing.assert_allclose(got[r + 4:r + 12, c + 4:c + 12].mean((0, 1)), want[r + 8, c + 8], atol=8)
    assert models.image_to_tensor(Image.open(tmp_path / "phone.jpg")).shape == (3, 48, 32)
    assert models.load_image(tmp_path / "phone.jpg", exif=False).shape == (32, 48, 3)

def test_palette_with_transparency_composited_over_white(tmp_path):
    im = Image.fromarray(np.array([[0, 1, 2, 3]], np.uint8))
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30])  # 'L' -> 'P': the values become palette indices
    im.save(tmp_path / "p.png", transparency=bytes([255, 0, 128, 255]))
    assert Image.open(tmp_path / "p.png").mode == "P"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns when such an image is converted straight to RGB
        got = models.load_image(tmp_path / "p.png")
        black = models.load_image(tmp_path / "p.png", background=(0, 0, 0))
    np.testing.assert_array_equal(got[0], [[255, 0, 0], [255, 255, 255], [_over(0, 128), _over(0, 128), _over(255, 128)], [10, 20, 30]])
    np.testing.assert_array_equal(black[0], [[255, 0, 0], [0, 0, 0], [0, 0, _over(255, 128, bg=0)], [10, 20, 30]])
    # one transparent palette index (GIF-style)
    im.save(tmp_path / "p1.png", transparency=3)
    np.testing.assert_array_equal(models.load_image(tmp_path / "p1.png")[0, 3], [255, 255, 255])

def test_la_and_rgba_composited(tmp_path):
    la = np.array([[[100, 0], [100, 64], [100, 255]]], np.uint8)
    Image.fromarray(la).save(tmp_path / "la.png")
    assert Image.open(tmp_path / "la.png").mode == "LA"
    got = models.load_image(tmp_path / "la.png")
    np.testing.assert_array_equal(got[0, :, 0], [255, _over(100, 64), 100])
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()
    rgba = Image.new("RGBA", (1, 1), (200, 40, 0, 200))
    np.testing.assert_array_equal(models.load_image(rgba)[0, 0], [_over(200, 200), _over(40, 200), _over(0, 200)])
    # an RGB PNG with a transparent colour key
    Image.fromarray(np.array([[[1, 2, 3], [4, 5, 6]]], np.uint8)).save(tmp_path / "key.png", transparency=(1, 2, 3))
    np.testing.assert_array_equal(models.load_image(tmp_path / "key.png")[0], [[255, 255, 255], [4, 5, 6]])

def test_cmyk_jpeg(tmp_path):
    inks = [(255, 0, 0, 0), (0, 0, 0, 0), (0, 128, 0, 0), (0, 0, 0, 255), (60, 0, 200, 30), (0, 255, 255, 0)]
    img = Image.new("CMYK", (32 * len(inks), 32))
    for i, ink in enumerate(inks): img.paste(ink, (32 * i, 0, 32 * i + 32, 32))
    img.save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    got = models.load_image(tmp_path / "c.jpg")
    assert got.shape == (32, 32 * len(inks), 3)
    for i, (c, m, y, k) in enumerate(inks):
        want = [255 * (1 - v / 255) * (1 - k / 255) for v in (c, m, y)]
        np.testing.assert_allclose(got[8:24, 32 * i + 8:32 * i + 24].mean((0, 1)), want, atol=4)

def test_1bit_png(tmp_path):
    bits = np.array([[1, 0, 1], [0, 1, 1]], bool)
    Image.fromarray(bits).save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    got = models.load_image(tmp_path / "b.png")
    for ch in range(3): np.testing.assert_array_equal(got[..., ch], bits * 255)

# ---------------------------------------------------------------- arrays: float ranges, read-only, shapes

def test_float_array_up_to_255_refused_not_clamped():
    scene = np.asarray(Image.open(SCENE))
    with pytest.raises(ValueError) as e: models.image_to_tensor(scene.astype(np.float32))
    assert str(e.value) == ("Float pixels must be in [0, 1], but these span [0, 255]: if they are 0..255 values, "
                            "divide by 255 (or pass uint8); if they only overshoot, clip with x.clip(0, 1).")
    np.testing.assert_allclose(models.image_to_tensor(scene.astype(np.float32) / 255), models.image_to_tensor(scene), atol=1e-7)
    with pytest.raises(ValueError, match=r"span \[-1, 1\]: if they are in \[-1, 1\], map them with \(x \+ 1\) / 2"):
        models.image_to_tensor(torch.linspace(-1, 1, 12).reshape(3, 2, 2))
    with pytest.raises(ValueError, match=r"span \[-0.5, 2\]: rescale them to \[0, 1\]"):
        models.image_to_tensor(torch.linspace(-0.5, 2, 12).reshape(3, 2, 2))
    with pytest.raises(ValueError, match="NaN or infinite"): models.image_to_tensor(np.full((2, 2, 3), np.nan, np.float32))

def test_float_array_refused_by_segmentation_api():
    from md_probe.segment import MaskDiffusion
    scene = np.asarray(Image.open(SCENE)).astype(np.float32)
    with pytest.raises(ValueError, match="divide by 255"): MaskDiffusion(models.load_model("shapes"))(scene, CLASSES.split(","))

def test_read_only_array_and_pil_image_give_no_warning():
    with Image.open(SCENE) as im:
        a = np.asarray(im)
        assert not a.flags.writeable
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            x, y = models.image_to_tensor(a), models.image_to_tensor(im)
    torch.testing.assert_close(x, y)
    torch.testing.assert_close(x, torch.from_numpy(np.array(a)).permute(2, 0, 1).float() / 255)

def test_array_shapes():
    np.testing.assert_array_equal(models.image_to_tensor(np.array([[0, 255]], np.uint8)).numpy(), [[[0, 1]]] * 3)  # 2-D: grey
    assert models.image_to_tensor(np.zeros((3, 5, 3), np.uint8)).shape == (3, 3, 5)  # a 3-row array is (H, W, 3)
    with pytest.raises(ValueError, match="4 channels, not RGB: if it is RGBA"): models.image_to_tensor(np.zeros((2, 2, 4), np.uint8))
    with pytest.raises(TypeError, match="white level is unknown"): models.image_to_tensor(np.zeros((2, 2, 3), np.int32))

# ---------------------------------------------------------------- the CLI (a subprocess, as a user runs it)

def _cli(*args, warn_error=False, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable] + (["-W", "error::UserWarning"] if warn_error else []) + ["-m", "md_probe.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)

def _labels(path): return np.asarray(Image.open(path))

def test_cli_16bit_and_exif_segment_like_their_twins(tmp_path):
    scene = np.asarray(Image.open(SCENE))[:, 16:112]  # 128 rows, 96 columns: not square
    grey = np.asarray(Image.fromarray(scene).convert("L"))
    Image.fromarray(grey).save(tmp_path / "grey8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    _exif_jpeg(tmp_path / "sideways.jpg", np.ascontiguousarray(np.rot90(scene)))  # stored turned left; EXIF says turn right
    raw = np.asarray(Image.open(tmp_path / "sideways.jpg"))  # the stored (decoded) pixels, no EXIF
    Image.fromarray(_shown_for_orientation_6(raw)).save(tmp_path / "upright.png")
    out = tmp_path / "out"
    r = _cli("segment", *(tmp_path / f for f in ("grey8.png", "grey16.png", "upright.png", "sideways.jpg")),
             "--classes", CLASSES, "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert _labels(out / "grey16_labels.png").shape == (128, 96)
    np.testing.assert_array_equal(_labels(out / "grey16_labels.png"), _labels(out / "grey8_labels.png"))
    assert _labels(out / "sideways_labels.png").shape == (128, 96)
    np.testing.assert_array_equal(_labels(out / "sideways_labels.png"), _labels(out / "upright_labels.png"))
    shares = {s: json.loads((out / f"{s}.json").read_text())["shares"] for s in ("grey8", "grey16", "upright", "sideways")}
    assert shares["grey16"] == shares["grey8"] and shares["sideways"] == shares["upright"]

@pytest.mark.parametrize("name,data,message", [
    ("f255.tif", np.full((8, 8), 200.0, np.float32), "divide by 255"),
    ("i32.tif", np.full((8, 8), 70000, np.int32), "whose white level is unknown"),
])
def test_cli_bad_image_exits_2_writes_nothing(tmp_path, name, data, message):
    Image.fromarray(data).save(tmp_path / name)
    Image.open(SCENE).save(tmp_path / "good.png")
    out = tmp_path / "out"
    r = _cli("segment", tmp_path / "good.png", tmp_path / name, "--classes", CLASSES, "--out", out)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"md-probe segment: error: cannot read image {tmp_path / name}: "), r.stderr
    assert message in lines[0]
    assert not out.exists()

def test_readme_main_command_no_warning(tmp_path):
    (tmp_path / "examples").mkdir(); (tmp_path / "examples" / "shapes_scene.png").write_bytes(SCENE.read_bytes())
    r = _cli("segment", "examples/shapes_scene.png", "--classes", CLASSES, "--out", "outputs", warn_error=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stderr, r.stderr
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == [
        "shapes_scene.json", "shapes_scene_labels.png", "shapes_scene_overlay.png"]
