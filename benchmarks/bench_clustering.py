"""Benchmark md_probe's spectral clustering on one CPU thread.

(a) 64x64 = 4096 points x 1280 dims (synthetic clustered features): md_probe vs scikit-learn
    `SpectralClustering(affinity="precomputed")` on the same dense cosine affinity (target: >= 10x faster).
(b) 128x128 = 16384 points x 1280 dims: md_probe's sparse (kNN) path, time (target: < 10 s) and peak memory,
    in a fresh process so that `ru_maxrss` measures this run alone; the dense 16384^2 float32 matrix would be 1 GiB.

Usage: python benchmarks/bench_clustering.py [--sklearn-large]
  --sklearn-large  also run scikit-learn on the dense 16384^2 affinity (about 85 s and 9.6 GB).
"""
import os, re, sys, time, subprocess, resource
for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"): os.environ[v] = "1"  # before numpy/torch load
import numpy as np, torch
torch.set_num_threads(1)

K = 6  # segments in the synthetic maps

def clustered_features(side, C=1280, k=K, noise=1.5, seed=1):
    "(side*side, C) float32 features of `k` Voronoi regions (centre + shared component + noise), and the region ids."
    g = torch.Generator().manual_seed(seed)
    seeds = torch.rand(k, 2, generator=g) * side
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    regions = ((torch.stack([yy, xx], -1)[..., None, :] - seeds) ** 2).sum(-1).argmin(-1).flatten()
    x = torch.randn(C, generator=g) + torch.randn(k, C, generator=g)[regions]
    x += noise * torch.randn(side * side, C, generator=g)
    return x, regions.numpy()

def best_of(f, n):
    "(min seconds over n runs, last result)"
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); out = f(); ts.append(time.perf_counter() - t0)
    return min(ts), out

def part_a():
    from sklearn.cluster import SpectralClustering
    from sklearn.metrics import adjusted_rand_score as ari
    from md_probe.clustering import cosine_affinity, spectral_clustering
    x, y = clustered_features(64)
    print(f"(a) 64x64 = {x.shape[0]} points x {x.shape[1]} dims, {K} segments, 1 thread")
    spectral_clustering(x[:600], K)                                    # warm-up (imports, allocator)
    t_aff, W = best_of(lambda: cosine_affinity(x), 2)
    t_ours, ours = best_of(lambda: spectral_clustering(W, K, affinity="precomputed"), 3)
    t_e2e, _ = best_of(lambda: spectral_clustering(x, K), 2)
    t_gap, info = best_of(lambda: spectral_clustering(x, return_info=True), 1)
    Wn = W.numpy()
    t_sk, sk = best_of(lambda: SpectralClustering(K, affinity="precomputed", random_state=0).fit_predict(Wn), 2)
    print(f"    dense cosine affinity (md_probe, 4096^2)        {t_aff:7.3f} s")
    print(f"    md_probe  spectral from that affinity           {t_ours:7.3f} s   ARI vs truth {ari(ours, y):.3f}")
    print(f"    sklearn   SpectralClustering(precomputed)       {t_sk:7.3f} s   ARI vs truth {ari(sk, y):.3f}")
    print(f"    -> same affinity: md_probe {t_sk / t_ours:.1f}x faster (target >= 10x); ARI(md_probe, sklearn) = {ari(ours, sk):.3f}")
    print(f"    md_probe end to end from features (k given)     {t_e2e:7.3f} s   ({t_sk / t_e2e:.1f}x faster than sklearn without its affinity)")
    print(f"    md_probe end to end, k by eigengap              {t_gap:7.3f} s   k = {info.k}")

def _status(field):
    "A memory figure of this process from /proc/self/status, in MiB."
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024

def _reset_peak():
    "Reset the kernel's peak-RSS mark (VmHWM) so it measures from now on; the baseline RSS in MiB."
    try: open("/proc/self/clear_refs", "w").write("5"); return _status("VmRSS")
    except OSError: return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak so far: a lower bound

def part_b():
    "Runs in a fresh process, peak RSS measured from just before the clustering."
    from sklearn.metrics import adjusted_rand_score as ari
    from md_probe.clustering import cosine_affinity, spectral_clustering
    x, y = clustered_features(128)
    spectral_clustering(x[:600], K, knn=20)                            # warm-up: scipy, sparse solver, allocator
    rss0 = _reset_peak()
    w0, c0 = time.perf_counter(), time.process_time(); W = cosine_affinity(x, knn=20)
    w1, c1 = time.perf_counter(), time.process_time(); r = spectral_clustering(W, None, affinity="precomputed", return_info=True)
    w2, c2 = time.perf_counter(), time.process_time()
    peak = _status("VmHWM")
    n = x.shape[0]
    print(f"(b) 128x128 = {n} points x {x.shape[1]} dims, {K} segments, 1 thread, sparse kNN path (knn=20); wall / CPU seconds")
    print(f"    kNN graph (blocked x @ x.T, upper triangle)     {w1 - w0:7.3f} / {c1 - c0:6.3f} s   nnz = {W.nnz} ({W.nnz / n:.1f} per point)")
    print(f"    eigenvectors + eigengap + k-means               {w2 - w1:7.3f} / {c2 - c1:6.3f} s   k = {r.k}, ARI vs truth {ari(r.labels, y):.3f}")
    print(f"    total                                           {w2 - w0:7.3f} / {c2 - c0:6.3f} s   (target < 10 s; wall > CPU when the core is shared)")
    print(f"    peak RSS growth during the clustering {peak - rss0:6.1f} MiB (the features alone are {x.numel() * 4 / 2**20:.0f} MiB); "
          f"a dense {n}^2 float32 affinity would be {n * n * 4 / 2**20:.0f} MiB: never built")

def part_b_sklearn():
    from sklearn.cluster import SpectralClustering
    from sklearn.metrics import adjusted_rand_score as ari
    from md_probe.clustering import cosine_affinity
    x, y = clustered_features(128)
    W = cosine_affinity(x).numpy()
    t0 = time.perf_counter(); sk = SpectralClustering(K, affinity="precomputed", random_state=0).fit_predict(W)
    print(f"    sklearn on the dense 16384^2 affinity          {time.perf_counter() - t0:7.3f} s   ARI vs truth {ari(sk, y):.3f}")

if __name__ == "__main__":
    if "--part-b" in sys.argv: part_b(); sys.exit()
    if "--part-b-sklearn" in sys.argv: part_b_sklearn(); sys.exit()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, CPU: "
          f"{next((l.split(':')[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), '?')}")
    part_a()
    for flag in ["--part-b"] + (["--part-b-sklearn"] if "--sklearn-large" in sys.argv else []):
        sys.stdout.flush()
        subprocess.run([sys.executable, __file__, flag], check=True)
