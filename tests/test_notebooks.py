"Every notebook in nbs/ runs as a test through nbdev's own runner (the notebooks hold the documented assertions)."
import os, pytest
from pathlib import Path

NBS = Path(__file__).resolve().parent.parent / "nbs"
NOTEBOOKS = sorted(p for p in NBS.rglob("*.ipynb")
                   if not any(part.startswith(("_", ".")) for part in p.relative_to(NBS).parts))

@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: str(p.relative_to(NBS)))
def test_notebook(nb, monkeypatch):
    from nbdev.test import test_nb
    import torch
    # cells flagged `#| slow` run too (the suite is the place they are checked); `#| gpu` cells need CUDA and are
    # skipped without it, which the skip list below makes explicit. MD_PROBE_SKIP_FLAGS="slow" skips slow cells locally.
    skip = os.environ.get("MD_PROBE_SKIP_FLAGS", "").split() + ([] if torch.cuda.is_available() else ["gpu"])
    monkeypatch.chdir(nb.parent)
    ok, secs = test_nb(nb, skip_flags=skip, do_print=False, showerr=True)
    assert ok, f"{nb.name} failed (see the traceback above)"
