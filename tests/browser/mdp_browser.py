"""Drive md_probe's explorers in a real browser: Voila on 127.0.0.1 serving tests/browser/explorers_demo.ipynb, Debian's
chromium through playwright (executable_path, no browser download). Shared by tests/test_browser_explorers.py and
benchmarks/bench_explorers.py.

What a page can tell: `digest(page, explorer)` hashes the data of every plotly figure of an explorer (read from the
graph divs, `gd.data`), so a test sees whether a control changed what is plotted; `Latency` times a control change
in the page, from the user's input event (keydown, change, click, mouseup) to the last plotly redraw event
(plotly_restyle / _update / _relayout / _afterplot) that follows it, on `performance.now()`.
"""
from __future__ import annotations
import contextlib, os, shutil, socket, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEMO = Path(__file__).resolve().parent / "explorers_demo.ipynb"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
EXPLORERS = ("attention-explorer", "feature-explorer", "cluster-explorer", "segmentation-explorer")


def missing() -> str | None:
    "Why the browser tests cannot run here (None when they can)."
    if not Path(CHROMIUM).exists(): return f"{CHROMIUM} is missing: run .ci/install-browser (apt chromium)"
    try: import playwright.sync_api  # noqa: F401
    except ImportError: return "playwright is missing: run .ci/install-browser (pip playwright; never `playwright install`)"
    try: import voila, jupyterlab, notebook  # noqa: F401
    except ImportError as e: return f"{e.name} is missing: pip install -e '.[dev]' (voila, jupyterlab and notebook are dev requirements)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    "The environment of a server the tests start: offline hub, one thread per kernel, the checkout importable."
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)


@contextlib.contextmanager
def _server(cmd: list, cwd: Path, env: dict, port: int, log: Path | None, timeout: float):
    "Run server `cmd` until it listens on 127.0.0.1:`port`; stop it and the kernels it started on exit."
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t0 = time.time()
        while True:
            if proc.poll() is not None: raise RuntimeError(f"{cmd[2]} exited with {proc.returncode} (log: {log})")
            with contextlib.suppress(OSError):
                with socket.create_connection(("127.0.0.1", port), timeout=1): break
            if time.time() - t0 > timeout: raise TimeoutError(f"{cmd[2]} did not listen on 127.0.0.1:{port} in {timeout} s")
            time.sleep(0.3)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError): os.killpg(proc.pid, 15)   # the server and the kernels it started
        try: proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError): os.killpg(proc.pid, 9)
            proc.wait(10)
        if log: out.close()


@contextlib.contextmanager
def voila(notebook: Path = DEMO, log: Path | None = None, timeout: float = 120):
    "Serve `notebook` with Voila on 127.0.0.1 (a free port); yields its URL; stops the server (and its kernel) on exit."
    port = _free_port()
    cmd = [sys.executable, "-m", "voila", str(notebook), "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1",
           "--Voila.port_retries=0", "--show_tracebacks=True", "--Voila.open_browser=False",
           # Notebook 7's JupyterLab extension (a dev requirement, for tests/test_browser_frontends.py) is built
           # against JupyterLab 4.6's shared modules, which Voila 0.5's page lacks: it fails there with a console
           # error, with or without md_probe. Voila pages do not need it.
           '--VoilaConfiguration.extension_denylist=["@jupyter-notebook/lab-extension"]']
    with _server(cmd, notebook.parent, _env(), port, log, timeout):
        yield f"http://127.0.0.1:{port}/"


FRONTENDS = {"jupyterlab": ("jupyterlab", "lab/tree/{nb}"), "notebook7": ("notebook", "notebooks/{nb}")}


@contextlib.contextmanager
def jupyter(frontend: str, notebook: Path = DEMO, log: Path | None = None, timeout: float = 120):
    """Serve a copy of `notebook` with JupyterLab or Notebook 7 (`frontend`: "jupyterlab" or "notebook7") on
    127.0.0.1 (a free port, a token, settings and workspaces in a temporary folder, no update or news checks);
    yields the notebook's URL; stops the server and its kernels on exit."""
    module, path = FRONTENDS[frontend]
    port, token, tmp = _free_port(), "mdp" + os.urandom(8).hex(), Path(tempfile.mkdtemp(prefix="mdp-jupyter-"))
    (tmp / "root").mkdir()
    shutil.copy(notebook, tmp / "root" / notebook.name)
    env = _env(JUPYTER_CONFIG_DIR=str(tmp / "config"), JUPYTERLAB_SETTINGS_DIR=str(tmp / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"), JUPYTER_RUNTIME_DIR=str(tmp / "runtime"))
    cmd = [sys.executable, "-m", module, "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp / 'root'}",
           "--LabServerApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           "--LabApp.extension_manager=readonly", "--ServerApp.allow_root=True"]
    try:
        with _server(cmd, tmp / "root", env, port, log, timeout):
            yield f"http://127.0.0.1:{port}/{path.format(nb=notebook.name)}?token={token}"
    finally: shutil.rmtree(tmp, ignore_errors=True)


def run_all_cells(page, url: str, timeout: float = 300):
    """Open the notebook in JupyterLab or Notebook 7, run every cell from the Run menu (what a user clicks), wait until
    every explorer shows its plotly figures, then install the page probes (see `wait_loaded`). The console errors
    logged before the run (the front end's own) are kept in `page.errors_before_run`."""
    page.goto(url, timeout=timeout * 1000)
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=timeout * 1000)
    page.wait_for_timeout(2000)
    page.errors_before_run = list(page.errors)   # the front end's own, before any md_probe code runs
    prompt = page.locator(".jp-CodeCell .jp-InputPrompt").first
    for attempt in range(10):   # a run asked before the kernel's session is connected is dropped: ask again
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        with contextlib.suppress(Exception):
            page.wait_for_function("el => /[*0-9]/.test(el.textContent)", arg=prompt.element_handle(), timeout=10_000)
            break
    else: raise TimeoutError("the notebook's cells never started running (is the kernel starting?)")
    for name in EXPLORERS:
        page.wait_for_selector(f"{root(name)} .js-plotly-plot .main-svg", timeout=timeout * 1000)
    page.wait_for_selector(".mdp-echo", timeout=timeout * 1000)
    page.wait_for_timeout(1000)
    page.evaluate(_JS)
    for name in EXPLORERS: page.evaluate("r => window.__mdp.bind(r)", root(name))


@contextlib.contextmanager
def browser():
    """A headless chromium page (fresh user-data-dir), with the JavaScript console errors it logs in `page.errors` and
    the URLs it asked beyond 127.0.0.1 in `page.external` (answered empty: the machine is offline)."""
    from playwright.sync_api import sync_playwright
    profile = tempfile.mkdtemp(prefix="mdp-chromium-")
    try:
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                                                         viewport={"width": 1400, "height": 1000})
            external = []
            def offline(route):
                "Nothing leaves 127.0.0.1: other requests are recorded and answered empty (no console noise)."
                url = route.request.url
                if url.startswith(("http://127.0.0.1", "http://localhost", "data:", "blob:")): return route.continue_()
                external.append(url)
                kind = "text/css" if ".css" in url else "application/javascript" if ".js" in url else "text/plain"
                return route.fulfill(status=200, content_type=kind, body="")
            ctx.route("**/*", offline)
            try:
                page = ctx.pages[0] if ctx.pages else ctx.new_page()
                page.external = external
                page.errors = []
                page.on("console", lambda m: page.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
                page.on("pageerror", lambda e: page.errors.append(f"pageerror: {e}"))
                yield page
            finally: ctx.close()
    finally: shutil.rmtree(profile, ignore_errors=True)


_JS = r"""
(() => {
  if (window.__mdp) return;
  const m = window.__mdp = {t0: null, events: [], bound: new WeakSet()};
  for (const ev of ["keydown", "change", "input", "click", "mouseup"])
    document.addEventListener(ev, () => { m.t0 = performance.now(); m.events = []; }, true);
  m.bind = (root, record) => {   // record: a figure that appeared since (a control that makes new figures) counts
    for (const gd of document.querySelectorAll(root + " .js-plotly-plot")) {
      if (m.bound.has(gd) || !gd.on) continue;
      m.bound.add(gd);
      if (record && gd._fullLayout) m.events.push(performance.now());
      for (const e of ["plotly_restyle", "plotly_update", "plotly_relayout", "plotly_afterplot", "plotly_redraw"])
        gd.on(e, () => m.events.push(performance.now()));
    }
  };
  const plain = (k, v) => (ArrayBuffer.isView(v) ? Array.from(v) : (k === "uid" ? undefined : v));
  m.digest = (root) => {
    let h = 2166136261 >>> 0, n = 0;
    for (const gd of document.querySelectorAll(root + " .js-plotly-plot")) {
      const s = JSON.stringify((gd.data || []).map((t) => ({...t})), plain);
      n += s.length;
      for (let i = 0; i < s.length; i++) { h ^= s.charCodeAt(i); h = Math.imul(h, 16777619) >>> 0; }
    }
    return n + ":" + h;
  };
})();
"""


def root(name: str) -> str: return f".mdp-{name}"


def wait_loaded(page, url: str, timeout: float = 240):
    "Open the Voila page and wait until every explorer shows its plotly figures."
    page.goto(url, timeout=timeout * 1000)
    for name in EXPLORERS:
        page.wait_for_selector(f"{root(name)} .js-plotly-plot .main-svg", timeout=timeout * 1000)
    page.wait_for_timeout(1000)
    page.evaluate(_JS)
    for name in EXPLORERS: page.evaluate("r => window.__mdp.bind(r)", root(name))


def digest(page, name: str) -> str:
    return page.evaluate("r => window.__mdp.digest(r)", root(name))


def change(page, name: str, action, timeout: float = 60, settle: float = 0.4) -> dict:
    """Run `action()` (a user input on explorer `name`); wait for the plotly redraws it causes to end (no new one for
    `settle` s). Returns {"changed": whether the plotted data changed, "ms": input event -> last redraw, or None}.
    Only an event counter is polled while the figures update (the data is hashed before and after), so the
    measurement does not slow the page it measures."""
    page.evaluate("r => window.__mdp.bind(r)", root(name))
    before = digest(page, name)
    page.evaluate("() => { window.__mdp.events = []; window.__mdp.t0 = null; }")
    action()
    t_end, n = time.time() + timeout, 0
    while time.time() < t_end:
        k = page.evaluate("r => { window.__mdp.bind(r, true); return window.__mdp.events.length; }", root(name))
        if k and k == n: break
        n = k
        page.wait_for_timeout(int(settle * 1000) if k else 30)
    changed = digest(page, name) != before
    m = page.evaluate("() => ({t0: window.__mdp.t0, events: window.__mdp.events})")
    ms = (max(m["events"]) - m["t0"]) if m["t0"] is not None and m["events"] else None
    return {"changed": changed, "ms": ms}


def echo(page, timeout: float = 30) -> float:
    "Milliseconds from a keydown on the demo's echo slider to its label showing the kernel's answer (transport only)."
    label = page.locator(".mdp-echo .widget-html-content").first
    before = label.inner_text()
    page.evaluate("""() => { const el = document.querySelector('.mdp-echo .widget-html-content');
        window.__mdpEcho = null;
        new MutationObserver((ms, obs) => { window.__mdpEcho = performance.now(); obs.disconnect(); })
            .observe(el, {childList: true, subtree: true, characterData: true}); }""")
    slide(page, "echo", "echo-slider")
    t0 = time.time()
    while time.time() - t0 < timeout:
        if page.evaluate("() => window.__mdpEcho") is not None: break
        page.wait_for_timeout(20)
    assert label.inner_text() != before, "the echo label did not change"
    return page.evaluate("() => window.__mdpEcho - window.__mdp.t0")


# ------------------------------------------------------------------------------------------------ user inputs
def control(page, explorer: str, name: str):
    return page.locator(f"{root(explorer)} .mdp-{name}").first


def select_next(page, explorer: str, name: str, index: int | None = None):
    "Pick another option of a dropdown (the next one, or `index`)."
    sel = control(page, explorer, name).locator("select")
    n = sel.locator("option").count()
    cur = sel.evaluate("s => s.selectedIndex")
    sel.select_option(index=(cur + 1) % n if index is None else index)


def slide(page, explorer: str, name: str, steps: int = 1):
    "Move a slider's handle with the keyboard (right, or left when it is at its maximum)."
    c = page.locator(f"{root(explorer)} .noUi-handle") if name == "echo-slider" else control(page, explorer, name)
    h = c if name == "echo-slider" else c.locator(".noUi-handle")
    h = h.first
    at_max = h.get_attribute("aria-valuenow") == h.get_attribute("aria-valuemax")
    h.focus()
    for _ in range(steps): page.keyboard.press("ArrowLeft" if at_max else "ArrowRight")


def toggle(page, explorer: str, name: str):
    "Click the first toggle button that is not active (or a checkbox)."
    c = control(page, explorer, name)
    if c.locator("input[type=checkbox]").count(): c.locator("input[type=checkbox]").click(); return
    c.locator("button:not(.mod-active)").first.click()


def drag_slider(page, explorer: str, name: str, dx: float = 40):
    "Drag a slider's handle `dx` pixels with the mouse (Notebook 7 keeps arrow keys for itself)."
    h = control(page, explorer, name).locator(".noUi-handle").first
    h.scroll_into_view_if_needed()
    box = h.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y); page.mouse.down()
    page.mouse.move(x + dx, y, steps=5); page.mouse.up()


def type_text(page, explorer: str, name: str, text: str):
    box = control(page, explorer, name).locator("input")
    box.fill(text)
    box.press("Enter")


def plot_point(page, explorer: str, figure: str, x: float, y: float, axis: str = "") -> tuple:
    "Page coordinates of data point (x, y) on subplot axes `x{axis}`/`y{axis}` of figure `mdp-fig-<figure>`."
    gd = page.locator(f"{root(explorer)} .mdp-fig-{figure}.js-plotly-plot").first
    gd.scroll_into_view_if_needed()                                    # the mouse acts on what is on screen
    return tuple(gd.evaluate("""(gd, a) => {
        const L = gd._fullLayout, xa = L["xaxis" + a.axis], ya = L["yaxis" + a.axis], r = gd.getBoundingClientRect();
        return [r.left + xa._offset + xa.l2p(a.x), r.top + ya._offset + ya.l2p(a.y)];
    }""", {"x": x, "y": y, "axis": axis}))


def click_plot(page, explorer: str, figure: str, x: float, y: float, axis: str = ""):
    px, py = plot_point(page, explorer, figure, x, y, axis)
    page.mouse.move(px, py); page.wait_for_timeout(150)      # plotly clicks what it hovers
    page.mouse.click(px, py)


def lasso(page, explorer: str, figure: str, fraction: float = 0.5):
    """Drag a lasso over the left `fraction` of a scatter's plot area (a negative `fraction`: the right part),
    starting away from the edges, where a previous selection's outline would take the drag."""
    gd = page.locator(f"{root(explorer)} .mdp-fig-{figure}.js-plotly-plot").first
    gd.scroll_into_view_if_needed()                                    # the mouse acts on what is on screen
    x0, y0, w, h = gd.evaluate("""gd => { const L = gd._fullLayout, r = gd.getBoundingClientRect();
        return [r.left + L.xaxis._offset, r.top + L.yaxis._offset, L.xaxis._length, L.yaxis._length]; }""")
    a, b = (x0 + 6, x0 + w * fraction) if fraction > 0 else (x0 + w - 6, x0 + w * (1 + fraction))
    pts = [(a, y0 + 6), (b, y0 + 6), (b, y0 + h - 6), (a, y0 + h - 6), (a, y0 + 8)]
    page.mouse.move(*pts[0]); page.mouse.down()
    for p in pts[1:]: page.mouse.move(*p, steps=6)
    page.mouse.up()


def interactions(page, one_step: bool = False) -> list:
    """(explorer, control, action) for every control of every explorer of the demo page: each call of an action is a
    user input that changes what is plotted, also when repeated (menus cycle, clicks and lassos alternate, text
    alternates between two class lists, sliders turn back at their end). A few sliders move several steps, so that
    the plot surely changes; `one_step=True` moves every slider by one step: one control change (for timings)."""
    P, n = page, {"click": 0, "lasso": 0, "classes": 0}
    steps = (lambda k: 1) if one_step else (lambda k: k)
    def alternate(key, a, b):
        n[key] += 1
        return a if n[key] % 2 else b
    lists = ("circle, square, triangle, background", "circle, square, background")
    return [
        ("attention-explorer", "word", lambda: select_next(P, "attention-explorer", "word")),
        ("attention-explorer", "layers", lambda: select_next(P, "attention-explorer", "layers")),
        ("attention-explorer", "head", lambda: select_next(P, "attention-explorer", "head")),
        ("attention-explorer", "timestep", lambda: slide(P, "attention-explorer", "timestep")),
        ("attention-explorer", "aggregate", lambda: select_next(P, "attention-explorer", "aggregate")),
        ("attention-explorer", "opacity", lambda: slide(P, "attention-explorer", "opacity", steps(2))),
        ("feature-explorer", "layer", lambda: select_next(P, "feature-explorer", "layer")),
        ("feature-explorer", "timestep", lambda: slide(P, "feature-explorer", "timestep")),
        ("feature-explorer", "k", lambda: slide(P, "feature-explorer", "k")),
        ("feature-explorer", "click", lambda: click_plot(P, "feature-explorer", "features", *alternate("click", (10, 12), (22, 25)), "2")),
        ("cluster-explorer", "layer", lambda: select_next(P, "cluster-explorer", "layer")),
        ("cluster-explorer", "timestep", lambda: slide(P, "cluster-explorer", "timestep")),
        ("cluster-explorer", "k", lambda: slide(P, "cluster-explorer", "k")),
        ("cluster-explorer", "method", lambda: toggle(P, "cluster-explorer", "method")),
        ("cluster-explorer", "eigengap", lambda: toggle(P, "cluster-explorer", "eigengap")),
        ("cluster-explorer", "lasso", lambda: lasso(P, "cluster-explorer", "clusters", alternate("lasso", 0.5, -0.3))),
        ("cluster-explorer", "projection", lambda: toggle(P, "cluster-explorer", "projection")),
        ("segmentation-explorer", "similarity", lambda: toggle(P, "segmentation-explorer", "similarity")),
        ("segmentation-explorer", "attention", lambda: toggle(P, "segmentation-explorer", "attention")),
        ("segmentation-explorer", "power", lambda: slide(P, "segmentation-explorer", "power", steps(2))),
        ("segmentation-explorer", "use_threshold", lambda: toggle(P, "segmentation-explorer", "use_threshold")),
        ("segmentation-explorer", "threshold", lambda: slide(P, "segmentation-explorer", "threshold", steps(4))),
        ("segmentation-explorer", "layers", lambda: select_next(P, "segmentation-explorer", "layers")),
        ("segmentation-explorer", "opacity", lambda: slide(P, "segmentation-explorer", "opacity", steps(2))),
        ("segmentation-explorer", "classes", lambda: type_text(P, "segmentation-explorer", "classes", alternate("classes", *lists))),
    ]
