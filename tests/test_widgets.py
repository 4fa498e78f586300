"""md_probe.widgets (nbs/08a_widgets.ipynb) relies on parts of plotly, ipywidgets and anywidget that are not their
public API. This file is where an upgrade of any of them fails first, and loudly: it names the versions the transport
was checked against, then checks each internal it uses, then the behaviour built on them.

After an upgrade: run this file, tests/test_explorers.py and the browser tests (`pytest -m browser
tests/test_browser_explorers.py tests/test_browser_frontends.py`); when they pass, put the new versions in `CHECKED`.
"""
from pathlib import Path
import pytest

# package -> the major.minor it was checked against (a patch release is assumed compatible)
CHECKED = {"plotly": "7.1", "ipywidgets": "8.1", "anywidget": "0.11"}


def _major_minor(v: str) -> str: return ".".join(v.split(".")[:2])


def test_checked_versions():
    from importlib.metadata import version
    found = {p: version(p) for p in CHECKED}
    new = {p: v for p, v in found.items() if _major_minor(v) != CHECKED[p]}
    assert not new, (f"md_probe.widgets was checked against {CHECKED}; installed: {found}. It uses private parts of "
                     "these packages: run this file, tests/test_explorers.py and the browser tests with the new versions, "
                     "then update CHECKED in tests/test_widgets.py.")


def test_the_internals_it_relies_on():
    import anywidget, plotly, plotly.graph_objects as go
    from ipywidgets.widgets import widget as ipw
    # plotly's FigureWidget is an anywidget whose front end is the widget bundle shipped in the wheel
    bundle = Path(plotly.__file__).parent / "package_data" / "widgetbundle.js"
    assert bundle.exists() and bundle.stat().st_size > 1_000_000, bundle
    assert issubclass(go.FigureWidget, anywidget.AnyWidget)
    # the private selection handler that the transport wraps in one batch
    assert callable(getattr(go.FigureWidget, "_handler_js2py_pointsCallback", None))
    # the traits the front end reports through, and ipywidgets' per-trait echo switch
    js2py = [n for n in go.FigureWidget.class_trait_names() if n.startswith("_js2py_")]
    assert {"_js2py_pointsCallback", "_js2py_relayout", "_js2py_restyle", "_js2py_update"} <= set(js2py), js2py
    assert "echo_update" in Path(ipw.__file__).read_text() and ipw.JUPYTER_WIDGETS_ECHO


def test_one_bundle_for_the_kernel():
    import plotly.graph_objects as go
    from md_probe.widgets import figure_widget
    a, b = figure_widget(go.Figure(go.Bar(y=[1, 2]))), figure_widget(go.Figure(go.Bar(y=[2, 1])))
    assert isinstance(a, go.FigureWidget) and a._bundle is b._bundle
    assert len(a._esm) < 3000 and len(a._bundle.source) > 1_000_000     # a loader per figure, plotly's code once
    a._bundle.close()                                                   # e.g. Widget.close_all(): a new one next time
    c = figure_widget(go.Figure())
    assert c._bundle is not a._bundle and c._bundle.comm is not None


def test_a_selection_is_one_message():
    "plotly.py restyles trace by trace on a selection; the transport sends one update (plotly's own widget does not)."
    import plotly.graph_objects as go
    from md_probe.widgets import figure_widget
    points = {"event_type": "plotly_selected", "selector": None, "device_state": None,
              "points": {"trace_indexes": [0, 0], "point_indexes": [0, 2], "xs": [0, 2], "ys": [0, 2]}}
    def select(fw):
        sent = []
        fw.observe(lambda ch: ch["new"] and sent.append(ch["name"]), names=["_py2js_update", "_py2js_restyle"])
        fw._js2py_pointsCallback = points
        return sent, list(fw.data[0].selectedpoints)
    fig = go.Figure([go.Scatter(x=[0, 1, 2], y=[0, 1, 2]), go.Scatter(x=[0, 1], y=[1, 0])])
    assert select(go.FigureWidget(fig)) == (["_py2js_restyle", "_py2js_restyle"], [0, 2])   # what is being fixed
    assert select(figure_widget(fig)) == (["_py2js_update"], [0, 2])


def test_reports_are_not_echoed():
    "A front end's report (here a relayout after a redraw) is not sent back; a change made in the kernel still is."
    import plotly.graph_objects as go
    from md_probe.widgets import figure_widget
    def echoes(fw):
        sent = []
        fw._send = lambda msg, buffers=None: sent.append(msg)
        fw.set_state({"_js2py_relayout": {"relayout_data": {"xaxis.range": [0, 1]}, "source_view_id": "v"}})
        return [m for m in sent if m.get("method") == "echo_update"]
    assert echoes(go.FigureWidget(go.Figure(go.Bar(y=[1]))))               # ipywidgets 8 echoes by default
    fw = figure_widget(go.Figure(go.Bar(y=[1])))
    assert echoes(fw) == []
    assert all(fw.trait_metadata(n, "echo_update") is False for n in fw.trait_names() if n.startswith("_js2py_"))
