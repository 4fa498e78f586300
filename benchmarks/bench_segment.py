"""Benchmark MaskDiffusion's cost against the UNet it reads, on the SD 1.5 architecture (`sd15-random`) at 512 x 512.

Prints, per dtype (CPU fp32 and bf16 by default), from one run:
(a) MaskDiffusion end to end for one image (prepare, text encoder, VAE encode, one UNet call with capture that stops
    after the last layer MaskDiffusion reads, head) / (VAE encode + one bare UNet forward, no capture)
    target <= 0.90. The two are timed alternately, `--repeats` times each, and the minimum of each is kept, so that a
    machine shared with other work slows both alike.
(b) with --batch: 4 images in one batched call vs the same 4 one at a time.

The random weights cost exactly what SD 1.5's do (same architecture, same shapes). The class list is four words that
are single tokens of the offline tokenizer, so the prompt is one row, as a real SD prompt of a few classes.
On a CPU without native bf16 (AVX2 only), PyTorch's bf16 convolutions in the default NCHW layout run about 100x
slower than fp32, and channels-last brings that to about 10x: bf16 runs put the UNet and the VAE in channels-last
(both sides of the ratio alike). On one CPU thread a 512 x 512 fp32 UNet forward takes tens of seconds, a bf16 one
minutes: a run takes about an hour (more with --batch).

Usage: python benchmarks/bench_segment.py [--dtypes fp32,bf16] [--threads 1] [--repeats 3] [--batch]
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

def bare(model, image, ctx):
    "VAE encode + one plain UNet forward (the model's own attention processors, nothing captured, no early stop)."
    with torch.no_grad():
        t0 = time.perf_counter()
        z = model.encode_image(image)
        model.denoiser(model.add_noise(z, [0]).to(model.dtype), torch.tensor([0]), encoder_hidden_states=ctx)
        return time.perf_counter() - t0

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dtypes", default="fp32,bf16"); p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3); p.add_argument("--batch", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from md_probe.models import load_model
    from md_probe.engine import list_layers
    from md_probe.segment import MaskDiffusion
    t_build, model = timed(lambda: load_model("sd15-random"))
    list_layers(model)   # the engine measures a UNet once (a forward on a 16 x 16 latent); not part of a segmentation
    print(f"sd15-random built in {t_build:.0f} s; CPU, {args.threads} thread(s), torch {torch.__version__}", flush=True)
    imgs = images(4)
    ratios = {}
    for dt in args.dtypes.split(","):
        model.to(dtype=dt)
        fmt = torch.channels_last if model.dtype == torch.bfloat16 else torch.contiguous_format
        for m in (model.denoiser, model.vae): m.to(memory_format=fmt)
        md = MaskDiffusion(model)
        with torch.no_grad(): ctx = model.encode_prompt(" and ".join(CLASSES)).embeddings.to(model.dtype)
        bare(model, imgs[0], ctx)                                     # warm-up, untimed
        bases, singles = [], []
        for r in range(args.repeats):                                 # alternate, so that both see the same machine
            bases.append(bare(model, imgs[r % 4], ctx))
            t, seg = timed(lambda: md(imgs[r % 4], CLASSES)); singles.append(t)
            assert seg.labels.shape == (512, 512)
        base, e2e = min(bases), min(singles)
        ratios[dt] = e2e / base
        print(f"[{dt}] (a) VAE encode + bare UNet forward      {base:7.1f} s   ({', '.join(f'{s:.1f}' for s in bases)})")
        print(f"[{dt}]     MaskDiffusion end to end, 1 image   {e2e:7.1f} s   ({', '.join(f'{s:.1f}' for s in singles)})")
        print(f"[{dt}]     -> ratio {e2e / base:.3f} (target <= 0.90)", flush=True)
        if args.batch:
            one_by_one = sum(timed(lambda: md(im, CLASSES))[0] for im in imgs)
            t_batch, segs = timed(lambda: md(imgs, CLASSES))
            assert len(segs) == 4 and segs[0].labels.shape == (512, 512)
            print(f"[{dt}] (b) 4 images one at a time              {one_by_one:7.1f} s   ({4 / one_by_one:.3f} images/s)")
            print(f"[{dt}]     4 images in one batched call        {t_batch:7.1f} s   ({4 / t_batch:.3f} images/s)")
            print(f"[{dt}]     -> batched / one at a time = {t_batch / one_by_one:.3f}", flush=True)
    print("ratios (MaskDiffusion end to end / (VAE encode + bare UNet forward)): "
          + ", ".join(f"{dt} {r:.3f}" for dt, r in ratios.items()))

if __name__ == "__main__": main()
