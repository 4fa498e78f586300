"FLUX.1 backbone on the tiny model: conditioning, denoiser call, noise, guidance, saving, and the attention recorder against a recomputation from first principles."
import math, warnings
import pytest
import torch
from md_probe.models import load_model
from md_probe.flux import Flux, FluxRecorder, tiny_flux, default_layers, flux_layer_table, t5_tokenizer

PROMPTS = ["a photo of a grassy cat", "a red car on the road", "dog", "a sky sky with a tree"]


@pytest.fixture(scope="module")
def flux():
    return tiny_flux()


@pytest.fixture(scope="module")
def pipe(flux):
    from diffusers import FluxPipeline
    p = FluxPipeline(**flux.backbone.components(flux))
    p.set_progress_bar_config(disable=True)
    return p


def _generate(pipe, m, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipe(kw.pop("prompt", "a photo of a cat"), height=64, width=64, num_inference_steps=2,
                    max_sequence_length=m.max_length, output_type="latent", **kw)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_encode_prompt_equals_pipeline(flux, pipe, prompt):
    enc = flux.encode_prompt(prompt)
    ids = pipe.tokenizer_2(prompt, padding="max_length", max_length=flux.max_length, truncation=True,
                           return_tensors="pt").input_ids
    assert torch.equal(enc.input_ids, ids)
    with torch.no_grad(): pe, pooled, _ = pipe.encode_prompt(prompt, max_sequence_length=flux.max_length)
    assert enc.embeddings.shape == pe.shape == (1, flux.max_length, 32)
    torch.testing.assert_close(enc.embeddings, pe, atol=1e-6, rtol=0)
    assert set(enc.extra) == {"pooled_projections"}
    torch.testing.assert_close(enc.extra["pooled_projections"], pooled, atol=1e-6, rtol=0)
    assert enc.streams == {"t5": (0, flux.max_length)}


def test_word_positions_multi_token(flux):
    enc = flux.tokenize("a photo of a grassy cat")
    pos = enc.positions("grassy")
    assert [enc.tokens[p] for p in pos] == ["▁grass", "y"]
    assert enc.positions("grassy", "t5") == pos
    assert [enc.tokens[p] for p in enc.positions("cat")] == ["▁cat"]
    twice = flux.tokenize("a sky sky with a tree")
    assert [len(o) for o in twice.occurrences("sky")] == [1, 1] and len(set(twice.positions("sky"))) == 2
    tok = t5_tokenizer(["cat"], max_length=8)
    assert tok.convert_ids_to_tokens(tok("cats").input_ids) == ["▁cat", "s", "</s>"]


def test_denoise_equals_pipeline_call(flux, pipe):
    from diffusers import FluxPipeline
    calls, outs = [], []
    hs = [flux.denoiser.register_forward_pre_hook(lambda mod, a, kw: calls.append(kw), with_kwargs=True),
          flux.denoiser.register_forward_hook(lambda mod, a, kw, o: outs.append(o[0]), with_kwargs=True)]
    try: _generate(pipe, flux, prompt="a red car on the road")
    finally:
        for h in hs: h.remove()
    assert len(calls) == 2
    enc = flux.encode_prompt("a red car on the road")
    for kw, ref in zip(calls, outs):
        assert kw["guidance"] is not None and float(kw["guidance"][0]) == 3.5
        x = FluxPipeline._unpack_latents(kw["hidden_states"], 64, 64, pipe.vae_scale_factor)
        t = kw["timestep"] * 1000                      # back to the scheduler's units
        assert float(t[0]) in [float(v) for v in pipe.scheduler.timesteps]
        with torch.no_grad():
            out = flux.backbone.denoise(flux.denoiser, x, t, enc.embeddings, **enc.extra)
        torch.testing.assert_close(out, FluxPipeline._unpack_latents(ref, 64, 64, pipe.vae_scale_factor), atol=1e-5, rtol=1e-5)
    assert out.shape == (1, 4, 8, 8)
    assert flux.backbone.token_grid(flux.denoiser, (8, 8)) == (4, 4) and flux.stride == 16


def test_add_noise_matches_scheduler(flux):
    from diffusers import FlowMatchEulerDiscreteScheduler
    sched = FlowMatchEulerDiscreteScheduler.from_config(flux.scheduler.config)
    sched.set_timesteps(4, mu=0.7)
    ts = [float(t) for t in sched.timesteps[:3]]
    assert any(t != int(t) for t in ts)                # non-integer flow-matching timesteps
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    got = flux.backbone.add_noise(flux, z0, ts, eps)
    assert got.shape == (6, 4, 8, 8)
    for i, t in enumerate(ts):
        ref = sched.scale_noise(z0, torch.tensor([t] * 2), eps.expand_as(z0))
        torch.testing.assert_close(got[2 * i:2 * i + 2], ref, atol=1e-6, rtol=1e-6)
    zt = flux.add_noise(z0[:1], [0, 1000, 250.5])        # the public path: checked float timesteps
    torch.testing.assert_close(zt[0], z0[0])
    with pytest.raises(ValueError): flux.add_noise(z0[:1], [1001])


def test_guidance_from_the_running_call(flux, pipe):
    seen = []
    h = flux.denoiser.register_forward_pre_hook(lambda mod, a, kw: seen.append(flux.backbone.guidance(pipe)), with_kwargs=True)
    try:
        _generate(pipe, flux)
        _generate(pipe, flux, negative_prompt="a dog", true_cfg_scale=2.0)
        _generate(pipe, flux, negative_prompt="a dog", true_cfg_scale=1.0)    # a negative prompt alone: no true CFG
        _generate(pipe, flux, true_cfg_scale=3.0)                             # no negative prompt: no true CFG
    finally: h.remove()
    assert seen == ["none"] * 2 + ["calls"] * 4 + ["none"] * 4
    assert flux.backbone.guidance(pipe) == "none"


def test_save_and_load_roundtrip(flux, tmp_path):
    from diffusers import FluxPipeline
    path = flux.save_pretrained(tmp_path / "tiny-flux")
    p = FluxPipeline.from_pretrained(path)
    assert type(p.transformer).__name__ == "FluxTransformer2DModel"
    m2 = load_model(str(path))
    assert isinstance(m2.backbone, Flux) and m2.family == "flux"
    assert (m2.image_size, m2.max_length, m2.stride) == (64, 32, 16)
    a, b = flux.encode_prompt("a red car"), m2.encode_prompt("a red car")
    assert torch.equal(a.input_ids, b.input_ids)
    torch.testing.assert_close(a.embeddings, b.embeddings); torch.testing.assert_close(a.extra["pooled_projections"], b.extra["pooled_projections"])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        o1 = flux.backbone.denoise(flux.denoiser, x, torch.tensor([500.0]), a.embeddings, **a.extra)
        o2 = m2.backbone.denoise(m2.denoiser, x, torch.tensor([500.0]), b.embeddings, **b.extra)
    torch.testing.assert_close(o1, o2)
    assert not torch.equal(o1, flux.backbone.denoise(flux.denoiser, x, torch.tensor([100.0]), a.embeddings, **a.extra))


# -- the recorder ---------------------------------------------------------------------------------------------------

class _RefAttend(FluxRecorder):
    "FluxRecorder with a stand-in `attend` (full softmax) that keeps the blocks it was asked to record."
    def attend(self, q, k, v, scale, queries, text_keys=None, image_keys=None, mask=None):
        p = (q.float() @ k.float().transpose(-1, -2) * scale).softmax(-1)
        self.got = dict(text=p[:, :, queries, text_keys], image=p[:, :, queries, image_keys])
        return (p @ v.float()).to(v.dtype)


def _rms(x, norm):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    return y * norm.weight if norm.weight is not None else y


def _reference(attn, x, ctx, rope):
    "Joint softmax P (B, heads, S, S) from the module's own weights: linear maps, RMS norms, rotary by hand."
    B, H, D = x.shape[0], attn.heads, attn.head_dim
    heads = lambda lin, t: (t @ lin.weight.T + lin.bias).view(B, t.shape[1], H, D)
    q, k = _rms(heads(attn.to_q, x), attn.norm_q), _rms(heads(attn.to_k, x), attn.norm_k)
    if ctx is not None:
        q = torch.cat([_rms(heads(attn.add_q_proj, ctx), attn.norm_added_q), q], 1)
        k = torch.cat([_rms(heads(attn.add_k_proj, ctx), attn.norm_added_k), k], 1)
    cos, sin = (r[None, :, None, :].float() for r in rope)
    def rotate(t):   # pairs (t0, t1) -> (t0 cos - t1 sin, t1 cos + t0 sin)
        pairs = t.unflatten(-1, (-1, 2))
        return t * cos + torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(-2) * sin
    q, k = rotate(q), rotate(k)
    return (torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(D)).softmax(-1)


def _inputs(flux, seed=0):
    g = torch.Generator().manual_seed(seed)
    enc = flux.encode_prompt("a photo of a grassy cat")
    return torch.randn(1, 4, 8, 8, generator=g), enc


def _attn_modules(flux):
    return [n for n, m in flux.denoiser.named_modules() if type(m).__name__ == "FluxAttention"]


def test_recorder_equals_first_principles_and_default(flux):
    x, enc = _inputs(flux)
    den, bb = flux.denoiser, flux.backbone
    names = _attn_modules(flux)
    assert any(n.startswith("single_") for n in names) and any(n.startswith("transformer_blocks") for n in names)
    seen = {}
    def keep(name): return lambda mod, a, kw: seen.__setitem__(name, kw)
    hs = [den.get_submodule(n).register_forward_pre_hook(keep(n), with_kwargs=True) for n in names]
    try:
        with torch.no_grad(): ref_out = bb.denoise(den, x, torch.tensor([700.0]), enc.embeddings, **enc.extra)
    finally:
        for h in hs: h.remove()
    procs = {n: den.get_submodule(n).processor for n in names}
    recs = {n: bb.recorder(n, den.get_submodule(n), sink=None) for n in names}
    assert all(type(r) is FluxRecorder for r in recs.values())
    recs = {n: _RefAttend(n, sink=None) for n in names}
    handles = []
    try:
        for n, r in recs.items():
            den.get_submodule(n).set_processor(r)
            handles += [m.register_forward_pre_hook(fn, with_kwargs=True) for m, fn in r.hooks(n, den)]
        with torch.no_grad(): out = bb.denoise(den, x, torch.tensor([700.0]), enc.embeddings, **enc.extra)
    finally:
        for h in handles: h.remove()
        for n, p in procs.items(): den.get_submodule(n).set_processor(p)
    assert all(den.get_submodule(n).processor is procs[n] for n in names)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    T, N = enc.embeddings.shape[1], 16
    for n in names:
        kw, attn = seen[n], den.get_submodule(n)
        with torch.no_grad():
            P = _reference(attn, kw["hidden_states"], kw.get("encoder_hidden_states"), kw["image_rotary_emb"])
        assert P.shape == (1, 2, T + N, T + N)
        got = recs[n].got
        assert got["text"].shape == (1, 2, N, T) and got["image"].shape == (1, 2, N, N)
        torch.testing.assert_close(got["text"], P[:, :, T:, :T], atol=1e-5, rtol=0)
        torch.testing.assert_close(got["image"], P[:, :, T:, T:], atol=1e-5, rtol=0)
        assert (got["text"].sum(-1) < 1 - 1e-3).all()     # the text block of a joint softmax: rows do not sum to 1


def test_single_stream_needs_the_block_hook(flux):
    x, enc = _inputs(flux)
    den, bb = flux.denoiser, flux.backbone
    name = "single_transformer_blocks.0.attn"
    attn = den.get_submodule(name)
    proc = attn.processor
    attn.set_processor(_RefAttend(name, sink=None))
    try:
        with pytest.raises(RuntimeError, match="text length"), torch.no_grad():
            bb.denoise(den, x, torch.tensor([700.0]), enc.embeddings, **enc.extra)
    finally: attn.set_processor(proc)
    assert attn.processor is proc
    assert FluxRecorder("transformer_blocks.0.attn", sink=None).hooks("transformer_blocks.0.attn", den) == []
    [(mod, fn)] = FluxRecorder(name, sink=None).hooks(name, den)
    assert mod is den.get_submodule("single_transformer_blocks.0")


def test_image_stream_of_blocks_and_attention(flux):
    x, enc = _inputs(flux)
    den, bb = flux.denoiser, flux.backbone
    outs = {}
    names = ["transformer_blocks.0", "transformer_blocks.0.attn", "single_transformer_blocks.1",
             "single_transformer_blocks.1.attn"]
    hs = [den.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: outs.__setitem__(n, o)) for n in names]
    try:
        with torch.no_grad(): bb.denoise(den, x, torch.tensor([300.0]), enc.embeddings, **enc.extra)
    finally:
        for h in hs: h.remove()
    T = enc.embeddings.shape[1]
    for n in names:
        f = bb.image_stream(n, den.get_submodule(n), outs[n], (4, 4))
        assert f.shape == (1, den.inner_dim, 4, 4)
        o = outs[n]
        img = o[1] if n.endswith(("0", "1")) and not n.endswith("attn") else o[0] if isinstance(o, tuple) else o[:, T:]
        assert img.shape[1] == 16
        torch.testing.assert_close(f[0, :, 1, 2], img[0, 1 * 4 + 2])     # row-major token order


def test_layers_and_defaults(flux):
    assert flux.backbone.relations("transformer_blocks.0.attn", flux.denoiser.get_submodule("transformer_blocks.0.attn")) \
        == ("text->image", "image->image")
    assert flux.backbone.relations("transformer_blocks.0", flux.denoiser.get_submodule("transformer_blocks.0")) == ()
    rows = flux_layer_table()
    assert len(rows) == 114 and rows[-1]["name"] == "single_transformer_blocks.37.attn" and rows[0]["grid"] == (64, 64)
    d = default_layers(flux.denoiser)
    assert d["feature_layers"] == ("transformer_blocks.1", "single_transformer_blocks.0")
    assert d["attention_layers"] == tuple(n + ".attn" for n in d["feature_layers"])
    assert flux.backbone.dummy_forward(flux.denoiser) == (4, 4)


# -- through the engine's capture --------------------------------------------------------------------------------------

def _ref_blocks(flux, x, enc, t):
    "Per attention module: the reference joint softmax P from its recorded inputs, and the plain denoiser output."
    den, bb = flux.denoiser, flux.backbone
    seen = {}
    hs = [den.get_submodule(n).register_forward_pre_hook(lambda mod, a, kw, n=n: seen.__setitem__(n, kw), with_kwargs=True)
          for n in _attn_modules(flux)]
    try:
        with torch.no_grad(): out = bb.denoise(den, x, torch.tensor([t]), enc.embeddings, **enc.extra)
    finally:
        for h in hs: h.remove()
    with torch.no_grad():
        P = {n: _reference(den.get_submodule(n), kw["hidden_states"], kw.get("encoder_hidden_states"), kw["image_rotary_emb"])
             for n, kw in seen.items()}
    return P, out


@pytest.mark.parametrize("heads", [True, False])
def test_capture_equals_first_principles(flux, heads):
    from md_probe.engine import capture, attached
    x, enc = _inputs(flux, seed=3)
    den, bb = flux.denoiser, flux.backbone
    P, ref_out = _ref_blocks(flux, x, enc, 420.0)
    names = _attn_modules(flux)
    before = attached(den)
    with capture(den, cross_attention=names, self_attention=names, heads=heads, backbone=bb) as store:
        with torch.no_grad(): out = bb.denoise(den, x, torch.tensor([420.0]), enc.embeddings, **enc.extra)
    assert attached(den) == before
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    T = enc.embeddings.shape[1]
    for n in names:
        text, image = P[n][:, :, T:, :T], P[n][:, :, T:, T:]
        got = torch.cat(store.attention[n])
        want = text if heads else text.mean(1, keepdim=True)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        renorm = text / text.sum(-1, keepdim=True)                        # softmax over the text keys, per head
        torch.testing.assert_close(torch.cat(store.renorm[n]), renorm if heads else renorm.mean(1, keepdim=True), atol=1e-5, rtol=0)
        img = image / image.sum(-1, keepdim=True)                         # the engine keeps image rows normalised over image keys
        torch.testing.assert_close(torch.cat(store.self_attention[n]), img.mean(1), atol=1e-5, rtol=0)


def test_capture_restores_on_error(flux):
    from md_probe.engine import capture, attached
    x, enc = _inputs(flux)
    den, bb = flux.denoiser, flux.backbone
    before = attached(den)
    procs = {n: den.get_submodule(n).processor for n in _attn_modules(flux)}
    boom = den.get_submodule("single_transformer_blocks.1").register_forward_pre_hook(lambda *a: 1 / 0)
    try:
        with pytest.raises(ZeroDivisionError):
            with capture(den, features=["single_transformer_blocks.0"], cross_attention=_attn_modules(flux), backbone=bb):
                with torch.no_grad(): bb.denoise(den, x, torch.tensor([100.0]), enc.embeddings, **enc.extra)
    finally: boom.remove()
    assert attached(den) == before
    assert all(den.get_submodule(n).processor is p for n, p in procs.items())


def test_probe_features_equal_forward_hook(flux):
    import numpy as np
    from md_probe.probe import probe
    img = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    layers = ["transformer_blocks.1", "single_transformer_blocks.0"]
    cache = probe(flux, img, "a photo of a grassy cat", timesteps=[100, 750.5], layers=layers, cross_attention=True)
    assert cache.attention("single_transformer_blocks.0.attn", t=750.5).shape == (1, 16, flux.max_length)
    assert cache.word_attention("grassy", t=100).shape == (4, 4)
    # the same features from a plain forward hook on the same inputs
    enc = flux.encode_prompt("a photo of a grassy cat")
    with torch.no_grad(): zt = flux.add_noise(flux.encode_image(img), [750.5])
    outs = {}
    hs = [flux.denoiser.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: outs.__setitem__(n, o[1])) for n in layers]
    try:
        with torch.no_grad(): flux.backbone.denoise(flux.denoiser, zt, torch.tensor([750.5]), enc.embeddings, **enc.extra)
    finally:
        for h in hs: h.remove()
    for n in layers:
        want = outs[n][0].T.reshape(-1, 4, 4)
        torch.testing.assert_close(cache.features(n, t=750.5), want, atol=1e-5, rtol=1e-5)


def test_call_grid_timestep_latent(flux, pipe):
    got = []
    h = flux.denoiser.register_forward_pre_hook(lambda mod, a, kw: got.append(
        (flux.backbone.call_grid(mod, a, kw), flux.backbone.call_timestep(mod, a, kw), flux.backbone.call_latent_hw(mod, a, kw))),
        with_kwargs=True)
    try: _generate(pipe, flux)
    finally: h.remove()
    assert [g[0] for g in got] == [(4, 4)] * 2 and [g[2] for g in got] == [(8, 8)] * 2
    for (_, t, _), ref in zip(got, pipe.scheduler.timesteps):
        assert abs(t - float(ref)) < 1e-3


@pytest.mark.parametrize("branch", ["cond", "uncond", "both"])
def test_trace_true_cfg_records_the_branch_asked_for(flux, pipe, branch):
    "True CFG: two transformer calls per step, conditional first; trace keeps the branch asked for, each equal to a capture of that call."
    from md_probe.trace import trace
    from md_probe.engine import capture, attached
    L = "single_transformer_blocks.0.attn"
    calls, before = [], attached(flux.denoiser)
    h = flux.denoiser.register_forward_pre_hook(lambda m, a, kw: calls.append(dict(kw)), with_kwargs=True)
    try:
        with trace(pipe, cross_attention=[L], branch=branch) as c:
            pipe("a cat", negative_prompt="a dog", true_cfg_scale=2.0, num_inference_steps=2, height=64, width=64,
                 max_sequence_length=flux.max_length, output_type="latent", generator=torch.Generator().manual_seed(0))
    finally: h.remove()
    assert attached(flux.denoiser) == before and len(calls) == 4            # 2 steps x (cond, uncond)
    def captured(kw):
        with capture(flux.denoiser, cross_attention=[L], backbone=flux.backbone) as st, torch.no_grad(): flux.denoiser(**kw)
        return st.attention[L][0][0]
    assert c.meta["guidance"] == "calls" and len(c.timesteps) == 2
    for s in range(2):
        cond, uncond = captured(calls[2 * s]), captured(calls[2 * s + 1])
        assert not torch.allclose(cond, uncond, atol=1e-6)                  # the two calls differ: the test can fail
        if branch == "both":
            torch.testing.assert_close(c.attention(L, step=s, prompt=0), cond, rtol=0, atol=1e-6)
            torch.testing.assert_close(c.attention(L, step=s, prompt=1), uncond, rtol=0, atol=1e-6)
        else:
            torch.testing.assert_close(c.attention(L, step=s), cond if branch == "cond" else uncond, rtol=0, atol=1e-6)
    assert c.prompts[0].prompt == ("a dog" if branch == "uncond" else "a cat")
    if branch == "both": assert c.prompts[1].prompt == "a dog"
