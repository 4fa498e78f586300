"""Export the developer tools documented in `nbs/dev/` into `tools/` (they are not part of the installed library).

`nbdev_export` writes the library, `md_probe/`, from the notebooks in `nbs/`. The notebooks in `nbs/dev/` document
tools that must not ship with it (the documentation-site builder, the widget snapshots), so they use no `#| export`
and no `#| default_exp`, and `nbdev_export` leaves them alone. Instead:

- a notebook names its module with `#| tool_exp docsite.build` (-> `tools/docsite/build.py`);
- the cells that make the module carry `#| exec_doc`, which nbdev's documentation processors treat as they treat
  exported cells (run them, add a `show_doc` entry per public name), and which exports nothing by itself.

This script writes those modules with nbdev's own exporter, so they read like the library's (cell headers, `__all__`,
imports of the same package made relative). Run it after `nbdev_export`:

    nbdev_export && python tools/export_tools.py

`tests/test_nbdev_sync.py` runs both on a copy of the repository and fails when the result differs from what is
committed.
"""
import re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS, DEV = ROOT / "tools", ROOT / "nbs" / "dev"
_re_target = re.compile(r"^\s*#\|\s*tool_exp\s+([\w.]+)\s*$")
_re_exec_doc = re.compile(r"^(\s*#\|\s*)exec_doc\s*$")
_re_nbdev_export = re.compile(r"^\s*#\|\s*(export|exports|exporti|default_exp)\b")


def _directives(source: str) -> int:
    "How many lines at the top of a code cell are `#|` directives (nbdev reads only those)."
    n = 0
    for line in source.split("\n"):
        if not line.strip().startswith("#|"): break
        n += 1
    return n


def tool_target(nb) -> str | None:
    "The module a notebook's `#| tool_exp` cell names (e.g. `docsite.build`), or None."
    names = [m[1] for c in nb.cells if c.cell_type == "code"
             for line in c.source.split("\n")[:_directives(c.source)] if (m := _re_target.match(line))]
    if len(names) > 1: raise ValueError(f"{len(names)} `#| tool_exp` cells ({names}): a notebook exports one module.")
    return names[0] if names else None


def export_tool(path: Path, dest: Path = TOOLS) -> Path | None:
    "Export one `nbs/dev` notebook's `#| exec_doc` cells to the module its `#| tool_exp` names; returns the file."
    from execnb.nbio import read_nb
    from nbdev.export import ExportModuleProc
    from nbdev.maker import ModuleMaker
    from nbdev.process import NBProcessor
    nb = read_nb(path)
    name = tool_target(nb)
    if name is None: return None
    for c in nb.cells:
        if c.cell_type != "code": continue
        lines, n = c.source.split("\n"), _directives(c.source)
        if any(_re_nbdev_export.match(l) for l in lines[:n]):
            raise ValueError(f"{path}: a cell uses nbdev's `#| export` or `#| default_exp`, which nbdev_export would write "
                             f"into the library (or warn about): mark the tool's cells `#| exec_doc`.\n{c.source[:200]}")
        # nbdev's exporter, told that these cells are exported
        c.source = "\n".join([_re_exec_doc.sub(r"\1export", l) for l in lines[:n]] + lines[n:])
    exp = ExportModuleProc()
    NBProcessor(path, [exp], nb=nb).process()
    mm = ModuleMaker(dest=dest, name=name, nb_path=path, is_new=True)
    mm.make(exp.modules["#"], exp.in_all["#"], lib_path=dest / name.split(".")[0])
    return mm.fname


def main(argv=None) -> int:
    "Export every notebook of `nbs/dev/` that names a tool module; print what was written."
    for p in sorted(DEV.rglob("*.ipynb")):
        if any(part.startswith((".", "_")) for part in p.relative_to(DEV).parts): continue
        f = export_tool(p)
        if f: print(f"{p.relative_to(ROOT)} -> {f.relative_to(ROOT)}")
    return 0


if __name__ == "__main__": sys.exit(main(sys.argv[1:]))
