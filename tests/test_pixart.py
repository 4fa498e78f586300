"PixArt backbone on the tiny offline model: conditioning, loading, the denoiser call, noise, capture, words, grid."
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import math
import pytest
import torch
torch.set_num_threads(1)

from md_probe.models import load_model, DiffusionModel
from md_probe.pixart import PixArt, tiny_pixart, default_layers, pixart_layer_table, PIXART_SIGMA_XL2, MAX_LENGTH
from md_probe.engine import capture, attached

PROMPT = "A photo of a zebra cat on grass"

@pytest.fixture(scope="module")
def m(): return load_model("tiny-pixart")

def _pipe(m, cls="PixArtSigmaPipeline"):
    import diffusers
    pipe = getattr(diffusers, cls)(**m.backbone.components(m))
    pipe.set_progress_bar_config(disable=True)
    return pipe

def _text_ids(m, fn):
    "The input ids every text-encoder call saw while `fn` ran."
    ids = []
    h = m.text_encoder.register_forward_pre_hook(lambda mod, a, kw: ids.append((a[0] if a else kw["input_ids"]).clone()), with_kwargs=True)
    try: out = fn()
    finally: h.remove()
    return ids, out

@pytest.mark.parametrize("cls", ["PixArtSigmaPipeline", "PixArtAlphaPipeline"])
def test_encode_prompt_equals_pipeline(m, cls):
    mm = DiffusionModel(m.denoiser, m.text_encoder, m.tokenizer, m.scheduler, m.vae, max_length=MAX_LENGTH[cls], backbone=PixArt(cls))
    pipe = _pipe(mm, cls)
    enc = mm.encode_prompt(PROMPT)
    with torch.no_grad():
        ids, (pe, pm, _, _) = _text_ids(mm, lambda: pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, device="cpu"))
    assert enc.input_ids.shape == (1, MAX_LENGTH[cls]) == ids[0].shape
    assert torch.equal(enc.input_ids, ids[0])
    assert torch.equal(enc.attention_mask, pm) and torch.equal(enc.extra["encoder_attention_mask"].cpu(), pm)
    assert enc.embeddings.shape == pe.shape
    assert (enc.embeddings - pe).abs().max() <= 1e-6
    assert int(pm.sum()) < pm.shape[1]          # the prompt is padded: the mask matters

def test_word_positions_multi_token_and_repeated(m):
    enc = m.tokenize("the zebra and the zebra sky")
    occ = enc.occurrences("zebra")
    assert len(occ) == 2 and all(len(o) > 1 for o in occ)           # zebra is not in the tiny vocabulary
    for o in occ:
        assert "".join(enc.tokens[p] for p in o).lstrip("▁") == "zebra"
    assert enc.positions("sky") == [enc.tokens.index("▁sky")]
    assert enc.tokens[int(enc.attention_mask.sum()) - 1] == "</s>" and enc.tokens[0] == "▁the"   # no start token
    assert m.tokenize("A Photo").words == ["A", "Photo"] and m.tokenize("A Photo").tokens[:2] == ["▁a", "▁photo"]

def test_save_and_load_roundtrip(m, tmp_path):
    from diffusers import PixArtSigmaPipeline, PixArtAlphaPipeline
    m.save_pretrained(tmp_path / "sigma")
    pipe = PixArtSigmaPipeline.from_pretrained(tmp_path / "sigma")
    assert type(pipe.transformer).__name__ == "PixArtTransformer2DModel"
    back = load_model(str(tmp_path / "sigma"))
    assert isinstance(back.backbone, PixArt) and back.backbone.pipeline == "PixArtSigmaPipeline" and back.max_length == 300
    assert back.image_size == m.image_size == 64 and back.family == "pixart"
    for a, b in zip(m.denoiser.state_dict().values(), back.denoiser.state_dict().values()): assert torch.equal(a, b)
    assert torch.equal(back.tokenize(PROMPT).input_ids, m.tokenize(PROMPT).input_ids)
    assert (back.encode_prompt(PROMPT).embeddings - m.encode_prompt(PROMPT).embeddings).abs().max() == 0
    # an α folder loads with α's class and window, and saves back as α
    alpha = DiffusionModel(m.denoiser, m.text_encoder, m.tokenizer, m.scheduler, m.vae, max_length=120, backbone=PixArt("PixArtAlphaPipeline"))
    alpha.save_pretrained(tmp_path / "alpha")
    PixArtAlphaPipeline.from_pretrained(tmp_path / "alpha")
    a2 = load_model(str(tmp_path / "alpha"))
    assert a2.backbone.pipeline == "PixArtAlphaPipeline" and a2.max_length == 120

@pytest.mark.parametrize("scale", [4.5, 1.0])
def test_denoise_equals_pipeline_call(m, scale):
    pipe, calls = _pipe(m), []
    def pre(mod, args, kw): calls.append(dict(kw, x=args[0], guidance=m.backbone.guidance(pipe)))
    def post(mod, args, kw, out): calls[-1]["out"] = out[0]
    hs = [m.denoiser.register_forward_pre_hook(pre, with_kwargs=True), m.denoiser.register_forward_hook(post, with_kwargs=True)]
    try: pipe(PROMPT, num_inference_steps=1, height=64, width=64, guidance_scale=scale, use_resolution_binning=False,
              clean_caption=False, output_type="latent", generator=torch.Generator().manual_seed(0))
    finally:
        for h in hs: h.remove()
    assert not m.denoiser._forward_hooks and not m.denoiser._forward_pre_hooks
    (c,) = calls
    guided = scale > 1
    assert c["guidance"] == ("halves" if guided else "none") and c["x"].shape[0] == (2 if guided else 1)
    enc = m.encode_prompt(PROMPT)
    assert (c["encoder_hidden_states"][-1:] - enc.embeddings).abs().max() <= 1e-6          # the conditional row is last
    assert torch.equal(c["encoder_attention_mask"][-1:], enc.extra["encoder_attention_mask"])
    # what md_probe feeds the transformer, from its own conditioning (not the pipeline's tensors)
    n = c["x"].shape[0]
    eps = m.backbone.denoise(m.denoiser, c["x"][-1:], c["timestep"][-1:], enc.embeddings, **enc.extra)
    assert eps.shape == c["x"][-1:].shape and c["out"].shape[1] == 2 * eps.shape[1]
    assert (eps - c["out"][-1:, :4]).abs().max() <= 1e-5 * c["out"].abs().max()
    assert m.backbone.guidance(pipe) == "none"          # outside a generation

def test_add_noise_matches_scheduler(m):
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ts = [0, 17, 500, 999]
    zt = m.add_noise(z0, ts, seed=3)
    eps = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(3))
    z = z0.repeat(len(ts), 1, 1, 1); t = torch.tensor(ts).repeat_interleave(2)
    ddpm = DDPMScheduler.from_config(m.scheduler.config)
    assert (zt - ddpm.add_noise(z, eps.expand_as(z), t)).abs().max() <= 1e-5
    own = DPMSolverMultistepScheduler.from_config(m.scheduler.config)
    own.set_timesteps(1000)               # its add_noise indexes its current schedule: compare where t is in it
    keep = torch.isin(t, own.timesteps)
    assert keep.sum() >= 4
    assert (zt[keep] - own.add_noise(z[keep], eps.expand_as(z)[keep], t[keep])).abs().max() <= 1e-5
    import copy
    mm = copy.copy(m); mm.scheduler = DPMSolverMultistepScheduler.from_config(m.scheduler.config)
    mm.scheduler.set_timesteps(2)          # after a generation set a short schedule, add_noise still takes any t
    assert torch.equal(mm.add_noise(z0, ts, seed=3), zt)

def _attn_inputs(m, names, fn):
    "hidden_states, encoder_hidden_states and attention_mask each attention module received while `fn` ran."
    mods, seen = dict(m.denoiser.named_modules()), {}
    def hook(n):
        def f(mod, a, kw): seen.setdefault(n, (a[0] if a else kw["hidden_states"], kw.get("encoder_hidden_states"), kw.get("attention_mask")))
        return f
    hs = [mods[n].register_forward_pre_hook(hook(n), with_kwargs=True) for n in names]
    try: out = fn()
    finally:
        for h in hs: h.remove()
    return seen, out

def _reference_probs(attn, x, ctx, mask):
    "softmax(q k^T / sqrt(d) + bias) from the module's own projections, per head: (B, heads, N, L)."
    ctx = x if ctx is None else ctx
    B, N, _ = x.shape
    split = lambda y: y.view(B, y.shape[1], attn.heads, -1).transpose(1, 2)
    q, k = split(attn.to_q(x)), split(attn.to_k(ctx))
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None: logits = logits + mask.view(B, 1, 1, -1)
    return logits.softmax(-1)

@pytest.mark.parametrize("heads", [True, False])
def test_capture_equals_independent_recomputation(m, heads):
    enc = m.encode_prompt(PROMPT)
    x = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([5, 700])
    ctx, mask = enc.embeddings.expand(2, -1, -1), enc.extra["encoder_attention_mask"].expand(2, -1)
    run = lambda: m.backbone.denoise(m.denoiser, x, t, ctx, encoder_attention_mask=mask)
    names = ["transformer_blocks.1.attn2", "transformer_blocks.0.attn1"]
    block, raw = m.denoiser.transformer_blocks[1], []
    with torch.no_grad():
        h = block.register_forward_hook(lambda mod, a, out: raw.append(out))
        try: seen, ref_out = _attn_inputs(m, names, run)
        finally: h.remove()
        before = attached(m.denoiser)
        with capture(m.denoiser, features=["transformer_blocks.1"], cross_attention=names[:1], self_attention=names[1:],
                     heads=heads) as st:
            out = run()
    assert attached(m.denoiser) == before
    assert (out - ref_out).abs().max() <= 1e-5 * ref_out.abs().max()
    mods = dict(m.denoiser.named_modules())
    hs, ehs, bias = seen[names[0]]
    assert bias is not None and bias.shape == (2, 1, 300)              # the mask arrives as an additive bias
    p_ref = _reference_probs(mods[names[0]], hs, ehs, (1 - mask.float()) * -10000.0)
    p = st.attention[names[0]][0]
    if not heads: p_ref = p_ref.mean(1, keepdim=True)                  # heads averaged on the fly
    assert p.shape == (2, 3 if heads else 1, 12, 300)
    assert (p - p_ref).abs().max() <= 1e-5
    n = int(enc.attention_mask.sum())
    assert p[..., n:].max() == 0 and (p.sum(-1) - 1).abs().max() <= 1e-5   # padding gets zero mass
    s_ref = _reference_probs(mods[names[1]], *seen[names[1]][:2], None).mean(1)
    assert (st.self_attention[names[1]][0] - s_ref).abs().max() <= 1e-5
    # block outputs are (B, N, C) tokens, row-major over the (h/2, w/2) grid; capture gives them as (B, C, h, w)
    (f,) = raw
    grid = m.backbone.token_grid(m.denoiser, x.shape[-2:])
    img = st.features["transformer_blocks.1"][0]
    assert grid == (4, 3) and f.shape == (2, 12, 24) and img.shape == (2, 24, 4, 3)
    close = lambda a, b: (a - b).abs().max() <= 1e-5 * b.abs().max()   # capture's own softmax: rounding differs
    assert close(img[:, :, 1, 2], f[:, 1 * 3 + 2]) and close(img.flatten(2).transpose(1, 2), f)
    assert not close(img[:, :, 2, 1], f[:, 1 * 3 + 2])

def test_capture_restores_on_error(m):
    enc = m.encode_prompt(PROMPT)
    before = attached(m.denoiser)
    procs = {n: mod.processor for n, mod in m.denoiser.named_modules() if hasattr(mod, "processor")}
    with pytest.raises(RuntimeError, match="boom"):
        with capture(m.denoiser, features=["transformer_blocks.0"], cross_attention=["transformer_blocks.0.attn2"]):
            m.backbone.denoise(m.denoiser, torch.zeros(1, 4, 8, 8), torch.tensor([3]), enc.embeddings, **enc.extra)
            raise RuntimeError("boom")
    assert attached(m.denoiser) == before
    assert all(mod.processor is procs[n] for n, mod in m.denoiser.named_modules() if hasattr(mod, "processor"))

def test_tokens_are_row_major_patches(m):
    pe = m.denoiser.pos_embed
    for r, c in [(0, 1), (2, 0), (3, 2)]:
        z = torch.zeros(1, 4, 8, 6); z[0, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2] = 1.0
        changed = (pe(z) - pe(torch.zeros_like(z))).abs().sum(-1)[0].nonzero().flatten().tolist()
        assert changed == [r * 3 + c]

def test_shapes_layers_and_defaults(m):
    assert m.stride == 16 and m.backbone.dummy_forward(m.denoiser) == (4, 4)
    assert m.backbone.relations("transformer_blocks.0.attn2", m.denoiser.transformer_blocks[0].attn2) == ("text->image",)
    assert m.backbone.relations("transformer_blocks.0.attn1", m.denoiser.transformer_blocks[0].attn1) == ("image->image",)
    table = pixart_layer_table()
    assert len(table) == 3 * PIXART_SIGMA_XL2["num_layers"] and {l.resolution for l in table} == {(64, 64)}
    assert {l.channels for l in table} == {1152}
    assert [l.relations for l in table[:3]] == [(), ("image->image",), ("text->image",)]
    from md_probe.engine import list_layers
    tiny = list_layers(m)
    assert [l.name for l in tiny if l.cross_attention] == ["transformer_blocks.0.attn2", "transformer_blocks.1.attn2"]
    assert {l.resolution for l in tiny} == {(4, 4)}
    d = default_layers(m.denoiser)
    assert d["feature_layers"] == ("transformer_blocks.0", "transformer_blocks.1") and d["read"] == "output"
    mods = dict(m.denoiser.named_modules())
    assert all(n in mods for n in (*d["feature_layers"], *d["attention_layers"]))

def test_tiny_is_fast_and_seeded():
    import time
    a, b = tiny_pixart(), tiny_pixart()
    assert all(torch.equal(x, y) for x, y in zip(a.denoiser.state_dict().values(), b.denoiser.state_dict().values()))
    enc = a.encode_prompt(PROMPT)
    t0 = time.perf_counter()
    with torch.no_grad(): a.backbone.denoise(a.denoiser, torch.zeros(1, 4, 8, 8), torch.tensor([10]), enc.embeddings, **enc.extra)
    assert time.perf_counter() - t0 < 1.0

def test_prompt_too_long_is_refused(m):
    with pytest.raises(ValueError, match="window"):
        m.tokenize(" ".join(["cat"] * 400))
