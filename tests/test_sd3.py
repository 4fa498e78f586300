"SD3 / SD3.5 backbone on the tiny model: conditioning, ids, saving, the denoiser call, noise, joint-attention capture."
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np, pytest, torch
torch.set_num_threads(1)
from md_probe.models import load_model
from md_probe.sd3 import SD3, tiny_sd3, JointAttentionRecorder

PROMPT = "a photo of cats on grass"   # "cats": 3 CLIP tokens (ca t s</w>), 2 T5 tokens (▁cat s)

@pytest.fixture(scope="module")
def m(): return tiny_sd3()

@pytest.fixture(scope="module")
def m_no_t5(): return tiny_sd3(t5=False)

def _pipe(model):
    import diffusers
    return getattr(diffusers, model.backbone.pipeline)(**model.backbone.components(model))

@pytest.mark.parametrize("t5", [True, False])
def test_encode_prompt_equals_pipeline(m, m_no_t5, t5):
    model = m if t5 else m_no_t5
    enc = model.encode_prompt(PROMPT)
    with torch.no_grad():   # as the pipeline's __call__ runs it (with grad, T5 takes other kernels: 5e-6 apart)
        pe, _, pooled, _ = _pipe(model).encode_prompt(PROMPT, None, None, do_classifier_free_guidance=False,
                                                      max_sequence_length=SD3.max_sequence_length)
    assert enc.embeddings.shape == pe.shape == (1, 77 + 256, 48)
    torch.testing.assert_close(enc.embeddings, pe, rtol=0, atol=1e-6)
    torch.testing.assert_close(enc.extra["pooled_projections"], pooled, rtol=0, atol=1e-6)
    if not t5: assert (enc.embeddings[0, 77:] == 0).all() and enc.positions("cats", "t5") == []

def test_token_ids_equal_the_pipelines(m):
    enc, p = m.tokenize(PROMPT), _pipe(m)
    ids = lambda tok, n: tok(PROMPT, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(enc.input_ids[:, :77], ids(p.tokenizer, 77))
    assert torch.equal(enc.input_ids[:, 77:], ids(p.tokenizer_3, 256))
    # CLIP-G (another pad id) shares the positions: its real tokens sit where CLIP-L's do
    g = ids(p.tokenizer_2, 77)
    assert (g != p.tokenizer_2.pad_token_id).sum() == enc.attention_mask[0, :77].sum()

def test_word_positions_in_each_stream(m):
    enc = m.tokenize(PROMPT)
    clip, t5 = enc.positions("cats", "clip"), enc.positions("cats", "t5")
    assert [enc.tokens[i] for i in clip] == ["ca", "t", "s</w>"] and clip == [4, 5, 6]
    assert [enc.tokens[i] for i in t5] == ["▁cat", "s"] and t5 == [77 + 3, 77 + 4]
    assert enc.positions("cats") == clip + t5 and enc.positions("cats", "all") == clip + t5
    assert enc.positions("grass", "t5") == [77 + 6]

def _calls(m, **kw):
    "The transformer's kwargs and output of each call during a 2-step generation."
    p, seen = _pipe(m), []
    h = m.denoiser.register_forward_hook(lambda mod, a, k, out: seen.append((k, out[0])), with_kwargs=True)
    try: p(PROMPT, num_inference_steps=2, height=64, width=64, output_type="latent",
           generator=torch.Generator().manual_seed(0), **kw)
    finally: h.remove()
    return p, seen

def test_denoise_equals_the_pipelines_call(m):
    "Capture the transformer's kwargs in a generation and replay them through `denoise`."
    p, seen = _calls(m, guidance_scale=1.0)
    assert m.backbone.guidance(p) == "none" and len(seen) == 2
    kw, want = seen[-1]
    enc = m.encode_prompt(PROMPT)
    torch.testing.assert_close(kw["encoder_hidden_states"], enc.embeddings, rtol=0, atol=1e-6)
    torch.testing.assert_close(kw["pooled_projections"], enc.extra["pooled_projections"], rtol=0, atol=1e-6)
    with torch.no_grad():
        out = m.backbone.denoise(m.denoiser, kw["hidden_states"], kw["timestep"], enc.embeddings, **enc.extra)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    t = float(kw["timestep"][0])   # the scheduler's own value, not an integer
    assert kw["timestep"].dtype.is_floating_point and not t.is_integer() and t in p.scheduler.timesteps.tolist()

def test_guidance_halves_cond_second(m):
    p, seen = _calls(m, guidance_scale=3.0)
    assert m.backbone.guidance(p) == "halves"
    kw, _ = seen[0]
    enc = m.encode_prompt(PROMPT)
    assert kw["encoder_hidden_states"].shape[0] == 2
    torch.testing.assert_close(kw["encoder_hidden_states"][1:], enc.embeddings, rtol=0, atol=1e-6)
    assert not torch.allclose(kw["encoder_hidden_states"][:1], enc.embeddings)

def test_add_noise_equals_scale_noise(m):
    sch = m.scheduler
    sch.set_timesteps(4)
    ts = [float(sch.timesteps[1]), float(sch.timesteps[3])]
    z0, eps = torch.randn(2, 16, 8, 8), torch.randn(1, 16, 8, 8)
    got = m.backbone.add_noise(m, z0, ts, eps)
    want = torch.cat([sch.scale_noise(z0, torch.tensor([t, t]), eps.expand_as(z0)) for t in ts])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    sch._step_index = sch._begin_index = None

def test_shapes_and_grid(m):
    assert m.stride == 8 and m.image_size == 64
    assert m.backbone.token_grid(m.denoiser, (16, 12)) == (8, 6)
    assert m.backbone.dummy_forward(m.denoiser) == (4, 4)
    mods = dict(m.denoiser.named_modules())
    rel = m.backbone.relations
    assert rel("transformer_blocks.3.attn", mods["transformer_blocks.3.attn"]) == ("text->image", "image->image")
    assert rel("transformer_blocks.0.attn2", mods["transformer_blocks.0.attn2"]) == ("image->image",)
    assert rel("transformer_blocks.0", mods["transformer_blocks.0"]) == ()
    assert mods["transformer_blocks.3.attn"].context_pre_only

def test_image_stream_takes_the_image(m):
    blk = m.denoiser.transformer_blocks[1]
    img, txt = torch.randn(1, 64, 32), torch.randn(1, 333, 32)
    x = m.backbone.image_stream("transformer_blocks.1", blk, (txt, img), (8, 8))
    assert x.shape == (1, 32, 8, 8) and torch.equal(x[0, :, 2, 3], img[0, 2 * 8 + 3])

def test_save_and_load_round_trip(m, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    m.save_pretrained(tmp_path)
    p = StableDiffusion3Pipeline.from_pretrained(tmp_path)
    assert type(p.transformer).__name__ == "SD3Transformer2DModel" and p.text_encoder_3 is not None
    m2 = load_model(str(tmp_path))
    assert isinstance(m2.backbone, SD3) and m2.family == "sd3"
    a, b = m.encode_prompt(PROMPT), m2.encode_prompt(PROMPT)
    assert torch.equal(a.input_ids, b.input_ids)
    torch.testing.assert_close(a.embeddings, b.embeddings, rtol=1e-5, atol=1e-6)
    x, t = torch.randn(1, 16, 8, 8), torch.tensor([500.0])
    with torch.no_grad():
        torch.testing.assert_close(m.backbone.denoise(m.denoiser, x, t, a.embeddings, **a.extra),
                                   m2.backbone.denoise(m2.denoiser, x, t, b.embeddings, **b.extra), rtol=1e-5, atol=1e-5)

def test_save_without_t5_round_trip(m_no_t5, tmp_path):
    m_no_t5.save_pretrained(tmp_path)
    m2 = load_model(str(tmp_path))
    assert m2.extra["text_encoder_3"] is None
    torch.testing.assert_close(m2.encode_prompt(PROMPT).embeddings, m_no_t5.encode_prompt(PROMPT).embeddings)

def test_builtin_and_seeded():
    a, b = load_model("tiny-sd3"), tiny_sd3()
    for (k, x), y in zip(a.denoiser.state_dict().items(), b.denoiser.state_dict().values()): assert torch.equal(x, y), k
    assert a.denoiser.config.dual_attention_layers == (0,) and a.denoiser.config.qk_norm == "rms_norm"
