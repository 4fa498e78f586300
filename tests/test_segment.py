"""Tests of md_probe.segment against first principles: class tokens located by their own span, padded inputs mapped
back to the image, grids that follow the latent's aspect, and MaskDiffusion's feature levels as the authors read them.

References are written here, not taken from the library: a class's tokens must spell its own words at the position
where the prompt names it; a linear ramp survives bilinear resampling exactly; a label border must stay where the
image has it. Models are the offline `tiny` (SD 1.5's layer names, random weights, stride 64) and nothing else."""
import numpy as np, pytest, torch
import torch.nn.functional as F
from md_probe.models import load_model, clip_bpe_tokenizer
from md_probe.probe import probe
from md_probe.data import class_names
from md_probe.segment import (MaskDiffusion, MaskDiffusionConfig, UnsupervisedConfig, UnsupervisedMaskDiffusion,
                              build_prompts, where_in_cache, class_attention, pixel_features, upsample_scores,
                              unsupervised_head, cluster_segments, oracle_segment, grid_shape, FAMILY_DEFAULTS)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(): return load_model("tiny")


@pytest.fixture(scope="module")
def tiny_words():
    "`tiny` with a tokenizer that knows every word of the shipped class lists (one token each, as CLIP mostly has)."
    m = load_model("tiny")
    words = sorted({w for n in ("cocostuff27", "cityscapes27", "ade20k") for c in class_names(n) for w in c.split()})
    m.tokenizer = clip_bpe_tokenizer(words + ["and"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m.text_encoder.resize_token_embeddings(len(m.tokenizer))
    return m


def noise_image(h=64, w=64, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


# ---------- bug: MaskDiffusion(cache, classes) merged repeated words ----------
NESTED = {  # the shipped lists where a class name is a word of another one (audit, method.md ranked item 7)
    "cocostuff27": ["food", "furniture"], "cityscapes27": ["pole"],
    "ade20k": ["door", "table", "chair", "light", "screen"]}

def own_span(enc, name, positions):
    "Reference: the class's tokens are exactly the tokens of one whole-name occurrence in the prompt's word sequence."
    words = [enc.token_words[p] for p in positions]
    n = len(name.split())
    return (sorted(set(words)) == list(range(words[0], words[0] + n)) and
            [w.lower() for w in enc.words[words[0]:words[0] + n]] == name.lower().split() and
            positions == [p for p, w in enumerate(enc.token_words) if words[0] <= w < words[0] + n])

@pytest.mark.parametrize("tokenizer", ["tiny", "class words"])
@pytest.mark.parametrize("dataset", list(NESTED) + ["audit"])
def test_cache_path_locates_each_class_by_its_own_span(tiny, tiny_words, tokenizer, dataset):
    model = tiny if tokenizer == "tiny" else tiny_words
    classes = ["grass", "grass tree", "sky"] if dataset == "audit" else class_names(dataset)
    md = MaskDiffusion(model)
    cp = build_prompts(model, classes)
    image = noise_image()
    cache = md.config.capture_spec.probe(model, image, cp.prompts)
    where = where_in_cache(cache, classes)
    for c, (p, pos) in zip(classes, where):
        assert own_span(cache.prompts[p], c, pos), (c, p, pos)
    # a name that is a word of a longer name keeps only its own tokens (the old code added the longer name's)
    for c in (NESTED.get(dataset) or ["grass"]):
        p, pos = where[classes.index(c)]
        assert len({cache.prompts[p].token_words[t] for t in pos}) == 1, c
    assert where == cp.where
    torch.testing.assert_close(md(cache, classes).labels, md(image, classes).labels, rtol=0, atol=0)


def test_where_in_cache_errors_and_subsets(tiny):
    md = MaskDiffusion(tiny)
    cache = md.config.capture_spec.probe(tiny, noise_image(), "grass tree and sky")
    with pytest.raises(KeyError, match=r"only inside the longer class names \['grass tree'\]"):
        where_in_cache(cache, ["grass", "grass tree"])
    with pytest.raises(KeyError, match="not a word of the cache's prompts"): where_in_cache(cache, ["dog"])
    assert where_in_cache(cache, ["grass"]) == [(0, [1])]      # alone, a word inside a name is what the user asked for
    assert where_in_cache(cache, ["sky", "grass tree"]) == [(0, [4]), (0, [1, 2])]


# ---------- the one map from a grid over the (padded) input back to the image ----------
@pytest.mark.parametrize("hw", [(64, 40), (40, 64), (64, 44), (64, 32), (32, 64)])
def test_upsample_scores_reads_the_image_part_of_a_padded_grid(tiny, hw):
    H, W = hw
    cache = probe(tiny, noise_image(H, W), layers=["conv_in"], keep_aspect=True)
    assert cache.latent_hw == (8, 8) and tuple(cache.content_hw) == hw         # padded to 64 x 64, not resized
    g = 4                                                                       # 16-pixel cells: centres 8, 24, 40, 56
    centres = (torch.arange(g) + 0.5) * 64 / g
    ramp = torch.stack([centres[:, None].expand(g, g), centres[None, :].expand(g, g)])   # (2, g, g): y, x in pixels
    up = upsample_scores(ramp, cache)
    assert up.shape == (2, H, W)
    # bilinear resampling reproduces a linear ramp between cell centres: each pixel gets its own centre's position,
    # held at the first centre before it and at the last centre inside the image after it (padding cells never read)
    last = lambda n: max(c for c in centres.tolist() if c < n)
    ref_y = (torch.arange(H) + 0.5).clamp(8, last(H))[:, None].expand(H, W)
    ref_x = (torch.arange(W) + 0.5).clamp(8, last(W))[None, :].expand(H, W)
    torch.testing.assert_close(up[0], ref_y, atol=1e-4, rtol=0)
    torch.testing.assert_close(up[1], ref_x, atol=1e-4, rtol=0)


def test_upsample_scores_without_padding_is_bilinear_resizing(tiny):
    cache = probe(tiny, noise_image(48, 80), layers=["conv_in"])               # squashed to 64 x 64: no padding
    s = torch.randn(3, 5, 7)
    torch.testing.assert_close(upsample_scores(s, cache),
                               F.interpolate(s[None], size=(48, 80), mode="bilinear", align_corners=False)[0])


# ---------- integer grids follow the latent's aspect ----------
def test_integer_grid_follows_the_latent(tiny):
    assert grid_shape(4, (8, 16)) == (2, 4) and grid_shape(4, (16, 8)) == (4, 2) and grid_shape(4, (8, 8)) == (4, 4)
    cfg = MaskDiffusionConfig.for_model(tiny, grid=4, attention_grid=4, keep_aspect=True, image_size=128)
    cp = build_prompts(tiny, ["cat", "sky"])
    cache = cfg.capture_spec.probe(tiny, noise_image(64, 128), cp.prompts)
    assert cache.latent_hw == (8, 16)                                           # a 64 x 128 input, not padded
    assert pixel_features(cache, cfg.feature_layers, 4).shape[-2:] == (2, 4)   # square cells, not 4 x 4
    assert class_attention(cache, cp.where, cfg.attention_layers, 4).shape[-2:] == (2, 4)
    assert pixel_features(cache, cfg.feature_layers, (3, 3)).shape[-2:] == (3, 3)
    seg = MaskDiffusion(tiny, cfg)(noise_image(64, 128), ["cat", "sky"])
    assert seg.labels.shape == (64, 128)


# ---------- bug: labels of a padded input (keep_aspect=True) were not cropped to the image ----------
RED, BLUE = (200, 30, 30), (30, 30, 200)

def two_regions(h, w, border, axis):
    "An (h, w) image red before `border` along `axis` (1: columns, 0: rows) and blue after; its mask (0 red, 1 blue)."
    mask = np.zeros((h, w), np.int64)
    if axis == 1: mask[:, border:] = 1
    else: mask[border:] = 1
    return np.where(mask[..., None] == 0, RED, BLUE).astype(np.uint8), mask

def colour_cache(model, image, layer="conv_in"):
    """A keep_aspect probe of `image` whose features are replaced by the input's colours averaged over each latent
    cell (grey padding included): features that separate the two regions exactly, whatever the random model does."""
    cache = probe(model, image, layers=[layer], keep_aspect=True)
    x = (model.prepare_image(image, keep_aspect=True).pixels + 1) / 2                # [0, 1]; padding is grey 0.5
    cache.feats[layer] = F.avg_pool2d(x, model.vae_scale)[None, None]          # (T, B, P, 3, h, w)
    return cache

def splits_at(labels, border, axis, margin):
    "The labels are one segment before border - margin and another after border + margin, along `axis`."
    lab = labels.numpy() if axis == 1 else labels.numpy().T
    a, b = np.unique(lab[:, :border - margin]), np.unique(lab[:, border + margin:])
    return len(a) == 1 and len(b) == 1 and a[0] != b[0]

# a 64 x 32 image (red on the left) and a 32 x 64 one (red on top), each padded to 64 x 64 on tiny; the border at
# pixel 10 lies inside 8-pixel cell 1, which is 2/8 red and 6/8 blue, so it must come out within a cell of pixel 10
CASES = [((64, 32), 10, 1), ((32, 64), 10, 0)]

@pytest.mark.parametrize("hw,border,axis", CASES)
def test_unsupervised_labels_are_the_image_part_of_the_padded_grid(tiny, hw, border, axis):
    image, mask = two_regions(*hw, border, axis)
    cache = colour_cache(tiny, image)
    cfg = UnsupervisedConfig.for_model(tiny, feature_layers=("conv_in",), read="output", grid=8, k=2, keep_aspect=True)
    seg = unsupervised_head(cache, cfg)
    assert seg.labels.shape == hw and seg.scores.shape == (2, *hw)
    assert splits_at(seg.labels, border, axis, margin=4)
    # the padding is not clustered: its grey cells would otherwise take one of the k = 2 segments
    assert set(seg.labels.unique().tolist()) == {0, 1}
    torch.testing.assert_close(seg.labels, seg.scores.argmax(0), rtol=0, atol=0)


@pytest.mark.parametrize("hw,border,axis", CASES)
def test_cluster_segments_maps_a_given_clustering_to_the_image(tiny, hw, border, axis):
    image, mask = two_regions(*hw, border, axis)
    cache = colour_cache(tiny, image)
    f = pixel_features(cache, ["conv_in"], 8)
    seen = []
    def red_or_blue(x):                                 # the cells passed: the image's, never the padding's
        seen.append(len(x)); return (x[:, 2] > x[:, 0]).long()
    labels, scores = cluster_segments(cache, f, red_or_blue)
    assert seen == [8 * 4]                              # 8 x 8 grid, the image covers half of it
    assert splits_at(labels, border, axis, margin=4) and labels.shape == hw
    assert labels[mask == 0].float().mean() < 0.2 and labels[mask == 1].float().mean() > 0.8


@pytest.mark.parametrize("hw,border,axis", CASES)
def test_oracle_with_its_cache_leaves_the_padding_out(tiny, hw, border, axis):
    image, mask = two_regions(*hw, border, axis)
    cache = colour_cache(tiny, image)
    seg = oracle_segment(pixel_features(cache, ["conv_in"], 8), mask, cache=cache)
    assert seg.labels.shape == hw and splits_at(seg.labels, border, axis, margin=4)
    assert (seg.labels.numpy() == mask).mean() > 0.9
    with pytest.raises(ValueError, match="pass the mask of that image"):
        oracle_segment(pixel_features(cache, ["conv_in"], 8), mask[:-1], cache=cache)


def test_unsupervised_without_padding_is_unchanged_by_the_crop(tiny):
    "Without padding, the head's scores are the cells' cosines to the segment means, resized bilinearly (reference)."
    image = noise_image()
    um = UnsupervisedMaskDiffusion(tiny, k=3)
    cache = um.config.capture_spec.probe(tiny, image)
    seg = unsupervised_head(cache, um.config)
    f = pixel_features(cache, um.config.feature_layers, um.config.grid)
    D, h, w = f.shape
    x = f.reshape(D, -1).T
    from md_probe.clustering import spectral_clustering
    lab = torch.as_tensor(spectral_clustering(x, 3, seed=0))
    means = F.normalize(torch.stack([x[lab == j].mean(0) for j in range(3)]), dim=1)
    ref = F.interpolate((means @ x.T).reshape(1, 3, h, w), size=(64, 64), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(seg.scores, ref)
    torch.testing.assert_close(seg.labels, ref.argmax(0), rtol=0, atol=0)
    torch.testing.assert_close(um(image).labels, seg.labels, rtol=0, atol=0)


# ---------- MaskDiffusion's SD feature levels (Valkyrja3607/MaskDiffusion: ODISE s4 and s5) ----------
def test_sd_feature_levels_are_the_authors(tiny):
    levels = ("up_blocks.0.resnets.2", "up_blocks.1.resnets.2", "up_blocks.2.resnets.2")
    assert FAMILY_DEFAULTS["sd"]["feature_layers"] == levels and FAMILY_DEFAULTS["sd"]["read"] == "input"
    cfg = MaskDiffusionConfig.for_model(tiny)
    assert cfg.feature_layers == levels and cfg.read == "input"
    assert UnsupervisedConfig.for_model(tiny).feature_layers == levels
    # at SD's 512 px the three inputs are 8x8, 16x16 and 32x32 (the latent is 64x64); on tiny's 8x8 latent: 1, 2, 4
    cache = cfg.capture_spec.probe(tiny, noise_image(), "cat")
    assert [tuple(cache.feats[l].shape[-2:]) for l in levels] == [(1, 1), (2, 2), (4, 4)]
    unet = tiny.denoiser
    assert [cache.feats[l].shape[3] for l in levels] == [unet.get_submodule(l).conv1.in_channels for l in levels]
