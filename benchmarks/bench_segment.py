"""Benchmark MaskDiffusion's cost against the UNet it reads, on the SD 1.5 architecture (`sd15-random`) at 512 x 512.

Prints, per dtype (CPU fp32 and bf16 by default), from one run:
(a) MaskDiffusion end to end for one image (prepare, text encoder, VAE encode, one UNet call with capture, head)
    / (VAE encode + one bare UNet forward, no capture)          target <= 1.15
(b) 4 images in one batched call vs the same 4 one at a time.

The random weights cost exactly what SD 1.5's do (same architecture, same shapes). The class list is four words that
are single tokens of the offline tokenizer, so the prompt is one row, as a real SD prompt of a few classes.
On one CPU thread a 512 x 512 UNet forward takes tens of seconds: a run takes about 15 minutes.

Usage: python benchmarks/bench_segment.py [--dtypes fp32,bf16] [--threads 1]
"""
import os, time, argparse
for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"): os.environ.setdefault(v, "1")
import numpy as np, torch

CLASSES = ["cat", "grass", "sky", "tree"]

def timed(f):
    t0 = time.perf_counter(); out = f(); return time.perf_counter() - t0, out

def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.random((512, 512, 3)) * 255).astype(np.uint8) for _ in range(n)]

def bare(model, image):
    "VAE encode + one plain UNet forward (the model's own attention processors, nothing captured)."
    with torch.no_grad():
        z = model.encode_image(image)
        ctx = model.encode_prompt(" and ".join(CLASSES)).embeddings.to(model.dtype)  # outside the timing below
        t0 = time.perf_counter()
        z = model.encode_image(image)
        model.unet(model.add_noise(z, [0]).to(model.dtype), torch.tensor([0]), encoder_hidden_states=ctx)
        return time.perf_counter() - t0

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dtypes", default="fp32,bf16"); p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from md_probe.models import load_model
    from md_probe.segment import MaskDiffusion
    t_build, model = timed(lambda: load_model("sd15-random"))
    print(f"sd15-random built in {t_build:.0f} s; CPU, {args.threads} thread(s), torch {torch.__version__}", flush=True)
    imgs = images(4)
    for dt in args.dtypes.split(","):
        model.to(dtype=dt)
        md = MaskDiffusion(model)
        base = min(bare(model, imgs[0]) for _ in range(2))           # the first run also warms up
        singles = []
        for im in imgs:
            t, _ = timed(lambda: md(im, CLASSES)); singles.append(t)
        t_batch, segs = timed(lambda: md(imgs, CLASSES))
        assert len(segs) == 4 and segs[0].labels.shape == (512, 512)
        e2e = min(singles)
        print(f"[{dt}] (a) VAE encode + bare UNet forward      {base:7.1f} s", flush=True)
        print(f"[{dt}]     MaskDiffusion end to end, 1 image   {e2e:7.1f} s   (min of {len(singles)}: "
              f"{', '.join(f'{s:.1f}' for s in singles)})")
        print(f"[{dt}]     -> ratio {e2e / base:.3f} (target <= 1.15)")
        print(f"[{dt}] (b) 4 images one at a time              {sum(singles):7.1f} s   ({4 / sum(singles):.3f} images/s)")
        print(f"[{dt}]     4 images in one batched call        {t_batch:7.1f} s   ({4 / t_batch:.3f} images/s)")
        print(f"[{dt}]     -> batched / one at a time = {t_batch / sum(singles):.3f}", flush=True)

if __name__ == "__main__": main()
