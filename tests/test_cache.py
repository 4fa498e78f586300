"""Tests of `ProbeCache` beyond the notebook's examples: the mapping protocol and the builder's row layout against
plain loops over randomly shaped caches (hypothesis), `select` against indexing by hand, and save/load round trips of
every field, dtype and view, with the format-version errors."""
import json
import numpy as np, pytest, torch
from hypothesis import given, settings, strategies as st, HealthCheck

torch.set_num_threads(1)

from md_probe.cache import ProbeCache, CACHE_FORMAT
from md_probe.models import load_model

NAMES = ["down_blocks.0", "mid_block", "up_blocks.1.resnets.2", "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
         "up_blocks.1.attentions.0.transformer_blocks.0.attn1"]


@st.composite
def caches(draw):
    "A random cache from the builder: a (T, B, P) grid, random names in each field (a name may be in several)."
    T, B, P = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    pick = lambda: draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=3))
    n = T * B * P
    feats = {k: torch.randn(n, 2, 2, 4) for k in pick()}
    probs = {k: torch.rand(n, 2, 4, 5) for k in pick()}
    lse = {k: torch.randn(n, 2, 4) for k in probs if draw(st.booleans())}
    self_probs = {k: torch.rand(n, 4, 4) for k in pick()}
    ts = draw(st.lists(st.integers(0, 999), min_size=T, max_size=T, unique=True))
    c = ProbeCache.from_rows((T, B, P), feats, probs, lse, self_probs, timesteps=ts, latent_hw=(2, 4),
                             image_hw=[(16, 32)] * B, content_hw=(16, 32))
    return c, (T, B, P), dict(feats=feats, probs=probs, lse=lse, self_probs=self_probs)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(caches())
def test_mapping_protocol_and_row_layout(drawn):
    c, (T, B, P), rows = drawn
    keys = list(dict.fromkeys([*rows["feats"], *rows["probs"], *rows["self_probs"]]))
    assert list(c) == keys and list(c.keys()) == keys and len(c) == len(keys)
    assert [k for k, _ in c.items()] == keys and len(list(c.values())) == len(keys)
    for k in keys:                                     # features first, then cross-, then self-attention
        want = next(rows[g][k] for g in ("feats", "probs", "self_probs") if k in rows[g])
        got = c[k]
        assert got.shape[:3] == (T, B, P) and k in c
        for t in range(T):
            for b in range(B):
                for p in range(P):                     # row r = (t * B + b) * P + p: timestep-major, then image, prompt
                    assert torch.equal(got[t, b, p], want[(t * B + b) * P + p])
            assert torch.equal(c[k, c.timesteps[t]], got[t])
    for g in ("lse",):
        for k, v in rows[g].items(): assert torch.equal(c.lse[k].reshape(v.shape), v)
    assert "nothing" not in c and c.get("nothing") is None and 3 not in c
    with pytest.raises(KeyError, match="not recorded"): c["nothing"]
    assert len(c.prompts) == P and all(e.words == [] for e in c.prompts)   # unknown prompts, filled in


@settings(max_examples=40, deadline=None)
@given(caches(), st.data())
def test_select_matches_indexing(drawn, data):
    c, (T, B, P), _ = drawn
    ts = data.draw(st.lists(st.sampled_from(c.timesteps), min_size=1, unique=True))
    ps = data.draw(st.lists(st.integers(0, P - 1), min_size=1, unique=True))
    s = c.select(t=ts, prompt=ps)
    rows = [i for i, t in enumerate(c.timesteps) if t in ts]
    assert s.timesteps == [c.timesteps[i] for i in rows] and len(s.prompts) == len(ps)
    for k in c:
        want = c[k][rows][:, :, ps]
        assert torch.equal(s[k], want)


def test_features_from_tokens_follow_the_latent_aspect():
    "Token n of an attention block's (rows, h*w, C) output is pixel (n // w, n % w) of the map, also when h != w."
    lat = (4, 8)                                     # a 2 x 4 grid at half the latent's resolution
    x = torch.arange(8 * 3, dtype=torch.float32).reshape(1, 8, 3)
    c = ProbeCache.from_rows((1, 1, 1), feats={"blk": x}, timesteps=[0], latent_hw=lat)
    m = c.features("blk")
    assert m.shape == (3, 2, 4)
    for n in range(8):
        assert torch.equal(m[:, n // 4, n % 4], x[0, n])


@pytest.fixture(scope="module")
def probed():
    from md_probe.probe import probe
    m = load_model("tiny")
    imgs = [(np.random.default_rng(i).random((64, 64, 3)) * 255).astype(np.uint8) for i in range(2)]
    return probe(m, imgs, ["a cat and grassland", "a dog"], timesteps=[0, 300], layers=["up_blocks.1", "mid_block"],
                 cross_attention="up_blocks.1", self_attention="mid_block.*attn1", with_lse=True, seed=3)


def test_save_load_round_trip(probed, tmp_path):
    c = probed.to(dtype=torch.bfloat16)
    path = c.save(tmp_path / "run")                              # the suffix is added
    assert path.name == "run.safetensors" and (tmp_path / "run.json").is_file()
    back = ProbeCache.load(path)
    for g in ("feats", "probs", "lse", "self_probs"):
        a, b = getattr(c, g), getattr(back, g)
        assert list(a) == list(b) and a                          # every field holds something here
        for k in a: assert b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k])
    assert (back.timesteps, back.latent_hw, back.image_hw, back.content_hw, back.read, back.meta) == \
           (c.timesteps, c.latent_hw, c.image_hw, c.content_hw, c.read, c.meta)
    assert [e.prompt for e in back.prompts] == ["a cat and grassland", "a dog"]
    assert back.prompts[0].positions("grassland") == c.prompts[0].positions("grassland")
    assert all(np.array_equal(a, b) for a, b in zip(back.images, c.images)) and len(back.images) == 2
    assert json.loads((tmp_path / "run.json").read_text())["format"] == CACHE_FORMAT
    part = ProbeCache.load(probed.select(t=300, image=1).save(tmp_path / "part.safetensors"))   # views of a bigger tensor
    assert part.timesteps == [300] and len(part.image_hw) == 1
    assert torch.equal(part.features("up_blocks.1", image=0), probed.features("up_blocks.1", t=300, image=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part.json", "part.safetensors", "run.json", "run.safetensors"]


@pytest.mark.parametrize("fmt, fix", [(None, "from before cache format"), (CACHE_FORMAT + 1, "upgrade md_probe"),
                                      (0, "probe the image again")])
def test_other_formats_are_refused(probed, tmp_path, fmt, fix):
    from safetensors.torch import save_file
    meta = probed._meta()
    if fmt is None: del meta["format"]
    else: meta["format"] = fmt
    path = tmp_path / "old.safetensors"
    save_file({"feats.0": torch.zeros(1, 1, 1, 1)}, str(path), metadata={"md_probe.ProbeCache": json.dumps(meta)})
    with pytest.raises(ValueError, match=fix): ProbeCache.load(path)


@pytest.mark.parametrize("taken", ["c.safetensors", "c.json"])
def test_save_over_a_folder_writes_nothing(probed, tmp_path, taken):
    "A folder at the cache's name or at its sidecar's: a clear error, and the folder holds exactly what it held (audit CCH-07)."
    (tmp_path / taken).mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"): probed.save(tmp_path / "c.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == [taken] and not any((tmp_path / taken).iterdir())

def test_save_writes_no_sidecar_before_its_tensors(probed, tmp_path, monkeypatch):
    "A failure while the tensors are written leaves neither file (the sidecar is renamed only after the tensors)."
    import safetensors.torch
    def boom(*a, **k): raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"): probed.save(tmp_path / "c.safetensors")
    assert list(tmp_path.iterdir()) == []
