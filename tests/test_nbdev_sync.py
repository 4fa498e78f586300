"The library is what the notebooks export, and the notebooks are clean: `nbdev_export` and `nbdev_clean` change nothing."
import shutil, subprocess, sys, filecmp
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def _copy(tmp):
    for p in ("nbs", "md_probe"): shutil.copytree(ROOT / p, tmp / p, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    for p in ("settings.ini", "setup.py"): shutil.copy(ROOT / p, tmp / p)
    return tmp

def _bin(name): return str(Path(sys.executable).parent / name)

def test_export_changes_nothing(tmp_path):
    tmp = _copy(tmp_path)
    subprocess.run([_bin("nbdev_export")], cwd=tmp, check=True, capture_output=True)
    diff = [p.name for p in (ROOT / "md_probe").glob("*.py") if not filecmp.cmp(p, tmp / "md_probe" / p.name, shallow=False)]
    new = sorted({p.name for p in (tmp / "md_probe").glob("*.py")} - {p.name for p in (ROOT / "md_probe").glob("*.py")})
    assert not diff and not new, f"nbdev_export changes {diff}, adds {new}: run nbdev_export and commit md_probe/"

def test_clean_changes_nothing(tmp_path):
    tmp = _copy(tmp_path)
    subprocess.run([_bin("nbdev_clean")], cwd=tmp, check=True, capture_output=True)
    diff = [str(p.relative_to(ROOT)) for p in (ROOT / "nbs").rglob("*.ipynb")
            if not filecmp.cmp(p, tmp / p.relative_to(ROOT), shallow=False)]
    assert not diff, f"nbdev_clean changes {diff}: run nbdev_clean and commit the notebooks"
