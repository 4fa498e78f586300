"""Full-size denoisers of every family, built from their published configs with random weights (no hub), and
MaskDiffusion's throughput and peak GPU memory on each: the python part of `benchmarks/gpu.sh`.

What is built, per family (`build_model`):
- the denoiser from its published config (`PUBLISHED`: SD 1.5's UNet, SDXL base's UNet, PixArt-Sigma XL-2 1024,
  SD3.5-medium, FLUX.1-dev), seeded random weights, created directly on the device in the run's dtype;
- a VAE of the family's published architecture (SD's 4-level VAE, 8 pixels per latent cell; 16 latent channels and
  the shift/scale factors of SD3 and FLUX), random weights;
- the text encoders and tokenizers of the family's TINY built-in model (`load_model("tiny-sdxl")`, ...): small encoders
  (32 to 48 wide, 2-3 layers), so the denoiser's text-input widths (cross_attention_dim, joint_attention_dim,
  caption_channels, pooled widths) follow them; the text LENGTHS are the real ones (CLIP 77, PixArt-Sigma's T5 300,
  SD3 77 + 256, FLUX's T5 512). Everything the denoiser does per image token is the published model's.

Run (GPU): python benchmarks/gpu_backbones.py [--families sd,sdxl,pixart,sd3,flux] [--dtype bf16] [--repeats 5]
            [--flux-blocks D,S]   (FLUX with D double- and S single-stream blocks, e.g. 10,19, when memory is short)
Dry run (CPU, tiny widths, 64 px, fp32; checks the code path only): python benchmarks/gpu_backbones.py --dry-run
"""
import os, sys, gc, time, argparse, dataclasses
for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"): os.environ.setdefault(v, "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch

FAMILIES = ("sd", "sdxl", "pixart", "sd3", "flux")
TINY = {"sd": "tiny", "sdxl": "tiny-sdxl", "pixart": "tiny-pixart", "sd3": "tiny-sd3", "flux": "tiny-flux"}
NATIVE = {"sd": 512, "sdxl": 1024, "pixart": 1024, "sd3": 1024, "flux": 1024}   # native image side in pixels
CLASSES = ["cat", "dog", "grass", "sky"]   # single tokens of the tiny tokenizers

_SD_BLOCKS = dict(down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
# (diffusers class, config): the fields of each published denoiser config that differ from diffusers' defaults
PUBLISHED = {
    # runwayml/stable-diffusion-v1-5 unet/config.json
    "sd": ("UNet2DConditionModel", dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768, **_SD_BLOCKS)),
    # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    "sdxl": ("UNet2DConditionModel", dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
             block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
             transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
             addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)),
    # PixArt-alpha/PixArt-Sigma-XL-2-1024-MS transformer/config.json
    "pixart": ("PixArtTransformer2DModel", dict(sample_size=128, num_layers=28, attention_head_dim=72, num_attention_heads=16,
               in_channels=4, out_channels=8, patch_size=2, cross_attention_dim=1152, caption_channels=4096,
               attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
               norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=2, use_additional_conditions=False)),
    # stabilityai/stable-diffusion-3.5-medium transformer/config.json
    "sd3": ("SD3Transformer2DModel", dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
            attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")),
    # black-forest-labs/FLUX.1-dev transformer/config.json
    "flux": ("FluxTransformer2DModel", dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
             attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
             guidance_embeds=True, axes_dims_rope=(16, 56, 56))),
}
# the families' VAEs: SD's architecture (8 pixels per latent cell); latent channels, shift and scale as published
_VAE = dict(in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
VAES = {"sd": dict(latent_channels=4, scaling_factor=0.18215),
        "sdxl": dict(latent_channels=4, scaling_factor=0.13025),
        "pixart": dict(latent_channels=4, scaling_factor=0.13025),     # PixArt-Sigma uses SDXL's VAE
        "sd3": dict(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
        "flux": dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)}
TEXT_LENGTH = {"pixart": 300, "sd3": 256, "flux": 512}   # T5 positions as the pipelines default (PixArt-Sigma, SD3's T5, FLUX)
# tiny settings for --dry-run (CPU): the published architecture's kinds of blocks, tiny widths and depths
DRY = {"sd": dict(block_out_channels=(32, 64, 64, 64), attention_head_dim=2, norm_num_groups=8),
       "sdxl": dict(block_out_channels=(32, 64, 64), attention_head_dim=(2, 2, 4), transformer_layers_per_block=(1, 1, 2),
                    norm_num_groups=8, addition_time_embed_dim=8),
       "pixart": dict(num_layers=3, num_attention_heads=2, attention_head_dim=8),
       "sd3": dict(num_layers=3, num_attention_heads=2, attention_head_dim=8, dual_attention_layers=(0,), pos_embed_max_size=32),
       "flux": dict(num_layers=1, num_single_layers=2, num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 6, 6))}
DRY_VAE = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8)


def text_inputs(family:str, tiny_cfg, cfg:dict)->dict:
    "The denoiser's text-input widths, taken from the tiny model's denoiser (whose text encoders are reused)."
    if family == "sd": return dict(cross_attention_dim=tiny_cfg.cross_attention_dim)
    if family == "sdxl":
        pooled = tiny_cfg.projection_class_embeddings_input_dim - 6 * tiny_cfg.addition_time_embed_dim
        return dict(cross_attention_dim=tiny_cfg.cross_attention_dim,
                    projection_class_embeddings_input_dim=pooled + 6 * cfg["addition_time_embed_dim"])
    if family == "pixart": return dict(caption_channels=tiny_cfg.caption_channels)
    return dict(joint_attention_dim=tiny_cfg.joint_attention_dim, pooled_projection_dim=tiny_cfg.pooled_projection_dim)


def build_model(family:str, overrides:dict|None=None, # config fields to change (reduced width/depth)
                device="cpu", dtype=torch.float32, full_vae:bool=True, # the family's VAE (False: the tiny model's)
                vae_overrides:dict|None=None, seed:int=0):
    """A DiffusionModel: the published denoiser config (with `overrides`) and seeded random weights made on `device`
    in `dtype`; the tiny model's text encoders and tokenizers, at the real text lengths; the family's VAE or the tiny one."""
    import diffusers
    from md_probe.models import load_model
    tiny = load_model(TINY[family])
    kind, cfg = PUBLISHED[family]
    cfg = cfg | dict(overrides or {})
    cfg |= text_inputs(family, tiny.denoiser.config, cfg)
    inner = cfg.get("num_attention_heads", 0) * cfg.get("attention_head_dim", 0)   # DiTs: the text is projected to the width
    if family == "pixart": cfg["cross_attention_dim"] = inner
    if family == "sd3": cfg["caption_projection_dim"] = inner
    if not full_vae and family == "flux": cfg |= dict(in_channels=4 * tiny.vae.config.latent_channels)
    if not full_vae and family in ("sd3", "pixart"):
        cfg |= dict(in_channels=tiny.denoiser.config.in_channels, out_channels=tiny.denoiser.config.out_channels)
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)      # weights are made in the run's dtype, on the device: no full-size fp32 copy
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(seed)
            den = getattr(diffusers, kind)(**cfg).eval()
            vae = (diffusers.AutoencoderKL(**(_VAE | VAES[family] | dict(vae_overrides or {}))).eval() if full_vae else tiny.vae)
    finally:
        torch.set_default_dtype(old)
    model = dataclasses.replace(tiny, denoiser=den, vae=vae, name=f"{family}-published-random")
    n = TEXT_LENGTH.get(family)
    if family == "flux":
        model.extra["tokenizer_2"].model_max_length = n
        model.max_length = n
    elif family == "sd3": model.extra["tokenizer_3"].model_max_length = n
    elif family == "pixart": model.tokenizer.model_max_length = model.max_length = n
    return model.to(device=device, dtype=dtype)


def params(module)->float: return sum(p.numel() for p in module.parameters()) / 1e6


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--dtype", default="bf16", help="bf16 (default: random weights overflow less than in fp16) or fp16")
    p.add_argument("--repeats", type=int, default=5, help="timed MaskDiffusion calls per family (after one warm-up)")
    p.add_argument("--flux-blocks", default="", help="D,S: FLUX with D double- and S single-stream blocks (default: all, 19,38)")
    p.add_argument("--dry-run", action="store_true", help="CPU, fp32, tiny widths, 64 px: checks the code path only")
    args = p.parse_args(argv)
    import numpy as np
    from md_probe.segment import MaskDiffusion
    dry = args.dry_run
    if not dry and not torch.cuda.is_available(): sys.exit("gpu_backbones: no CUDA device (use --dry-run on a CPU).")
    device = "cpu" if dry else "cuda"
    dtype = torch.float32 if dry else {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if dry: torch.set_num_threads(1)
    where = "CPU dry run (tiny widths, 64 px, fp32)" if dry else torch.cuda.get_device_name()
    print(f"MaskDiffusion on full-size random-weight denoisers: {where}, {dtype}, torch {torch.__version__}", flush=True)
    print(f"{'family':<7} {'denoiser':<26} {'M params':>9} {'image':>6} {'build s':>8} {'images/s':>9} {'peak GiB':>9}  config")
    for fam in args.families.split(","):
        over = dict(DRY[fam]) if dry else {}
        note = "dry run: tiny widths" if dry else "published"
        if fam == "flux" and args.flux_blocks and not dry:
            d, s = map(int, args.flux_blocks.split(","))
            over |= dict(num_layers=d, num_single_layers=s); note = f"FLUX.1-dev with {d} double + {s} single blocks (of 19 + 38)"
        size = 64 if dry else NATIVE[fam]
        if not dry: torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        model = build_model(fam, over, device, dtype, vae_overrides=DRY_VAE if dry else None)
        model.image_size = size
        build = time.perf_counter() - t0
        md = MaskDiffusion(model)
        image = (np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8)
        sync = (lambda: None) if dry else torch.cuda.synchronize
        with torch.no_grad():
            seg = md(image, CLASSES); sync()            # warm-up (and the engine's one-off layer measurement)
            assert seg.labels.shape == (size, size)
            if not dry: torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(args.repeats): md(image, CLASSES)
            sync()
            ips = args.repeats / (time.perf_counter() - t0)
        peak = "n/a" if dry else f"{torch.cuda.max_memory_allocated() / 2**30:.2f}"
        print(f"{fam:<7} {type(model.denoiser).__name__:<26} {params(model.denoiser):>9.1f} {size:>6} {build:>8.1f} "
              f"{ips:>9.2f} {peak:>9}  {note}; text encoders: tiny", flush=True)
        del md, model, seg
        gc.collect()
        if not dry: torch.cuda.empty_cache()
    print("images/s: MaskDiffusion(model)(image, classes) on one image with 4 class names, default layers of the family; "
          "peak: torch.cuda.max_memory_allocated during the timed calls (weights included).")


if __name__ == "__main__":
    main()
