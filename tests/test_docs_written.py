"""The documentation as written: the house rule every notebook follows, checked without building the site.

Every exported name has prose in its section (the markdown just before its cell, or between it and the next export)
and a worked example: a visible code cell after it that uses it. A constant may instead be named in that prose
(`` `DENSE_MAX` is the largest ... ``): a value needs no example to be understood. A class's members are documented
with their class; a method `@patch`ed on later is its own name, with its own section. Hidden cells don't count: the
reader never sees them. A name that the module index lists but no notebook exports is reported too (a stale
`nbdev_export`). And no title cell holds prose nbdev would drop: its frontmatter processor turns the whole
`# Title` cell into the page title and summary.

The checker is plain Python here, with its own tests first; the last two tests apply it to every notebook in `nbs/`
(the library's `#| export` cells, and the developer tools' `#| exec_doc` cells in `nbs/dev/`).
"""
import ast, configparser, json, re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------ the checker
_re_export = re.compile(r'^\s*#\|\s*(export|exports|exec_doc)\b', re.M)
_re_hide = re.compile(r'^\s*#\|\s*hide\b', re.M)

def _public(n: str) -> bool: return not n.startswith('_')

def _text(v) -> str: return ''.join(v) if isinstance(v, list) else (v or '')

def _visible(p: Path, root: Path) -> bool: return not any(o.startswith(('_', '.')) for o in p.relative_to(root).parts)

def _patch_classes(f: ast.AST) -> list:
    "Classes a `@patch`ed function is attached to (from its first argument's annotation)."
    if not any((isinstance(d, ast.Name) and d.id in ('patch', 'patch_to')) or
               (isinstance(d, ast.Call) and getattr(d.func, 'id', '') in ('patch', 'patch_to')) for d in f.decorator_list): return []
    ann = f.args.args[0].annotation if f.args.args else None
    elts = ann.elts if isinstance(ann, ast.Tuple) else [ann] if ann is not None else []
    return [e.id for e in elts if isinstance(e, ast.Name)]

def exports_by_kind(source: str) -> list:
    "(name, kind) for the public names an exported cell defines; kind is 'def', 'member' or 'constant'."
    if not _re_export.search(source): return []
    try: tree = ast.parse('\n'.join(l for l in source.split('\n') if not l.lstrip().startswith(('%', '!'))))
    except SyntaxError: return []
    res = []
    for n in tree.body:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            cls = _patch_classes(n)
            res += [(f'{c}.{n.name}', 'def') for c in cls] if cls else [(n.name, 'def')] if _public(n.name) else []
        elif isinstance(n, ast.ClassDef) and _public(n.name):
            res.append((n.name, 'def'))
            res += [(f'{n.name}.{m.name}', 'member') for m in n.body
                    if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)) and _public(m.name)]
        elif isinstance(n, (ast.Assign, ast.AnnAssign)):
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target]):
                res += [(e.id, 'constant') for e in (t.elts if isinstance(t, ast.Tuple) else [t])
                        if isinstance(e, ast.Name) and _public(e.id)]
    return [(r, k) for r, k in res if _public(r.split('.')[-1])]

def cell_exports(source: str) -> list:
    "The names an exported cell defines that the documentation rule applies to (`Class.method` for methods)."
    return [n for n, _ in exports_by_kind(source)]

def _uses(source: str) -> set:
    "Names and attributes a code cell refers to, outside `show_doc(...)` calls."
    try: tree = ast.parse('\n'.join(l for l in source.split('\n') if not l.lstrip().startswith(('%', '!', '#|'))))
    except SyntaxError: return set(re.findall(r'\w+', source))
    res, skip = set(), set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Call) and getattr(n.func, 'id', '') == 'show_doc': skip.update(id(m) for m in ast.walk(n))
    for n in ast.walk(tree):
        if id(n) in skip: continue
        if isinstance(n, ast.Name): res.add(n.id)
        elif isinstance(n, ast.Attribute): res.add(n.attr)
    return res

def _prose(md: str) -> bool: return any(l.strip() and not l.lstrip().startswith('#') for l in md.split('\n'))

def undocumented(cells: list) -> list:
    "'name (why)' for each exported name of a notebook's cells lacking prose, or an example (or, for a constant, a mention)."
    code = [(i, _text(c.get('source'))) for i, c in enumerate(cells) if c['cell_type'] == 'code']
    exports = [(i, ns) for i, src in code if (ns := exports_by_kind(src))]
    shown = [(i, _uses(src)) for i, src in code if not _re_hide.search(src) and not cell_exports(src)
             and not re.fullmatch(r'\s*show_doc\([^\n]*\)\s*', src)]
    res = []
    for k, (i, names) in enumerate(exports):
        # the section: the prose introducing the export (just before it) or following it, up to the next export
        start = i
        while start > 0 and cells[start - 1]['cell_type'] == 'markdown': start -= 1
        end = exports[k + 1][0] if k + 1 < len(exports) else len(cells)
        prose = '\n'.join(_text(c.get('source')) for c in cells[start:end] if c['cell_type'] == 'markdown')
        used = set().union(set(), *(u for j, u in shown if j > i))   # a worked example anywhere after it
        defined = {n for n, _ in names}
        # members of a class are documented with their class; a patched method is its own name
        for n, kind in [(n, kind) for n, kind in names if '.' not in n or n.split('.')[0] not in defined]:
            ex = n.split('.')[-1] in used or (kind == 'constant' and f'`{n}`' in prose)
            if not (_prose(prose) and ex):
                why = 'no prose and no example' if not (_prose(prose) or ex) else 'no prose' if not _prose(prose) else 'no example uses it'
                res.append(f"{n} ({why})")
    return res

def title_cell_extras(cells: list) -> list:
    "Lines of a notebook's title cell (besides `# Title`, `> summary` and `- key: value`) that nbdev's docs lose."
    for c in cells:
        if c['cell_type'] != 'markdown': continue
        src = _text(c.get('source'))
        if not re.search(r'^#\s+\S', src, re.M): return []
        return [l for l in src.split('\n') if l.strip() and not re.match(r'^(#\s+\S|>\s|-\s+[\w-]+:\s)', l)]
    return []

def _settings(root: Path) -> dict:
    cp = configparser.ConfigParser(delimiters=['='], interpolation=None)
    cp.read(root / 'settings.ini', encoding='utf-8')
    return dict(cp['DEFAULT'])

def _modidx(path: Path) -> dict:
    "{symbol: (doc url, file)} from an nbdev `_modidx.py`, read without importing it."
    if not path.exists(): return {}
    tree = ast.parse(path.read_text(encoding='utf-8'))
    d = next((ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == 'd'), {})
    return {s: v for m in d.get('syms', {}).values() for s, v in m.items()}

def _module_of(cells: list) -> str | None:
    for c in cells:
        m = re.search(r'^\s*#\|\s*default_exp\s+(\S+)', _text(c.get('source')), re.M) if c['cell_type'] == 'code' else None
        if m: return m[1]

def undocumented_names(root: Path = ROOT) -> dict:
    "{notebook or module: ['name (why)', ...]} for every exported name of the project lacking documentation."
    cfg = _settings(root); nbs, lib = root / cfg.get('nbs_path', 'nbs'), cfg.get('lib_path', 'md_probe')
    res, seen = {}, set()
    for p in sorted(p for p in nbs.rglob('*.ipynb') if _visible(p, nbs)):
        cells = json.loads(p.read_text(encoding='utf-8'))['cells']
        mod = _module_of(cells)
        if mod: seen.update(f"{cfg.get('lib_name', lib)}.{mod}.{n}" for c in cells if c['cell_type'] == 'code'
                            for n in cell_exports(_text(c.get('source'))))
        if bad := undocumented(cells): res[str(p.relative_to(root))] = bad
    for sym in _modidx(root / lib / '_modidx.py'):
        parts = sym.split('.')
        if all(_public(x) for x in parts) and sym not in seen:
            res.setdefault(str(Path(lib) / (parts[1] + '.py')), []).append(
                f"{'.'.join(parts[2:])} (in the module index, exported by no notebook: run nbdev_export)")
    return res


# --------------------------------------------------------------------------------------- the checker's tests
def _c(kind, src): return {'cell_type': kind, 'metadata': {}, 'source': src}

def test_cell_exports():
    assert cell_exports('#| export\nPALETTE = ["red"]\n_private = 1\ndef overlay(image, labels): ...\nclass ProbeCache:\n'
                        '    def features(self, layer): ...\n    def _check(self): ...\n    def __repr__(self): ...\n'
                        '@patch\ndef save(self:ProbeCache, path): ...') == \
        ["PALETTE", "overlay", "ProbeCache", "ProbeCache.features", "ProbeCache.save"]
    assert cell_exports("#| export\ndef f(): ...\nclass C:\n    @property\n    def p(self): ...") == ["f", "C", "C.p"]
    assert cell_exports("def f(): ...") == []                                    # not exported
    assert cell_exports("#| exports\n@patch(as_prop=True)\ndef area(self:(Box, Circle)): ...") == ["Box.area", "Circle.area"]
    assert cell_exports("#| exec_doc\ndef build(): ...") == ["build"]            # a developer tool's cell (nbs/dev)
    assert exports_by_kind("#| export\nA, B = 1, 2\nx: int = 3") == [("A", "constant"), ("B", "constant"), ("x", "constant")]

def test_undocumented():
    cells = [_c('code', '#| export\ndef miou(conf): ...'), _c('markdown', 'Mean IoU over classes present.'), _c('code', 'miou(c)'),
             _c('code', '#| export\ndef accuracy(conf): ...'), _c('code', 'show_doc(accuracy)'),
             _c('code', '#| export\nclass Acc:\n    def update(self, x): ...'), _c('markdown', '## Accumulating'),
             _c('markdown', 'Sums matrices.'), _c('code', 'a = Acc()'), _c('code', '#| hide\na.update(1)')]
    assert undocumented(cells) == ['accuracy (no prose and no example)']     # a bare show_doc is no worked example
    assert undocumented(cells[:2] + [_c('code', 'x = 1')]) == ['miou (no example uses it)']
    assert undocumented(cells[:3]) == []
    assert undocumented([_c('code', '#| export\ndef f(): ...'), _c('code', '#| hide\nf()')]) == ['f (no prose and no example)']

def test_constants_named_in_prose():
    "A constant is documented by prose that names it; a function still needs a worked example."
    named = [_c('markdown', '`KNN` neighbours make the graph; `DENSE_MAX` points at most are clustered densely.'),
             _c('code', '#| export\nKNN, DENSE_MAX = 10, 4096\ndef cluster(x): ...')]
    assert undocumented(named) == ['cluster (no example uses it)']
    assert undocumented(named + [_c('code', 'cluster(1)')]) == []
    assert undocumented([_c('markdown', 'Neighbours of the graph.'), _c('code', '#| export\nKNN = 10')]) == ['KNN (no example uses it)']

def test_title_cell_extras():
    assert title_cell_extras([_c('markdown', '# Metrics\n\n> Scores.\n\nEvery number comes from one matrix.')]) == \
        ['Every number comes from one matrix.']
    assert title_cell_extras([_c('markdown', '# Metrics\n\n> Scores.\n- skip_exec: true'), _c('markdown', 'Prose.')]) == []

def test_undocumented_names_sees_a_stale_index(tmp_path):
    (tmp_path / "settings.ini").write_text("[DEFAULT]\nlib_name = lib\nlib_path = lib\nnbs_path = nbs\n")
    (tmp_path / "nbs").mkdir(); (tmp_path / "lib").mkdir()
    cells = [_c('code', '#| default_exp core'), _c('markdown', '# Core\n\n> The core.'), _c('markdown', 'Adds one.'),
             _c('code', '#| export\ndef add(x): ...'), _c('code', 'add(1)')]
    (tmp_path / "nbs" / "00_core.ipynb").write_text(json.dumps({"cells": cells}))
    (tmp_path / "lib" / "_modidx.py").write_text("d = {'syms': {'lib.core': {'lib.core.add': ('core.html#add', 'lib/core.py'), "
                                                 "'lib.core.gone': ('core.html#gone', 'lib/core.py')}}}\n")
    assert undocumented_names(tmp_path) == {"lib/core.py": ["gone (in the module index, exported by no notebook: run nbdev_export)"]}


# ---------------------------------------------------------------------------------------- the notebooks
def test_every_exported_name_documented():
    "Each exported name is followed, before the next export, by prose and a code cell that uses it."
    bad = undocumented_names(ROOT)
    assert bad == {}, "\n" + "\n".join(f"{nb}: {n}" for nb, names in bad.items() for n in names)

def test_title_cells_keep_their_prose():
    "nbdev turns the whole `# Title` cell into the page title and summary: prose there never reaches the docs."
    nbs = ROOT / "nbs"
    bad = {str(p.relative_to(ROOT)): title_cell_extras(json.loads(p.read_text())["cells"])
           for p in sorted(nbs.rglob("*.ipynb")) if _visible(p, nbs)}
    bad = {k: v for k, v in bad.items() if v}
    assert bad == {}, "\n" + "\n".join(f"{k}: {len(v)} line(s) dropped, from {v[0][:80]!r}" for k, v in bad.items())
