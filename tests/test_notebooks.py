"Every notebook in nbs/ runs as a test through nbdev's own runner (the notebooks hold the documented assertions)."
import os, pytest
from pathlib import Path

NBS = Path(__file__).resolve().parent.parent / "nbs"
NOTEBOOKS = sorted(p for p in NBS.rglob("*.ipynb")
                   if not any(part.startswith(("_", ".")) for part in p.relative_to(NBS).parts))

@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: str(p.relative_to(NBS)))
def test_notebook(nb, monkeypatch):
    from nbdev.test import test_nb
    flags = os.environ.get("MD_PROBE_TEST_FLAGS", "").split()  # e.g. "slow" to run cells flagged #| slow
    monkeypatch.chdir(nb.parent)
    ok, secs = test_nb(nb, force_flags=flags, do_print=False, showerr=True)
    assert ok, f"{nb.name} failed (see the traceback above)"
