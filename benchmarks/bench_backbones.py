"""What capturing costs on every backbone (SD 1.5, SDXL, PixArt-Sigma, SD3.5, FLUX.1), on CPU with one thread, measured
side by side in one run (CPU time of this process, `time.process_time`; medians of `--repeats` runs, 3 by default,
the variants of one measurement alternated so that a busy machine slows them alike; a ratio is the median over rounds
of the two times of the same round, so drift between rounds cancels). Nothing is asserted on a time.

(1) Capture overhead over the bare denoiser forward, per family:
    `run_with_cache(model, z, t, ctx, cross_attention=True, need_output=True, **extra)` (every text->image attention
    module, heads averaged on the fly, the full forward) / `model.backbone.denoise(model.denoiser, z, t, ctx, **extra)`
    (the model's own processors, SDPA). Target <= 1.10. Each family's published denoiser config
    (benchmarks/gpu_backbones.py PUBLISHED) with reduced width/depth (`BENCH` below) so one forward takes about 0.5-2 s:
      sd      SD 1.5 UNet at half width (160/320/640/640, 8 heads), latent 32x32
      sdxl    SDXL base UNet at half width (160/320/640, 5/10/20 heads of 32), transformer layers 1/2/4 (of 1/2/10), latent 48x48
      pixart  PixArt-Sigma XL-2 with 8 of 28 blocks, 8 of 16 heads (x 72), 32x32 image tokens, 300 T5 positions
      sd3     SD3.5-medium with 6 of 24 blocks (dual attention in 0-2), 8 of 24 heads (x 64), 32x32 image tokens, 77 + 256 text
      flux    FLUX.1-dev with 2 of 19 double + 2 of 38 single blocks, 6 of 24 heads (x 128), 32x32 image tokens, 512 T5 positions
    Text encoders, tokenizers and VAE are the tiny built-in model's (`load_model("tiny-sdxl")`, ...); the denoiser's
    text-input widths follow them.
(2) Tracing overhead of a 2-step generation over the bare pipeline call (text encoders, denoiser, VAE decode, PIL
    output; guidance as each pipeline defaults), for md_probe's `trace(pipe)` and the peers on the same pipelines;
    beside it, the CPU time spent inside the modules that see text (hooks on the modules, so they time whichever
    processor a tracer installs): the attention work itself, free of the noise of the rest of the generation
    (attention-map-diffusers' fast mode makes its maps in `.compute()`, after the calls: there it shows only what the
    calls store; its ratio counts `.compute()`):
      sd      SD 1.5's full architecture (sd15-random: UNet, VAE, CLIP ViT-L) at 512 px, DDIM, CFG  (--quick: 256 px)
              peer: DAAM 0.2.0 `daam.trace(pipe)` (it records every attn2 but the mid block's; md_probe records all)
      sdxl    the reduced SDXL of (1) in StableDiffusionXLPipeline at 384 px, CFG; peer: DAAM 0.2.0
      pixart  the reduced PixArt of (1) in PixArtSigmaPipeline at 512 px, CFG; peer: attention-map-diffusers 1.0
      sd3     the reduced SD3.5 of (1) in StableDiffusion3Pipeline (32x32 tokens), CFG; peer: attention-map-diffusers 1.0
      flux    the reduced FLUX of (1) in FluxPipeline at 512 px (distilled guidance, one call per step); peer: attention-map-diffusers 1.0
    attention-map-diffusers runs as `AttentionCapture(pipe, relations="image->text", timesteps="all", heads="mean")`
    (its default mode "fast" keeps SDPA and stores q and k; the maps exist after `.compute()`, which is timed with it),
    and in mode="exact" (maps computed during the attention calls). DAAM and md_probe: the `with` block.
    Peers are installed with `tools/install-peers` (--no-deps); DAAM imports spacy and matplotlib at module level for
    its word and plotting helpers, which tracing never calls: where they are not installed, empty stand-ins are put
    in sys.modules (said in the output). A peer that is not installed is reported as such.
(3) Peak memory and time of recording one FLUX-width text->image layer at 1024 px: q, k, v of (1, 24 heads, 512 text
    + 4096 image tokens, 128) fp32, [text, image] order as FLUX. md_probe's chunked `AttentionRecorder.attend` (exact
    softmax per query chunk, heads averaged on the fly) vs the full softmax matrix (softmax(q k^T * scale) of
    (1, 24, 4608, 4608), then P @ v and the head-mean of P[:, :, 512:, :512]), and plain SDPA (no recording) for
    reference. Each in its own subprocess; peak = the resident high-water mark (Linux VmHWM, reset through
    /proc/self/clear_refs once the inputs exist) minus the resident set size then: torch's CPU allocations are not
    seen by tracemalloc, and ru_maxrss carries the parent's high-water mark into a child.

Run time (one thread, on a 2-core machine shared with other jobs): about 20 min wall with --quick (models 10 s,
(1) 2 min, (2) 16 min of which SD 1.5 at 256 px about 4 min, (3) 2 min). Without --quick, SD 1.5 at 512 px makes (2)
about 14 min longer: a 2-step 512 px generation costs about 90 s of CPU (the UNet about 24 s per batch-2 call, the
VAE decode about 37 s), and (2) runs 12 of them (one untimed run and 3 timed runs each of bare, md_probe, DAAM).

Usage: python benchmarks/bench_backbones.py [--parts 1,2,3] [--families sd,sdxl,pixart,sd3,flux] [--repeats 3] [--quick]
"""
import os, sys, time, json, argparse, statistics, subprocess, types, importlib.util, warnings
for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"): os.environ.setdefault(v, "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch

FAMILIES = ("sd", "sdxl", "pixart", "sd3", "flux")
PROMPT = "a photo of a cat and a dog on the grass"
# reduced width/depth of each published config (gpu_backbones.PUBLISHED), and the latent side
BENCH = {"sd": (dict(block_out_channels=(160, 320, 640, 640)), 32),
         "sdxl": (dict(block_out_channels=(160, 320, 640), transformer_layers_per_block=(1, 2, 4), sample_size=64), 48),
         "pixart": (dict(num_layers=8, num_attention_heads=8, sample_size=64), 64),
         "sd3": (dict(num_layers=6, num_attention_heads=8, dual_attention_layers=(0, 1, 2), pos_embed_max_size=96,
                      sample_size=64), 64),
         "flux": (dict(num_layers=2, num_single_layers=2, num_attention_heads=6), 64)}
PEERS = {"sd": ("daam",), "sdxl": ("daam",), "pixart": ("amd", "amd-exact"), "sd3": ("amd", "amd-exact"),
         "flux": ("amd", "amd-exact")}
PEER_NAMES = {"daam": "DAAM 0.2.0", "amd": "attention-map-diffusers 1.0 (fast + compute)",
              "amd-exact": "attention-map-diffusers 1.0 (exact)"}


def cpu(f):
    "(CPU seconds of this process, result) of f()."
    t0 = time.process_time(); out = f(); return time.process_time() - t0, out


def alternate(fns:dict, repeats:int)->dict:
    "Median CPU time of each function, the functions run in turn `repeats` times (after one untimed run of each)."
    for f in fns.values(): f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items(): times[k].append(cpu(f)[0])
    return {k: (statistics.median(v), v) for k, v in times.items()}


def paired(r:dict, k:str, base:str="bare")->float:
    "Median over rounds of time(k) / time(base) in the same round: the machine's drift between rounds cancels."
    return statistics.median(a / b for a, b in zip(r[k][1], r[base][1]))


def fmt(ts): return "(" + ", ".join(f"{t:.2f}" for t in ts) + ")"


def bench_model(family:str):
    "The reduced model of a family: the published denoiser config with `BENCH`'s overrides, the tiny model's other parts."
    from gpu_backbones import build_model
    over, lat = BENCH[family]
    model = build_model(family, over, full_vae=False)
    model.image_size = lat * model.vae_scale
    return model, lat

# -- (1) capture overhead ---------------------------------------------------------------------------------------------
def part1(models:dict, repeats:int):
    from md_probe.engine import run_with_cache
    print("\n(1) capture overhead over the bare denoiser forward: run_with_cache(cross_attention=True, need_output=True, "
          "heads averaged) / backbone.denoise (CPU s, medians)", flush=True)
    print(f"{'family':<7} {'denoiser (reduced)':<26} {'M par':>6} {'latent':>7} {'text':>5} {'layers':>6} {'bare s':>7} "
          f"{'capture s':>9} {'ratio':>6}  runs bare | capture")
    ratios = {}
    for fam, (model, lat) in models.items():
        enc = model.encode_prompt(PROMPT)
        ctx, extra = enc.embeddings, enc.extra
        x = torch.randn(1, model.vae.config.latent_channels, lat, lat, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([500.0 if model.backbone.flow_matching else 500])
        got = {}
        def bare():
            with torch.no_grad(): got["bare"] = model.backbone.denoise(model.denoiser, x, t, ctx, **extra)
        def cap():
            got["cap"], got["cache"] = run_with_cache(model, x, t, ctx, cross_attention=True, need_output=True, **extra)
        r = alternate(dict(bare=bare, cap=cap), repeats)
        diff = ((got["cap"] - got["bare"]).abs().max() / got["bare"].abs().max()).item()
        n = len(got["cache"].probs)
        ratios[fam] = paired(r, "cap")
        print(f"{fam:<7} {type(model.denoiser).__name__:<26} {sum(p.numel() for p in model.denoiser.parameters()) / 1e6:>6.0f} "
              f"{lat:>4}x{lat:<2} {ctx.shape[1]:>5} {n:>6} {r['bare'][0]:>7.2f} {r['cap'][0]:>9.2f} {ratios[fam]:>6.3f}  "
              f"{fmt(r['bare'][1])} | {fmt(r['cap'][1])}  (output rel. diff {diff:.1e})", flush=True)
    return ratios

# -- (2) tracing overhead ---------------------------------------------------------------------------------------------
def _stub_daam_imports()->list:
    "Empty stand-ins for the modules DAAM imports at module level but tracing never uses (only where not installed)."
    stubbed = []
    for name in ("spacy", "matplotlib"):
        if importlib.util.find_spec(name) is not None: continue
        mod = types.ModuleType(name); sys.modules[name] = mod; stubbed.append(name)
        if name == "spacy":
            mod.tokens = types.ModuleType("spacy.tokens"); mod.tokens.Token = type("Token", (), {})
            sys.modules["spacy.tokens"] = mod.tokens
        else:
            mod.pyplot = types.ModuleType("matplotlib.pyplot"); mod.pyplot.Axes = type("Axes", (), {})
            sys.modules["matplotlib.pyplot"] = mod.pyplot
    return stubbed


def load_peers()->dict:
    "The installed peers: name -> (module, note)."
    peers = {}
    if importlib.util.find_spec("daam") is not None:
        stubbed = _stub_daam_imports()
        import daam
        peers["daam"] = (daam, f"stand-ins for {', '.join(stubbed)}" if stubbed else "")
    if importlib.util.find_spec("attention_map_diffusers") is not None:
        import attention_map_diffusers as amd
        peers["amd"] = peers["amd-exact"] = (amd, "")
    return peers


def make_pipe(model):
    import diffusers
    pipe = getattr(diffusers, model.backbone.pipeline)(**model.backbone.components(model))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen_kwargs(family:str, model, side:int)->dict:
    kw = dict(prompt=PROMPT, num_inference_steps=2, height=side, width=side)
    if family == "pixart": kw |= dict(use_resolution_binning=False, max_sequence_length=model.max_length)
    if family == "flux": kw |= dict(max_sequence_length=model.max_length)
    return kw


class AttentionClock:
    """CPU time spent inside the given modules (forward pre-hook to forward hook), per variant of a measurement: the
    attention work alone, without the noise of the rest of the generation. Its hooks sit on the modules themselves, so
    they time whatever processor a tracer swaps in."""
    def __init__(self, modules:list):
        self.now, self.spent, self.runs = None, 0.0, {}
        pre = lambda m, a: setattr(self, "t0", time.process_time())
        def post(m, a, out): self.spent += time.process_time() - self.t0
        self.handles = [h for mod in modules for h in (mod.register_forward_pre_hook(pre), mod.register_forward_hook(post))]
    def timed(self, name:str, f):
        def g():
            self.spent = 0.0; out = f(); self.runs.setdefault(name, []).append(self.spent); return out
        return g
    def median(self, name:str)->float: return statistics.median(self.runs[name][1:])   # the untimed first run left out
    def remove(self):
        for h in self.handles: h.remove()


def part2(models:dict, repeats:int, quick:bool):
    from md_probe.trace import trace
    from md_probe.engine import resolve_capture
    peers = load_peers()
    print("\n(2) tracing overhead of a 2-step generation over the bare pipeline call (CPU s, medians; ratio = traced / bare, median over rounds)",
          flush=True)
    notes = {k: n for k, (_, n) in peers.items() if n}
    if notes: print("    note: " + "; ".join(f"{PEER_NAMES[k]}: {n}" for k, n in notes.items()))
    missing = sorted({p for ps in PEERS.values() for p in ps} - set(peers))
    if missing: print("    not installed (tools/install-peers): " + ", ".join(PEER_NAMES[p] for p in missing))
    rows = {}
    for fam in models:
        if fam == "sd":
            from md_probe.models import load_model
            model = load_model("sd15-random")
            side, what = (256, "SD 1.5 architecture, random weights, 256 px (--quick)") if quick else (512, "SD 1.5 architecture, random weights, 512 px")
        else:
            model, lat = models[fam]
            side = lat * model.vae_scale
            what = f"reduced {type(model.denoiser).__name__} of (1), {side} px"
        pipe = make_pipe(model)
        kw = gen_kwargs(fam, model, side)
        run = lambda: pipe(**kw, generator=torch.Generator().manual_seed(0))
        layers = {}
        def md():
            with trace(pipe) as c: run()
            layers["md_probe"] = len(c.probs)
        fns = dict(bare=run, md=md)
        for p in PEERS[fam]:
            if p not in peers: continue
            mod = peers[p][0]
            if p == "daam":
                def f(mod=mod):
                    with mod.trace(pipe) as tc: run()
                    layers["daam"] = len(tc.locator.layer_names)
            else:
                def f(mod=mod, mode="exact" if p == "amd-exact" else "fast", p=p):
                    with mod.AttentionCapture(pipe, relations="image->text", timesteps="all", heads="mean", mode=mode) as cap:
                        run()
                    cap.compute()                      # the maps exist only now (fast mode)
                    layers[p] = len({r.layer_id for r in cap.records if r.relation == "image->text"}) if hasattr(cap, "records") else None
            fns[p] = f
        names = resolve_capture(model, (), True, False)[1]      # the modules that see text (what md_probe records)
        clock = AttentionClock([model.denoiser.get_submodule(n) for n in names])
        try: r = alternate({k: clock.timed(k, f) for k, f in fns.items()}, repeats)
        finally: clock.remove()
        base = r["bare"][0]
        rows[fam] = {k: paired(r, k) for k in r if k != "bare"}
        print(f"[{fam}] {what}; text {model.max_length if fam != 'sd3' else '77 + 256'} positions", flush=True)
        print(f"    {'bare pipeline call':<48} {base:>8.2f} s  {fmt(r['bare'][1])}  "
              f"[inside the {len(names)} text attention modules: {clock.median('bare'):.2f} s]")
        for k in fns:
            if k == "bare": continue
            name = "md_probe trace (heads averaged)" if k == "md" else PEER_NAMES[k]
            nl = layers.get("md_probe" if k == "md" else k)
            print(f"    {name:<48} {r[k][0]:>8.2f} s  ratio {rows[fam][k]:.3f}  {fmt(r[k][1])}"
                  + (f"  [{nl} attention layers recorded]" if nl is not None else "")
                  + f"  [inside them: {clock.median(k):.2f} s, +{clock.median(k) - clock.median('bare'):.2f} s]", flush=True)
    return rows

# -- (3) memory -------------------------------------------------------------------------------------------------------
T, N, H, D = 512, 4096, 24, 128     # FLUX at 1024 px: 512 T5 positions, 64x64 image tokens, 24 heads x 128


def _vm(field:str)->int|None:
    "A field of /proc/self/status in bytes (Linux), or None."
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"): return int(line.split()[1]) * 1024
    except OSError: return None


def memory_child(kind:str, repeats:int):
    """Runs in a subprocess: one recording of the layer per repeat; prints JSON (peak bytes over the inputs, CPU times).
    Peak: Linux's resident high-water mark (VmHWM), reset once the inputs exist (/proc/self/clear_refs), minus the
    resident set then. (Not ru_maxrss: Linux carries the parent's high-water mark into a child across exec.)"""
    import resource
    import torch.nn.functional as F
    from md_probe.engine import AttentionRecorder
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, T + N, D, generator=g) for _ in range(3))
    scale = D ** -0.5
    try:
        with open("/proc/self/clear_refs", "w") as f: f.write("5")     # reset the high-water mark to the current RSS
        how = "VmHWM"
    except OSError: how = "ru_maxrss"
    rss0 = _vm("VmRSS") if how == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times, shape = [], None
    for _ in range(repeats):
        t0 = time.process_time()
        if kind == "chunked":
            got = []
            rec = AttentionRecorder("flux_layer", sink=lambda name, probs, lse, **kw: got.append(probs))
            out = rec.attend(q, k, v, scale=scale, queries=slice(T, T + N), text_keys=slice(0, T))
            maps = got[0]
        elif kind == "full":
            p = torch.softmax((q @ k.transpose(-1, -2)) * scale, -1)
            out = p @ v
            maps = p[:, :, T:, :T].mean(1, keepdim=True)
            del p
        else:
            out, maps = F.scaled_dot_product_attention(q, k, v), None
        times.append(time.process_time() - t0)
        shape = None if maps is None else tuple(maps.shape)
        del out, maps
    peak = (_vm("VmHWM") if how == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - rss0
    print(json.dumps(dict(peak=peak, times=times, shape=shape, how=how)))


def part3(repeats:int):
    print(f"\n(3) one FLUX-width text->image layer at 1024 px: q, k, v (1, {H}, {T} + {N}, {D}) fp32; peak memory over the "
          "inputs (resident high-water mark - RSS once the inputs exist, own subprocess each) and CPU time (medians)", flush=True)
    res = {}
    for kind, name in (("chunked", "md_probe AttentionRecorder.attend (chunked, heads averaged)"),
                       ("full", "full softmax matrix (1, 24, 4608, 4608)"), ("sdpa", "SDPA, nothing recorded (reference)")):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", kind, "--repeats", str(repeats)],
                             capture_output=True, text=True, env=os.environ | dict(PYTHONPATH=os.pathsep.join(sys.path)))
        if out.returncode:
            print(f"    {name}: failed ({out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode})"); continue
        res[kind] = r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"    {name:<62} peak {r['peak'] / 2**20:>8.0f} MiB  time {statistics.median(r['times']):>6.2f} s  "
              f"{fmt(r['times'])}" + (f"  maps {r['shape']}" if r["shape"] else ""), flush=True)
    if "chunked" in res and "full" in res:
        c, f = res["chunked"], res["full"]
        print(f"    full / chunked: memory {f['peak'] / c['peak']:.1f}x, time {statistics.median(f['times']) / statistics.median(c['times']):.2f}x "
              f"(the full matrix alone: {H * (T + N) ** 2 * 4 / 2**30:.2f} GiB fp32; the recorded map: {N * T * 4 / 2**20:.0f} MiB)")
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description="Capture and tracing overhead per backbone, and attention-recording memory (CPU).")
    p.add_argument("--parts", default="1,2,3")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="(2) on SD 1.5 at 256 px instead of 512 px")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.memory_child: return memory_child(args.memory_child, args.repeats)
    import diffusers, transformers
    diffusers.utils.logging.set_verbosity_error(); transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    parts = set(args.parts.split(","))
    fams = [f for f in args.families.split(",") if f]
    print(f"bench_backbones: CPU, {torch.get_num_threads()} thread, torch {torch.__version__}, diffusers {diffusers.__version__}; "
          f"medians of {args.repeats}; {'--quick' if args.quick else 'full size'}", flush=True)
    t0 = time.time()
    models = {}
    if parts & {"1", "2"}:
        for f in fams:
            try: models[f] = bench_model(f)
            except (ImportError, KeyError, ModuleNotFoundError) as e:
                print(f"[{f}] skipped: {type(e).__name__}: {e}", flush=True)
    print(f"models built in {time.time() - t0:.0f} s wall", flush=True)
    for part, run in (("1", lambda: part1(models, args.repeats)), ("2", lambda: part2(models, args.repeats, args.quick)),
                      ("3", lambda: part3(args.repeats))):
        if part not in parts: continue
        t1 = time.time(); run()
        print(f"    ({part}) took {time.time() - t1:.0f} s wall", flush=True)
    print(f"\nbench_backbones: {time.time() - t0:.0f} s wall", flush=True)


if __name__ == "__main__":
    main()
