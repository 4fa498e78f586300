"""Benchmark the evaluation runner (md_probe.evaluate.evaluate).

(a) Throughput in images/s of MaskDiffusion at 512 x 512 on the SD 1.5 architecture (`sd15-random`), CPU fp32 and
    bf16, through `evaluate` (DataLoader, one UNet call per batch, confusion counts, resumable records). The data set
    is a fake Potsdam-3 at 512 x 512 (three class names: one prompt row, as SD's tokenizer gives for a data set's
    names; the offline tokenizer would split COCO-Stuff's 27 names over 3 rows).
(b) The runner's overhead over the bare segmenter loop, side by side on the shapes model: the same scenes, the same
    batches through `segment.MaskDiffusion` and `metrics.ConfusionAccumulator.update` by hand, vs `evaluate` (records
    written to disk). Target <= 5 %. Runs alternate and the minimum of each is kept; the machine is shared, so the
    process CPU time (what this process computed, whatever else runs) is printed beside the wall time.

Usage: python benchmarks/bench_evaluate.py [--dtypes fp32,bf16] [--images 4] [--batch-size 2] [--skip-sd]
"""
import os, time, argparse, tempfile
for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"): os.environ.setdefault(v, "1")
import torch

def part_a(dtypes, n, batch_size):
    from md_probe.models import load_model
    from md_probe.data import load_dataset, make_fake_dataset
    from md_probe.evaluate import evaluate
    root = make_fake_dataset("potsdam3", tempfile.mkdtemp(), n=n, size=(512, 512))
    ds = load_dataset("potsdam3", root)
    model = load_model("sd15-random")
    print(f"(a) MaskDiffusion through evaluate(): sd15-random, {n} images 512 x 512, batch {batch_size}, CPU 1 thread", flush=True)
    for dt in dtypes:
        model.to(dtype=dt)
        with tempfile.TemporaryDirectory() as out:
            r = evaluate("maskdiffusion", ds, model=model, batch_size=batch_size, out=out, progress=False)
        print(f"    [{dt}] {r.images_per_s:.4f} images/s ({1 / r.images_per_s:.1f} s per image)", flush=True)

def bare_loop(md, scenes, names, ids, batch_size):
    "The segmenter loop a researcher would write: batched MaskDiffusion, labels mapped to ids, accumulated."
    from md_probe.metrics import ConfusionAccumulator
    acc = ConfusionAccumulator(5, "supervised", num_preds=6)
    lut = torch.tensor(ids + [5] * (256 - len(ids)))
    for b in range(0, len(scenes), batch_size):
        batch = scenes[b:b + batch_size]
        for seg, s in zip(md([s.image for s in batch], names), batch): acc.update(lut[seg.labels], s.mask)
    return acc

def part_b(n, batch_size, repeats):
    from md_probe.models import load_model
    from md_probe.shapes import make_scenes, SHAPE_CLASSES
    from md_probe.data import load_dataset
    from md_probe.segment import MaskDiffusion
    from md_probe.evaluate import evaluate, make_method, prompt_class_ids
    model = load_model("shapes")
    scenes, ds = make_scenes(n, 12345), load_dataset("shapes", n=n, seed=12345)
    ids = prompt_class_ids(list(SHAPE_CLASSES))
    names = [SHAPE_CLASSES[i] for i in ids]
    md = MaskDiffusion(model)
    bare_loop(md, scenes[:batch_size], names, ids, batch_size)                       # warm-up
    t_bare, t_run = [], []                                                          # (wall, cpu) pairs
    def clock(f):
        w, c = time.perf_counter(), time.process_time(); out = f()
        return (time.perf_counter() - w, time.process_time() - c), out
    for _ in range(repeats):                                                          # interleaved: same machine load
        t, acc = clock(lambda: bare_loop(md, scenes, names, ids, batch_size)); t_bare.append(t)
        with tempfile.TemporaryDirectory() as out:
            t, r = clock(lambda: evaluate(make_method("maskdiffusion", model), ds, batch_size=batch_size, out=out,
                                          progress=False, num_workers=0))
            t_run.append(t)
        assert (r.scores.confusion == acc.confusion).all(), "the runner and the bare loop disagree"
    print(f"(b) runner overhead on the shapes model: {n} scenes, batch {batch_size}, all 5 class names, CPU 1 thread, "
          f"min of {repeats} alternating runs", flush=True)
    for k, what in ((0, "wall"), (1, "CPU ")):
        b, e = min(t[k] for t in t_bare), min(t[k] for t in t_run)
        print(f"    [{what}] bare loop (MaskDiffusion + ConfusionAccumulator.update) {b:6.2f} s ({n / b:5.1f} images/s); "
              f"evaluate(..., out=DIR) {e:6.2f} s ({n / e:5.1f} images/s) -> overhead {100 * (e / b - 1):+.1f} % (target <= 5 %)")

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dtypes", default="fp32,bf16"); p.add_argument("--images", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=2); p.add_argument("--skip-sd", action="store_true")
    p.add_argument("--shapes-n", type=int, default=192); p.add_argument("--shapes-batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    part_b(args.shapes_n, args.shapes_batch, args.repeats)
    if not args.skip_sd: part_a(args.dtypes.split(","), args.images, args.batch_size)

if __name__ == "__main__": main()
