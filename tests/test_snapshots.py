"""Tests of the widget snapshots (tools/docsite/snapshots.py, from nbs/dev/01_snapshots.ipynb) beyond the notebook's
asserts: the saved state of real explorers is static and complete (every widget it refers to is in it, plotly figures
as plain JSON with a small front end, no binary buffers), a notebook run by `execute_notebook` keeps it, and the docs
tools find their checkout without md_probe (they are not part of the installed package).
"""
import json, re, subprocess, sys
from pathlib import Path
import numpy as np, pytest, torch

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))   # docsite: the docs tools are not part of the installed package

from md_probe.models import load_model
from md_probe.shapes import make_scenes


@pytest.fixture(scope="module")
def scene():
    return next(s for s in make_scenes(6, seed=12345) if len(s.classes) >= 3)


def test_widget_state_is_static_and_complete(shapes, scene):
    from md_probe.explorers import AttentionExplorer, ClusterExplorer
    from docsite.snapshots import widget_state
    exs = [AttentionExplorer(shapes, scene.image, scene.prompt()), ClusterExplorer(shapes, scene.image)]
    state = widget_state([e.widget.model_id for e in exs])
    assert state["version_major"] == 2 and state["version_minor"] == 0
    st = state["state"]
    text = json.dumps(st)                                        # JSON as saved, no binary left behind
    refs = set(re.findall(r"IPY_MODEL_([0-9a-f]{32})", text))
    assert refs and refs <= set(st), refs - set(st)
    figs = [e.fig for e in exs]
    for fw in figs:
        s = st[fw.model_id]
        assert s["model_module"] == "anywidget" and "buffers" not in s
        assert len(s["state"]["_esm"]) < 4000 and "Plotly.newPlot" in s["state"]["_esm"]
        assert [t["type"] for t in s["state"]["_widget_data"]] == [t.type for t in fw.data]
        assert not any(k.startswith(("_js2py", "_py2js")) for k in s["state"])
    # the plotted data survives: the scatter's x as saved (plotly's base64 typed array) equals the live one
    import base64
    x = st[exs[1].fig.model_id]["state"]["_widget_data"][0]["x"]
    arr = np.frombuffer(base64.b64decode(x["bdata"]), dtype=x["dtype"]) if isinstance(x, dict) else np.asarray(x)
    np.testing.assert_allclose(arr, np.asarray(exs[1].fig.data[0].x), rtol=1e-6)
    assert len(text) < 600_000
    assert len(exs[0].fig._bundle.source) > 1_000_000       # the live figure keeps plotly's own front end ...
    assert exs[0].fig._bundle.model_id not in st              # ... but the snapshot does not carry it


def test_execute_notebook_saves_widget_state(tmp_path):
    from docsite.snapshots import execute_notebook
    nb = {"cells": [{"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [], "source":
                     "import numpy as np, torch\ntorch.set_num_threads(1)\nfrom md_probe.models import load_model\n"
                     "from md_probe.shapes import make_scenes\nfrom md_probe.explorers import AttentionExplorer\n"
                     "s = make_scenes(1, seed=12345)[0]\nAttentionExplorer(load_model('shapes'), s.image, s.prompt())"},
                    {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [], "source": "1 + 1"}],
          "metadata": {"kernelspec": {"display_name": "python3", "language": "python", "name": "python3"}},
          "nbformat": 4, "nbformat_minor": 5}
    p = tmp_path / "demo.ipynb"
    p.write_text(json.dumps(nb))
    info = execute_notebook(p)
    out = json.loads(p.read_text())
    view = out["cells"][0]["outputs"][0]["data"]["application/vnd.jupyter.widget-view+json"]["model_id"]
    st = out["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    assert info["views"] == 1 and view in st and info["widgets"] == len(st)
    assert "AttentionExplorer(" in "".join(out["cells"][0]["outputs"][0]["data"]["text/plain"])


def test_docs_tools_find_their_checkout_without_md_probe(tmp_path):
    "From a copy of tools/ inside a fake checkout, with md_probe unimportable: the checkout is where the tool is."
    fake = tmp_path / "clone"
    (fake / "docs").mkdir(parents=True)
    (fake / "docs" / "conf.py").write_text("")
    (fake / "settings.ini").write_text("[DEFAULT]\n")
    import shutil
    shutil.copytree(ROOT / "tools" / "docsite", fake / "tools" / "docsite", ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import sys; sys.modules['md_probe'] = None; from docsite.build import _repo; print(_repo()); "
            "assert 'md_probe' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env={"PYTHONPATH": str(fake / "tools"), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == fake.resolve()


def test_docs_tools_are_not_in_the_package():
    "md_probe ships the library only: no module of it comes from nbs/dev or imports the docs tools."
    for f in sorted((ROOT / "md_probe").glob("*.py")):
        text = f.read_text()
        assert "File to edit: ../nbs/dev/" not in text, f"{f.name} is exported from nbs/dev: a developer tool, not the library"
        assert not re.search(r"^\s*(import|from)\s+(docsite|nbdev|execnb|sphinx)\b", text, re.M), f"{f.name} imports docs tooling"
    assert not (ROOT / "md_probe" / "docs.py").exists()
