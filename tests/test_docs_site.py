"""The documentation site, checked as a reader meets it.

`tools/build-docs` (tools/docsite/build.py, from nbs/dev/00_docs_site.ipynb) builds the site offline, once for a
small fake project that has every kind of page content (show_doc entries, a callout, a plotly figure, an ipywidgets
slider and an anywidget, a study) and once for md_probe itself. The browser tests then open every page in Debian's
chromium through playwright (`.ci/install-browser`; no browser download), served from 127.0.0.1, with every request
that leaves 127.0.0.1 aborted and counted. Screenshots go to test-results/screenshots/. The documentation as
written (exported names, title cells) is checked without a build, in tests/test_docs_written.py.
"""
import functools, http.server, json, os, re, shutil, subprocess, sys, threading, time
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))   # docsite: the docs tools are not part of the installed package
SHOTS = ROOT / "test-results" / "screenshots"
NPM_CACHE = ROOT / "build" / "docs" / "npm"   # tarballs from the npm registry, shared between builds (git-ignored)
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
BUILD_LIMIT_S = 300  # the issue: the site builds (and is checked) in CI in under 5 minutes on 2 cores


# ---------------------------------------------------------------------------------------------- fake project
def _nb(cells, metadata=None):
    return {"cells": cells, "metadata": {"kernelspec": {"display_name": "python3", "language": "python", "name": "python3"},
                                         **(metadata or {})}, "nbformat": 4, "nbformat_minor": 5}

def _md(src): return {"cell_type": "markdown", "metadata": {}, "source": src}

def _code(src, outputs=(), n=None):
    return {"cell_type": "code", "metadata": {}, "source": src, "outputs": list(outputs), "execution_count": n}

def _result(text, n=1): return {"output_type": "execute_result", "metadata": {}, "execution_count": n, "data": {"text/plain": text}}

def _display(data): return {"output_type": "display_data", "metadata": {}, "data": data}

SITE_URL = "https://md-probe.github.io/md_probe"

def _widgets():
    "An ipywidgets slider and an anywidget, with their state saved as 09_explorers must save it (drop_defaults=False)."
    import anywidget, ipywidgets as W, traitlets
    class Hello(anywidget.AnyWidget):
        _esm = ("function render({ model, el }) { const p = document.createElement('p'); p.className = 'anywidget-ok';"
                " p.textContent = 'anywidget says ' + model.get('value'); el.appendChild(p); }\nexport default { render };")
        value = traitlets.Unicode("hello").tag(sync=True)
    slider, hello = W.IntSlider(value=7, description="k"), Hello()
    views = [w._repr_mimebundle_() for w in (slider, hello)]
    views = [(v[0] if isinstance(v, tuple) else v) for v in views]
    state = W.Widget.get_manager_state(drop_defaults=False, widgets=[slider, slider.layout, slider.style, hello, hello.layout])
    return views, state

def make_fake_project(root: Path) -> Path:
    "A tiny nbdev project whose notebooks hold every kind of content the site must render."
    settings = (ROOT / "settings.ini").read_text()
    for k, v in {"lib_name": "fakelib", "lib_path": "fakelib", "repo": "fakelib", "title": "fakelib",
                 "console_scripts": "", "description": "A fake project for the docs build test."}.items():
        settings = re.sub(rf"^{k}\s*=.*$", f"{k} = {v}", settings, flags=re.M)
    (root / "settings.ini").write_text(settings)
    (root / "fakelib").mkdir(parents=True)
    (root / "fakelib" / "__init__.py").write_text('__version__ = "0.0.1"\n')
    (root / "README.md").write_text("# fakelib\n")
    nbs = root / "nbs"; (nbs / "studies").mkdir(parents=True)
    w = lambda p, nb: (nbs / p).write_text(json.dumps(nb, indent=1))
    w("index.ipynb", _nb([_md("# fakelib\n\n> The fake home page."), _md("Welcome: HOME_MARKER.")]))
    w("_scratch.ipynb", _nb([_md("# Scratch\n\nSCRATCH_MARKER")]))
    w("00_core.ipynb", _nb([
        _code("#| default_exp core"),
        _code("#| export\nfrom __future__ import annotations"),
        _code("#| hide\nfrom nbdev.showdoc import show_doc\nHIDDEN_MARKER = 1"),
        _md("# Core\n\n> The fake core module."),
        _md("## Adding\n\n::: {.callout-tip}\nFAKE_CALLOUT_TEXT\n:::"),
        _code('#| export\ndef add_one(x:int, # the number\n           )->int: # one more\n'
              '    "Add one to `x`."\n    return x + 1  # EXPORT_BODY_MARKER'),
        _md(f"It adds one; [`add_one`]({SITE_URL}/core.html#add_one) links to itself, "
            f"[`twice`]({SITE_URL}/core.html#twice) to the next entry."),
        _code("add_one(41)", [_result("42", 1)], 1),
        _code('#| echo: false\nprint("ECHO_HIDDEN_SOURCE")', [{"output_type": "stream", "name": "stdout", "text": "SHOWN_OUTPUT\n"}], 2),
        _code('#| export\ndef twice(x:int)->int:\n    "Twice `x`, *emphasised* and a|b."\n    return 2 * x'),
        _md("Doubles."),
        _code("twice(2)", [_result("4", 3)], 3),
    ]))
    import plotly.graph_objects as go
    fig = go.Figure(go.Bar(x=["cat", "sky"], y=[3, 5]))
    cdn = '<script src="https://cdn.plot.ly/plotly-3.0.1.min.js"></script><div>figure</div>'  # as notebook_connected saves it
    w("01_figures.ipynb", _nb([
        _code("#| default_exp figures"),
        _md("# Figures\n\n> Plotly figures, drawn offline."),
        _code('#| export\ndef bars():\n    "A bar chart."\n    import plotly.graph_objects as go\n    return go.Figure(go.Bar(x=["cat", "sky"], y=[3, 5]))'),
        _md("A bar chart:"),
        _code("bars()", [_display({"application/vnd.plotly.v1+json": fig.to_plotly_json(), "text/html": cdn, "text/plain": "Figure"})], 1),
    ]))
    views, state = _widgets()
    w("02_widgets.ipynb", _nb([
        _md("# Widgets\n\n> Widget snapshots."),
        _md("A slider and an anywidget:"),
        _code("slider", [_display(views[0])], 1),
        _code("hello", [_display(views[1])], 2),
    ], {"widgets": {"application/vnd.jupyter.widget-state+json": state}}))
    w("studies/00_demo.ipynb", _nb([_md("# Demo study\n\n> A study of nothing."), _md("STUDY_MARKER prose."),
                                     _code("1 + 1", [_result("2")], 1)]))
    r = subprocess.run([sys.executable, "-c", "from nbdev.doclinks import nbdev_export; nbdev_export()"],
                       cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return root


@pytest.fixture(scope="module")
def fake_site(tmp_path_factory):
    from docsite.build import build_site
    root = make_fake_project(tmp_path_factory.mktemp("fake"))
    rep = build_site(root / "_site", root=root, jobs=2, work=root / "build" / "docs", npm_cache=NPM_CACHE)
    return root, rep


@pytest.fixture(scope="module")
def real_site(tmp_path_factory):
    "md_probe's own site, built once from the committed notebooks (their outputs are rendered, not recomputed)."
    from docsite.build import build_site
    tmp = tmp_path_factory.mktemp("real")
    t0 = time.time()
    rep = build_site(tmp / "_site", root=ROOT, jobs=2, work=tmp / "work", npm_cache=NPM_CACHE)
    return rep, time.time() - t0


# --------------------------------------------------------------------------------------------- HTML helpers
class _Page(HTMLParser):
    "ids and links of an HTML page."
    def __init__(self):
        super().__init__(); self.ids, self.links, self.text = set(), [], []
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for k in ("id", "name"):
            if a.get(k): self.ids.add(a[k])
        if tag == "a" and a.get("href"): self.links.append(a["href"])
    def handle_data(self, data): self.text.append(data)

@functools.lru_cache(maxsize=None)
def _parse(path: Path) -> _Page:
    p = _Page(); p.feed(path.read_text(encoding="utf-8", errors="replace")); return p

def _pages(site: Path) -> list:
    "Every page of the site (the theme's template snippets in _static/ are not pages)."
    return sorted(p.relative_to(site).as_posix() for p in site.rglob("*.html") if p.relative_to(site).parts[0] != "_static")

def _text(site: Path, page: str) -> str:
    return " ".join(_parse(site / page).text)

def broken_links(site: Path) -> list:
    "Internal links (and their #anchors) of every page that lead nowhere."
    bad = []
    for page in _pages(site):
        for href in _parse(site / page).links:
            u = urlparse(href)
            if u.scheme or href.startswith(("//", "mailto:", "javascript:")): continue
            target = (site / page).parent / unquote(u.path) if u.path else site / page
            if target.is_dir(): target = target / "index.html"
            target = target.resolve()
            if not target.exists() or site.resolve() not in target.parents and target != site.resolve():
                bad.append(f"{page}: {href} (no such file)"); continue
            if u.fragment and target.suffix == ".html" and unquote(u.fragment) not in _parse(target).ids:
                bad.append(f"{page}: {href} (no such anchor)")
    return bad

def _nav(site: Path) -> list:
    "(caption or page) entries of the sidebar navigation of the home page, in order."
    html = (site / "index.html").read_text()
    nav = html[html.index('class="bd-sidebar-primary'):]
    nav = nav[:nav.index("</nav>")]
    return re.findall(r'<p aria-level="2" class="caption" role="heading"><span class="caption-text">([^<]+)</span>|'
                      r'class="reference internal" href="([^"#]+)"', nav)


# ------------------------------------------------------------------------------------ fake site: structure
def test_fake_site_pages_and_navigation(fake_site):
    root, rep = fake_site
    site = rep.out
    assert rep.problems == [], rep.problems
    test_pages = {"index.html", "core.html", "figures.html", "widgets.html", "studies/demo.html", "api.html", "search.html"}
    assert test_pages <= set(_pages(site)), _pages(site)
    assert "scratch.html" not in _pages(site)                      # `_` notebooks are skipped, as nbdev skips them
    assert rep.pages == ["index", "core", "figures", "widgets", "studies/demo", "api"]
    nav = [c or p for c, p in _nav(site)]
    assert nav == ["Library", "core.html", "figures.html", "widgets.html", "Studies", "studies/demo.html",
                   "Reference", "api.html"], nav

def test_fake_site_renders_processed_notebooks(fake_site):
    site = fake_site[1].out
    every = " ".join((site / p).read_text() for p in _pages(site) if not p.startswith("_modules"))
    for marker in ("HIDDEN_MARKER", "EXPORT_BODY_MARKER", "ECHO_HIDDEN_SOURCE", "#|", ":::", "{.callout", "SCRATCH_MARKER"):
        assert marker not in every, f"{marker!r} should not be on any page"
    core = (site / "core.html").read_text()
    assert 'id="add_one"' in core and 'id="twice"' in core            # show_doc entries with nbdev's anchors
    assert "the number" in core and "one more" in core               # docments
    assert "admonition tip" in core and "FAKE_CALLOUT_TEXT" in core
    assert "SHOWN_OUTPUT" in core and 'href="core.html#twice"' in core
    assert "HOME_MARKER" in (site / "index.html").read_text()
    assert "STUDY_MARKER" in (site / "studies" / "demo.html").read_text()
    fig = (site / "figures.html").read_text()
    assert "cdn.plot.ly" not in fig and re.search(r'<script src="_static/plotly.min.js\?v=\w+"></script>', fig)
    wid = (site / "widgets.html").read_text()
    assert "application/vnd.jupyter.widget-state+json" in wid and "static snapshots" in wid
    assert fig.index("plotly.min.js") < fig.index("</head>")
    assert "_static/npm/require.js" in wid and "_static/npm/html-manager/embed-amd.js" in wid

def test_fake_site_api_reference(fake_site):
    site = fake_site[1].out
    api = (site / "api.html").read_text()
    for name in ("fakelib.core.add_one", "fakelib.core.twice", "fakelib.figures.bars"):
        assert f'id="{name}"' in api, name
    for mod, name in (("core", "add_one"), ("core", "twice"), ("figures", "bars")):
        assert f'href="_modules/fakelib/{mod}.html#{name}"' in api, name   # [source], inside the site
        assert f'href="{mod}.html#{name}"' in api, name                    # "Explained with examples"
    assert "Twice <code" in api and "a|b" in api and "<em>emphasised</em>" in api  # markdown docstrings, as reST
    assert broken_links(site) == []


# --------------------------------------------------------------------------------------- real site: build
def test_real_site_builds(real_site):
    rep, secs = real_site
    print(rep, f"(fixture: {secs:.0f} s)")
    assert secs < BUILD_LIMIT_S, f"the build took {secs:.0f} s"
    assert rep.pages[0] == "index" and rep.pages[-1] == "api"
    nbs = [p for p in (ROOT / "nbs").rglob("*.ipynb") if not any(o.startswith(("_", ".")) for o in p.relative_to(ROOT / "nbs").parts)]
    from docsite.build import page_name
    missing = [str(p.relative_to(ROOT)) for p in nbs if page_name(p.relative_to(ROOT / "nbs")) not in rep.pages]
    assert missing == [], f"notebooks without a page: {missing} (see the build's problems: {rep.problems})"
    assert [p for p in rep.problems if " loads " in p] == []            # nothing from another host

def test_real_site_has_no_build_problems(real_site):
    "What nbdev's own processing (and so `nbdev_docs`) cannot do with the notebooks, or a reader would miss."
    problems = real_site[0].problems
    assert problems == [], "\n" + "\n".join(problems)

def test_real_site_links_resolve(real_site):
    bad = broken_links(real_site[0].out)
    assert bad == [], "\n" + "\n".join(bad)

def test_real_site_api_lists_every_exported_name(real_site):
    "Every name in a module's __all__ has an API entry; functions and classes link to their source in the site."
    import ast
    site, api = real_site[0].out, (real_site[0].out / "api.html").read_text()
    missing = []
    for mod in sorted((ROOT / "md_probe").glob("[!_]*.py")):
        if f'id="md_probe.{mod.stem}.' not in api and mod.stem not in real_site[0].pages: continue  # not a notebook's module
        tree = ast.parse(mod.read_text())
        alls = next((ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                     and getattr(n.targets[0], "id", "") == "__all__"), [])
        defs = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        for name in alls:
            if f'id="md_probe.{mod.stem}.{name}"' not in api: missing.append(f"md_probe.{mod.stem}.{name}: no entry")
            elif name in defs and f'href="_modules/md_probe/{mod.stem}.html#{name}"' not in api:
                missing.append(f"md_probe.{mod.stem}.{name}: no [source] link")
    assert missing == [], "\n".join(missing)


# ---------------------------------------------------------------------------------- the Quarto path
def test_quarto_config_is_what_nbdev_reads():
    import yaml
    top, nbq = ROOT / "_quarto.yml", ROOT / "nbs" / "_quarto.yml"
    assert nbq.is_symlink() and nbq.resolve() == top.resolve()
    q = yaml.safe_load(top.read_text())
    assert q["project"]["type"] == "website" and q["metadata-files"] == ["nbdev.yml", "sidebar.yml"]
    assert q["website"]["navbar"]["search"] is True
    ny = yaml.safe_load((ROOT / "nbs" / "nbdev.yml").read_text())
    assert ny["project"]["output-dir"] == "_docs" and ny["website"]["site-url"] == SITE_URL
    css = q["format"]["html"].get("css")
    assert css is None or (ROOT / "nbs" / css).exists()
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "deploy.yaml").read_text())
    assert wf["jobs"]["deploy"]["steps"] == [{"uses": "fastai/workflows/quarto-ghp@master"}]

def test_nbdev_sidebar_in_notebook_order(tmp_path):
    "nbdev's own sidebar (custom_sidebar = False): index first, notebooks in order, studies in their own section."
    r = subprocess.run([sys.executable, "-c", "from nbdev.quarto import nbdev_sidebar; nbdev_sidebar(printit=True, force=True)"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import yaml
    contents = yaml.safe_load(r.stdout)["website"]["sidebar"]["contents"]
    files = [c for c in contents if isinstance(c, str)]
    assert files[0] == "index.ipynb" and files[1:] == sorted(files[1:])
    sections = [c for c in contents if isinstance(c, dict)]
    folders = sorted(d.name for d in (ROOT / "nbs").iterdir() if d.is_dir() and not d.name.startswith(("_", ".")) and any(d.glob("*.ipynb")))
    assert [s["section"] for s in sections] == folders == ["dev", "studies"]   # the developer tools' pages, the studies

def test_build_docs_command_help():
    r = subprocess.run([str(ROOT / "tools" / "build-docs"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "build the offline documentation site" in " ".join(r.stdout.split())


# ---------------------------------------------------------------------------------------- the browser
@contextmanager
def serve(folder: Path):
    "A static server for `folder` on 127.0.0.1 (random port), stopped on exit."
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a): pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    t = threading.Thread(target=srv.serve_forever, daemon=True); t.start()
    try: yield f"http://127.0.0.1:{srv.server_address[1]}/"
    finally:
        srv.shutdown(); srv.server_close(); t.join(5)

@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not Path(CHROMIUM).exists(): pytest.fail(f"{CHROMIUM} is missing: run .ci/install-browser")
    try: from playwright.sync_api import sync_playwright
    except ImportError: pytest.fail("playwright is missing: run .ci/install-browser")
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM,
                                                   headless=True, args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900})
        try: yield ctx
        finally: ctx.close()

_RENDERED = """() => {
  const plots = [...new Set(document.querySelectorAll('.plotly-graph-div, .js-plotly-plot'))];  // saved figures and figure widgets
  const views = [...document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]')];
  const drawn = d => d._fullData && d._fullData.length > 0 && d.querySelector('.main-svg');
  const shown = s => { const a = s.previousElementSibling;
    return !!(a && a.classList.contains('widget-subarea') && a.children.length && a.getBoundingClientRect().height > 0); };
  return {plots: plots.length, empty_plots: plots.filter(d => !drawn(d)).map(d => d.id || d.className),
          widgets: views.length, unrendered_widgets: views.filter(s => !shown(s)).map(s => JSON.parse(s.textContent).model_id)};
}"""

def check_page(ctx, url: str, shot: Path | None = None, scroll_to: str | None = None) -> dict:
    "Open `url` with everything not on 127.0.0.1 blocked; what a reader would see go wrong."
    page = ctx.new_page()
    errors, failed, blocked = [], [], []
    def route(r):
        if urlparse(r.request.url).hostname == "127.0.0.1" or r.request.url.startswith(("data:", "blob:")): r.continue_()
        else: blocked.append(r.request.url); r.abort()
    page.route("**/*", route)
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    page.on("requestfailed", lambda r: None if r.url in blocked else failed.append(f"{r.url} ({r.failure})"))
    page.on("response", lambda r: failed.append(f"{r.url} ({r.status})") if r.status >= 400 else None)
    try:
        page.goto(url, wait_until="load", timeout=60_000)
        try: page.wait_for_function(f"() => {{ const s = ({_RENDERED})(); return !s.empty_plots.length && !s.unrendered_widgets.length; }}",
                                    timeout=20_000)
        except Exception: pass  # reported below
        page.wait_for_timeout(300)
        stats = page.evaluate(_RENDERED)
        if shot:
            if scroll_to and page.query_selector(scroll_to): page.eval_on_selector(scroll_to, "e => e.scrollIntoView()")
            shot.parent.mkdir(parents=True, exist_ok=True); page.screenshot(path=str(shot))
    finally: page.close()
    return dict(console_errors=errors, failed_requests=failed, blocked_requests=blocked, **stats)

def _problems(res: dict) -> dict:
    return {k: v for k, v in res.items() if k in ("console_errors", "failed_requests", "blocked_requests", "empty_plots",
                                                  "unrendered_widgets") and v}

def _check_site(ctx, site: Path, shots: dict) -> tuple:
    results, bad = {}, {}
    with serve(site) as base:
        for page in _pages(site):
            name, sel = shots.get(page, (None, None))
            res = results[page] = check_page(ctx, urljoin(base, page), SHOTS / name if name else None, sel)
            if _problems(res): bad[page] = _problems(res)
    return results, bad

@pytest.mark.browser
def test_fake_site_in_browser(fake_site, browser):
    site = fake_site[1].out
    results, bad = _check_site(browser, site, {"widgets.html": ("fake-widgets.png", ".widget-subarea")})
    assert bad == {}, json.dumps(bad, indent=1)
    assert results["figures.html"]["plots"] == 1
    assert results["widgets.html"]["widgets"] == 2
    with serve(site) as base:   # the anywidget's own front end ran (its ESM came from the saved state)
        page = browser.new_page()
        page.route("**/*", lambda r: r.continue_() if urlparse(r.request.url).hostname == "127.0.0.1" else r.abort())
        page.goto(urljoin(base, "widgets.html"))
        page.wait_for_selector(".anywidget-ok", timeout=20_000)
        assert page.inner_text(".anywidget-ok") == "anywidget says hello"
        assert page.query_selector(".widget-slider") is not None
        page.close()

@pytest.mark.browser
def test_real_site_in_browser(real_site, browser):
    site = real_site[0].out
    shots = {"index.html": ("home.png", None), "probe.html": ("probe.png", None),
             "explorers.html": ("explorers.png", ".widget-subarea")}
    results, bad = _check_site(browser, site, shots)
    for page, (name, _) in shots.items():
        assert page not in results or (SHOTS / name).exists()
    assert bad == {}, json.dumps(bad, indent=1)
    print({p: {k: v for k, v in r.items() if k in ("plots", "widgets")} for p, r in results.items() if r["plots"] or r["widgets"]})
    if "explorers.html" not in results:
        pytest.skip("nbs/09_explorers.ipynb does not exist yet: no explorers screenshot (every page was checked)")

@pytest.mark.browser
def test_real_site_search_box(real_site, browser):
    "A reader types a function's name into the search box and gets its page, with no network."
    site = real_site[0].out
    with serve(site) as base:
        page = browser.new_page()
        page.route("**/*", lambda r: r.continue_() if urlparse(r.request.url).hostname == "127.0.0.1" else r.abort())
        page.goto(urljoin(base, "index.html"))
        page.locator(".search-button-field, .search-button__button").first.click()
        page.locator('input[name="q"]:visible').first.fill("hungarian_match")
        page.keyboard.press("Enter")
        page.wait_for_url("**/search.html?q=hungarian_match*", timeout=30_000)
        page.wait_for_selector("#search-results li", timeout=30_000)
        hrefs = page.eval_on_selector_all("#search-results li a", "els => els.map(e => e.getAttribute('href'))")
        page.close()
    assert any(h.startswith(("metrics.html", "api.html")) for h in hrefs), hrefs
