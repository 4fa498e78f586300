"""The library is what the notebooks export, and the notebooks are clean: `nbdev_export` and `nbdev_clean` change
nothing. The same holds for the developer tools in tools/ (`tools/export_tools.py` exports `nbs/dev/`), which
`nbdev_export` must never write into the library."""
import shutil, subprocess, sys, filecmp
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def _copy(tmp):
    for p in ("nbs", "md_probe", "tools"):
        shutil.copytree(ROOT / p, tmp / p, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    for p in ("settings.ini", "setup.py"): shutil.copy(ROOT / p, tmp / p)
    return tmp

def _bin(name): return str(Path(sys.executable).parent / name)

def _changed(folder, tmp):
    "Python files of `folder` that differ in the copy `tmp`, and the ones only the copy has."
    here = {p.relative_to(ROOT / folder) for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts}
    there = {p.relative_to(tmp / folder) for p in (tmp / folder).rglob("*.py") if "__pycache__" not in p.parts}
    diff = sorted(str(p) for p in here & there if not filecmp.cmp(ROOT / folder / p, tmp / folder / p, shallow=False))
    return diff, sorted(str(p) for p in there - here)

def test_export_changes_nothing(tmp_path):
    tmp = _copy(tmp_path)
    subprocess.run([_bin("nbdev_export")], cwd=tmp, check=True, capture_output=True)
    diff, new = _changed("md_probe", tmp)
    assert not diff and not new, f"nbdev_export changes {diff}, adds {new}: run nbdev_export and commit md_probe/"
    from_dev = [p.name for p in (tmp / "md_probe").glob("*.py") if "File to edit: ../nbs/dev/" in p.read_text()]
    assert not from_dev, f"nbdev_export wrote {from_dev} from nbs/dev: tools use `#| exec_doc`, never `#| export`"

def test_tools_export_changes_nothing(tmp_path):
    tmp = _copy(tmp_path)
    r = subprocess.run([sys.executable, str(tmp / "tools" / "export_tools.py")], cwd=tmp, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "nbs/dev/00_docs_site.ipynb -> tools/docsite/build.py" in r.stdout, r.stdout
    diff, new = _changed("tools", tmp)
    assert not diff and not new, f"tools/export_tools.py changes {diff}, adds {new}: run it and commit tools/"

def test_clean_changes_nothing(tmp_path):
    tmp = _copy(tmp_path)
    subprocess.run([_bin("nbdev_clean")], cwd=tmp, check=True, capture_output=True)
    diff = [str(p.relative_to(ROOT)) for p in (ROOT / "nbs").rglob("*.ipynb")
            if not filecmp.cmp(p, tmp / p.relative_to(ROOT), shallow=False)]
    assert not diff, f"nbdev_clean changes {diff}: run nbdev_clean and commit the notebooks"

def test_tools_export_rules(tmp_path):
    "A tool's cells are `#| exec_doc`; nbdev's `#| export` in nbs/dev is refused (nbdev_export would warn or ship it)."
    import json, pytest, sys
    sys.path.insert(0, str(ROOT / "tools"))
    from export_tools import export_tool
    def nb(*sources):
        cells = [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "outputs": [], "execution_count": None, "source": s}
                 for i, s in enumerate(sources)]
        p = tmp_path / "nbs" / "dev" / "00_tool.ipynb"; p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
        return p
    f = export_tool(nb("#| hide\n#| tool_exp kit.core", "#| exec_doc\ndef f(): return 1", "def g(): '#| exec_doc'"), tmp_path / "tools")
    assert f == tmp_path / "tools" / "kit" / "core.py"
    text = f.read_text()
    assert "__all__ = ['f']" in text and "def f()" in text and "def g()" not in text and "../../nbs/dev/00_tool.ipynb" in text
    with pytest.raises(ValueError, match="exec_doc"): export_tool(nb("#| hide\n#| tool_exp kit.core", "#| export\ndef f(): ..."), tmp_path / "tools")
    assert export_tool(nb("#| exec_doc\ndef f(): ..."), tmp_path / "tools") is None     # no `#| tool_exp`: nothing to write
