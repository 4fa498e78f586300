"""Benchmark md_probe's explorers on the trained shapes model: how long a control change takes to reach the figure.

(a) In the browser (the number that matters, target < 100 ms, reported, not asserted): Voila serves
    tests/browser/explorers_demo.ipynb on 127.0.0.1, Debian's chromium (playwright, executable_path) moves every
    control of every explorer `--repeats` times; latency = the user's input event (keydown / change / click /
    mouseup) -> the last plotly redraw event that follows it, on the page's clock. A trivial widget round trip
    (slider -> kernel -> label) is measured too: the transport floor of this machine.
(b) In Python (what the kernel spends per update, no browser): the explorers' own `timings`.

UMAP's first projection compiles with numba (seconds) and a new class list runs the UNet: both are reported
apart from the controls that are served from the cache. The repeats run in the ClusterExplorer's default PCA view:
under UMAP every new layer or timestep needs a UMAP of its pixels (1.6 s for 1024 points here), which is computation,
not display.

Usage: python benchmarks/bench_explorers.py [--repeats 5] [--json test-results/bench_explorers.json] [--python-only]
Needs chromium, playwright and voila (.ci/install-browser, the dev extra) for (a).
"""
import argparse, json, os, statistics, sys, time
from pathlib import Path
os.environ.setdefault("HF_HUB_OFFLINE", "1")
for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"): os.environ.setdefault(v, "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "browser"))

SEPARATE = {("cluster-explorer", "projection"): "first UMAP compiles (numba); later switches are cached",
            ("segmentation-explorer", "classes"): "a new class list: one UNet call",
            ("cluster-explorer", "lasso"): "selection of ~half the points"}


def stats(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs: return dict(n=0)
    return dict(n=len(xs), median=statistics.median(xs), p90=xs[min(len(xs) - 1, int(0.9 * len(xs)))], max=xs[-1])


def python_side(repeats):
    "Median Python time per control update (ms), explorers built in this process on the shapes model."
    import numpy as np, torch
    torch.set_num_threads(1)
    from md_probe.models import load_model
    from md_probe.shapes import make_scenes
    from md_probe.explorers import AttentionExplorer, FeatureExplorer, ClusterExplorer, SegmentationExplorer
    shapes = load_model("shapes")
    scene = next(s for s in make_scenes(6, seed=12345) if len(s.classes) >= 3)
    exs = {"attention-explorer": AttentionExplorer(shapes, scene.image, scene.prompt()),
           "feature-explorer": FeatureExplorer(shapes, scene.image),
           "cluster-explorer": ClusterExplorer(shapes, scene.image),
           "segmentation-explorer": SegmentationExplorer(shapes, scene.image, classes=scene.classes[1:] + ["background"])}
    exs["segmentation-explorer"].controls["use_threshold"].value = True
    out = {}
    for name, ex in exs.items():
        for cname, w in ex.controls.items():
            if cname in ("classes", "projection"): continue    # reported apart (UNet call, numba compile)
            ex.timings.pop(cname, None)
            for i in range(repeats): w.value = _next_value(w, i)
            out[f"{name}/{cname}"] = stats([t * 1000 for t in ex.timings.get(cname, [])])
    fx, cx = exs["feature-explorer"], exs["cluster-explorer"]
    out["feature-explorer/click"] = stats([_time(lambda: fx.select_pixel(3 + i, 5 + i)) for i in range(repeats)])
    out["cluster-explorer/lasso"] = stats([_time(lambda: cx.select(range(0, len(cx.features()), 2 + i))) for i in range(repeats)])
    sx = exs["segmentation-explorer"]
    lists = ["circle, square, triangle, background", "circle, square, background"]
    out["segmentation-explorer/classes"] = stats([_time(lambda: setattr(sx.controls["classes"], "value", lists[i % 2]))
                                                  for i in range(repeats)])
    return out


def _next_value(w, i):
    "Another value for control `w`: the next option, the other boolean, or a point along the slider."
    import numpy as np
    if isinstance(w.value, bool): return not w.value
    if hasattr(w, "options"):
        opts = [o[1] if isinstance(o, tuple) else o for o in w.options]
        return opts[(opts.index(w.value) + 1) % len(opts)]
    v = np.linspace(w.min, w.max, 5)[1 + i % 3]
    return int(round(v)) if isinstance(w.value, int) else float(v)


def _time(f):
    t0 = time.perf_counter(); f(); return (time.perf_counter() - t0) * 1000


def browser_side(repeats, log):
    import mdp_browser as B
    why = B.missing()
    if why: raise SystemExit(f"bench_explorers: {why}")
    res, first = {}, {}
    with B.voila(log=log) as url, B.browser() as page:
        t0 = time.time()
        B.wait_loaded(page, url)
        res["page load (s)"] = time.time() - t0
        B.echo(page)                                            # warm-up
        res["echo"] = stats([B.echo(page) for _ in range(max(5, repeats * 2))])
        acts = B.interactions(page, one_step=True)
        for ex, c, act in acts:                                 # one pass: first-time costs (caches, UMAP compile)
            first[f"{ex}/{c}"] = B.change(page, ex, act, timeout=300)["ms"]
            print(f"  first {ex}/{c}: {first[f'{ex}/{c}']}", flush=True)
            if c == "projection": B.change(page, ex, act, timeout=300)   # back to PCA: a UMAP per new layer takes seconds
        eigengap = page.locator(".mdp-cluster-explorer .mdp-eigengap input")
        for ex, c, act in acts:
            if c == "eigengap": continue                      # its k may equal the slider's: measured once, above
            if c == "k" and eigengap.is_checked(): eigengap.click(); page.wait_for_timeout(500)  # k is disabled under it
            ms = [B.change(page, ex, act, timeout=300 if c == "projection" else 30)["ms"] for _ in range(repeats)]
            if c == "use_threshold" and not page.locator(".mdp-segmentation-explorer .mdp-use_threshold input").is_checked():
                act()                                           # leave the threshold on: its slider is measured next
                page.wait_for_timeout(500)
            res[f"{ex}/{c}"] = stats(ms)
            print(f"  {ex}/{c}: {res[f'{ex}/{c}']}", flush=True)
        res["console errors"] = page.errors
    return res, first


def main():
    import signal
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))   # a killed benchmark still stops its server and browser
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=str(ROOT / "test-results" / "bench_explorers.json"))
    ap.add_argument("--python-only", action="store_true")
    a = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    py = python_side(a.repeats)
    out = {"python": py}
    if not a.python_only:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        br, first = browser_side(a.repeats, Path(a.json).with_suffix(".voila.log"))
        out.update(browser=br, browser_first=first)
        print(f"\npage load {br['page load (s)']:.1f} s; widget round trip (echo) median {br['echo']['median']:.0f} ms, "
              f"p90 {br['echo']['p90']:.0f} ms; console errors: {len(br['console errors'])}")
    print(f"\n{'explorer/control':<42}{'browser median':>15}{'p90':>8}{'first':>9}{'python median':>15}  note")
    order = list(out.get("browser_first") or py)
    for k in order:
        b, f, p = out.get("browser", {}).get(k, {}), out.get("browser_first", {}).get(k), py.get(k, {})
        ex, c = k.split("/")
        note = SEPARATE.get((ex, c), "")
        if b.get("n") and not note: note = "< 100 ms" if b["median"] < 100 else ">= 100 ms"
        fmt = lambda d, key: f"{d[key]:.0f}" if d.get("n") else "-"
        print(f"{k:<42}{fmt(b, 'median'):>15}{fmt(b, 'p90'):>8}{(f'{f:.0f}' if f else '-'):>9}{fmt(p, 'median'):>15}  {note}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=1))
    print(f"\nwritten {a.json}")


if __name__ == "__main__":
    main()
