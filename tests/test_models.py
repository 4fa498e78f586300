"Model loading: offline names, saved folders (SD 1.x and 2.x v-prediction), the hub error, sizes."
import os, subprocess, sys, time, numpy as np, pytest, torch
from md_probe.models import load_model, sd15_random_model, tiny_model
from md_probe.probe import probe

IMG = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)

def test_sd15_random_has_the_exact_sd15_unet():
    with torch.device("meta"): m = sd15_random_model()   # the architecture without allocating 3.4 GB
    assert sum(p.numel() for p in m.denoiser.parameters()) == 859_520_964
    assert sum(p.numel() for p in m.text_encoder.parameters()) == 123_060_480
    assert m.image_size == 512 and m.stride == 64

def test_tiny_is_seeded():
    a, b = tiny_model(), tiny_model()
    for (k, x), y in zip(a.denoiser.state_dict().items(), b.denoiser.state_dict().values()): assert torch.equal(x, y), k

def test_pipeline_folder_loads(tmp_path):
    from diffusers import StableDiffusionPipeline
    m = tiny_model()
    pipe = StableDiffusionPipeline(vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.denoiser,
                                   scheduler=m.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(tmp_path)
    m2 = load_model(str(tmp_path))
    a = probe(m, IMG, "a cat", layers="up_blocks.1").features("up_blocks.1")
    b = probe(m2, IMG, "a cat", layers="up_blocks.1").features("up_blocks.1")
    # same weights, same inputs; a reloaded module may pick other fp32 kernels (measured: 1.4e-6 on values ~0.4)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

def test_sd2_v_prediction_folder_loads(tmp_path):
    "SD 2.x: linear projections, per-level head dims, a v-prediction scheduler; probing only noises, so it just works."
    from diffusers import UNet2DConditionModel, DDIMScheduler
    m = tiny_model()
    m.denoiser = UNet2DConditionModel(block_out_channels=(32, 64, 64, 64), attention_head_dim=(2, 4, 8, 8), norm_num_groups=8,
                                  cross_attention_dim=32, sample_size=8, use_linear_projection=True, layers_per_block=2,
                                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3).eval()
    m.scheduler = DDIMScheduler.from_config(m.scheduler.config, prediction_type="v_prediction")
    m.save_pretrained(tmp_path)
    m2 = load_model(str(tmp_path), dtype="bf16")
    assert m2.scheduler.config.prediction_type == "v_prediction" and m2.dtype == torch.bfloat16
    c = probe(m2, IMG, "a cat", cross_attention=True)
    assert c.word_attention("cat").shape == (8, 8)

def test_unknown_hub_id_fails_fast_and_says_what_to_do():
    code = ("from md_probe.models import load_model\n"
            "try: load_model('some-org/not-a-real-model')\n"
            "except OSError as e: print(e)")
    t = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}).stdout
    assert "not in the Hugging Face cache" in out and "HF_HUB_OFFLINE" in out and "save_pretrained" in out, out
    assert time.time() - t < 60   # no retry loop (a hang would hit the timeout above)

def test_casting_says_nothing_when_no_module_must_stay_fp32():
    "diffusers 0.42 logs a warning on every ModelMixin.to(dtype), even with no module to keep in float32: md_probe casts quietly."
    import logging
    seen, h = [], logging.Handler()
    h.emit = lambda r: seen.append(r.getMessage())
    lg = logging.getLogger("diffusers"); lg.addHandler(h)
    try:
        m = tiny_model().to(dtype="bf16")
        assert m.denoiser.dtype == m.vae.dtype == m.text_encoder.dtype == torch.bfloat16
        assert not [w for w in seen if "float32" in w], seen
        if type(m.denoiser).to is not torch.nn.Module.to:                 # diffusers' own `to` still warns: the test can fail
            type(m.denoiser).to(m.denoiser, dtype=torch.float32)
            assert any("float32" in w for w in seen)
    finally: lg.removeHandler(h)

def test_unknown_dtype_and_file():
    with pytest.raises(ValueError, match="Unknown dtype"): load_model("tiny", dtype="fp8")
    with pytest.raises(ValueError, match="not a .safetensors shapes checkpoint"): load_model(__file__)
