"""The explorers in the notebook front ends researchers use: JupyterLab 4 and Notebook 7, each started by the test on
127.0.0.1 over a copy of tests/browser/explorers_demo.ipynb; Debian's chromium runs every cell from the Run menu
(what a user clicks), then every explorer must show its figures and answer its controls (menus, toggles, a slider
dragged with the mouse, a lasso), with no console error beyond the front end's own before the run (Notebook 7.6 logs
one while loading its settings, with or without md_probe). Voila is covered by tests/test_browser_explorers.py.
VS Code cannot be installed here (no package for it): it is not tested."""
import sys
from pathlib import Path
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "browser"))
import mdp_browser as B  # noqa: E402

pytestmark = pytest.mark.browser
OUT = B.ROOT / "test-results" / "browser-frontends"


def actions(page):
    "(explorer, control, action) for one control of each kind per explorer."
    by = {(e, c): a for e, c, a in B.interactions(page)}
    pick = [("attention-explorer", "word"), ("feature-explorer", "layer"), ("cluster-explorer", "method"),
            ("cluster-explorer", "lasso"), ("segmentation-explorer", "similarity")]
    return [(e, c, by[(e, c)]) for e, c in pick] + [
        ("cluster-explorer", "k", lambda: B.drag_slider(page, "cluster-explorer", "k")),
        ("segmentation-explorer", "power", lambda: B.drag_slider(page, "segmentation-explorer", "power"))]


@pytest.mark.parametrize("frontend", sorted(B.FRONTENDS))
def test_explorers_in_frontend(frontend):
    why = B.missing()
    if why: pytest.fail(f"the browser tests need chromium, playwright, voila, jupyterlab and notebook: {why} (or deselect them: -m 'not browser')")
    OUT.mkdir(parents=True, exist_ok=True)
    with B.jupyter(frontend, log=OUT / f"{frontend}.log") as url, B.browser() as page:
        B.run_all_cells(page, url)
        for name in B.EXPLORERS:
            assert page.locator(f"{B.root(name)} .js-plotly-plot").count() >= 1, name
        for explorer, control, act in actions(page):
            r = B.change(page, explorer, act)
            assert r["changed"], f"{frontend}: moving {control} of the {explorer} did not change the plotted data"
            assert page.locator(f"{B.root(explorer)} .mdp-status").inner_text().strip() == ""
        page.screenshot(path=str(OUT / f"{frontend}.png"), full_page=True)
        assert page.errors == page.errors_before_run, page.errors     # nothing from the explorers
        assert page.external == [], page.external                    # nothing asked beyond 127.0.0.1
