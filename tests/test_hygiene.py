"""What the repository must not hold, checked on every committed file: notebooks that embed plotly.js (4.8 MB each
time: the figures must load it, `pio.renderers.default = "plotly_mimetype+notebook_connected"`), paths of the
machine a file was made on (a kept output's warning, a record's `--out` folder), and files too large for git.
Each test lists every offender, so one run says everything there is to fix.
"""
import json, re, subprocess
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_OUTPUT = 1_000_000      # bytes of one notebook output (or of a notebook's saved widget state)
MAX_FILE = 10_000_000       # bytes of any committed file
# a path of a machine: a home or work folder at the start of a path, or an installed package's folder; written in
# pieces so that this file does not match itself
_MACHINE_PATH = re.compile(r"(?<![\w./-])/(?:" + "|".join(["wo" + "rk", "ro" + "ot", "ho" + "me", "Us" + "ers"]) + r")/\w"
                           r"|site-" + r"packages/|[A-Za-z]:\\\\?Users\\\\")


def committed() -> list:
    "The files git tracks (what a clone gets), relative to the repository root."
    try: r = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError): pytest.skip("not a git checkout: nothing is committed here")
    return sorted(p for p in r.stdout.decode().split("\0") if p and (ROOT / p).is_file())


def notebooks() -> list: return [p for p in committed() if p.endswith(".ipynb")]


def _outputs(nb: dict):
    "(cell id or index, output JSON) for every output of a notebook."
    for i, c in enumerate(nb.get("cells", [])):
        for o in c.get("outputs", []): yield c.get("id", i), json.dumps(o)


def embedded_plotly(path: str) -> list:
    "Where a notebook embeds plotly.js: outputs holding its source, or over MAX_OUTPUT, and oversized widget state."
    nb = json.loads((ROOT / path).read_text(encoding="utf-8"))
    res = [f"cell {cid}: plotly.js in an output ({len(o) / 1e6:.1f} MB)" if "plotly.js v" in o else
           f"cell {cid}: an output of {len(o) / 1e6:.1f} MB" for cid, o in _outputs(nb)
           if "plotly.js v" in o or len(o) > MAX_OUTPUT]
    state = json.dumps((nb.get("metadata") or {}).get("widgets") or {})
    if "plotly.js v" in state or len(state) > MAX_OUTPUT:
        res.append(f"saved widget state of {len(state) / 1e6:.1f} MB (plotly's front end in it?)")
    return res


def machine_paths(path: str) -> list:
    "'line: text' for each line of a committed text file that names a path of a machine."
    try: text = (ROOT / path).read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError): return []          # binary: images, checkpoints
    return [f"{i}: {line.strip()[:120]}" for i, line in enumerate(text.splitlines(), 1) if _MACHINE_PATH.search(line)]


# ------------------------------------------------------------------------------------------ the checks' tests
def test_the_checks_can_fail(tmp_path, monkeypatch):
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    out = {"output_type": "display_data", "metadata": {}, "data": {"text/html": "<script>/**\n* plotly.js v3.0.1\n*/</script>"}}
    big = {"output_type": "stream", "name": "stdout", "text": "x" * (MAX_OUTPUT + 1)}
    (tmp_path / "a.ipynb").write_text(json.dumps({"cells": [{"id": "c1", "cell_type": "code", "outputs": [out]},
                                                            {"id": "c2", "cell_type": "code", "outputs": [big]}]}))
    assert [m.split(":")[0] for m in embedded_plotly("a.ipynb")] == ["cell c1", "cell c2"]
    home, work = "/" + "home/ana/x.py", "/" + "work/main/.venv/lib/python3.11/site-" + "packages/hf/utils.py:205: UserWarning"
    (tmp_path / "b.txt").write_text(f"ok: https://example.org/home/page\n{home}\n{work}\nok: md-probe train-shapes --out runs/x\n")
    assert [m.split(":")[0] for m in machine_paths("b.txt")] == ["2", "3"]


# ------------------------------------------------------------------------------------------- the repository
def test_no_notebook_embeds_plotly_js():
    bad = {p: m for p in notebooks() if (m := embedded_plotly(p))}
    assert not bad, ("notebooks embed plotly.js (set pio.renderers.default = 'plotly_mimetype+notebook_connected' in a "
                     "hidden cell, re-run, nbdev_clean):\n" + "\n".join(f"{p}: {m}" for p, ms in bad.items() for m in ms))


def test_no_committed_file_names_a_machine_path():
    bad = {p: m for p in committed() if (m := machine_paths(p))}
    assert not bad, ("committed files name paths of the machine they were made on (fix the warning that printed it, "
                     "filter it by name, or record paths relative to the run):\n"
                     + "\n".join(f"{p}:{m}" for p, ms in bad.items() for m in ms))


def test_no_committed_file_is_too_large():
    bad = {p: (ROOT / p).stat().st_size for p in committed() if (ROOT / p).stat().st_size > MAX_FILE}
    assert not bad, f"files over {MAX_FILE / 1e6:.0f} MB: {bad}"


def test_a_workflow_runs_the_test_suite():
    "GitHub Actions runs .ci/run (the README's test command) on every push and pull request."
    import yaml
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "test.yaml").read_text())
    on = wf.get("on", wf.get(True))                      # YAML 1.1 reads a bare `on:` as True
    assert {"push", "pull_request"} <= set(on)
    job = wf["jobs"]["test"]
    assert job["runs-on"].startswith("ubuntu") and job["timeout-minutes"] <= 60
    assert any(s.get("run", "").strip() == "bash .ci/run" for s in job["steps"])
    assert any(s.get("with", {}).get("python-version") == "3.11" for s in job["steps"])
