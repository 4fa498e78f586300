"""Tests of md_probe.data against the published layouts and label encodings.

The fake datasets here are written by this file's own builders, with the folder/file names and raw label values
spelled out literally (not through md_probe.data), so a layout or encoding bug in the library cannot hide behind a
matching bug in its own `make_fake_dataset`; that helper is then checked against the same literal paths."""
import pickle
from pathlib import Path
import numpy as np, pytest, torch
from PIL import Image
from scipy.io import savemat, loadmat
from hypothesis import given, settings, strategies as st, HealthCheck
from md_probe import data as D
from md_probe.data import (load_dataset, make_fake_dataset, DatasetNotFoundError, class_names, read_class_file,
                           resize_crop, resize_label, keep_aspect, cityscapes_to_19, cityscapes_to_27, cocostuff_to_27,
                           potsdam_to_3)

torch.set_num_threads(1)
RNG = np.random.default_rng(0)

# ---------- independent references ----------
# cityscapesScripts labels.py: labelId -> trainId (255 = ignore) for labelIds 0..33
CS_TRAIN_ID = [255] * 7 + [0, 1, 255, 255, 2, 3, 4, 255, 255, 255, 5, 255, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                           255, 255, 16, 17, 18]
CS19 = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
        "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
CS_NAMES = ["unlabeled", "ego vehicle", "rectification border", "out of roi", "static", "dynamic", "ground", "road",
            "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge", "tunnel", "pole",
            "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
            "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle"]
# STEGO src/data.py Coco.fine_to_coarse, fine ids 0..181 in order
STEGO_FINE_TO_COARSE = [
    9, 11, 11, 11, 11, 11, 11, 11, 11, 8, 8, 8, 8, 8, 8, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 6, 6, 6, 6, 6, 6, 6, 6,
    10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 5, 5, 5, 5, 5, 5, 5, 5, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3,
    3, 3, 3, 3, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 4, 4, 4, 4, 4, 4, 4, 4, 17, 17, 22, 20, 20, 22, 15, 25, 16, 13,
    12, 12, 17, 17, 23, 15, 15, 17, 15, 21, 15, 25, 13, 13, 13, 13, 13, 22, 26, 14, 14, 15, 22, 21, 21, 24, 20, 22,
    15, 17, 16, 15, 22, 24, 21, 17, 25, 16, 21, 17, 22, 16, 21, 21, 25, 21, 26, 21, 24, 20, 17, 14, 21, 26, 15, 23,
    20, 21, 24, 15, 24, 22, 25, 15, 20, 17, 17, 22, 14, 18, 18, 18, 18, 18, 18, 18, 26, 26, 19, 19, 24]
# STEGO's label order of the 27 coarse classes (things, then stuff)
COCO27 = ["electronic", "appliance", "food", "furniture", "indoor", "kitchen", "accessory", "animal", "outdoor",
          "person", "sports", "vehicle", "ceiling", "floor", "food-stuff", "furniture-stuff", "raw-material", "textile",
          "wall", "window", "building", "ground", "plant", "sky", "solid", "structural", "water"]
CONTEXT59 = ["aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building",
             "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog",
             "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike",
             "mountain", "mouse", "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves",
             "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall",
             "water", "window", "wood"]
VOC21 = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
         "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]

def ref_lut(pairs, n=256):
    lut = np.full(n, 255, np.int64)
    for k, v in pairs: lut[k] = v
    return lut

# ---------- independent fake-dataset builders (literal published paths) ----------
H, W = 20, 28

def img(seed=0):
    "A smooth random picture (JPEG keeps it close to the original)."
    small = np.random.default_rng(seed).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((W, H), Image.Resampling.BILINEAR))
def png(path, arr, palette=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr)
    if palette is not None: im.putpalette(palette)
    im.save(path)
def jpg(path, arr): path.parent.mkdir(parents=True, exist_ok=True); Image.fromarray(arr).save(path, quality=95)
def lst(path, ids): path.parent.mkdir(parents=True, exist_ok=True); path.write_text("\n".join(ids) + "\n")
def raw_map(values, seed=0): return np.random.default_rng(seed).choice(np.asarray(values, np.uint8), (H, W))

def build(name, root):
    "Write two images of `name` in its published layout; return {stem: raw label array} (stem k uses img(k))."
    raws = {}
    if name == "cocostuff27":
        for k, i in enumerate(["000000000139", "000000000285"]):
            raws[i] = raw_map(list(range(182)) + [255], k)
            jpg(root / "cocostuff/images/val2017" / f"{i}.jpg", img(k))
            png(root / "cocostuff/annotations/val2017" / f"{i}.png", raws[i])
        lst(root / "cocostuff/curated/val2017/Coco164kFull_Stuff_Coarse_7.txt", list(raws))
    elif name == "cityscapes":
        for k, i in enumerate(["frankfurt_000000_000294", "munster_000001_000019"]):
            city = i.split("_")[0]; raws[i] = raw_map(range(34), k)
            png(root / "cityscapes/leftImg8bit/val" / city / f"{i}_leftImg8bit.png", img(k))
            png(root / "cityscapes/gtFine/val" / city / f"{i}_gtFine_labelIds.png", raws[i])
            png(root / "cityscapes/gtFine/val" / city / f"{i}_gtFine_color.png", img(k + 7))  # must be ignored
    elif name == "potsdam3":
        for k, i in enumerate(["12", "7"]):
            raws[i] = raw_map(range(6), k).astype(np.int32)
            (root / "potsdam/imgs").mkdir(parents=True, exist_ok=True); (root / "potsdam/gt").mkdir(exist_ok=True)
            rgbir = np.concatenate([img(k), np.full((H, W, 1), 77, np.uint8)], 2)
            savemat(root / "potsdam/imgs" / f"{i}.mat", {"img": rgbir})
            savemat(root / "potsdam/gt" / f"{i}.mat", {"gt": raws[i]})
        lst(root / "potsdam/labelled_test.txt", list(raws))
    elif name == "voc":
        pal = [v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)]
        for k, i in enumerate(["2007_000033", "2007_000042"]):
            raws[i] = raw_map(list(range(21)) + [255], k)
            jpg(root / "VOCdevkit/VOC2012/JPEGImages" / f"{i}.jpg", img(k))
            png(root / "VOCdevkit/VOC2012/SegmentationClass" / f"{i}.png", raws[i], palette=pal)
        lst(root / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt", list(raws))
    elif name == "context59":
        for k, i in enumerate(["2008_000002", "2008_000008"]):
            raws[i] = raw_map(range(60), k)
            jpg(root / "VOCdevkit/VOC2010/JPEGImages" / f"{i}.jpg", img(k))
            png(root / "VOCdevkit/VOC2010/SegmentationClassContext" / f"{i}.png", raws[i])
        lst(root / "VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt", list(raws))
    elif name == "ade20k":
        for k, i in enumerate(["ADE_val_00000001", "ADE_val_00000002"]):
            raws[i] = raw_map(range(151), k)
            jpg(root / "ADEChallengeData2016/images/validation" / f"{i}.jpg", img(k))
            png(root / "ADEChallengeData2016/annotations/validation" / f"{i}.png", raws[i])
    return raws

EXPECTED = {  # raw -> class lookup tables, written from the published definitions
    "cocostuff27": ref_lut(enumerate(STEGO_FINE_TO_COARSE)),
    "cityscapes": ref_lut(enumerate(CS_TRAIN_ID)),
    "cityscapes27": ref_lut((i, i - 7) for i in range(7, 34)),
    "cityscapes_ov": ref_lut(enumerate(CS_TRAIN_ID)),
    "potsdam3": ref_lut([(0, 0), (4, 0), (1, 1), (5, 1), (2, 2), (3, 2)]),
    "voc": ref_lut([(i, i) for i in range(21)]),
    "context59": ref_lut((i, i - 1) for i in range(1, 60)),
    "ade20k": ref_lut((i, i - 1) for i in range(1, 151)),
}
NUM = {"cocostuff27": 27, "cityscapes": 19, "cityscapes27": 27, "cityscapes_ov": 19, "potsdam3": 3, "voc": 21,
       "context59": 59, "ade20k": 150}
BUILD = {"cityscapes27": "cityscapes", "cityscapes_ov": "cityscapes"}

# ---------- readers on the independent fakes ----------
@pytest.mark.parametrize("name", list(EXPECTED))
def test_reader_reads_published_layout(tmp_path, name):
    raws = build(BUILD.get(name, name), tmp_path)
    ds = load_dataset(name, tmp_path)
    assert len(ds) == 2 and ds.name == name and ds.num_classes == NUM[name] == len(ds.classes) == len(ds.label_names)
    assert sorted(ds.names) == sorted(raws)
    for i in range(len(ds)):
        image, mask, stem = ds[i]
        assert image.dtype == np.uint8 and image.shape == (H, W, 3)
        assert mask.dtype == np.int64 and mask.shape == (H, W)
        np.testing.assert_array_equal(mask, EXPECTED[name][raws[stem]])
        k = list(raws).index(stem)  # the builder drew stem number k with img(k): same picture, same orientation
        assert np.abs(image.astype(int) - img(k)).mean() < 3, stem
        assert set(np.unique(mask)) <= set(range(NUM[name])) | {255}


def test_potsdam_drops_infrared_and_keeps_rgb(tmp_path):
    build("potsdam3", tmp_path)
    image, _, stem = load_dataset("potsdam3", tmp_path)[0]
    np.testing.assert_array_equal(image, loadmat(tmp_path / "potsdam/imgs" / f"{stem}.mat")["img"][..., :3])


def test_voc_palette_indices_not_colours(tmp_path):
    raws = build("voc", tmp_path)
    assert Image.open(tmp_path / "VOCdevkit/VOC2012/SegmentationClass/2007_000033.png").mode == "P"
    _, mask, stem = load_dataset("voc", tmp_path)[0]
    np.testing.assert_array_equal(mask, raws[stem])  # VOC stores class ids; 255 boundaries stay 255


def test_potsdam_unlabelled_split_is_all_ignore(tmp_path):
    make_fake_dataset("potsdam3", tmp_path, n=2, split="unlabelled_train")
    assert not list((tmp_path / "potsdam/gt").glob("*.mat"))
    ds = load_dataset("potsdam3", tmp_path, split="unlabelled_train")
    assert (ds[0][1] == 255).all() and ds[0][0].shape == (24, 32, 3)


# ---------- label mappings ----------
def test_cityscapes_mappings():
    ids = np.arange(256)
    np.testing.assert_array_equal(cityscapes_to_19(ids), EXPECTED["cityscapes"])
    np.testing.assert_array_equal(cityscapes_to_27(ids), EXPECTED["cityscapes27"])
    assert [CS_NAMES[i] for i in range(34) if CS_TRAIN_ID[i] != 255] == CS19 == class_names("cityscapes")
    assert class_names("cityscapes27", which="label") == CS_NAMES[7:34]


def test_cocostuff_mapping_equals_stego():
    np.testing.assert_array_equal(cocostuff_to_27(np.arange(182)), STEGO_FINE_TO_COARSE)
    assert cocostuff_to_27(np.array([255]))[0] == 255
    assert class_names("cocostuff27", which="label") == COCO27
    rows = D.label_table("cocostuff27_fine_to_coarse")
    assert [r["coarse_name"] for r in rows] == [COCO27[c] for c in STEGO_FINE_TO_COARSE]
    assert rows[123]["fine_name"] == "grass" and rows[0]["fine_name"] == "person" and rows[181]["fine_name"] == "wood"


def test_potsdam_and_shift_mappings():
    np.testing.assert_array_equal(potsdam_to_3(np.arange(256)), EXPECTED["potsdam3"])
    np.testing.assert_array_equal(D.apply_lut(np.arange(-3, 300), D.reduce_zero_lut(59)),
                                  [255] * 4 + list(range(59)) + [255] * (303 - 63))
    np.testing.assert_array_equal(D.apply_lut(np.array([[0, 150], [151, 255]], np.uint8), D.reduce_zero_lut(150)),
                                  [[255, 149], [255, 255]])


# ---------- class-name files ----------
def test_shipped_class_files():
    assert class_names("context59", which="label") == CONTEXT59
    assert class_names("voc", which="label") == VOC21
    for name, n in NUM.items():
        prompts, labels = class_names(name), class_names(name, which="label")
        assert len(prompts) == len(set(prompts)) == len(labels) == n
        assert not any("and" in p.lower().split() for p in prompts), name
    assert class_names("potsdam3", which="label") == ["roads and cars", "buildings and clutter", "trees and vegetation"]
    ade = class_names("ade20k")
    assert ade[:3] == ["wall", "building", "sky"] and ade[7] == "bed" and ade[-1] == "flag"
    # setup.py ships assets/* and assets/*/*: every class file sits exactly one level below assets/
    for p in D.classes_dir().iterdir(): assert p.relative_to(D.classes_dir().parent).parts[0] == "classes"


def test_class_file_errors(tmp_path):
    (tmp_path / "a.txt").write_text("# c\nroads and cars | x\n")
    with pytest.raises(ValueError, match="joiner word 'and'"): read_class_file(tmp_path / "a.txt")
    (tmp_path / "b.txt").write_text("sky\n\nsky\n")
    with pytest.raises(ValueError, match="duplicate"): read_class_file(tmp_path / "b.txt")
    (tmp_path / "c.txt").write_text(" | published\n")
    with pytest.raises(ValueError, match="empty class name"): read_class_file(tmp_path / "c.txt")


def test_classes_override(tmp_path):
    build("potsdam3", tmp_path)
    (tmp_path / "mine.txt").write_text("road | R\nhouse | B\ntree | T\n")
    ds = load_dataset("potsdam3", tmp_path, classes=tmp_path / "mine.txt")
    assert ds.classes == ["road", "house", "tree"] and ds.label_names == ["R", "B", "T"]
    with pytest.raises(ValueError, match="3 classes but 2 names"): load_dataset("potsdam3", tmp_path, classes=["a", "b"])


# ---------- transforms ----------
SET = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

@SET
@given(h=st.integers(1, 40), w=st.integers(1, 40), size=st.integers(1, 48), seed=st.integers(0, 2**31 - 1))
def test_resize_crop_nearest_masks(h, w, size, seed):
    rng = np.random.default_rng(seed)
    values = rng.choice([0, 3, 7, 26, 255], rng.integers(1, 5), replace=False)
    mask = rng.choice(values, (h, w)).astype(np.int64)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    out, m = resize_crop(image, mask, size=size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    assert m.shape == (size, size) and m.dtype == np.int64
    assert set(np.unique(m)) <= set(values.tolist())  # nearest neighbour: no new labels


def test_resize_crop_centre_and_short_side():
    mask = np.tile(np.arange(40), (20, 1))           # 20 x 40: columns numbered
    image = np.zeros((20, 40, 3), np.uint8); image[:, 10:30] = 200
    out, m = resize_crop(image, mask, size=10)      # short side 20 -> 10, width 40 -> 20, crop columns 5..14
    np.testing.assert_array_equal(m[0], np.arange(11, 31, 2))  # centre sampling: (j + 0.5) * 2
    assert (out[:, 1:-1] > 150).all()               # the crop keeps the bright centre band only
    tall = np.tile(np.arange(30)[:, None], (1, 10))  # 30 x 10: rows numbered
    _, mt = resize_crop(np.zeros((30, 10, 3), np.uint8), tall, size=10)
    np.testing.assert_array_equal(mt[:, 0], np.arange(10, 20))
    same, ms = resize_crop(image[:, :20], mask[:, :20], size=20)  # already square at size: unchanged
    np.testing.assert_array_equal(ms, mask[:, :20]); np.testing.assert_array_equal(same, image[:, :20])


def test_resize_crop_image_is_antialiased():
    image = np.zeros((64, 64, 3), np.uint8); image[:, ::2] = 255  # 1-pixel stripes
    out, _ = resize_crop(image, None, size=8)
    assert np.abs(out.astype(int) - 127).max() < 20  # averaged to grey, not aliased to black/white


def test_transform_argument(tmp_path):
    build("cityscapes", tmp_path)
    assert load_dataset("cityscapes27", tmp_path, transform="protocol")[0][0].shape == (512, 512, 3)
    assert load_dataset("cityscapes", tmp_path, transform="protocol")[0][0].shape == (H, W, 3)  # 19-class: keep
    assert load_dataset("cityscapes", tmp_path, transform=16)[0][1].shape == (16, 16)
    image, mask, _ = load_dataset("cityscapes", tmp_path, transform=keep_aspect)[0]
    assert image.shape == (H, W, 3)
    with pytest.raises(ValueError, match="unknown transform"): load_dataset("cityscapes", tmp_path, transform="crop")


# ---------- Cityscapes as the MaskDiffusion authors score it ----------
# Valkyrja3607/MaskDiffusion scripts/run.py: the prompt names, and convert27to19 applied to labelId - 7
MD_CITYSCAPES_PROMPTS = ["road", "sidewalk", "building", "wall", "fence", "pole", "light", "sign", "vegetation", "terrain",
                         "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
MD_CONVERT27TO19 = [0, 1, -1, -1, 2, 3, 4, -1, -1, -1, 5, -1, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, -1, -1, 16, 17, 18, -1]

def md_authors_target(raw_label_ids):
    """scripts/utils.py CityscapesSeg: Resize((256, 352), Image.NEAREST) on the labelIds PIL image (torchvision runs
    PIL's resize), minus first_nonvoid 7, < 0 or >= 27 -> -1; then run.py's convert27to19 (index -1 is its last, -1)."""
    small = np.array(Image.fromarray(raw_label_ids).resize((352, 256), Image.NEAREST)).astype(np.int64) - 7
    small[(small < 0) | (small >= 27)] = -1
    out = np.asarray(MD_CONVERT27TO19)[small]
    return np.where(out < 0, 255, out)

def test_cityscapes_ov_is_the_authors_protocol(tmp_path):
    raws = build("cityscapes", tmp_path)
    ds = load_dataset("cityscapes_ov", tmp_path, transform="protocol")
    assert ds.classes == MD_CITYSCAPES_PROMPTS and ds.label_names == CS19 and ds.num_classes == 19
    for i in range(len(ds)):
        image, mask, stem = ds[i]
        assert image.shape == (H, W, 3)                                  # the image as stored
        np.testing.assert_array_equal(image, load_dataset("cityscapes", tmp_path)[ds.names.index(stem)][0])
        assert mask.shape == (256, 352) and mask.dtype == np.int64
        np.testing.assert_array_equal(mask, md_authors_target(raws[stem]))
    # keep (the default): the 19-class mask as stored, like `cityscapes`
    np.testing.assert_array_equal(load_dataset("cityscapes_ov", tmp_path)[0][1], load_dataset("cityscapes", tmp_path)[0][1])


def test_resize_label_is_pils_nearest_at_cityscapes_size():
    """At 2048 -> 352 columns, centre sampling computed as (j + 0.5) * w / n and PIL's (j + 0.5) * (w / n) round apart
    at some columns: the protocol must pick PIL's (what the authors' torchvision transform runs)."""
    ids = (np.arange(2048) % 251).astype(np.uint8)[None].repeat(4, 0)   # every column its own value (mod 251)
    image = np.zeros((4, 2048, 3), np.uint8)
    out_image, m = resize_label(image, ids, size=(2, 352))
    assert out_image is image or np.shares_memory(out_image, image)
    np.testing.assert_array_equal(m, np.array(Image.fromarray(ids).resize((352, 2), Image.NEAREST)))
    assert m.dtype == np.int64 and resize_label(image, None)[1] is None
    big = np.full((4, 8), 300, np.int64)                                # any integer label survives (not only uint8)
    assert (resize_label(np.zeros((4, 8, 3), np.uint8), big, size=(2, 2))[1] == 300).all()


# ---------- errors ----------
@pytest.mark.parametrize("name,layout_line,url", [
    ("cocostuff27", "curated/", "cocostuff.zip"),
    ("cityscapes", "gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png", "cityscapes-dataset.com"),
    ("potsdam3", "labelled_test.txt", "potsdam.zip"),
    ("voc", "SegmentationClass/<id>.png", "VOCtrainval_11-May-2012.tar"),
    ("context59", "SegmentationClassContext/<id>.png", "trainval_merged.json"),
    ("ade20k", "annotations/{training,validation}/", "ADEChallengeData2016.zip")])
def test_missing_dataset_one_clear_error(tmp_path, name, layout_line, url):
    with pytest.raises(DatasetNotFoundError) as e: load_dataset(name, tmp_path / "empty")
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError) and layout_line in msg and url in msg and "ROOT/" in msg


def test_coco_without_curated_list(tmp_path):
    build("cocostuff27", tmp_path)
    (tmp_path / "cocostuff/curated/val2017/Coco164kFull_Stuff_Coarse_7.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="Coco164kFull_Stuff_Coarse_7.txt.*full=True"):
        load_dataset("cocostuff27", tmp_path)
    jpg(tmp_path / "cocostuff/images/val2017/000000999999.jpg", img(5))
    png(tmp_path / "cocostuff/annotations/val2017/000000999999.png", raw_map([1, 255]))
    full = load_dataset("cocostuff27_full", tmp_path)
    assert full.names == ["000000000139", "000000000285", "000000999999"] and full.name == "cocostuff27_full"
    assert load_dataset("cocostuff27", tmp_path, full=True).names == full.names


def test_malformed_folders(tmp_path):
    build("voc", tmp_path)
    (tmp_path / "VOCdevkit/VOC2012/SegmentationClass/2007_000042.png").unlink()
    with pytest.raises(DatasetNotFoundError, match="1 listed file"): load_dataset("voc", tmp_path)
    lst(tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt", [])
    with pytest.raises(DatasetNotFoundError, match="lists no images"): load_dataset("voc", tmp_path)
    build("cityscapes", tmp_path)
    png(tmp_path / "cityscapes/gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png", img(3))
    ds = load_dataset("cityscapes", tmp_path)
    with pytest.raises(ValueError, match="colour visualisation"): ds[ds.names.index("frankfurt_000000_000294")]
    with pytest.raises(ValueError, match="unknown dataset 'cityscape'.*did you mean"): load_dataset("cityscape", tmp_path)
    with pytest.raises(ValueError, match="no split 'test'"): load_dataset("ade20k", tmp_path, split="test")
    with pytest.raises(IndexError): ds[len(ds)]


def test_root_from_environment_and_inside_layout(tmp_path, monkeypatch):
    build("ade20k", tmp_path)
    monkeypatch.setenv("MD_PROBE_DATA", str(tmp_path))
    assert len(load_dataset("ade20k")) == 2
    assert load_dataset("ade20k", tmp_path / "ADEChallengeData2016").dir == tmp_path / "ADEChallengeData2016"


# ---------- make_fake_dataset writes the published paths ----------
FAKE_PATHS = {
    "cocostuff27": ["cocostuff/annotations/val2017/000000000139.png", "cocostuff/annotations/val2017/000000000140.png",
                    "cocostuff/curated/val2017/Coco164kFull_Stuff_Coarse_7.txt",
                    "cocostuff/images/val2017/000000000139.jpg", "cocostuff/images/val2017/000000000140.jpg"],
    "cityscapes_ov": ["cityscapes/gtFine/val/frankfurt/frankfurt_000000_000000_gtFine_labelIds.png",
                      "cityscapes/gtFine/val/frankfurt/frankfurt_000000_000001_gtFine_labelIds.png",
                      "cityscapes/leftImg8bit/val/frankfurt/frankfurt_000000_000000_leftImg8bit.png",
                      "cityscapes/leftImg8bit/val/frankfurt/frankfurt_000000_000001_leftImg8bit.png"],
    "cityscapes": ["cityscapes/gtFine/val/frankfurt/frankfurt_000000_000000_gtFine_labelIds.png",
                   "cityscapes/gtFine/val/frankfurt/frankfurt_000000_000001_gtFine_labelIds.png",
                   "cityscapes/leftImg8bit/val/frankfurt/frankfurt_000000_000000_leftImg8bit.png",
                   "cityscapes/leftImg8bit/val/frankfurt/frankfurt_000000_000001_leftImg8bit.png"],
    "potsdam3": ["potsdam/gt/0.mat", "potsdam/gt/1.mat", "potsdam/imgs/0.mat", "potsdam/imgs/1.mat",
                 "potsdam/labelled_test.txt"],
    "voc": ["VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt", "VOCdevkit/VOC2012/JPEGImages/2007_000000.jpg",
            "VOCdevkit/VOC2012/JPEGImages/2007_000001.jpg", "VOCdevkit/VOC2012/SegmentationClass/2007_000000.png",
            "VOCdevkit/VOC2012/SegmentationClass/2007_000001.png"],
    "context59": ["VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt",
                  "VOCdevkit/VOC2010/JPEGImages/2008_000000.jpg", "VOCdevkit/VOC2010/JPEGImages/2008_000001.jpg",
                  "VOCdevkit/VOC2010/SegmentationClassContext/2008_000000.png",
                  "VOCdevkit/VOC2010/SegmentationClassContext/2008_000001.png"],
    "ade20k": ["ADEChallengeData2016/annotations/validation/ADE_val_00000001.png",
               "ADEChallengeData2016/annotations/validation/ADE_val_00000002.png",
               "ADEChallengeData2016/images/validation/ADE_val_00000001.jpg",
               "ADEChallengeData2016/images/validation/ADE_val_00000002.jpg"]}
RAW_VALUES = {"cocostuff27": set(range(182)) | {255}, "cityscapes": set(range(34)), "cityscapes_ov": set(range(34)),
              "potsdam3": set(range(6)),
              "voc": set(range(21)) | {255}, "context59": set(range(60)), "ade20k": set(range(151))}

@pytest.mark.parametrize("name", list(FAKE_PATHS))
def test_make_fake_dataset(tmp_path, name):
    root = make_fake_dataset(name, tmp_path, n=2)
    assert root == tmp_path
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == FAKE_PATHS[name]
    for p in tmp_path.rglob("*"):
        if p.suffix == ".png" and "leftImg8bit" not in p.name and "JPEG" not in str(p):
            assert set(np.unique(np.array(Image.open(p)))) <= RAW_VALUES[name]
        if p.parent.name == "gt": assert set(np.unique(loadmat(p)["gt"])) <= RAW_VALUES[name]
    if name == "voc": assert Image.open(tmp_path / FAKE_PATHS["voc"][3]).mode == "P"
    ds = load_dataset(name, root)
    assert len(ds) == 2 and ds[1][0].shape == (24, 32, 3)


# ---------- shapes ----------
def test_shapes_dataset():
    from md_probe.shapes import make_scenes, SHAPE_CLASSES
    ds = load_dataset("shapes", n=6)
    assert ds.seed == 12345 and ds.classes == list(SHAPE_CLASSES) and ds.num_classes == len(SHAPE_CLASSES)
    ref = make_scenes(6, 12345, 32)
    for i in range(6):
        image, mask, name = ds[i]
        np.testing.assert_array_equal(image, ref[i].image); np.testing.assert_array_equal(mask, ref[i].mask)
        assert mask.dtype == np.int64 and name == f"shapes-12345-{i:04d}"
    other = load_dataset("shapes", n=6, seed=0)
    assert not all(np.array_equal(other[i][0], ds[i][0]) for i in range(6))
    assert ds.scene(2).caption == ref[2].caption


# ---------- DataLoader workers ----------
def test_readers_pickle_and_load_in_workers(tmp_path):
    build("cityscapes", tmp_path)
    ds = load_dataset("cityscapes27", tmp_path, transform=32)
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone[1][1], ds[1][1])
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    images, masks, names = next(iter(loader))
    assert images.shape == (2, 32, 32, 3) and masks.dtype == torch.int64 and sorted(names) == sorted(ds.names)
    sh = load_dataset("shapes", n=4); sh[0]
    assert len(pickle.dumps(sh)) < 4000  # generated scenes are not shipped to workers
    batch = next(iter(torch.utils.data.DataLoader(sh, batch_size=4, num_workers=1)))
    assert batch[1].shape == (4, 32, 32)


def test_import_stays_light():
    import subprocess, sys
    code = ("import sys, md_probe.data; bad = [m for m in ('torch', 'plotly', 'ipywidgets', 'umap', 'pandas', "
            "'sklearn', 'md_probe.shapes') if m in sys.modules]; print(bad); assert not bad")
    subprocess.run([sys.executable, "-c", code], check=True)
