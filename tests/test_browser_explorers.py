"""The explorers in a real browser: Voila serves tests/browser/explorers_demo.ipynb (each explorer on the trained shapes
model) on 127.0.0.1, Debian's chromium opens it through playwright (`.ci/install-browser`: apt chromium + pip
playwright; never `playwright install`). The page must load with no JavaScript console error and ask nothing
beyond 127.0.0.1 except Voila's own template font (recorded and answered empty: the machine is offline); moving
each control of each explorer must change the data its plotly figures hold (read from the graph divs). Screenshots
and the measured latencies go to test-results/browser-explorers/ (git-ignored); latencies are not asserted here,
benchmarks/bench_explorers.py reports them."""
import json, sys
from pathlib import Path
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "browser"))
import mdp_browser as B  # noqa: E402

pytestmark = pytest.mark.browser
OUT = B.ROOT / "test-results" / "browser-explorers"
VOILA_TEMPLATE_FONTS = "fontawesome-free"   # Voila's page template links Font Awesome from a CDN


@pytest.fixture(scope="module")
def page():
    why = B.missing()
    if why: pytest.fail(f"the browser tests need chromium, playwright and voila: {why} (or deselect them: -m 'not browser')")
    OUT.mkdir(parents=True, exist_ok=True)
    with B.voila(log=OUT / "voila.log") as url, B.browser() as p:
        B.wait_loaded(p, url)
        p.screenshot(path=str(OUT / "loaded.png"), full_page=True)
        p.latencies = {}
        yield p
        (OUT / "latency.json").write_text(json.dumps(p.latencies, indent=1))
        p.screenshot(path=str(OUT / "end.png"), full_page=True)


def test_page_loads_clean(page):
    assert page.errors == [], page.errors
    assert all(VOILA_TEMPLATE_FONTS in u for u in page.external), page.external     # the explorers load nothing
    for name in B.EXPLORERS:
        assert page.locator(f"{B.root(name)} .js-plotly-plot").count() >= 1, name
        assert page.locator(f"{B.root(name)} .mdp-status").inner_text().strip() == "", name
    assert page.locator(".mdp-attention-explorer .mdp-word select option").count() >= 3


CONTROLS = [(e, c) for e, c, _ in B.interactions(None)]


@pytest.mark.parametrize("explorer,control", CONTROLS, ids=[f"{e}-{c}" for e, c in CONTROLS])
def test_control_changes_plot(page, explorer, control):
    action = dict(((e, c), a) for e, c, a in B.interactions(page))[(explorer, control)]
    r = B.change(page, explorer, action, timeout=300 if control == "projection" else 60)
    page.locator(B.root(explorer)).screenshot(path=str(OUT / f"{explorer}-{control}.png"))
    page.latencies[f"{explorer}/{control}"] = r["ms"]
    assert r["changed"], f"moving {control} of the {explorer} did not change the plotted data"
    assert page.locator(f"{B.root(explorer)} .mdp-status").inner_text().strip() == ""
    assert page.errors == [], page.errors


def test_no_console_errors_after_all(page):
    assert page.errors == [], page.errors
    assert B.echo(page) < 10_000   # the kernel still answers
