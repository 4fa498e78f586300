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

# -- joint-attention capture ---------------------------------------------------------------------------------------
from md_probe.engine import capture, attached, CaptureStore

def _inputs(m, n=2):
    g = torch.Generator().manual_seed(1)
    enc = m.encode_prompt(PROMPT)
    x = torch.randn(n, 16, 16, 16, generator=g)   # the latent of a 64 px image: 8x8 image tokens (patch 2)
    return x, torch.tensor([700.0] * n), enc.embeddings.repeat(n, 1, 1), enc.extra["pooled_projections"].repeat(n, 1)

def _run(m, x, t, ctx, pooled):
    with torch.no_grad(): return m.backbone.denoise(m.denoiser, x, t, ctx, pooled_projections=pooled)

def _rms(x, w, eps):   # RMSNorm from its definition
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

def _reference(attn, hs, ehs):
    "Joint attention probabilities (B, heads, S, S) of an SD3 Attention from its own weights, the full softmax."
    H = attn.heads
    split = lambda y: y.view(y.shape[0], -1, H, y.shape[-1] // H).transpose(1, 2)
    q, k = split(hs @ attn.to_q.weight.T + attn.to_q.bias), split(hs @ attn.to_k.weight.T + attn.to_k.bias)
    if attn.norm_q is not None: q, k = _rms(q, attn.norm_q.weight, attn.norm_q.eps), _rms(k, attn.norm_k.weight, attn.norm_k.eps)
    if ehs is not None:
        cq = split(ehs @ attn.add_q_proj.weight.T + attn.add_q_proj.bias)
        ck = split(ehs @ attn.add_k_proj.weight.T + attn.add_k_proj.bias)
        if attn.norm_added_q is not None:
            cq, ck = _rms(cq, attn.norm_added_q.weight, attn.norm_added_q.eps), _rms(ck, attn.norm_added_k.weight, attn.norm_added_k.eps)
        q, k = torch.cat([q, cq], 2), torch.cat([k, ck], 2)   # [image, text]
    return ((q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5).softmax(-1)

def _module_inputs(m, names, inputs):
    "Each attention module's (hidden_states, encoder_hidden_states) in a plain forward."
    seen, mods = {}, dict(m.denoiser.named_modules())
    def pre(n):
        def f(mod, a, kw): seen.setdefault(n, (kw["hidden_states"] if "hidden_states" in kw else a[0], kw.get("encoder_hidden_states")))
        return f
    hs = [mods[n].register_forward_pre_hook(pre(n), with_kwargs=True) for n in names]
    try: _run(m, *inputs)
    finally:
        for h in hs: h.remove()
    return seen

JOINT, DUAL = ["transformer_blocks.0.attn", "transformer_blocks.3.attn"], "transformer_blocks.0.attn2"

@pytest.mark.parametrize("heads", [True, False])
def test_recorded_attention_equals_reference(m, heads):
    inputs = _inputs(m)
    want_out = _run(m, *inputs)
    seen = _module_inputs(m, JOINT + [DUAL], inputs)
    mods = dict(m.denoiser.named_modules())
    assert mods[JOINT[1]].context_pre_only and seen[DUAL][1] is None
    with capture(m.denoiser, cross_attention=JOINT, self_attention=JOINT + [DUAL], heads=heads, backbone=m.backbone) as st:
        got_out = _run(m, *inputs)
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-6)   # recording changes nothing
    N = 64
    avg = (lambda p: p) if heads else (lambda p: p.mean(1, keepdim=True))
    for n in JOINT:
        with torch.no_grad(): P = _reference(mods[n], *seen[n])
        assert P.shape == (2, 4, N + 333, N + 333)
        t2i = P[:, :, :N, N:]
        assert 0.01 < t2i.sum(-1).mean() < 0.99                       # a block of the joint softmax, rows not summing to 1
        torch.testing.assert_close(st.attention[n][0], avg(t2i), rtol=0, atol=1e-5)
        txt = t2i / t2i.sum(-1, keepdim=True)                         # softmax over the text keys only, per head
        torch.testing.assert_close(st.renorm[n][0], avg(txt), rtol=0, atol=1e-5)
        i2i = P[:, :, :N, :N]
        torch.testing.assert_close(st.self_attention[n][0], (i2i / i2i.sum(-1, keepdim=True)).mean(1), rtol=0, atol=1e-5)
    with torch.no_grad(): P2 = _reference(mods[DUAL], *seen[DUAL])
    assert P2.shape == (2, 4, N, N)
    torch.testing.assert_close(st.self_attention[DUAL][0], P2.mean(1), rtol=0, atol=1e-5)

def test_word_maps_in_both_streams(m):
    "A multi-token word's positions select the right columns of the text axis in each stream."
    inputs, enc = _inputs(m, 1), m.tokenize(PROMPT)
    seen = _module_inputs(m, [JOINT[1]], inputs)
    with capture(m.denoiser, cross_attention=[JOINT[1]], heads=True, backbone=m.backbone) as st: _run(m, *inputs)
    with torch.no_grad(): P = _reference(dict(m.denoiser.named_modules())[JOINT[1]], *seen[JOINT[1]])
    for s, width in (("clip", 3), ("t5", 2)):
        pos = enc.positions("cats", s)
        assert len(pos) == width
        torch.testing.assert_close(st.attention[JOINT[1]][0][..., pos], P[:, :, :64, [64 + p for p in pos]], rtol=0, atol=1e-5)

def test_attn2_is_not_text_attention(m):
    with pytest.raises(ValueError, match="text->image"):
        with capture(m.denoiser, cross_attention=[DUAL], backbone=m.backbone): pass

def test_model_restored_also_on_error(m):
    before = attached(m.denoiser)
    procs = {n: type(mod.processor).__name__ for n, mod in m.denoiser.named_modules() if hasattr(mod, "processor")}
    assert set(procs.values()) == {"JointAttnProcessor2_0"}
    with pytest.raises(RuntimeError, match="boom"):
        with capture(m.denoiser, features=["transformer_blocks.1"], cross_attention=JOINT, self_attention=[DUAL],
                     backbone=m.backbone):
            _run(m, *_inputs(m, 1)); raise RuntimeError("boom")
    assert attached(m.denoiser) == before

def test_image_stream_feature_equals_forward_hook(m):
    inputs, got = _inputs(m, 1), {}
    blk = m.denoiser.transformer_blocks[1]
    h = blk.register_forward_hook(lambda mod, a, out: got.update(x=out[1]))
    try: _run(m, *inputs)
    finally: h.remove()
    with capture(m.denoiser, features=["transformer_blocks.1"], backbone=m.backbone) as st: _run(m, *inputs)
    f = st.features["transformer_blocks.1"][0]
    assert f.shape == (1, 32, 8, 8)
    torch.testing.assert_close(f.flatten(2).transpose(1, 2), got["x"])

@pytest.mark.parametrize("branch,row", [("cond", 1), ("uncond", 0)])
def test_trace_records_the_branch_asked_for(m, branch, row):
    "Under guidance ([uncond, cond] halves) trace's maps equal a capture of that half of the same call."
    from md_probe.trace import trace
    p, calls, L, before = _pipe(m), [], JOINT[1], attached(m.denoiser)
    h = m.denoiser.register_forward_pre_hook(lambda mod, a, kw: calls.append(dict(kw)), with_kwargs=True)
    try:
        with trace(p, cross_attention=[L], branch=branch) as c:
            p(PROMPT, num_inference_steps=2, guidance_scale=3.0, height=64, width=64, output_type="latent",
              generator=torch.Generator().manual_seed(0))
    finally: h.remove()
    assert attached(m.denoiser) == before
    kw = {k: (v[row:row + 1] if isinstance(v, torch.Tensor) and v.ndim else v) for k, v in calls[1].items()}
    with capture(m.denoiser, cross_attention=[L], backbone=m.backbone) as st, torch.no_grad(): m.denoiser(**kw)
    assert c.timesteps[1] == pytest.approx(float(calls[1]["timestep"][0]))
    torch.testing.assert_close(c.attention(L, step=1), st.attention[L][0][0], rtol=0, atol=1e-6)


def test_trace_leaves_out_skip_layer_guidance_calls(m):
    """SD3.5's skip-layer guidance adds, at some steps, a call with `skip_layers` (batch 1, some blocks skipped) after the
    guided call: it is not a step, so trace records the guided calls only, and their maps are those of the guided call."""
    from md_probe.trace import trace
    p, calls, L = _pipe(m), [], JOINT[1]
    h = m.denoiser.register_forward_pre_hook(lambda mod, a, kw: calls.append(dict(kw)), with_kwargs=True)
    try:
        with trace(p, cross_attention=[L]) as c:
            p(PROMPT, num_inference_steps=3, guidance_scale=3.0, height=64, width=64, output_type="latent",
              skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0,
              generator=torch.Generator().manual_seed(0))
    finally: h.remove()
    guided = [k for k in calls if k.get("skip_layers") is None]
    assert len(guided) == 3 and len(calls) > 3          # the pipeline did make skip-layer calls (steps 1 and 2)
    assert c.meta["calls"] == 3 and c.timesteps == pytest.approx([float(k["timestep"][0]) for k in guided])
    kw = {k: (v[1:2] if isinstance(v, torch.Tensor) and v.ndim else v) for k, v in guided[2].items()}
    with capture(m.denoiser, cross_attention=[L], backbone=m.backbone) as st, torch.no_grad(): m.denoiser(**kw)
    torch.testing.assert_close(c.attention(L, step=2), st.attention[L][0][0], rtol=0, atol=1e-6)
