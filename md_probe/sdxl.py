from __future__ import annotations
import torch
from md_probe.models import (Backbone, DiffusionModel, PromptEncoding, tokenize_prompt, clip_bpe_tokenizer, TINY_WORDS,
                             _seeded, _native_size)

SDXL_UNET_CONFIG = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the fields that differ from diffusers' defaults)
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)

class SDXL(Backbone):
    """Stable Diffusion XL: a three-level UNet whose cross-attention reads CLIP-L and CLIP-G penultimate hidden states
    joined on the feature axis (one text position per token), plus the pooled, projected CLIP-G vector and six
    size/crop numbers ("time ids") through `added_cond_kwargs`. Everything else is SD's."""
    family = "sdxl"
    pipeline = "StableDiffusionXLPipeline"
    vae_scale = 8   # pixels per latent cell of SDXL's VAE (and the tiny one): the time ids are in pixels

    def _streams(self, model, prompt:str)->tuple:
        "The prompt tokenised by CLIP-L's and CLIP-G's tokenizers (the second None without CLIP-G), one word alignment."
        enc = tokenize_prompt(model.tokenizer, prompt, model.max_length)
        tok2 = model.extra.get("tokenizer_2")
        enc2 = None if tok2 is None else tokenize_prompt(tok2, prompt, model.max_length)
        if enc2 is not None and enc2.token_words != enc.token_words:
            raise ValueError("SDXL's two tokenizers split this prompt differently: md_probe needs one word alignment "
                             "for the fused text axis (CLIP-L and CLIP-G features side by side).")
        return enc, enc2

    def tokenize(self, model, prompt:str)->PromptEncoding:
        "The prompt's 77 text positions: CLIP-L's ids (CLIP-G's tokens sit at the same positions; only its padding id differs)."
        return self._streams(model, prompt)[0]

    def encode_prompt(self, model, prompt:str)->PromptEncoding:
        "Embeddings (1, 77, D_L + D_G) and `extra['text_embeds']` (1, D_proj) exactly as `StableDiffusionXLPipeline.encode_prompt` (no clip_skip)."
        enc, enc2 = self._streams(model, prompt)
        hidden, pooled = [], None
        with torch.no_grad():
            for te, e in ((model.text_encoder, enc), (model.extra.get("text_encoder_2"), enc2)):
                if te is None or e is None: continue
                out = te(e.input_ids.to(te.device), output_hidden_states=True)
                if out[0].ndim == 2: pooled = out[0]          # the pipeline keeps the last 2-D first output: CLIP-G's projection
                hidden.append(out.hidden_states[-2])          # penultimate layer, as the pipeline without clip_skip
        enc.embeddings = torch.cat(hidden, -1)
        enc.extra = dict(text_embeds=pooled)
        return enc

    def add_noise(self, model, z0:torch.Tensor, timesteps:list, eps:torch.Tensor)->torch.Tensor:
        """sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps from the scheduler's `alphas_cumprod`: what the UNet reads. SDXL ships
        `EulerDiscreteScheduler`, whose own `add_noise` gives z_0 + sigma eps, which its pipeline divides by
        sqrt(sigma^2 + 1) (`scale_model_input`) before the UNet: the same input."""
        z = z0.repeat(len(timesteps), *([1] * (z0.ndim - 1)))
        abar = model.scheduler.alphas_cumprod.to(z.device, torch.float32)[torch.tensor(timesteps)]
        abar = abar.repeat_interleave(z0.shape[0]).view(-1, *([1] * (z0.ndim - 1)))
        return abar.sqrt() * z + (1 - abar).sqrt() * eps.expand_as(z)

    def time_ids(self, sample:torch.Tensor)->torch.Tensor:
        "The pipeline's default time ids for `sample`'s image: (original size, crop top-left (0, 0), target size) in pixels, (N, 6)."
        H, W = (s * self.vae_scale for s in sample.shape[-2:])
        return torch.tensor([[H, W, 0, 0, H, W]], dtype=sample.dtype, device=sample.device).repeat(sample.shape[0], 1)

    def denoise(self, denoiser, sample, timestep, context, text_embeds=None, time_ids=None, **extra):
        "One UNet call as `StableDiffusionXLPipeline`: `added_cond_kwargs` text_embeds (N, D_proj) and time_ids (default: `time_ids(sample)`)."
        if text_embeds is None: raise ValueError("SDXL's UNet needs text_embeds (the pooled CLIP-G vector): encode the prompt with the model.")
        time_ids = self.time_ids(sample) if time_ids is None else time_ids
        cond = dict(text_embeds=text_embeds.to(sample.dtype), time_ids=time_ids.to(sample.dtype))
        return super().denoise(denoiser, sample, timestep, context, added_cond_kwargs=cond, **extra)

    def dummy_forward(self, denoiser)->tuple:
        "A zero-input forward on a 2^levels latent, with zero text_embeds and time_ids."
        c = denoiser.config
        side = 2 ** len(c.block_out_channels)
        p = next(denoiser.parameters())
        z = lambda *s: torch.zeros(*s, device=p.device, dtype=p.dtype)
        d_text = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        denoiser(z(1, c.in_channels, side, side), 0, z(1, 2, c.cross_attention_dim),
                 added_cond_kwargs=dict(text_embeds=z(1, d_text), time_ids=z(1, 6)))
        return (side, side)

    def from_pipeline(self, pipe, name:str|None=None)->DiffusionModel:
        "A `DiffusionModel` over a `StableDiffusionXLPipeline`'s own components (CLIP-G and its tokenizer in `extra`)."
        tok = pipe.tokenizer
        return DiffusionModel(pipe.unet, pipe.text_encoder, tok, pipe.scheduler, pipe.vae, name=name or type(pipe).__name__,
                              image_size=_native_size(pipe.unet, pipe.vae),
                              max_length=tok.model_max_length if tok.model_max_length < 10_000 else 77, backbone=self,
                              extra=dict(text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2))

    def load(self, path, dtype=None, name:str|None=None)->DiffusionModel:
        "A checkpoint folder or hub id of `StableDiffusionXLPipeline`, loaded by diffusers, then `from_pipeline`."
        from diffusers import StableDiffusionXLPipeline
        pipe = StableDiffusionXLPipeline.from_pretrained(path, dtype=dtype, add_watermarker=False)
        for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2): m.eval()
        return self.from_pipeline(pipe, name or str(path))

    def components(self, model)->dict:
        "The `StableDiffusionXLPipeline` init arguments (no image encoder, no watermarker)."
        return dict(unet=model.denoiser, vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                    scheduler=model.scheduler, image_encoder=None, feature_extractor=None, add_watermarker=False) | model.extra

def _sdxl_scheduler():
    from diffusers import EulerDiscreteScheduler
    # stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
    return EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")

def tiny_sdxl()->DiffusionModel:
    "SDXL's layer names (three levels, 1/1/2 transformer layers) with tiny widths, two tiny CLIPs and seeded random weights; 64 px."
    from diffusers import UNet2DConditionModel, AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    tok, tok2 = clip_bpe_tokenizer(TINY_WORDS), clip_bpe_tokenizer(TINY_WORDS)
    tok2.pad_token = "!"   # as SDXL's CLIP-G tokenizer: padding is "!" (id of the byte "!"), not the end token
    def clip(hidden, layers, act):
        return CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                              num_attention_heads=2, projection_dim=hidden, max_position_embeddings=77, hidden_act=act,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    text = _seeded(2, lambda: CLIPTextModel(clip(32, 3, "quick_gelu")))               # CLIP-L's role
    text_2 = _seeded(3, lambda: CLIPTextModelWithProjection(clip(32, 3, "gelu")))     # CLIP-G's role
    unet = _seeded(0, lambda: UNet2DConditionModel(**(SDXL_UNET_CONFIG | dict(
        sample_size=8, block_out_channels=(32, 64, 64), attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=64, addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8))))
    vae = _seeded(1, lambda: AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16), norm_num_groups=8, sample_size=64, scaling_factor=0.13025))
    return DiffusionModel(unet, text, tok, _sdxl_scheduler(), vae, name="tiny-sdxl", image_size=64, backbone=SDXL(),
                          extra=dict(text_encoder_2=text_2, tokenizer_2=tok2))

def default_layers(denoiser)->dict:
    """MaskDiffusion's starting layers for an SDXL UNet, by SD's rule mapped by resolution (not tuned on any benchmark):
    features = the input of the last resnet of every decoder level but the finest (SDXL has no 1/8 level; at 1024 px:
    32x32 and 64x64), attention = every text->image `attn2` at the coarsest level (down, mid and first up block; 32x32
    at 1024 px), t = 0."""
    c = denoiser.config
    n, last = len(c.block_out_channels), c.layers_per_block   # up blocks have layers_per_block + 1 resnets
    return dict(feature_layers=tuple(f"up_blocks.{i}.resnets.{last}" for i in range(n - 1)), read="input",
                attention_layers=(f"down_blocks.{n-1}.attentions.*.attn2", "mid_block.attentions.*.attn2",
                                  "up_blocks.0.attentions.*.attn2"), timestep=0)

def sdxl_unet_meta():
    "SDXL base's full-size UNet on the meta device (no memory, no weights): for layer tables."
    from diffusers import UNet2DConditionModel
    with torch.device("meta"): return UNet2DConditionModel(**SDXL_UNET_CONFIG)
