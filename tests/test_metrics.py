"""Property tests of md_probe.metrics against straightforward loop references and literal ports of the released
scoring code (hypothesis).

The released-code references below are ports of, and cite:
- DiffSeg, per-image Hungarian: google/diffseg @ 77ea596, `diffseg/utils.py: _fast_hist, hungarian_matching`, summed
  as in `benchmarks.ipynb` (cell "3. Run Inference");
- STEGO, dataset Hungarian: mhamilton723/STEGO @ eb4d6b5, `src/utils.py: UnsupervisedMetrics.update, compute`;
- mmsegmentation, mIoU: open-mmlab/mmsegmentation, `mmseg/evaluation/metrics/iou_metric.py:
  IoUMetric.intersect_and_union, total_area_to_metrics`.
They are written from that code, not from md_probe's: numpy + scipy loops over images, as the originals run."""
import itertools, subprocess, sys, warnings
import numpy as np, pytest, torch
from hypothesis import given, settings, strategies as st, HealthCheck
from scipy.optimize import linear_sum_assignment
from md_probe.metrics import (confusion_matrix, miou, pixel_accuracy, hungarian_match, apply_matching, matched_confusion,
                              fold_confusion, score_per_image, score_dataset, ConfusionAccumulator, Scores)

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
    "IoU = TP / (TP + FP + FN); NaN only where that union is empty (a class predicted but absent from the gt gets 0)."
    C = conf.shape[0]; out = []
    for c in range(C):
        tp = conf[c, c]; fn = conf[c].sum() - tp; fp = sum(conf[r, c] for r in range(C)) - tp
        out.append(np.nan if tp + fp + fn == 0 else tp / (tp + fp + fn))
    present = [v for v in out if not np.isnan(v)]
    return (sum(present) / len(present) if present else np.nan), np.array(out, dtype=float)

def ref_optimal_matchings(conf):
    """All matchings of maximal overlap, by brute force, as {cluster: class or -1}: every class takes a distinct column
    of the table widened to at least one column per class (padding columns are empty clusters, left out of the map)."""
    C, P = conf.shape; n = max(C, P)
    table = np.zeros((C, n), dtype=np.int64); table[:, :P] = conf
    best, maps = -1, []
    for cols in itertools.permutations(range(n), C):   # cols[class] = column
        v = sum(table[r, cols[r]] for r in range(C))
        mp = {k: -1 for k in range(P)}
        for r in range(C):
            if cols[r] < P: mp[cols[r]] = r
        if v > best: best, maps = v, [mp]
        elif v == best and mp not in maps: maps.append(mp)
    return best, maps

# ---------- released-code references ----------
def diffseg_fast_hist(label_true, label_pred, n_class):
    "google/diffseg diffseg/utils.py: _fast_hist (itself adapted from PiCIE), verbatim but for the comments."
    pred_n_class = np.maximum(n_class, label_pred.max() + 1)
    mask = (label_true >= 0) & (label_true < n_class)  # Exclude unlabelled data (md_probe's 255 included).
    hist = np.bincount(pred_n_class * label_true[mask] + label_pred[mask],
                       minlength=n_class * pred_n_class).reshape(n_class, pred_n_class)
    return hist

def diffseg_hungarian_matching(pred, label, n_class):
    "diffseg/utils.py: hungarian_matching, over a list of images (the released code loops over a same-size batch)."
    tp = np.zeros(n_class); fp = np.zeros(n_class); fn = np.zeros(n_class); all = 0
    for i in range(len(pred)):
        hist = diffseg_fast_hist(np.asarray(label[i]).flatten(), np.asarray(pred[i]).flatten(), n_class)
        row_ind, col_ind = linear_sum_assignment(hist, maximize=True)
        all += hist.sum()
        fn += (np.sum(hist, 1) - hist[row_ind, col_ind])
        tp += hist[row_ind, col_ind]
        hist = hist[:, col_ind]  # re-order hist to align labels to calculate FP
        fp += (np.sum(hist, 0) - np.diag(hist))
    return tp, fp, fn, all

def diffseg_benchmark(preds, gts, n_class):
    "benchmarks.ipynb, '3. Run Inference': TP, FP, FN, ALL summed over batches; (miou, acc, iou) at the end."
    TP = np.zeros(n_class); FP = np.zeros(n_class); FN = np.zeros(n_class); ALL = 0
    for p, g in zip(preds, gts):                   # one image per batch
        tp, fp, fn, all = diffseg_hungarian_matching([p], [g], n_class)
        TP += tp; FP += fp; FN += fn; ALL += all
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # nanmean of all-NaN: nothing counted
        acc = TP.sum() / ALL
        iou = TP / (TP + FP + FN)
        miou = np.nanmean(iou)
    return miou, acc, iou, (TP, FP, FN)

def stego_metrics(preds, gts, n_classes, extra_clusters, released_update_mask=True):
    """STEGO src/utils.py: UnsupervisedMetrics(prefix, n_classes, extra_clusters, compute_hungarian=True): `update` per
    image, then `compute`, in numpy (STEGO: torch, dividing in float32). `released_update_mask=False` widens update's
    mask `preds < self.n_classes` to all n_classes + extra_clusters clusters (md_probe's declared deviation).
    Returns (mIoU, accuracy, iou over the histogram's rows: C classes, plus STEGO's unmatched-clusters row if extra)."""
    K = n_classes + extra_clusters
    stats = np.zeros((K, n_classes), dtype=np.int64)
    for p, g in zip(preds, gts):
        actual = np.asarray(g).reshape(-1); pr = np.asarray(p).reshape(-1)
        hi = n_classes if released_update_mask else K
        mask = (actual >= 0) & (actual < n_classes) & (pr >= 0) & (pr < hi)
        actual = actual[mask]; pr = pr[mask]
        stats += np.bincount(K * actual + pr, minlength=n_classes * K).reshape(n_classes, K).T
    assignments = linear_sum_assignment(stats, maximize=True)
    if extra_clusters == 0:
        histogram = stats[np.argsort(assignments[1]), :]
    else:
        assignments_t = linear_sum_assignment(stats.T, maximize=True)
        histogram = stats[assignments_t[1], :]
        missing = list(set(range(K)) - set(assignments[0]))
        new_row = stats[missing, :].sum(0, keepdims=True)
        histogram = np.concatenate([histogram, new_row], axis=0)
        new_col = np.zeros((n_classes + 1, 1))
        histogram = np.concatenate([histogram, new_col], axis=1)
    tp = np.diag(histogram)
    fp = np.sum(histogram, axis=0) - tp
    fn = np.sum(histogram, axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        iou = tp / (tp + fp + fn)
        opc = np.sum(tp) / np.sum(histogram)
        m = iou[~np.isnan(iou)].mean()
    return m, opc, iou

def mmseg_iou(preds, gts, num_classes, ignore_index=IGN):
    """mmsegmentation IoUMetric: intersect_and_union per image (torch.histc, as released), summed, then
    total_area_to_metrics: IoU = intersect / union, mIoU = nanmean. Areas summed in float64 here (released: float32)."""
    totals = [torch.zeros(num_classes, dtype=torch.float64) for _ in range(4)]
    for pred, gt in zip(preds, gts):
        pred_label, label = torch.as_tensor(np.asarray(pred)), torch.as_tensor(np.asarray(gt))
        mask = (label != ignore_index)
        pred_label = pred_label[mask]
        label = label[mask]
        intersect = pred_label[pred_label == label]
        area_intersect = torch.histc(intersect.float(), bins=(num_classes), min=0, max=num_classes - 1)
        area_pred_label = torch.histc(pred_label.float(), bins=(num_classes), min=0, max=num_classes - 1)
        area_label = torch.histc(label.float(), bins=(num_classes), min=0, max=num_classes - 1)
        area_union = area_pred_label + area_label - area_intersect
        for t, a in zip(totals, (area_intersect, area_union, area_pred_label, area_label)): t += a.double()
    total_area_intersect, total_area_union, _, total_area_label = totals
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        iou = (total_area_intersect / total_area_union).numpy()
        return np.nanmean(iou), iou, float(total_area_intersect.sum() / total_area_label.sum())

@st.composite
def segmented(draw, min_classes=1, max_classes=6, max_images=4):
    """(preds, gts, C): images whose segments over-segment (more segments than classes, ids with gaps), under-segment
    (one segment across several classes), leave classes absent (from an image and from the whole set) and use 255."""
    C = draw(st.integers(min_classes, max_classes)); n = draw(st.integers(1, max_images)); seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    never = set(rng.choice(C, rng.integers(0, C), replace=False).tolist()) if C > 1 else set()  # absent from every image
    pool = [c for c in range(C) if c not in never]
    preds, gts = [], []
    for _ in range(n):
        h, w = rng.integers(2, 9, 2)
        present = rng.choice(pool, rng.integers(1, len(pool) + 1), replace=False)
        g = present[rng.integers(0, len(present), (h, w))]
        g[rng.random((h, w)) < rng.choice([0, 0.1, 0.4])] = IGN
        S = int(rng.integers(1, C + 5))                          # segments: fewer or more than the classes
        ids = rng.choice(S + int(rng.integers(0, 3)), S, replace=False)  # segment ids need not be contiguous
        owner = rng.integers(0, S, C)                              # a segment per class (shared = under-segmentation)
        p = ids[owner[np.where(g == IGN, 0, g)]]
        split = rng.random((h, w)) < rng.choice([0, 0.2, 0.5])     # over-segmentation and noise
        p = np.where(split, ids[rng.integers(0, S, (h, w))], p)
        preds.append(p); gts.append(g)
    return preds, gts, C

def _same(a, b, tol=1e-12):
    "Equal floats or both NaN, elementwise."
    a, b = np.atleast_1d(np.asarray(a, float)), np.atleast_1d(np.asarray(b, float))
    return a.shape == b.shape and bool(np.all((np.isnan(a) & np.isnan(b)) | (np.abs(a - b) <= tol)))

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
    # ids at ignored pixels that keep the table's width (DiffSeg: max(C, largest id + 1)) change nothing
    same_width = [np.where(g == IGN, rng.integers(0, max(C, int(p.max()) + 1), g.shape), p) for p, g in zip(preds, gts)]
    # wider ids widen the table, as in the released code: ties may then fall elsewhere, the optimum cannot
    wider = [np.where(g == IGN, rng.integers(0, 50, g.shape), p) for p, g in zip(preds, gts)]
    for f in (score_per_image, score_dataset):
        a, b, c = f(preds, gts, C), f(same_width, gts, C), f(wider, gts, C)
        np.testing.assert_array_equal(a.confusion, b.confusion)
        assert _same(a.pixel_accuracy, c.pixel_accuracy)

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
def _matched_confusions(conf, C):
    "The distinct class-by-class confusions that the optimal matchings of `conf` give."
    out = []
    for mp in ref_optimal_matchings(conf)[1]:
        mc = _matched_ref(conf, mp, C)
        if not any(np.array_equal(mc, o) for o in out): out.append(mc)
    return out

@SET
@given(labelled(), st.integers(0, 2**31 - 1))
def test_permuting_cluster_ids_follows_the_released_code(data, seed):
    """Renaming clusters never changes the optimum (pixel accuracy); where several optimal matchings score differently,
    the scores follow scipy's choice on the renamed table, as DiffSeg's and STEGO's code do, so they may change."""
    preds, gts, C, P = data
    perm = np.random.default_rng(seed).permutation(P + 2)          # also moves ids beyond the old range
    permuted = [perm[p] for p in preds]
    a, b = score_per_image(preds, gts, C), score_per_image(permuted, gts, C)
    assert _same(a.pixel_accuracy, b.pixel_accuracy)
    ref = diffseg_benchmark(permuted, gts, C)
    assert _same(b.miou, ref[0]) and _same(b.per_class, ref[2])
    # each image's matched confusion is one of its optimal ones; the same as before if all optimal ones agree
    for p, q, g in zip(preds, permuted, gts):
        Pp, Pq = max(C, int(p.max()) + 1), max(C, int(q.max()) + 1)
        before = fold_confusion(confusion_matrix(p, g, C, num_preds=Pp), "per_image")
        after = fold_confusion(confusion_matrix(q, g, C, num_preds=Pq), "per_image")
        options = _matched_confusions(ref_confusion(q, g, C, Pq), C)
        assert any(np.array_equal(after, o) for o in options)
        # the same as before only if the optimum is unique on both tables (their widths may differ: zero columns tie)
        if len(options) == 1 == len(_matched_confusions(ref_confusion(p, g, C, Pp), C)):
            np.testing.assert_array_equal(before, after)
    a, b = score_dataset(preds, gts, C), score_dataset(permuted, gts, C)
    assert _same(a.pixel_accuracy, b.pixel_accuracy)
    width = max(C, max(int(q.max()) + 1 for q in permuted))     # the dataset table grows to the largest id seen
    conf_b = sum(ref_confusion(q, g, C, width) for q, g in zip(permuted, gts))
    options = _matched_confusions(conf_b, C)
    assert any(np.array_equal(b.confusion, o) for o in options)
    width_a = max(C, max(int(p.max()) + 1 for p in preds))
    unique_a = len(_matched_confusions(sum(ref_confusion(p, g, C, width_a) for p, g in zip(preds, gts)), C)) == 1
    if len(options) == 1 and unique_a: np.testing.assert_array_equal(a.confusion, b.confusion)

def test_renaming_segments_can_move_a_leftover_segment_to_another_absent_class():
    "The notebook's example: the same segments under other ids; DiffSeg's code gives the two different mIoUs too."
    ga, gb = np.array([[0, 0, 1, 1]]), np.array([[2, 2, 2, 2]])
    pa, pb = np.array([[0, 0, 1, 2]]), np.array([[0, 0, 0, 0]])
    renamed = np.array([0, 2, 3])[pa]
    x, y = score_per_image([pa, pb], [ga, gb], 4), score_per_image([renamed, pb], [ga, gb], 4)
    assert x.pixel_accuracy == y.pixel_accuracy and x.miou != y.miou
    for s, p in ((x, pa), (y, renamed)):
        m, acc, iou, _ = diffseg_benchmark([p, pb], [ga, gb], 4)
        assert _same(s.miou, m) and _same(s.per_class, iou) and _same(s.pixel_accuracy, acc)

@SET
@given(labelled(max_classes=4, max_clusters=4, max_images=1))
def test_hungarian_is_optimal_against_brute_force(data):
    (p,), (g,), C, P = data
    conf = ref_confusion(p, g, C, P)
    best, optimal = ref_optimal_matchings(conf)
    for protocol in ("per_image", "dataset"):
        mapping = hungarian_match(conf, protocol)
        mc = matched_confusion(conf, mapping)
        assert np.trace(mc[:, :C]) == best                               # maximal overlap
        assert mapping in optimal                                        # and one of the optimal maps
        named = [v for v in mapping.values() if v >= 0]
        assert sorted(named) == sorted(set(named))                       # one-to-one
        assert len(named) == min(C, P)                                   # every class matched while clusters last
        assert mc.sum() == conf.sum()                                    # unmatched pixels kept (as wrong)

@SET
@given(segmented())
def test_hungarian_match_is_diffsegs_matching(data):
    "hungarian_match on a (C, P) table, even a narrow one, pairs what DiffSeg's linear_sum_assignment on _fast_hist pairs."
    preds, gts, C = data
    for p, g in zip(preds, gts):
        for P in sorted({int(p.max()) + 1, max(C, int(p.max()) + 1)}):     # narrow (P < C possible) and DiffSeg's width
            hist = diffseg_fast_hist(g.flatten(), p.flatten(), C)
            rows, cols = linear_sum_assignment(hist, maximize=True)
            want = {k: -1 for k in range(P)}
            want.update({int(c): int(r) for r, c in zip(rows, cols) if c < P})
            assert hungarian_match(confusion_matrix(p, g, C, num_preds=P)) == want

@SET
@given(labelled())
def test_per_image_protocol_equals_reference(data):
    preds, gts, C, _ = data
    s = score_per_image(preds, gts, C)
    total_best = sum(ref_optimal_matchings(ref_confusion(p, g, C, int(p.max()) + 1))[0] for p, g in zip(preds, gts))
    n = sum((g != IGN).sum() for g in gts)
    if n: assert s.pixel_accuracy == pytest.approx(total_best / n)
    assert s.protocol == "per_image" and s.confusion.shape == (C, C + 1)
    for p, g in zip(preds, gts):   # each image's matched confusion is one of its optimal full matchings
        P = max(C, int(p.max()) + 1)
        assert any(np.array_equal(fold_confusion(confusion_matrix(p, g, C, num_preds=P), "per_image"), o)
                   for o in _matched_confusions(ref_confusion(p, g, C, P), C))

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segmented())
def test_score_per_image_equals_diffseg_released_code(data):
    "score_per_image == DiffSeg's hungarian_matching + benchmarks.ipynb accumulation: mIoU, accuracy, per-class IoU, TP/FP/FN."
    preds, gts, C = data
    s = score_per_image(preds, gts, C)
    m, acc, iou, (TP, FP, FN) = diffseg_benchmark(preds, gts, C)
    assert _same(s.miou, m) and _same(s.pixel_accuracy, acc) and _same(s.per_class, iou)
    mc = s.confusion
    np.testing.assert_array_equal(np.diag(mc[:, :C]), TP)
    np.testing.assert_array_equal(mc[:, :C].sum(0) - np.diag(mc[:, :C]), FP)
    np.testing.assert_array_equal(mc.sum(1) - np.diag(mc[:, :C]), FN)
    # the same through the accumulator, and through folding stored counts (what the evaluation runner does)
    acc_u, acc_f = ConfusionAccumulator(C, "per_image"), ConfusionAccumulator(C, "per_image")
    for p, g in zip(preds, gts):
        acc_u.update(p, g)
        acc_f.confusion += fold_confusion(confusion_matrix(p, g, C, num_preds=max(C, int(p.max()) + 1)), "per_image")
    np.testing.assert_array_equal(acc_u.scores().confusion, mc); np.testing.assert_array_equal(acc_f.confusion, mc)

def test_diffseg_cases_by_hand():
    "The audit's case (../shared/audits/method.md, ranked list 1) and its opposite, against the port."
    gt = np.zeros((8, 8), int); gt[:, 4:] = 1; pred = gt.copy(); pred[:2, :2] = 2; pred[:2, 4:6] = 3
    assert score_per_image([pred], [gt], 27).miou == pytest.approx(0.4375, abs=1e-12)
    assert diffseg_benchmark([pred], [gt], 27)[0] == pytest.approx(0.4375, abs=1e-12)
    under = np.zeros((8, 8), int)                                    # one segment over both classes
    s = score_per_image([under], [gt], 27)
    assert _same(s.per_class[:2], [0.5, 0.0]) and s.miou == pytest.approx(0.25)   # class 1 gets an empty segment

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segmented(), st.integers(-3, 4))
def test_score_dataset_equals_stego_released_code(data, extra):
    """score_dataset == STEGO's UnsupervisedMetrics. With n_classes clusters (STEGO's released configs, extra_clusters 0),
    or fewer (STEGO with clusters never predicted): the same mIoU, accuracy and per-class IoU. With extra clusters: the
    same per-class IoU and accuracy as STEGO's code with its update mask widened to every cluster, and the mean over the
    classes (md_probe's declared deviation)."""
    preds, gts, C = data
    K = max(1, C + extra)
    rng = np.random.default_rng(C * 7 + extra + 3)
    preds = [rng.permutation(max(K, int(p.max()) + 1))[p] % K for p in preds]    # cluster ids shared, in [0, K)
    s = score_dataset(preds, gts, C, num_preds=K)
    if K <= C:
        m, opc, iou = stego_metrics(preds, gts, C, 0)
        assert _same(s.miou, m) and _same(s.pixel_accuracy, opc) and _same(s.per_class, iou)
        assert _same(score_dataset(preds, gts, C).miou, m)           # the grown table is padded to C clusters
    else:
        m, opc, iou = stego_metrics(preds, gts, C, extra, released_update_mask=False)
        assert _same(s.per_class, iou[:C]) and _same(s.pixel_accuracy, opc)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            assert _same(s.miou, np.nanmean(iou[:C]))

def test_stego_extra_clusters_deviation_is_what_the_notebook_says():
    "STEGO's update drops pixels of clusters >= n_classes and averages in a 0 for the unmatched row; md_probe does neither."
    g = np.array([[0, 0, 1, 1]]); p = np.array([[0, 2, 1, 1]])              # cluster 2 (an extra one) splinters class 0
    s = score_dataset([p], [g], 2, num_preds=3)
    released = stego_metrics([p], [g], 2, 1)                               # the pixel of cluster 2 is never counted
    assert released[0] == 1.0 and released[1] == 1.0
    widened = stego_metrics([p], [g], 2, 1, released_update_mask=False)   # counted: the unmatched row scores 0
    assert _same(widened[2], [0.5, 1.0, 0.0]) and widened[0] == pytest.approx(0.5)
    assert _same(s.per_class, [0.5, 1.0]) and s.miou == pytest.approx(0.75) and s.pixel_accuracy == pytest.approx(0.75)

def test_dataset_absent_class_scores_zero_as_in_stego():
    "A class absent from the whole split takes a leftover cluster: IoU 0 (it used to be dropped)."
    g = [np.array([[0, 0, 1, 1]]), np.array([[1, 1, 0, 0]])]; p = [np.array([[0, 2, 1, 1]]), np.array([[1, 1, 0, 0]])]
    s = score_dataset(p, g, 3, num_preds=3)
    m, opc, iou = stego_metrics(p, g, 3, 0)
    assert _same(s.per_class, [0.75, 1.0, 0.0]) and _same(iou, s.per_class) and s.miou == pytest.approx(m, abs=1e-12)

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segmented(min_classes=2))   # one class: histc(min=0, max=0) falls back to the data's range in torch
def test_miou_equals_mmsegmentation(data):
    "miou of a supervised confusion == mmsegmentation's IoUMetric; id C = 'no class' (outside histc's range)."
    preds, gts, C = data
    preds = [p % (C + 1) for p in preds]
    conf = sum(confusion_matrix(p, g, C, num_preds=C + 1) for p, g in zip(preds, gts))
    m, per = miou(conf)
    rm, riou, racc = mmseg_iou(preds, gts, C)
    assert _same(m, rm) and _same(per, riou)
    assert _same(pixel_accuracy(conf), racc)
    acc = ConfusionAccumulator(C, "supervised", num_preds=C + 1)
    for p, g in zip(preds, gts): acc.update(p, g)
    assert _same(acc.scores().miou, rm)

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
        out.append(np.nan if row + colsum - tp == 0 else tp / (row + colsum - tp))
    return np.array(out)

def test_zero_overlap_pairs_are_matched_as_diffseg_does():
    """Cluster 1 only touches class 0; the optimal assignment pairs it with class 1 at zero overlap. DiffSeg keeps that
    pair: the pixel is a false positive of class 1 (md_probe used to leave the cluster unmatched)."""
    conf = np.array([[4, 1], [2, 0]])
    assert hungarian_match(conf) == {0: 0, 1: 1}
    np.testing.assert_array_equal(matched_confusion(conf, {0: 0, 1: 1}), [[4, 1, 0], [2, 0, 0]])
    tp, fp, fn, _ = diffseg_hungarian_matching([np.array([0, 0, 0, 0, 1, 0, 0])], [np.array([0, 0, 0, 0, 0, 1, 1])], 2)
    np.testing.assert_array_equal(tp, [4, 0]); np.testing.assert_array_equal(fp, [2, 1]); np.testing.assert_array_equal(fn, [1, 2])

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
