"The README is kept in step with nbs/index.ipynb: the same two set-up commands, and .ci/run runs the test one."
import json, re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def _commands(text): return re.findall(r"```sh\n(tools/setup-env[^\n]*)\n```", text)

def test_readme_commands_match_index_and_ci():
    readme = _commands((ROOT / "README.md").read_text())
    nb = json.loads((ROOT / "nbs" / "index.ipynb").read_text())
    index = _commands("\n".join("".join(c["source"]).replace("\n# ", "\n").replace("\n#\n", "\n\n")
                                for c in nb["cells"] if c["cell_type"] == "markdown"))
    assert len(readme) == 2 and readme == index, (readme, index)
    ci = (ROOT / ".ci" / "run").read_text()
    assert readme[1] in ci.splitlines(), "the README's test command must be what .ci/run calls"
