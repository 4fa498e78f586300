"""Tests of md_probe.explorers beyond the notebook's asserts: UNet calls counted for every control of every explorer,
every control changes what is plotted, clicks and selections through plotly's callback objects, idle-time warm-ups
and a cheap import. (The saved widget state, a docs tool, is tested in tests/test_snapshots.py; the plotly widget
transport in tests/test_widgets.py.)
"""
import json, re, subprocess, sys
import numpy as np, pytest, torch

torch.set_num_threads(1)

from md_probe.models import load_model
from md_probe.shapes import make_scenes
from md_probe.probe import probe


@pytest.fixture(scope="module")
def shapes():
    return load_model("shapes")


@pytest.fixture(scope="module")
def scene():
    return next(s for s in make_scenes(6, seed=12345) if len(s.classes) >= 3)


@pytest.fixture
def unet_calls(shapes):
    from md_probe.probe import list_layers
    list_layers(shapes)   # the engine's one-time measurement of the UNet (a dummy forward) happens before counting
    calls = []
    h = shapes.denoiser.register_forward_pre_hook(lambda *a: calls.append(1))
    yield calls
    h.remove()


def plotted(ex):
    "Everything an explorer's figures plot, as plain JSON (what a browser would draw)."
    return json.dumps([fw.to_plotly_json()["data"] for fw in ex.figures.values()], sort_keys=True, default=str)


def alternatives(w):
    "Values a control can be moved to, other than its current one."
    import ipywidgets as W
    if isinstance(w, W.Checkbox): return [not w.value]
    if isinstance(w, (W.IntSlider, W.FloatSlider)):
        return [v for v in (w.max, w.min, (w.min + w.max) / 2) if v != w.value][:2]
    if hasattr(w, "options"): return [o for o in (v[1] if isinstance(v, tuple) else v for v in w.options) if o != w.value][:2]
    return []


def move_every_control(ex, calls, skip=()):
    "Move each control of `ex` to other values; every move must change the plotted data and run no UNet call."
    unchanged = []
    for name, w in list(ex.controls.items()):
        if name in skip: continue
        for v in alternatives(w):
            before = plotted(ex)
            w.value = v
            assert ex.status.value == "", (name, v, ex.status.value)
            if plotted(ex) == before: unchanged.append((name, v))
    assert calls == [], f"{len(calls)} UNet call(s) from controls that do not change the prompt, image or timesteps"
    return unchanged


def test_import_is_cheap():
    code = ("import md_probe, md_probe.explorers, sys; heavy = [m for m in ('plotly', 'ipywidgets', 'anywidget', 'umap', "
            "'pandas', 'sklearn') if m in sys.modules]; assert not heavy, heavy")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_attention_explorer_controls(shapes, scene, unet_calls):
    from md_probe.explorers import AttentionExplorer
    ex = AttentionExplorer(shapes, scene.image, scene.prompt())
    assert len(unet_calls) == 1
    unet_calls.clear()
    unchanged = move_every_control(ex, unet_calls, skip=("opacity",))
    assert not unchanged, unchanged
    ex.controls["opacity"].value = 0.2
    assert ex.fig.data[-1].opacity == 0.2 and unet_calls == []


def test_attention_explorer_shows_the_words_map(shapes, scene):
    from md_probe.explorers import AttentionExplorer
    from md_probe import viz
    cache = probe(shapes, scene.image, scene.prompt(), timesteps=[0, 50], cross_attention=True, heads=True)
    ex = AttentionExplorer(cache, word=scene.classes[1])
    c = ex.controls
    for word in [w for w in c["word"].options]:
        c["word"].value = word
        for t in (0, 50):
            c["timestep"].value = t
            m = cache.word_attention(word, t=t, size=cache.latent_hw)
            np.testing.assert_allclose(np.asarray(ex.fig.data[-1].z), viz.resize_map(m, ex._zshape), atol=1e-6)
            assert ex.fig.layout.annotations[0].text == word
    layer = cache.attention_layers[0]
    c["layers"].value, c["head"].value, c["timestep"].value = layer, 2, 50
    m = cache.word_attention(c["word"].value, t=50, layers=[layer], heads=[2], size=cache.latent_hw)
    np.testing.assert_allclose(np.asarray(ex.fig.data[-1].z), viz.resize_map(m, ex._zshape), atol=1e-6)


def test_attention_explorer_heads_follow_layers():
    "On the tiny model the levels have 2/4/8 heads: a head menu only where the chosen layers agree."
    from md_probe.explorers import AttentionExplorer
    tiny = load_model("tiny")
    img = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    ex = AttentionExplorer(tiny, img, "a cat and grassland", timesteps=[0])
    c = ex.controls
    assert list(c["word"].options) == ["a", "cat", "and", "grassland"]      # 4 tokens of "grassland": one entry
    assert list(c["head"].options) == ["mean"]                            # all layers: 2, 4 and 8 heads
    c["layers"].value = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    assert list(c["head"].options) == ["mean", 0, 1]
    c["head"].value = 1
    c["layers"].value = "down_blocks.2.attentions.0.transformer_blocks.0.attn2"
    assert list(c["head"].options) == ["mean"] + list(range(8)) and c["head"].value == 1


def test_feature_explorer_controls_and_click(shapes, scene, unet_calls):
    from plotly.callbacks import Points
    from md_probe.explorers import FeatureExplorer
    ex = FeatureExplorer(shapes, scene.image)
    assert len(unet_calls) == 1
    unet_calls.clear()
    # a click on the PCA panel, as plotly's front end reports it: image pixel coordinates (x = column, y = row)
    i, j = np.argwhere(scene.mask == scene.mask.max())[len(np.argwhere(scene.mask == scene.mask.max())) // 2]
    before = plotted(ex)
    ex._on_click(ex.fig.data[1], Points([0], [float(j)], [float(i)], "PCA-RGB", 1), None)
    assert ex.query == (i, j) and plotted(ex) != before
    assert list(ex.cluster_fig.data[2].x) == [j] and list(ex.cluster_fig.data[2].y) == [i]
    sim = np.asarray(ex.cluster_fig.data[1].z)
    h, w = sim.shape
    assert sim[i * h // 32, j * w // 32] == pytest.approx(1.0, abs=1e-5)    # a pixel is most similar to itself
    unchanged = move_every_control(ex, unet_calls)
    assert not unchanged, unchanged


def test_cluster_explorer_controls_and_selection(shapes, scene, unet_calls):
    from plotly.callbacks import Points
    from md_probe.explorers import ClusterExplorer
    ex = ClusterExplorer(shapes, scene.image)
    assert len(unet_calls) == 1
    unet_calls.clear()
    pts = np.flatnonzero(ex.labels() == ex.labels()[0])[:40].tolist()
    ex._on_select(ex.fig.data[0], Points(pts, [0.0] * len(pts), [0.0] * len(pts), "pixels", 0), None)
    z = np.asarray(ex.fig.data[3].z, dtype=float)                          # the selection layer, on the feature grid
    assert z.shape == ex.grid() and (z == 1).sum() == len(pts)
    rows, cols = np.divmod(np.array(pts), ex.grid()[1])
    assert (z[rows, cols] == 1).all()
    assert np.array_equal(np.asarray(ex.fig.data[2].z).reshape(-1), ex.labels())  # the cluster map shows the labels
    ex.controls["method"].value = "spectral"
    ex.controls["eigengap"].value = True
    assert ex.controls["k"].disabled and "(eigengap)" in ex.k_label.value
    ex.controls["eigengap"].value = False
    unchanged = move_every_control(ex, unet_calls, skip=("projection",))       # UMAP: see the slow test
    # k moves while the eigengap chooses k (a disabled slider), or an eigengap that picks the slider's k, may leave
    # the picture as it is; nothing else may
    assert all(name in ("k", "eigengap") for name, _ in unchanged), unchanged


@pytest.mark.slow
def test_cluster_explorer_umap(shapes, scene, unet_calls):
    from md_probe.explorers import ClusterExplorer
    ex = ClusterExplorer(shapes, scene.image)
    unet_calls.clear()
    x0 = np.asarray(ex.fig.data[0].x).copy()
    ex.controls["projection"].value = "umap"
    assert ex.status.value == "" and not np.allclose(np.asarray(ex.fig.data[0].x), x0)
    assert ex.fig.layout.annotations[0].text.startswith("UMAP")
    assert unet_calls == []


def test_segmentation_explorer_unet_calls(shapes, scene, unet_calls):
    from md_probe.explorers import SegmentationExplorer
    from md_probe.segment import MaskDiffusion
    classes = scene.classes[1:] + ["background"]
    ex = SegmentationExplorer(shapes, scene.image, classes=classes)
    assert len(unet_calls) == 1
    assert torch.equal(ex.seg.labels, MaskDiffusion(shapes)(scene.image, classes).labels)
    unet_calls.clear()
    ex.controls["threshold"].value = 0.3
    ex.controls["use_threshold"].value = True
    unchanged = move_every_control(ex, unet_calls, skip=("classes", "timestep"))
    assert all(name in ("threshold", "opacity") for name, _ in unchanged), unchanged
    for text in ("circle, cross, background", "square, background", "triangle, circle, square, cross, background"):
        unet_calls.clear()
        before = plotted(ex)
        ex.controls["classes"].value = text
        assert len(unet_calls) == 1, (text, len(unet_calls))
        assert ex.seg.classes == [c.strip() for c in text.split(",")] and plotted(ex) != before
        assert len([t for t in ex.fig.data if t.type == "heatmap"]) == 1 + 2 * len(ex.seg.classes)  # labels, scores, attention
        assert [t.name for t in ex.fig.data if t.visible is not False and t.type == "scatter"] == \
               [c for i, c in enumerate(ex.seg.classes) if (ex.seg.labels == i).any()]      # the legend: classes present
    unet_calls.clear()
    ex.controls["classes"].value = "Triangle, circle, square, cross,  background"  # the same classes: no UNet call
    assert unet_calls == [] and ex.status.value == "" and ex.seg.classes[0] == "Triangle"
    ex.controls["classes"].value = "triangle, triangle"                            # a mistake: none either
    assert unet_calls == [] and "Duplicate" in ex.status.value


def test_segmentation_explorer_timesteps_without_unet(shapes, scene, unet_calls):
    from md_probe.explorers import SegmentationExplorer
    ex = SegmentationExplorer(shapes, scene.image, classes="circle, square, background", timesteps=[0, 50, 200])
    assert len(unet_calls) == 1
    unet_calls.clear()
    before = plotted(ex)
    ex.controls["timestep"].value = 200
    assert unet_calls == [] and plotted(ex) != before


def test_segmentation_explorer_errors_keep_state(shapes, scene):
    from md_probe.explorers import SegmentationExplorer
    ex = SegmentationExplorer(shapes, scene.image, classes="circle, background")
    before = plotted(ex)
    ex.controls["classes"].value = "circle, circle"
    assert "Duplicate class names" in ex.status.value and plotted(ex) == before and ex.classes == ["circle", "background"]
    cached = SegmentationExplorer(ex.cache)                 # classes default to the prompt's words
    assert cached.classes == ["circle", "background"]
    cached.controls["classes"].value = "circle, dog"
    assert "words of the cached prompt" in cached.status.value
    with pytest.raises(ValueError, match="Pass the image to segment"): SegmentationExplorer(load_model("shapes"))


def test_errors_name_the_fix(shapes, scene):
    from md_probe.explorers import AttentionExplorer, FeatureExplorer
    with pytest.raises(ValueError, match="needs a prompt"): AttentionExplorer(shapes, scene.image)
    feats_only = probe(shapes, scene.image, layers="up_blocks.2.resnets.1")
    with pytest.raises(ValueError, match="cross_attention=True"): AttentionExplorer(feats_only)
    attn_only = probe(shapes, scene.image, "circle", cross_attention=True)
    with pytest.raises(ValueError, match="layers=\\[...\\]"): FeatureExplorer(attn_only)
    with pytest.raises(TypeError, match="index of one of its images"): FeatureExplorer(feats_only, scene.image)


def test_idle_time_warms_the_neighbouring_settings(shapes, scene, unet_calls):
    "Inside a running event loop (a kernel), the clusterings one step away are computed after an update, one per turn."
    import asyncio
    from md_probe.explorers import ClusterExplorer
    ex = ClusterExplorer(shapes, scene.image, k=4)                  # no loop here: nothing is warmed
    key = ex._key()
    assert ("kmeans", 5) + key not in ex._memo and len(ex._idle) == 0
    async def move_and_idle():
        ex.controls["k"].value = 5                                   # an update inside the loop queues warm-ups
        assert ("kmeans", 6) + key not in ex._memo                  # ... which wait for idle time
        for _ in range(200):
            if not ex._idle: break
            await asyncio.sleep(0.01)
    asyncio.run(move_and_idle())
    assert not ex._idle
    for k in (4, 6): assert ("kmeans", k) + key in ex._memo         # the k slider's neighbours
    layers = list(ex.controls["layer"].options)
    i = layers.index(key[0])
    for other in [layers[j] for j in (i - 1, i + 1) if 0 <= j < len(layers)]:
        assert ("kmeans", 5, other, key[1]) in ex._memo and ("pca", other, key[1]) in ex._memo
    np.testing.assert_array_equal(ex.clusters("kmeans", 6), ClusterExplorer(ex.cache, k=6).labels())  # same result
    assert unet_calls[1:] == []                                      # the explorer's own probe only


def test_selection_is_one_message_and_reports_are_not_echoed(shapes, scene):
    "A lasso's per-trace `selectedpoints` and the highlight reach the browser as one update; the front end's reports stay unechoed."
    from md_probe.explorers import ClusterExplorer
    ex = ClusterExplorer(shapes, scene.image)
    sent = []
    ex.fig.observe(lambda ch: ch["new"] and sent.append(ch["name"]), names=["_py2js_update", "_py2js_restyle", "_py2js_relayout"])
    pts = np.flatnonzero(ex.labels() == ex.labels()[0])[:30].tolist()
    ex.fig._js2py_pointsCallback = {"event_type": "plotly_selected", "selector": None, "device_state": None,
                                    "points": {"trace_indexes": [0] * len(pts), "point_indexes": pts,
                                               "xs": [0.0] * len(pts), "ys": [0.0] * len(pts)}}
    assert (np.asarray(ex.fig.data[3].z) == 1).sum() == len(pts)     # the selection arrived
    assert list(ex.fig.data[0].selectedpoints) == pts
    assert sent == ["_py2js_update"], sent                           # one message, not one per trace
    quiet = [n for n in ex.fig.trait_names() if n.startswith("_js2py_")]
    assert quiet and all(ex.fig.trait_metadata(n, "echo_update") is False for n in quiet)


def test_segmentation_explorer_non_square_image(shapes, scene):
    "An image resized to the model's square: the attention maps (token grid) are drawn at the input's size, as the scores."
    from md_probe.explorers import SegmentationExplorer
    img = np.concatenate([scene.image, scene.image[:, :16]], 1)     # 32 x 48
    ex = SegmentationExplorer(shapes, img, classes="circle, square, background")
    shapes_drawn = [np.asarray(t.z).shape[:2] for t in ex.fig.data if t.type == "heatmap"]
    assert len(shapes_drawn) >= 6
    assert all(abs(w / h - 48 / 32) < 0.1 for h, w in shapes_drawn), shapes_drawn
