"Tests of md_probe.viz beyond the notebook's asserts: orientation on non-square images, one palette, cheap import."
import base64, io, json, subprocess, sys
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch
from hypothesis import given, settings, strategies as st
from PIL import Image
from md_probe import viz
from md_probe.viz import (PALETTE, IGNORE_COLOR, class_colors, labels_to_rgb, resize_map, overlay, heatmap_grid,
                          pca_rgb_figure, scatter, sweep_heatmap, confusion_figure, iou_bars)

torch.set_num_threads(1)
H, W = 24, 40  # non-square on purpose: a transposed figure cannot pass


@pytest.fixture
def scene():
    "A 24 x 40 image, bright in the top-left only, with a label-1 blob in the top-left only."
    labels = np.zeros((H, W), np.int64)
    labels[2:8, 3:12] = 1
    labels[16:, 30:] = 2
    image = np.full((H, W, 3), 30, np.uint8)
    image[labels == 1] = 250
    return image, labels, ["background", "blob", "corner"]


def legend(fig): return [(t.name, t.marker.color) for t in fig.data if t.type == "scatter" and t.showlegend]


def colorscale_at(scale, v, vmin, vmax):
    "The colour a plotly stepwise colorscale gives value v (the discrete scales here are piecewise constant)."
    f = (v - vmin) / (vmax - vmin)
    for (f0, c0), (f1, c1) in zip(scale[:-1], scale[1:]):
        if f0 <= f < f1: return c0
    return scale[-1][1]


def test_import_is_cheap():
    code = ("import md_probe.viz, sys; heavy = [m for m in ('plotly', 'pandas', 'torch', 'PIL', 'sklearn') "
            "if m in sys.modules]; assert not heavy, heavy")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_viz_imports_nothing_of_md_probe():
    lines = [l.strip() for l in Path(viz.__file__).read_text().splitlines()]
    assert not [l for l in lines if l.startswith(("import md_probe", "from md_probe", "from ."))]


def test_overlay_orientation_non_square(scene):
    image, labels, classes = scene
    fig = overlay(image, labels, classes)
    img, lab = fig.data[0], fig.data[1]
    assert img.type == "image" and lab.type == "heatmap"
    np.testing.assert_array_equal(np.asarray(lab.z), labels)  # row 0 of the trace = row 0 of the mask
    np.testing.assert_array_equal(np.asarray(img.z), image)
    assert np.asarray(lab.z).shape == (H, W)
    assert np.asarray(lab.z)[:12, :20].max() == 1 and (np.asarray(lab.z)[12:, :30] == 0).all()  # blob top-left only
    assert fig.layout.yaxis.autorange == "reversed"  # row 0 drawn at the top
    assert fig.layout.yaxis.scaleanchor == "x"  # square pixels
    assert fig.layout.width > fig.layout.height  # a 24 x 40 image is wider than tall
    assert np.asarray(lab.text)[4, 5] == "blob" and np.asarray(lab.text)[20, 35] == "corner"


def test_overlay_legend_is_classes_present(scene):
    image, labels, classes = scene
    assert [n for n, _ in legend(overlay(image, labels, classes))] == classes
    assert [n for n, _ in legend(overlay(image, labels, classes + ["absent"]))] == classes
    lab = labels.copy(); lab[lab == 2] = -1
    fig = overlay(image, lab, classes)
    assert [n for n, _ in legend(fig)] == ["background", "blob"]
    assert np.isnan(np.asarray(fig.data[1].z)[20, 35])  # ignored pixels are transparent


def test_overlay_rejects_transposed_labels(scene):
    image, labels, classes = scene
    with pytest.raises(ValueError, match="labels.T"): overlay(image, labels.T, classes)


def test_heatmap_grid_orientation_non_square(scene):
    image, _, _ = scene
    m = np.zeros((3, 5), np.float32); m[0, 0] = 1  # hot in the top-left latent cell only
    fig = heatmap_grid(image, {"blob": m, "flat": np.ones((6, 10))})
    hm = [t for t in fig.data if t.type == "heatmap"]
    z = np.asarray(hm[0].z)
    assert z.shape == (H, W)
    assert np.unravel_index(z.argmax(), z.shape) == (0, 0)
    assert z[:8, :8].min() > z[16:, :].max()
    np.testing.assert_allclose(z, resize_map(m, (H, W)))
    assert all(ax.autorange == "reversed" for ax in fig.select_yaxes())
    grey = np.asarray(fig.data[0].z)  # the grey image under the maps keeps its orientation too
    assert grey.shape == (H, W, 3) and grey[4, 5, 0] > 200 and grey[20, 35, 0] < 60
    with pytest.raises(ValueError, match="transposed"): heatmap_grid(image, {"t": m.T})


def test_heatmap_grid_one_panel_per_cell(scene):
    image, _, _ = scene
    maps = {w: {f"L{l}": torch.rand(3, 5) * (i + 1) for l in range(3)} for i, w in enumerate(["cat", "dog"])}
    fig = heatmap_grid(image, maps)
    hm = [t for t in fig.data if t.type == "heatmap"]
    assert len(hm) == 6 and len({(t.xaxis, t.yaxis) for t in hm}) == 6
    assert [t.name for t in hm] == [f"{w} / L{l}" for w in ["cat", "dog"] for l in range(3)]
    assert [a.text for a in fig.layout.annotations] == ["L0", "L1", "L2"]
    for t in hm:  # each panel's data is its own map
        w, l = t.name.split(" / ")
        np.testing.assert_allclose(np.asarray(t.z), resize_map(maps[w][l], (H, W)), atol=1e-6)
    # a flat dict wraps after ncols: 5 maps, 2 per row -> 3 rows
    flat = heatmap_grid(None, {str(i): np.random.rand(3, 5) for i in range(5)}, ncols=2)
    hm = [t for t in flat.data if t.type == "heatmap"]
    assert len(hm) == 5 and not any(t.type == "image" for t in flat.data)
    assert len(list(flat.select_yaxes())) == 6


def test_heatmap_grid_large_images_are_capped():
    img = np.zeros((512, 768, 3), np.uint8)
    fig = heatmap_grid(img, {"a": np.random.rand(64, 96)}, max_side=128)
    assert np.asarray(fig.data[1].z).shape == (85, 128)


def test_pca_rgb_figure_orientation(scene):
    image, _, _ = scene
    rgb = np.zeros((6, 10, 3)); rgb[0, 0] = 1  # white block top-left
    fig = pca_rgb_figure(rgb, image)
    z = np.asarray(fig.data[1].z)
    assert z.shape == (6, 10, 3) and (z[0, 0] == 255).all() and z[1:].max() == 0
    t = fig.data[1]
    assert (t.dx, t.dy) == (4, 4) and (t.x0, t.y0) == (1.5, 1.5)  # the 6 x 10 grid spans the 24 x 40 image
    assert all(ax.autorange == "reversed" for ax in fig.select_yaxes())


def test_palette_is_the_same_in_every_figure(scene):
    image, labels, classes = scene
    colors = class_colors(3)
    assert [c for _, c in legend(overlay(image, labels, classes))] == colors
    pts = np.random.default_rng(0).normal(size=(H * W, 2))
    sc = scatter(pts, labels.reshape(-1), classes)
    assert [c for _, c in legend(sc)] == colors
    mk = sc.data[0].marker
    for i in range(3):  # the marker colour scale gives class i the palette colour i
        assert colorscale_at(mk.colorscale, i, mk.cmin, mk.cmax) == colors[i]
    ov = overlay(image, labels, classes).data[1]
    for i in range(3):
        assert colorscale_at(ov.colorscale, i, ov.zmin, ov.zmax) == colors[i]
    rgb = labels_to_rgb(labels)
    assert "#%02x%02x%02x" % tuple(rgb[4, 5]) == colors[1] and "#%02x%02x%02x" % tuple(rgb[20, 35]) == colors[2]
    assert list(iou_bars([0.9, 0.5, 0.2], classes).data[0].marker.color) == colors
    assert colors[0] == PALETTE[0]


def test_scatter_keeps_raster_order_and_pixel_index(scene):
    _, labels, classes = scene
    pts = torch.randn(H * W, 2, dtype=torch.bfloat16)
    fig = scatter(pts, torch.tensor(labels).reshape(-1), classes)
    main = fig.data[0]
    assert main.type == "scattergl" and len(main.x) == H * W
    np.testing.assert_array_equal(np.asarray(main.customdata), np.arange(H * W))
    np.testing.assert_allclose(np.asarray(main.x), pts[:, 0].float().numpy())
    np.testing.assert_array_equal(np.asarray(main.marker.color), labels.reshape(-1))
    assert fig.layout.dragmode == "lasso"
    cont = scatter(pts, torch.linspace(0, 1, H * W))
    assert cont.data[0].marker.showscale and len(cont.data) == 1


def test_sweep_heatmap_places_values(scene):
    layers, ts = ["down_blocks.2", "mid_block", "up_blocks.1"], [300, 0, 100]
    rows = [dict(layer=l, timestep=t, miou=10 * i + j) for i, l in enumerate(layers) for j, t in enumerate(ts)]
    df = pd.DataFrame(rows).sample(frac=1, random_state=0)  # row order must not matter...
    df = pd.concat([df[df.layer == l] for l in layers])  # ...but layers keep their order of appearance
    fig = sweep_heatmap(df)
    tr = fig.data[0]
    x, y, z = list(tr.x), list(tr.y), np.asarray(tr.z)
    assert x == ["0", "100", "300"] and y == layers
    for r in rows: assert z[y.index(r["layer"]), x.index(str(r["timestep"]))] == r["miou"]
    assert fig.layout.yaxis.autorange == "reversed" and fig.layout.xaxis.type == "category"
    assert "up_blocks.1, t=100" in fig.layout.title.text  # the best cell: 10 * 2 + 2
    piv = pd.DataFrame(rows).pivot(index="layer", columns="timestep", values="miou")
    pz = np.asarray(sweep_heatmap(piv).data[0].z)
    for r in rows: assert pz[list(piv.index).index(r["layer"]), list(piv.columns).index(r["timestep"])] == r["miou"]
    dup = pd.concat([pd.DataFrame(rows), pd.DataFrame(rows).assign(miou=lambda d: d.miou + 1)])
    np.testing.assert_allclose(np.asarray(sweep_heatmap(dup).data[0].z), z + 0.5)  # several rows per cell: mean
    with pytest.raises(TypeError, match="layer, timestep, miou"): sweep_heatmap(np.zeros((2, 2)))


def test_confusion_and_iou():
    conf = np.array([[8, 2, 0], [1, 3, 0], [0, 0, 0]])
    fig = confusion_figure(conf, ["a", "b", "c"])
    z = np.asarray(fig.data[0].z)
    np.testing.assert_allclose(z[:2], [[0.8, 0.2, 0], [0.25, 0.75, 0]])
    assert np.isnan(z[2]).all() and fig.layout.yaxis.autorange == "reversed"
    assert list(fig.data[0].y) == ["a", "b", "c"] and fig.layout.yaxis.title.text == "true"
    fig = iou_bars({"a": 0.5, "b": 0.25, "c": float("nan")})
    assert fig.layout.title.text == "mIoU = 0.375" and fig.data[0].text[-1] == "n/a"


def test_all_figures_serialise(scene):
    image, labels, classes = scene
    figs = [overlay(image, labels, classes), heatmap_grid(image, {"a": np.random.rand(3, 5)}, shared_scale=True),
            pca_rgb_figure(np.random.rand(3, 5, 3)), scatter(np.random.rand(10, 2)),
            confusion_figure(np.eye(3), classes, normalize=False), iou_bars(np.ones(3), classes)]
    for f in figs: json.loads(f.to_json())


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), H2=st.integers(1, 30), W2=st.integers(1, 30), seed=st.integers(0, 99))
def test_resize_map_matches_torch(h, w, H2, W2, seed):
    m = np.random.default_rng(seed).random((h, w)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.tensor(m)[None, None], size=(H2, W2), mode="bilinear",
                                          align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(resize_map(m, (H2, W2)), ref, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), seed=st.integers(0, 99))
def test_labels_to_rgb_uses_the_palette(n, seed):
    lab = np.random.default_rng(seed).integers(-1, n, (5, 7))
    rgb = labels_to_rgb(lab, n)
    colors = class_colors(n) + [IGNORE_COLOR]
    for (i, j), l in np.ndenumerate(lab):
        assert "#%02x%02x%02x" % tuple(rgb[i, j]) == colors[l if l >= 0 else n]


def test_errors_teach_the_fix():
    with pytest.raises(ValueError, match="only 2 classes"): labels_to_rgb(np.array([[0, 3]]), 2)
    with pytest.raises(TypeError, match="astype"): labels_to_rgb(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="permute"): overlay(torch.zeros(3, 8, 8), np.zeros((8, 8), int), ["a"])
    with pytest.raises(ValueError, match="divide 0-255"): overlay(np.full((8, 8, 3), 100.0), np.zeros((8, 8), int), ["a"])
    with pytest.raises(ValueError, match="one per point"): scatter(np.zeros((4, 2)), np.zeros(3, int))
    with pytest.raises(ValueError, match="one class name per IoU"): iou_bars([0.1, 0.2])
