"SDXL backbone on its tiny offline model: conditioning, loading, the UNet call, noise and attention capture against diffusers."
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import pytest, torch
torch.set_num_threads(1)
from md_probe.models import load_model, DiffusionModel
from md_probe.sdxl import SDXL, tiny_sdxl, default_layers, sdxl_unet_meta

PROMPT = "a photo of a zebra on the grass"   # "zebra" is not in the tiny vocabulary: several tokens

@pytest.fixture(scope="module")
def m(): return tiny_sdxl()

@pytest.fixture(scope="module")
def pipe(m):
    from diffusers import StableDiffusionXLPipeline
    return StableDiffusionXLPipeline(**m.backbone.components(m))

def test_builtin_name():
    m = load_model("tiny-sdxl")
    assert isinstance(m.backbone, SDXL) and m.family == "sdxl" and m.image_size == 64 and m.stride == 32

def test_token_ids_equal_pipeline(m, pipe):
    enc = m.tokenize(PROMPT)
    for tok in (pipe.tokenizer, pipe.tokenizer_2):
        ids = tok(PROMPT, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        ours = enc.input_ids if tok is pipe.tokenizer else m.backbone._streams(m, PROMPT)[1].input_ids
        assert torch.equal(ours, ids)
    # the two tokenizers differ only in padding (CLIP-G pads with "!")
    ids2 = m.backbone._streams(m, PROMPT)[1].input_ids
    assert not torch.equal(enc.input_ids, ids2) and torch.equal(enc.input_ids[enc.attention_mask.bool()], ids2[enc.attention_mask.bool()])

def test_encode_prompt_equals_pipeline(m, pipe):
    enc = m.encode_prompt(PROMPT)
    pe, _, pooled, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
    assert enc.embeddings.shape == (1, 77, 64) and set(enc.extra) == {"text_embeds"}
    assert (enc.embeddings - pe).abs().max() <= 1e-6
    assert (enc.extra["text_embeds"] - pooled).abs().max() <= 1e-6
    assert enc.extra["text_embeds"].shape == (1, 32)

def test_word_positions_multi_token(m):
    enc = m.tokenize(PROMPT)
    pos = enc.positions("zebra")
    assert len(pos) > 1 and pos == list(range(pos[0], pos[-1] + 1))
    assert "".join(enc.tokens[p] for p in pos).replace("</w>", "") == "zebra"
    assert pos[0] == 5 and enc.positions("grass") == [pos[-1] + 3]   # start, a, photo, of, a, zebra..., on, the, grass
    assert enc.occurrences("a") == [[1], [4]]
    assert m.backbone._streams(m, PROMPT)[1].token_words == enc.token_words   # CLIP-G: the same positions

def test_save_and_load(m, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    m.save_pretrained(tmp_path / "x")
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "x")
    assert type(pipe.unet).__name__ == "UNet2DConditionModel" and pipe.text_encoder_2 is not None
    back = load_model(str(tmp_path / "x"))
    assert isinstance(back.backbone, SDXL) and back.image_size == 64 and type(back.scheduler) is type(m.scheduler)
    for a, b in ((m.denoiser, back.denoiser), (m.extra["text_encoder_2"], back.extra["text_encoder_2"])):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    e1, e2 = m.encode_prompt(PROMPT), back.encode_prompt(PROMPT)
    assert (e1.embeddings - e2.embeddings).abs().max() <= 1e-6
    assert (e1.extra["text_embeds"] - e2.extra["text_embeds"]).abs().max() <= 1e-6

def test_denoise_equals_pipeline_call(m, pipe):
    "One guided step: the UNet call the pipeline makes, and its conditional half recomputed by `denoise`."
    calls = []
    def hook(mod, args, kwargs, out):
        calls.append((args, kwargs, out[0] if isinstance(out, tuple) else out.sample))
        assert m.backbone.guidance(pipe) == "halves"
    h = m.denoiser.register_forward_hook(hook, with_kwargs=True)
    try: pipe(PROMPT, num_inference_steps=1, guidance_scale=5.0, height=64, width=96, output_type="latent",
              generator=torch.Generator().manual_seed(0))
    finally: h.remove()
    (args, kw, out), = calls
    sample, t = args[0], args[1]
    assert sample.shape == (2, 4, 8, 12)   # not square: the time ids are (h, w) in that order
    enc = m.encode_prompt(PROMPT)
    cond = kw["added_cond_kwargs"]
    assert torch.equal(cond["time_ids"][1], m.backbone.time_ids(sample[1:])[0])
    with torch.no_grad():
        ours = m.backbone.denoise(m.denoiser, sample[1:], t.reshape(1), enc.embeddings, **enc.extra)
    assert (ours - out[1:]).abs().max() <= 1e-5 * out.abs().max()
    # the halves really differ (the test can fail): the unconditional row is something else
    assert (ours - out[:1]).abs().max() > 1e-3

def test_guidance_modes(m, pipe):
    seen = []
    h = m.denoiser.register_forward_pre_hook(lambda mod, a: seen.append(m.backbone.guidance(pipe)))
    try: pipe("a cat", num_inference_steps=1, guidance_scale=1.0, height=64, width=64, output_type="latent")
    finally: h.remove()
    assert seen == ["none"]

def test_add_noise_vs_schedulers(m):
    "Ours = DDPM's add_noise = Euler's add_noise then its scale_model_input (what the SDXL pipeline feeds the UNet)."
    from diffusers import DDPMScheduler
    sched = m.scheduler
    sched.set_timesteps(4)
    ts = [int(t) for t in sched.timesteps[:2]]
    z0, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    zt = m.backbone.add_noise(m, z0, ts, eps)
    assert zt.shape == (2, 4, 8, 8)
    ddpm = DDPMScheduler.from_config(sched.config)
    for i, t in enumerate(ts):
        tt = torch.tensor([t])
        assert (zt[i:i+1] - ddpm.add_noise(z0, eps, tt)).abs().max() <= 1e-5
        euler = sched.scale_model_input(sched.add_noise(z0, eps, tt), tt)
        sched._step_index = None
        assert (zt[i:i+1] - euler).abs().max() <= 1e-4
    assert (zt[0] - zt[1]).abs().max() > 1e-2

def _attn_modules(m):
    return {n: mod for n, mod in m.denoiser.named_modules() if n.endswith(("attn1", "attn2"))}

def test_relations_and_default_layers(m):
    mods = _attn_modules(m)
    assert len([n for n in mods if n.endswith("attn2")]) == 2 * 1 + 2 * 2 + 1 * 2 + 3 * 2 + 3 * 1   # tiny: (1, 1, 2) layers
    assert all(m.backbone.relations(n, mod) == (("text->image",) if n.endswith("attn2") else ("image->image",))
               for n, mod in mods.items())
    import fnmatch
    d = default_layers(m.denoiser)
    names = dict(m.denoiser.named_modules())
    assert all(f in names for f in d["feature_layers"])
    for pat in d["attention_layers"]: assert any(fnmatch.fnmatchcase(n, pat) for n in mods), pat
    full = sdxl_unet_meta()
    assert sum(n.endswith("attn2") for n, _ in full.named_modules()) == 70
    assert default_layers(full)["feature_layers"] == ("up_blocks.0.resnets.2", "up_blocks.1.resnets.2")

def test_dummy_forward(m):
    with torch.no_grad(): assert m.backbone.dummy_forward(m.denoiser) == (8, 8)

def _reference_probs(mod, x, ctx):
    "softmax(q k^T / sqrt(d)) from the module's own projections, averaged over heads: (B, N, L)."
    q, k = mod.to_q(x), mod.to_k(ctx)
    B, N, _ = q.shape; h = mod.heads
    q = q.view(B, N, h, -1).transpose(1, 2); k = k.view(B, k.shape[1], h, -1).transpose(1, 2)
    return (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1).mean(1)

def _heads_mean(p): return p.mean(1) if p.ndim == 4 else p

def test_attention_capture_equals_recomputation(m):
    from md_probe.engine import capture, attached
    enc = m.encode_prompt(PROMPT)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    ctx, kw = enc.embeddings.expand(2, -1, -1), {k: v.expand(2, -1) for k, v in enc.extra.items()}
    mods = _attn_modules(m)
    names = ["down_blocks.2.attentions.1.transformer_blocks.1.attn2", "up_blocks.1.attentions.0.transformer_blocks.0.attn1"]
    inputs, before = {}, attached(m.denoiser)
    hs = [mods[n].register_forward_pre_hook(lambda mod, a, k, n=n: inputs.__setitem__(n, (a, k)), with_kwargs=True) for n in names]
    try:
        with torch.no_grad():
            plain = m.backbone.denoise(m.denoiser, x, t, ctx, **kw)
            with capture(m.denoiser, cross_attention=names[:1], self_attention=names[1:]) as store:
                recorded = m.backbone.denoise(m.denoiser, x, t, ctx, **kw)
    finally:
        for h in hs: h.remove()
    assert attached(m.denoiser) == before
    assert (recorded - plain).abs().max() <= 1e-5 * plain.abs().max()
    with torch.no_grad():
        a, k = inputs[names[0]]
        hid, ehs = a[0] if a else k["hidden_states"], k.get("encoder_hidden_states")
        ref = _reference_probs(mods[names[0]], hid, ehs)
        got = _heads_mean(torch.cat(store.attention[names[0]]))
        assert ref.shape == got.shape == (2, 4, 77)   # level 2 of an 8x8 latent: 2x2 tokens
        assert (got - ref).abs().max() <= 1e-5
        a, k = inputs[names[1]]
        hid = a[0] if a else k["hidden_states"]
        ref = _reference_probs(mods[names[1]], hid, hid)
        got = _heads_mean(torch.cat(store.self_attention[names[1]]))
        assert ref.shape == got.shape == (2, 16, 16) and (got - ref).abs().max() <= 1e-5

def test_capture_restores_on_error(m):
    from md_probe.engine import capture, attached
    before = attached(m.denoiser)
    name = "mid_block.attentions.0.transformer_blocks.0.attn2"
    with pytest.raises(RuntimeError, match="boom"):
        with capture(m.denoiser, features=["up_blocks.0.resnets.2"], cross_attention=[name]):
            assert attached(m.denoiser) != before
            raise RuntimeError("boom")
    assert attached(m.denoiser) == before

def test_list_layers_every_level(m):
    "Every attention module is listed at its level's grid (8x8, 4x4, 2x2 for a 64 px image), with its relations."
    from md_probe.engine import list_layers
    rows = list_layers(m, pattern="*attn2")
    assert len(rows) == 17 and all(r.relations == ("text->image",) for r in rows)
    grid = {r.name: r.resolution for r in rows}
    assert grid["down_blocks.1.attentions.0.transformer_blocks.0.attn2"] == (4, 4)
    assert grid["mid_block.attentions.0.transformer_blocks.1.attn2"] == (2, 2)
    assert grid["up_blocks.1.attentions.2.transformer_blocks.0.attn2"] == (4, 4)
    assert list_layers(m, image_size=128, pattern="up_blocks.0.resnets.2")[0].resolution == (4, 4)

def test_probe_and_default_layers(m):
    "probe on an image with the default layers; its maps equal a recomputation from the attention module's input."
    import numpy as np
    from md_probe.probe import probe
    img = (np.random.RandomState(0).rand(64, 96, 3) * 255).astype(np.uint8)
    d = default_layers(m.denoiser)
    name = "up_blocks.0.attentions.2.transformer_blocks.1.attn2"
    mod = dict(m.denoiser.named_modules())[name]
    seen = []
    h = mod.register_forward_pre_hook(lambda mod, a, k: seen.append((a[0] if a else k["hidden_states"], k["encoder_hidden_states"])), with_kwargs=True)
    try: c = probe(m, img, PROMPT, timesteps=[0, 500], layers=d["feature_layers"], cross_attention=d["attention_layers"],
                   read="input", image_size=64)
    finally: h.remove()
    assert c.timesteps == [0, 500]
    (x, ctx), = seen
    with torch.no_grad(): ref = _reference_probs(mod, x, ctx)          # rows: t = 0, t = 500
    for i, t in enumerate((0, 500)):
        got = c.attention(name, t)
        assert got.shape[-2:] == (4, 77)
        assert (got.mean(0) - ref[i]).abs().max() <= 1e-5

def test_trace_generation_cond_branch(m, pipe):
    "trace records the conditional half of a guided SDXL generation: equal to a recomputation from the cond row."
    from md_probe.trace import trace
    name = "mid_block.attentions.0.transformer_blocks.0.attn2"
    mod = dict(m.denoiser.named_modules())[name]
    seen = []
    h = mod.register_forward_pre_hook(lambda mod, a, k: seen.append((a[0] if a else k["hidden_states"], k["encoder_hidden_states"])), with_kwargs=True)
    try:
        with trace(pipe, cross_attention=[name]) as cache:
            pipe(PROMPT, num_inference_steps=2, guidance_scale=5.0, height=64, width=64, output_type="latent")
    finally: h.remove()
    assert len(seen) == 2 and seen[0][0].shape[0] == 2
    for (x, ctx), t in zip(seen, cache.timesteps):
        with torch.no_grad(): ref = _reference_probs(mod, x, ctx)
        got = cache.attention(name, t).mean(0)
        assert (got - ref[1]).abs().max() <= 1e-5 and (got - ref[0]).abs().max() > 1e-4
