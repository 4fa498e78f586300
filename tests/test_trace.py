"""Tests of `trace` (recording a diffusers generation) and of `word_attention`'s switchable aggregation, DAAM's
recipe against a direct reference computation on a model whose attention is sharp and whose levels differ in heads."""
import math
import numpy as np, pytest, torch
import torch.nn.functional as F

torch.set_num_threads(1)

from md_probe.models import load_model
from md_probe.probe import trace, probe, attached

PROMPT = "a grassland and a cat on grassland"   # "grassland" is 4 tokens of the tiny tokenizer, twice
GEN = dict(num_inference_steps=3, height=64, width=64)


def make_pipe(m, scheduler=None):
    from diffusers import StableDiffusionPipeline
    p = StableDiffusionPipeline(unet=m.denoiser, vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer,
                                scheduler=scheduler or m.scheduler, safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def sharp_pipe():
    "A copy of the tiny model (2/4/8/8 heads per level) with sharpened cross-attention: to_q x 40."
    m = load_model("tiny")
    for n, mod in m.denoiser.named_modules():
        if n.endswith("attn2"): mod.to_q.weight.data *= 40
    return make_pipe(m)


def daam_reference(pipe, prompt, word, **gen):
    """DAAM's word heat map computed as DAAM computes it (daam/trace.py, daam/utils.py), from each attn2's inputs:
    conditional half of every down/up attn2 not at 1/8 of the latent grid; per (layer, head) the (tokens, h, w) maps
    summed over the UNet calls; bicubic (torch, align_corners=False) to the latent grid, clamp at 0; mean over all
    (layer, head) pairs; mean over the tokens of every occurrence of the word (token positions + 1 for the start)."""
    heat, unet = {}, pipe.unet
    lat = gen["height"] // pipe.vae_scale_factor
    def hook(name):
        def f(attn, args, kwargs, out):
            x, ctx = (args[0] if args else kwargs["hidden_states"]), kwargs["encoder_hidden_states"]
            q, k = attn.head_to_batch_dim(attn.to_q(x)), attn.head_to_batch_dim(attn.to_k(ctx))
            probs = attn.get_attention_scores(q, k, None)
            side = int(math.sqrt(probs.shape[1]))
            if side * 8 == lat: return
            maps = probs.permute(2, 0, 1).reshape(probs.shape[2], probs.shape[0], side, side)
            maps = maps[:, maps.shape[1] // 2:].permute(1, 0, 2, 3)
            for head, mp in enumerate(maps): heat[(name, head)] = heat.get((name, head), 0) + mp
        return f
    names = [n for n, _ in unet.named_modules() if n.endswith("attn2") and not n.startswith("mid_block")]
    hs = [unet.get_submodule(n).register_forward_hook(hook(n), with_kwargs=True) for n in names]
    try: pipe(prompt, **gen)
    finally:
        for h in hs: h.remove()
    up = [F.interpolate(mp[:, None], size=(lat, lat), mode="bicubic").clamp_(min=0) for mp in heat.values()]
    maps = torch.stack(up).mean(0)[:, 0]
    toks = [t.replace("</w>", "") for t in pipe.tokenizer.tokenize(prompt.lower())]
    search = [t.replace("</w>", "") for t in pipe.tokenizer.tokenize(word.lower())]
    idx = [s + i + 1 for s in range(len(toks)) if toks[s:s + len(search)] == search for i in range(len(search))]
    return maps[idx].mean(0), heat, idx


def test_daam_matches_reference(sharp_pipe):
    with trace(sharp_pipe, heads=True) as cache:
        ref, heat, idx = daam_reference(sharp_pipe, PROMPT, "grassland", generator=torch.Generator().manual_seed(0), **GEN)
    assert len(idx) == 8 and idx == cache.prompts[0].positions("grassland")     # 4 tokens x 2 occurrences
    assert {cache.probs[n].shape[3] for n, _ in heat} == {2, 4, 8}        # levels differ in heads
    ours = cache.word_attention("grassland", aggregate="daam")
    assert ours.shape == (8, 8)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    # the test can fail: each single wrong choice moves the map by far more than the tolerance
    for wrong in (dict(pool="layers"), dict(mode="bilinear"), dict(time="mean"), dict(layers="*"), dict(clamp=False),
                  dict(reduce="max")):
        diff = (cache.word_attention("grassland", aggregate="daam", **wrong) - ref).abs().max() / ref.abs().max()
        assert diff > 1e-3, (wrong, float(diff))


def test_daam_other_words_and_scheduler(sharp_pipe):
    "A single-token word, and a scheduler (PNDM) that runs one timestep twice: every call is summed."
    from diffusers import PNDMScheduler
    pndm = PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         skip_prk_steps=True, steps_offset=1)
    pipe = make_pipe(load_model("tiny"), pndm)
    pipe.unet, pipe.text_encoder = sharp_pipe.unet, sharp_pipe.text_encoder
    with trace(pipe, heads=True) as cache:
        ref, _, _ = daam_reference(pipe, PROMPT, "cat", generator=torch.Generator().manual_seed(1), **GEN)
    assert len(cache.timesteps) == 4 and len(set(cache.timesteps)) == 3      # PNDM repeats its first timestep
    torch.testing.assert_close(cache.word_attention("cat", aggregate="daam"), ref, rtol=1e-5, atol=1e-6)
    dup = [t for t in cache.timesteps if cache.timesteps.count(t) == 2][0]
    rows = [i for i, t in enumerate(cache.timesteps) if t == dup]
    a = cache.probs["up_blocks.1.attentions.0.transformer_blocks.0.attn2"]
    want = a[rows, 0, 0].mean(0).mean(0)[:, cache.prompts[0].positions("cat")].mean(-1).reshape(2, 2)
    want = F.interpolate(want[None, None], size=(2, 2), mode="bilinear", align_corners=False)[0, 0]
    got = cache.word_attention("cat", t=dup, layers="up_blocks.1.attentions.0.transformer_blocks.0.attn2")
    torch.testing.assert_close(got, want)


def test_default_word_attention_unchanged():
    "The default recipe is METHOD.md's (and the one word_attention had): mean of heads, bilinear, mean of layers and t."
    m = load_model("tiny")
    img = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    c = probe(m, img, "a cat and grassland", timesteps=[0, 100, 300], cross_attention=True)
    pos = c.prompts[0].positions("grassland")
    maps = []
    for t in (0, 300):
        for l in c.probs:
            a = c.attention(l, t=t).mean(0)[:, pos].mean(-1).reshape(c.attention_hw(l))
            maps.append(F.interpolate(a[None, None], size=(8, 8), mode="bilinear", align_corners=False)[0, 0])
    torch.testing.assert_close(c.word_attention("grassland", t=[0, 300]), torch.stack(maps).mean(0), rtol=1e-5, atol=1e-7)
    side = c.word_attention("grassland", t=0, weights="side")
    num = sum(c.attention_hw(l)[0] * F.interpolate(c.attention(l, t=0).mean(0)[:, pos].mean(-1).reshape(c.attention_hw(l))[None, None],
                                                  size=(8, 8), mode="bilinear", align_corners=False)[0, 0] for l in c.probs)
    torch.testing.assert_close(side, num / sum(c.attention_hw(l)[0] for l in c.probs), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="weights="): c.word_attention("cat", weights="heads")
    with pytest.raises(ValueError, match="weight 0"): c.word_attention("cat", weights={"nothing*": 1})


def test_trace_branches_and_restore():
    m = load_model("tiny")
    pipe = make_pipe(m)
    before = {k: attached(v) for k, v in (("unet", m.denoiser), ("text", m.text_encoder), ("vae", m.vae))}
    caches = {}
    for branch in ("cond", "uncond", "both"):
        with trace(pipe, layers="up_blocks.2.resnets.1", branch=branch) as caches[branch]:
            out = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **GEN)
    c, u, b = caches["cond"], caches["uncond"], caches["both"]
    name = "up_blocks.2.attentions.1.transformer_blocks.0.attn2"
    t = c.timesteps[1]
    torch.testing.assert_close(b.attention(name, t=t, prompt=0), c.attention(name, t=t))
    torch.testing.assert_close(b.attention(name, t=t, prompt=1), u.attention(name, t=t))
    torch.testing.assert_close(b.features("up_blocks.2.resnets.1", t=t, prompt=1), u.features("up_blocks.2.resnets.1", t=t))
    assert u.prompts[0].prompt == "" and c.prompts[0].prompt == PROMPT and b.meta["guided"]
    assert c.images[0].shape == (64, 64, 3) and np.array_equal(c.images[0], np.asarray(out.images[0]))
    assert c.latent_hw == (8, 8) and c.image_hw == [(64, 64)] and c.meta["calls"] == 3
    with pytest.raises(RuntimeError, match="planted"):
        with trace(pipe, layers="down_blocks.*", self_attention=True):
            boom = m.vae.decoder.register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("planted")))
            try: pipe(PROMPT, **GEN)
            finally: boom.remove()
    after = {k: attached(v) for k, v in (("unet", m.denoiser), ("text", m.text_encoder), ("vae", m.vae))}
    assert after == before
    with pytest.raises(RuntimeError, match="recorded no denoiser call"):
        with trace(pipe, heads=True): pass
    with pytest.raises(ValueError, match="branch="): trace(pipe, branch="cfg").__enter__()


def test_trace_own_loop_without_guidance():
    "A DiffusionModel and a sampling loop of one's own: no pipeline, no guidance, latent output (no image)."
    m = load_model("tiny")
    enc = m.encode_prompt("a cat and grassland")
    m.scheduler.set_timesteps(2)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with trace(m, layers="mid_block") as c:
        with torch.no_grad():
            for t in m.scheduler.timesteps:
                z = m.scheduler.step(m.denoiser(z, t, encoder_hidden_states=enc.embeddings).sample, t, z).prev_sample
    assert c.timesteps == m.scheduler.timesteps.tolist() and not c.meta["guided"] and c.images == []
    assert c.prompts[0].words == []                    # the text encoder ran before the block: words unknown ...
    with pytest.raises(KeyError, match="its words are"): c.word_attention("grassland")
    with trace(m, guidance=False, heads=True, prompt="a cat and grassland") as named:   # ... unless the prompt is given
        with torch.no_grad():
            for t in m.scheduler.timesteps: m.denoiser(z, t, encoder_hidden_states=enc.embeddings)
    assert named.prompts[0].positions("grassland") == enc.positions("grassland")
    assert named.word_attention("grassland", aggregate="daam").shape == (8, 8)
    assert c.features("mid_block", t=c.timesteps[0]).shape == (64, 1, 1)
