"md_probe.clustering against scikit-learn on synthetic blobs, the dense/sparse paths, kinds, devices, memory."
import subprocess, sys, textwrap
import numpy as np, pytest, torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score as ari
from md_probe.clustering import (kmeans, kmeans_fit, knn_cosine, cosine_affinity, spectral_embedding, eigengap,
                                 spectral_clustering, SpectralResult, cluster_feature_map, pca, pca_rgb, umap_embed,
                                 DENSE_MAX, KNN, _subspace)

torch.set_num_threads(1)

def blobs(n=600, d=32, k=4, noise=0.6, seed=0):
    "Equal-sized clusters separated in direction (cosine), with a shared mean component like real features."
    g = np.random.default_rng(seed)
    y = np.arange(n) % k
    x = 0.5 * g.normal(size=d) + g.normal(size=(k, d))[y] + noise * g.normal(size=(n, d))
    return x.astype(np.float32), y

# ---------- k-means ----------
@pytest.mark.parametrize("k", [3, 6])
def test_kmeans_matches_sklearn(k):
    from sklearn.cluster import KMeans
    x, y = blobs(k=k, d=16, seed=k)
    ours = kmeans(x, k)
    sk = KMeans(k, n_init=4, random_state=0).fit_predict(x)
    assert ari(ours, sk) >= 0.99 and ari(ours, y) >= 0.99

def test_kmeans_inertia_not_worse_than_sklearn():
    from sklearn.cluster import KMeans
    x, _ = blobs(n=500, k=8, noise=1.5, seed=3)                     # overlapping: a real optimisation problem
    lab, c = kmeans_fit(x, 8, n_init=8)
    inertia = ((x - c[lab]) ** 2).sum()
    assert inertia <= KMeans(8, n_init=8, random_state=0).fit(x).inertia_ * 1.01

def test_kmeans_seed_init_kinds():
    x, y = blobs()
    a, b = kmeans(x, 4, seed=0), kmeans(x, 4, seed=0)
    np.testing.assert_array_equal(a, b)
    assert isinstance(a, np.ndarray) and a.dtype == np.int64 and a.shape == (600,)
    t = kmeans(torch.from_numpy(x), 4)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.int64 and t.device.type == "cpu"
    np.testing.assert_array_equal(t.numpy(), a)
    # init: true class means as starting centroids give the true labels, in the init's order
    means = np.stack([x[y == c].mean(0) for c in range(4)])
    np.testing.assert_array_equal(kmeans(x, 4, init=means), y)
    assert kmeans(x.astype(np.float64), 4).dtype == np.int64

def test_kmeans_relocates_empty_clusters():
    g = np.random.default_rng(0)
    x = (np.concatenate([np.zeros((50, 2)), np.ones((50, 2)) * 10]) + g.normal(size=(100, 2))).astype(np.float32)
    init = np.array([[0, 0], [10, 10], [100, 100]], dtype=np.float32)  # the third centroid attracts nothing
    lab = kmeans(x, 3, init=init)
    assert len(np.unique(lab)) == 3                                    # it was moved onto the data

# ---------- affinity ----------
def test_knn_cosine_exact_with_uneven_blocks():
    x = torch.randn(1000, 24)
    v, i = knn_cosine(x, 7, block=300)
    xn = F.normalize(x, dim=1); s = xn @ xn.T; s.fill_diagonal_(-2)
    ref = s.topk(7, dim=1)
    torch.testing.assert_close(v, ref.values, atol=1e-5, rtol=0)
    assert (i == ref.indices).float().mean() > 0.999
    assert not (i == torch.arange(1000)[:, None]).any()                 # self excluded

def test_sparse_affinity_is_symmetric_union_of_neighbours():
    x, _ = blobs(n=300)
    Ws, Wd = cosine_affinity(x, knn=5), cosine_affinity(x)
    assert abs(Ws - Ws.T).max() == 0 and Ws.diagonal().sum() == 0
    _, idx = knn_cosine(x, 5)
    for r in range(0, 300, 37):                                          # every neighbour kept, with its cosine weight
        for c in idx[r].tolist():
            if Wd[r, c] > 0: assert Ws[r, c] == pytest.approx(float(Wd[r, c]), abs=1e-5) and Ws[c, r] == Ws[r, c]

# ---------- spectral ----------
@pytest.mark.parametrize("k", [3, 5])
def test_spectral_matches_sklearn_on_same_affinity(k):
    from sklearn.cluster import SpectralClustering
    x, y = blobs(k=k, seed=k)
    W = cosine_affinity(x).numpy()
    sk = SpectralClustering(k, affinity="precomputed", random_state=0).fit_predict(W)
    ours = spectral_clustering(x, k)
    assert ari(ours, sk) >= 0.99 and ari(ours, y) >= 0.99
    assert ari(spectral_clustering(W, k, affinity="precomputed"), sk) >= 0.99

@pytest.mark.parametrize("k", [3, 5, 7])
def test_eigengap_finds_true_k(k):
    x, y = blobs(n=700, k=k, seed=10 + k)
    for kw in ({}, {"knn": 15}, {"gap": "absolute", "power": 3}):
        r = spectral_clustering(x, return_info=True, **kw)
        assert isinstance(r, SpectralResult) and r.k == k, (kw, r)
        assert ari(r.labels, y) >= 0.99

def test_disconnected_knn_graph_keeps_every_component():
    "7 separate clusters make 7 components: eigenvalue 1 seven times (Lanczos alone finds only some copies)."
    x, y = blobs(n=700, k=7, seed=17)
    W = cosine_affinity(x, knn=15)
    from scipy.sparse.csgraph import connected_components
    assert connected_components(W)[0] == 7
    vals, vecs = spectral_embedding(W, 10)
    torch.testing.assert_close(vals[:7], torch.ones(7), atol=1e-6, rtol=0)
    assert vals[7] < 0.9
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(10), atol=1e-4, rtol=0)   # orthonormal
    assert ari(spectral_clustering(W, 7, affinity="precomputed"), y) == 1.0

def test_sparse_path_above_threshold_gives_same_clusters():
    x, y = blobs(n=1200, k=5, seed=2)
    dense = spectral_clustering(x, 5, return_info=True, dense_max=5000)
    sparse = spectral_clustering(x, 5, return_info=True, dense_max=1000)
    assert (dense.sparse, sparse.sparse, sparse.knn) == (False, True, KNN)
    assert ari(dense.labels, sparse.labels) >= 0.99 and ari(sparse.labels, y) >= 0.99
    assert spectral_clustering(x[:300], 5, knn=10, return_info=True).sparse     # knn= forces the sparse path
    assert DENSE_MAX == 64 * 64                                                 # a 64x64 map is dense, 128x128 sparse

def test_spectral_kinds_and_determinism():
    x, _ = blobs()
    a = spectral_clustering(x, 4)
    assert isinstance(a, np.ndarray) and a.dtype == np.int64 and a.shape == (600,)
    t = spectral_clustering(torch.from_numpy(x), 4)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.int64
    np.testing.assert_array_equal(t.numpy(), a)
    np.testing.assert_array_equal(spectral_clustering(x, 4), a)
    assert isinstance(spectral_clustering(cosine_affinity(x, knn=10), 4, affinity="precomputed"), np.ndarray)
    with pytest.raises(ValueError, match="use 'cosine'"): spectral_clustering(x, 4, affinity="rbf")

def test_dense_solver_agrees_with_full_decomposition():
    x, _ = blobs(n=900, k=6, seed=4)                                   # > 512 points: subspace iteration
    W = cosine_affinity(x)
    vals, vecs = spectral_embedding(W, 10)
    d = W.sum(1).rsqrt(); M = W * d[:, None] * d[None]
    full_vals, full_vecs = torch.linalg.eigh(M)
    torch.testing.assert_close(vals, full_vals.flip(0)[:10], atol=1e-3, rtol=0)
    # the leading 6-dim eigenspace is the same (projection onto it preserves the vectors)
    P = full_vecs[:, -6:]
    assert (P @ (P.T @ vecs[:, :6]) - vecs[:, :6]).norm() < 1e-2
    assert W.diagonal().sum() == 0                                     # the caller's affinity was not modified

def _designed(eigs, n=700, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g))[0]
    lam = torch.full((n,), 0.01); lam[:len(eigs)] = torch.tensor(eigs)
    return (Q * lam) @ Q.T

def test_subspace_detects_crowding_negative_eigenvalues():
    "Subspace iteration sees magnitudes: with more big negatives than spare vectors it must refuse (ARPACK takes over)."
    few = _designed([1, .5, .4] + [-.95] * 5)
    vals, _ = _subspace(few, 3, 0)
    torch.testing.assert_close(vals, torch.tensor([1, .5, .4]), atol=1e-4, rtol=0)
    # 12 eigenvalues -0.95 fill the 13-vector block and push 0.5, 0.4 out: converged, but not the answer
    assert _subspace(_designed([1, .5, .4] + [-.95] * 12), 3, 0) is None

def test_spectral_embedding_with_large_negative_eigenvalues():
    "A near-bipartite affinity has eigenvalues near -1; the leading (algebraic) ones must still come out."
    g = torch.Generator().manual_seed(0)
    n = 600; B = torch.rand(n // 2, n // 2, generator=g) ** 8
    W = torch.zeros(n, n); W[:n // 2, n // 2:] = B; W[n // 2:, :n // 2] = B.T
    u = torch.rand(n, n, generator=g).triu(1); W += 0.01 * (u + u.T)    # zero diagonal, symmetric
    d = W.sum(1).rsqrt(); M = W * d[:, None] * d[None]
    ref = torch.linalg.eigvalsh(M).flip(0)
    assert ref[-1] < -0.5                                               # really has big negative eigenvalues
    for k in (2, 8, 13):
        torch.testing.assert_close(spectral_embedding(W, k)[0], ref[:k], atol=2e-3, rtol=0)

def test_sparse_path_never_builds_dense_matrix():
    "Peak memory of a 12k-point sparse spectral clustering stays far below one dense 12k x 12k float32 matrix (576 MB)."
    code = textwrap.dedent("""
        import resource, numpy as np, torch
        torch.set_num_threads(1)
        from md_probe.clustering import spectral_clustering
        g = np.random.default_rng(0); y = np.arange(12000) % 5
        x = torch.tensor(g.normal(size=(5, 16))[y] + 0.5 * g.normal(size=(12000, 16)), dtype=torch.float32)
        spectral_clustering(x[:600], 5)                                  # warm up imports and allocator
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        r = spectral_clustering(x, 5, return_info=True)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        from sklearn.metrics import adjusted_rand_score as ari
        print(r.sparse, (after - before) / 1024, ari(r.labels, y))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "True"
    assert float(out[1]) < 200, f"peak memory grew by {out[1]} MB"
    assert float(out[2]) >= 0.99

# ---------- feature maps and projections ----------
def test_cluster_feature_map_shapes_and_kinds():
    x, y = blobs(n=24 * 20, k=3)
    f = torch.from_numpy(x.T.reshape(32, 24, 20).copy())
    for method, k in (("kmeans", 3), ("spectral", 3), ("spectral", None)):
        lab = cluster_feature_map(f, k, method=method)
        assert lab.shape == (24, 20) and lab.dtype == torch.int64
        assert ari(lab.flatten(), y) >= 0.99
    assert isinstance(cluster_feature_map(f.numpy(), 3), np.ndarray)
    with pytest.raises(ValueError, match=r"\(C, H, W\) map"): cluster_feature_map(x, 3)
    with pytest.raises(TypeError, match="return_info"): cluster_feature_map(f, 3, method="spectral", return_info=True)

def test_pca_matches_sklearn():
    from sklearn.decomposition import PCA
    x, _ = blobs(n=400, d=40, k=5, noise=1.0)
    ours = pca(x, 3)
    sk = PCA(3).fit_transform(x)
    np.testing.assert_allclose(np.abs(ours), np.abs(sk), atol=2e-3)
    assert isinstance(ours, np.ndarray) and isinstance(pca(torch.from_numpy(x), 2), torch.Tensor)

def test_pca_rgb_range_and_kind():
    x, _ = blobs(n=30 * 20, d=16)
    rgb = pca_rgb(torch.from_numpy(x.T.reshape(16, 30, 20).copy()))
    assert rgb.shape == (30, 20, 3) and rgb.dtype == torch.float32 and rgb.min() >= 0 and rgb.max() <= 1
    assert rgb.reshape(-1, 3).std(0).min() > 0.1                      # every channel is used
    assert isinstance(pca_rgb(x.T.reshape(16, 30, 20)), np.ndarray)

@pytest.mark.slow
def test_umap_embed_separates_blobs():
    x, y = blobs(n=400, k=4)
    emb = umap_embed(x, n_neighbors=15)
    assert emb.shape == (400, 2) and emb.dtype == np.float32
    assert ari(kmeans(emb, 4), y) >= 0.99
    assert isinstance(umap_embed(torch.from_numpy(x[:100])), torch.Tensor)

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_is_kept_on_gpu():
    x, y = blobs()
    t = torch.from_numpy(x).cuda()
    for lab in (kmeans(t, 4), spectral_clustering(t, 4), spectral_clustering(t, 4, knn=10)):
        assert lab.device.type == "cuda" and ari(lab.cpu().numpy(), y) >= 0.99
    assert pca(t, 3).device.type == "cuda"

def test_import_is_light():
    code = "import sys, md_probe.clustering; print(sorted(m for m in ('scipy', 'sklearn', 'umap', 'numba') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
