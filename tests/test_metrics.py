"Property tests of md_probe.metrics against straightforward loop references (hypothesis)."
import itertools, subprocess, sys
import numpy as np, pytest, torch
from hypothesis import given, settings, strategies as st, HealthCheck
from md_probe.metrics import (confusion_matrix, miou, pixel_accuracy, hungarian_match, apply_matching, matched_confusion,
                              score_per_image, score_dataset, ConfusionAccumulator, Scores)

torch.set_num_threads(1)
IGN = 255
SET = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------- strategies ----------
@st.composite
def labelled(draw, max_classes=4, max_clusters=5, max_images=3):
    "(preds, gts, C, P): a few small images with ignore pixels, cluster ids in [0, P)."
    C = draw(st.integers(1, max_classes)); P = draw(st.integers(1, max_clusters))
    n = draw(st.integers(1, max_images)); seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    preds, gts = [], []
    for _ in range(n):
        h, w = rng.integers(1, 7, 2)
        g = rng.integers(0, C, (h, w)); g[rng.random((h, w)) < 0.2] = IGN
        # predictions correlated with gt, so matchings are not trivial
        p = np.where(rng.random((h, w)) < 0.6, g % P, rng.integers(0, P, (h, w)))
        preds.append(p); gts.append(g)
    return preds, gts, C, P

# ---------- loop references ----------
def ref_confusion(pred, gt, C, P):
    m = np.zeros((C, P), dtype=np.int64)
    for p, g in zip(np.ravel(pred), np.ravel(gt)):
        if g != IGN: m[g, p] += 1
    return m

def ref_iou(conf):
    C = conf.shape[0]; out = []
    for c in range(C):
        tp = conf[c, c]; fn = conf[c].sum() - tp; fp = sum(conf[r, c] for r in range(C)) - tp
        out.append(np.nan if conf[c].sum() == 0 else tp / (tp + fp + fn))
    present = [v for v in out if not np.isnan(v)]
    return (sum(present) / len(present) if present else np.nan), np.array(out, dtype=float)

def ref_optimal_matchings(conf):
    "All one-to-one cluster->class maps of maximal overlap, by brute force (zero-overlap pairs dropped)."
    C, P = conf.shape; n = max(C, P)
    sq = np.zeros((n, n), dtype=np.int64); sq[:C, :P] = conf
    best, maps = -1, []
    for perm in itertools.permutations(range(n)):   # perm[row] = column
        v = sum(sq[r, perm[r]] for r in range(n))
        mp = {k: -1 for k in range(P)}
        for r in range(C):
            if perm[r] < P and conf[r, perm[r]] > 0: mp[perm[r]] = r
        if v > best: best, maps = v, [mp]
        elif v == best: maps.append(mp)
    return best, maps

# ---------- confusion matrix ----------
@SET
@given(labelled())
def test_confusion_equals_loop_reference(data):
    preds, gts, C, P = data
    for p, g in zip(preds, gts):
        np.testing.assert_array_equal(confusion_matrix(p, g, C, num_preds=P), ref_confusion(p, g, C, P))

@SET
@given(labelled())
def test_miou_and_accuracy_equal_loop_reference(data):
    preds, gts, C, _ = data
    conf = sum(ref_confusion(p % C, g, C, C) for p, g in zip(preds, gts))
    m, per = miou(conf); rm, rper = ref_iou(conf)
    np.testing.assert_allclose(per, rper, equal_nan=True)
    if np.isnan(rm): assert np.isnan(m)
    else: assert m == pytest.approx(rm)
    n = conf.sum()
    assert (np.isnan(pixel_accuracy(conf)) if n == 0 else pixel_accuracy(conf) == pytest.approx(np.trace(conf) / n))

@SET
@given(labelled())
def test_ignored_pixels_never_count(data):
    preds, gts, C, P = data
    rng = np.random.default_rng(0)
    for p, g in zip(preds, gts):
        junk = np.where(g == IGN, rng.integers(-5, 1000, g.shape), p)   # anything at ignored pixels, even invalid ids
        np.testing.assert_array_equal(confusion_matrix(junk, g, C, num_preds=P), confusion_matrix(p, g, C, num_preds=P))
        assert confusion_matrix(p, g, C, num_preds=P).sum() == (g != IGN).sum()
    junk = [np.where(g == IGN, rng.integers(0, 50, g.shape), p) for p, g in zip(preds, gts)]
    for f in (score_per_image, score_dataset):
        a, b = f(preds, gts, C), f(junk, gts, C)
        np.testing.assert_array_equal(a.confusion[:, :C], b.confusion[:, :C])
        assert a.pixel_accuracy == b.pixel_accuracy or (np.isnan(a.pixel_accuracy) and np.isnan(b.pixel_accuracy))

# ---------- perfect predictions ----------
@SET
@given(labelled())
def test_perfect_prediction_scores_one(data):
    _, gts, C, _ = data
    if all((g == IGN).all() for g in gts): return
    perm = np.random.default_rng(C).permutation(C + 3)           # cluster ids are arbitrary names
    clus = [np.where(g == IGN, 0, perm[np.minimum(g, C - 1)]) for g in gts]
    sup = np.concatenate([np.where(g == IGN, 0, g).ravel() for g in gts]); gt_all = np.concatenate([g.ravel() for g in gts])
    s = ConfusionAccumulator(C, "supervised"); s.update(sup, gt_all)
    for sc in (s.scores(), score_per_image(clus, gts, C), score_dataset(clus, gts, C)):
        assert sc.miou == 1.0 and sc.pixel_accuracy == 1.0, sc

# ---------- matching ----------
@SET
@given(labelled(), st.integers(0, 2**31 - 1))
def test_permuting_cluster_ids_keeps_matched_scores(data, seed):
    preds, gts, C, P = data
    perm = np.random.default_rng(seed).permutation(P + 2)          # also moves ids beyond the old range
    permuted = [perm[p] for p in preds]
    for f in (score_per_image, score_dataset):
        a, b = f(preds, gts, C), f(permuted, gts, C)
        np.testing.assert_array_equal(a.confusion, b.confusion)
        np.testing.assert_array_equal(a.per_class, b.per_class)

@SET
@given(labelled(max_classes=4, max_clusters=4, max_images=1))
def test_hungarian_is_optimal_against_brute_force(data):
    (p,), (g,), C, P = data
    conf = ref_confusion(p, g, C, P)
    mapping = hungarian_match(conf)
    best, optimal = ref_optimal_matchings(conf)
    mc = matched_confusion(conf, mapping)
    assert np.trace(mc[:, :C]) == best                               # maximal overlap
    assert mapping in optimal                                        # and one of the optimal maps
    assert sorted(v for v in mapping.values() if v >= 0) == sorted(set(v for v in mapping.values() if v >= 0))  # one-to-one
    assert all(conf[v, k] > 0 for k, v in mapping.items() if v >= 0)  # only overlapping pairs
    assert mc.sum() == conf.sum()                                    # unmatched pixels kept (as wrong)

@SET
@given(labelled())
def test_per_image_protocol_equals_reference(data):
    preds, gts, C, _ = data
    s = score_per_image(preds, gts, C)
    total_best = sum(ref_optimal_matchings(ref_confusion(p, g, C, int(p.max()) + 1))[0] for p, g in zip(preds, gts))
    n = sum((g != IGN).sum() for g in gts)
    if n: assert s.pixel_accuracy == pytest.approx(total_best / n)
    assert s.protocol == "per_image" and s.confusion.shape == (C, C + 1)

@SET
@given(labelled())
def test_dataset_protocol_equals_reference(data):
    preds, gts, C, P = data
    s = score_dataset(preds, gts, C, num_preds=P)
    conf = sum(ref_confusion(p, g, C, P) for p, g in zip(preds, gts))
    best, optimal = ref_optimal_matchings(conf)
    n = conf.sum()
    if n: assert s.pixel_accuracy == pytest.approx(best / n)
    assert s.mapping in optimal
    # mIoU read from the reference matched confusion of the same matching
    ref_mc = _matched_ref(conf, s.mapping, C)
    np.testing.assert_array_equal(s.confusion, ref_mc)
    np.testing.assert_allclose(s.per_class, _ref_iou_rect(ref_mc), equal_nan=True)

def _matched_ref(conf, mapping, C):
    out = np.zeros((C, C + 1), dtype=np.int64)
    for k in range(conf.shape[1]):
        col = mapping.get(k, -1); col = C if col < 0 else col
        for r in range(C): out[r, col] += conf[r, k]
    return out

def _ref_iou_rect(mc):
    C = mc.shape[0]; out = []
    for c in range(C):
        tp = mc[c, c]; row = mc[c].sum(); colsum = mc[:, c].sum()
        out.append(np.nan if row == 0 else tp / (row + colsum - tp))
    return np.array(out)

def test_zero_overlap_pairs_are_left_unmatched():
    "Cluster 1 only touches class 0; the optimal assignment pairs it with class 1 at zero overlap: it must stay unmatched."
    conf = np.array([[4, 1], [2, 0]])
    assert hungarian_match(conf) == {0: 0, 1: -1}
    np.testing.assert_array_equal(matched_confusion(conf, {0: 0, 1: -1}), [[4, 0, 1], [2, 0, 0]])

def test_apply_matching_then_confusion_equals_matched_confusion():
    rng = np.random.default_rng(1)
    g = rng.integers(0, 3, (20, 20)); g[:2] = IGN; p = (g * 2 + rng.integers(0, 2, g.shape)) % 7
    conf = confusion_matrix(p, g, 3, num_preds=7); m = hungarian_match(conf)
    np.testing.assert_array_equal(confusion_matrix(apply_matching(p, m, fill=3), g, 3, num_preds=4), matched_confusion(conf, m))

# ---------- accumulator ----------
def test_accumulator_streams_like_batch_and_merges():
    rng = np.random.default_rng(2)
    gts = [rng.integers(0, 4, (8, 8)) for _ in range(6)]; preds = [(g + rng.integers(0, 2, g.shape)) % 5 for g in gts]
    for proto, batch in (("per_image", score_per_image), ("dataset", score_dataset)):
        a, b = ConfusionAccumulator(4, proto), ConfusionAccumulator(4, proto)
        rows = [a.update(p, g) for p, g in zip(preds[:3], gts[:3])] + [b.update(p, g) for p, g in zip(preds[3:], gts[3:])]
        assert all(isinstance(r, Scores) and r.protocol == "per_image" for r in rows)
        whole = batch(preds, gts, 4)
        np.testing.assert_array_equal(a.merge(b).scores().confusion, whole.confusion)
        assert a.n_images == 6 and a.scores().protocol == proto

def test_torch_inputs_and_errors():
    g = torch.tensor([[0, 1], [1, 255]]); p = torch.tensor([[1, 0], [0, 7]])
    assert score_per_image(p[None], g[None], 2).miou == 1.0
    with pytest.raises(ValueError, match="resize the prediction"): confusion_matrix(p[:, :1], g, 2)
    with pytest.raises(ValueError, match="pass num_preds > 2"): confusion_matrix(torch.tensor([[2, 0], [0, 0]]), g, 2)
    with pytest.raises(TypeError, match="argmax"): confusion_matrix(p.float(), g, 2)

def test_import_is_light():
    "md_probe.metrics imports neither torch nor scipy."
    code = "import sys, md_probe.metrics; print(sorted(m for m in ('torch', 'scipy', 'sklearn') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
