"""Every notebook in nbs/ runs as a test through nbdev's own runner (the notebooks hold the documented assertions).

That includes the developer tools' notebooks in nbs/dev/ (the docs-site builder and the widget snapshots, exported
to tools/docsite/): their assertions are those tools' unit tests, and they run in seconds (what would be slow, the
site build and npm, is `#| eval: false` there and runs once in tests/test_docs_site.py)."""
import os, pytest
from pathlib import Path

NBS = Path(__file__).resolve().parent.parent / "nbs"
NOTEBOOKS = sorted(p for p in NBS.rglob("*.ipynb")
                   if not any(part.startswith(("_", ".")) for part in p.relative_to(NBS).parts))

@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: str(p.relative_to(NBS)))
def test_notebook(nb, monkeypatch):
    from nbdev.test import test_nb
    import torch
    # Cells flagged `#| slow` (UMAP's 30 s compile, say) are skipped here, as nbdev_test does by default: their saved
    # outputs stay in the notebook and the same code runs in the slow-marked pytest tests. MD_PROBE_NB_FLAGS="slow"
    # runs them too. `#| gpu` cells run only where CUDA is available.
    run = set(os.environ.get("MD_PROBE_NB_FLAGS", "").split()) | ({"gpu"} if torch.cuda.is_available() else set())
    skip = [f for f in ("slow", "gpu", "browser") if f not in run]
    monkeypatch.chdir(nb.parent)
    monkeypatch.setenv("IN_TEST", "1")   # test_nb sets it for good; restored after, or a later nbdev_export is skipped
    ok, secs = test_nb(nb, skip_flags=skip, do_print=False, showerr=True)
    assert ok, f"{nb.name} failed (see the traceback above)"
