"""Tests of the capture engine beyond the notebooks' examples: early stop against a full forward for random capture
sets (hypothesis), the guard against a stop that would miss a recording, nested and chained captures restoring exactly
what they found, failures inside a stopped forward, the per-UNet measurement living only as long as the UNet, and the
evaluation runner's batched forward (`evaluate.forward_batch`, written over `run_with_cache`)."""
import gc
from dataclasses import replace
import numpy as np, pytest, torch
from hypothesis import given, settings, strategies as st, HealthCheck

torch.set_num_threads(1)

from md_probe.models import load_model, PreparedImage
from md_probe.engine import (AttentionRecorder, CaptureStore, attached, capture, list_layers, resolve_layers,
                             run_with_cache,  _LAYER_INFO, _LayerInfo, _info)
from md_probe.probe import probe
from md_probe.evaluate import forward_batch   # the runner's batched forward: a thin front of run_with_cache


@pytest.fixture(scope="module")
def tiny():
    m = load_model("tiny")
    img = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    encs = [m.encode_prompt("a cat and grassland"), m.encode_prompt("a dog")]
    z = m.add_noise(m.encode_image(img), [0, 300]).repeat_interleave(2, 0)       # (t, image, prompt) rows
    return m, z, torch.tensor([0, 0, 300, 300]), encs


def _run(m, z, t, encs, **kw):
    return run_with_cache(m, z, t, torch.cat([e.embeddings for e in encs]), prompts=encs, **kw)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.data())
def test_early_stop_equals_full_forward(tiny, data):
    "For any capture set and read mode: identical tensors, nothing after the stop runs, the model restored."
    m, z, t, encs = tiny
    names = list_layers(m).names()
    attn2 = [n for n in names if n.endswith("attn2")]
    attn1 = [n for n in names if n.endswith("attn1")]
    layers = data.draw(st.lists(st.sampled_from(names), unique=True, max_size=4))
    xattn = data.draw(st.lists(st.sampled_from(attn2), unique=True, max_size=3))
    sattn = data.draw(st.lists(st.sampled_from(attn1), unique=True, max_size=2))
    if not (layers or xattn or sattn): layers = [data.draw(st.sampled_from(names))]
    read = data.draw(st.sampled_from(["output", "input"]))
    kw = dict(layers=layers, cross_attention=xattn, self_attention=sattn, read=read)
    before = attached(m.denoiser)
    out, full = _run(m, z, t, encs, **kw)
    ran = []
    hooks = [mod.register_forward_pre_hook(lambda *a, n=n: ran.append(n)) for n, mod in m.denoiser.named_modules() if n]
    try: none, early = _run(m, z, t, encs, need_output=False, **kw)
    finally:
        for h in hooks: h.remove()
    assert none is None and out.shape == z.shape
    assert list(early) == list(full)
    for g in ("feats", "probs", "self_probs"):
        for k, v in getattr(full, g).items(): assert torch.equal(getattr(early, g)[k], v), (g, k)
    assert attached(m.denoiser) == before
    # the reference order: when each module starts in a plain forward (counted independently of the engine)
    order = []
    hooks = [mod.register_forward_pre_hook(lambda *a, n=n: order.append(n)) for n, mod in m.denoiser.named_modules() if n]
    try:
        with torch.no_grad(): m.denoiser(z[:1], 0, encoder_hidden_states=encs[0].embeddings)
    finally:
        for h in hooks: h.remove()
    start = {n: i for i, n in enumerate(order)}
    assert ran == order[:len(ran)]                                 # what ran is a prefix of the plain forward's order
    assert max(start[n] for n in ran) >= max(start[n] for n in (*layers, *xattn, *sattn))   # and every read module started
    if read == "input" and layers and max(start[n] for n in layers) > max([start[n] for n in (*xattn, *sattn)], default=-1):
        deepest = max(layers, key=start.get)                      # read at its input: it never runs
        assert ran[-1] == deepest and not any(n.startswith(deepest + ".") for n in ran)
    assert "conv_out" not in ran or "conv_out" in layers


def test_stop_that_would_miss_a_recording_raises(tiny):
    "A wrong execution order (here planted) makes the forward stop too early: the engine refuses, and restores."
    m, z, t, encs = tiny
    info = _info(m)
    before = attached(m.denoiser)
    swapped = [(n, k) for n, k in info.events]
    i, j = swapped.index(("down_blocks.0", "post")), swapped.index(("up_blocks.1", "post"))
    swapped[i], swapped[j] = swapped[j], swapped[i]           # claims up_blocks.1 ends before down_blocks.0
    _LAYER_INFO[m.denoiser] = _LayerInfo(info.shapes, swapped, info.relations)
    try:
        with pytest.raises(RuntimeError, match="without reaching.*up_blocks.1.*need_output=True"):
            _run(m, z, t, encs, layers=["down_blocks.0", "up_blocks.1"], need_output=False)
        _, c = _run(m, z, t, encs, layers=["down_blocks.0", "up_blocks.1"])    # no stop asked: fine
        assert list(c) == ["down_blocks.0", "up_blocks.1"]
    finally: _LAYER_INFO[m.denoiser] = info
    assert attached(m.denoiser) == before


def test_failure_inside_a_stopped_forward_propagates(tiny):
    m, z, t, encs = tiny
    before = attached(m.denoiser)
    boom = m.denoiser.mid_block.register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("planted")))
    try:
        with pytest.raises(RuntimeError, match="planted"):
            _run(m, z, t, encs, layers=["up_blocks.1"], cross_attention=True, need_output=False)
    finally: boom.remove()
    assert attached(m.denoiser) == before


def test_nested_captures_chain_and_restore(tiny):
    "Three captures of one attn2, nested: every level records every call made inside it; each restores what it found."
    m, z, t, encs = tiny
    name = "up_blocks.1.attentions.1.transformer_blocks.0.attn2"
    mod = m.denoiser.get_submodule(name)
    original = mod.processor
    ctx = torch.cat([e.embeddings for e in encs]).repeat(2, 1, 1)
    call = lambda: m.denoiser(z, t, encoder_hidden_states=ctx)
    with torch.no_grad(), capture(m.denoiser, cross_attention=[name]) as a:
        level_a = mod.processor
        call()
        with capture(m.denoiser, cross_attention=[name], with_lse=True) as b:
            level_b = mod.processor
            _, c = _run(m, z, t, encs, cross_attention=[name], need_output=False)
            assert mod.processor is level_b
        assert mod.processor is level_a and level_b.outer is level_a and level_a.outer is None
    assert mod.processor is original
    assert len(a.attention[name]) == 2 and len(b.attention[name]) == 1 and len(b.lse[name]) == 1
    # b keeps heads (with_lse), a and c average them on the fly: the same call's numbers
    assert b.attention[name][0].shape[1] == mod.heads and a.attention[name][1].shape[1] == 1
    assert torch.allclose(a.attention[name][1], b.attention[name][0].mean(1, keepdim=True), atol=1e-7)
    assert torch.equal(c.probs[name].flatten(0, 2), a.attention[name][1])


def test_a_foreign_processor_is_restored_not_chained(tiny):
    m, z, t, encs = tiny
    name = "mid_block.attentions.0.transformer_blocks.0.attn2"
    mod = m.denoiser.get_submodule(name)
    original = mod.processor
    seen = []
    class Mine(type(original)):
        def __call__(self, *a, **k): seen.append(1); return super().__call__(*a, **k)
    mine = Mine()
    mod.set_processor(mine)
    try:
        _, c = _run(m, z, t, encs, cross_attention=[name])
        assert mod.processor is mine and seen == []               # replaced during the capture, put back after
        assert c.probs[name].shape[:3] == (2, 1, 2)
    finally: mod.set_processor(original)


def test_unet_measurement_lives_with_the_unet():
    m = load_model("tiny")
    list_layers(m)
    n = len(_LAYER_INFO)
    assert m.denoiser in _LAYER_INFO and "_layer_shapes" not in vars(m)
    del m
    gc.collect()
    assert len(_LAYER_INFO) == n - 1


def test_forward_batch_over_run_with_cache(tiny):
    "Ragged prompts per image in one call: each image's cache equals its own probe of the same rows."
    m = tiny[0]
    imgs = [(np.random.default_rng(i).random((64, 64, 3)) * 255).astype(np.uint8) for i in range(3)]
    pixels = torch.cat([m.prepare_image(im).pixels for im in imgs])
    prompts = [["a cat"], ["a dog", "grassland and sky"], ["a cat"]]
    attn = resolve_layers(m, "up_blocks.1", relation="text->image")
    calls = []
    h = m.denoiser.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        caches = forward_batch(m, pixels, prompts, 300, ["up_blocks.1.resnets.2"], attn, read="input", seed=2,
                               with_lse=True, image_hw=[(50, 60)] * 3)
    finally: h.remove()
    assert len(calls) == 1 and len(caches) == 3
    for im, ps, c in zip(imgs, prompts, caches):
        ref = probe(m, im, ps, timesteps=[300], layers="up_blocks.1.resnets.2", cross_attention=attn, read="input",
                    seed=2, with_lse=True)
        assert [e.prompt for e in c.prompts] == ps and c.timesteps == [300] and c.image_hw == [(50, 60)]
        for k in ref:
            assert c[k].shape == ref[k].shape
            torch.testing.assert_close(c[k], ref[k], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(c.lse[attn[0]], ref.lse[attn[0]], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="one list of prompts per image"): forward_batch(m, pixels, prompts[:2])
