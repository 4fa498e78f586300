"""Sphinx configuration of md_probe's offline documentation site.

`tools/build-docs` (docsite.build.build_site in tools/docsite/, documented in nbs/dev/00_docs_site.ipynb) copies
this file into the generated Sphinx source folder next to `site.json`, which holds what it learned from
settings.ini and the notebooks. Nothing here reaches the network: every script a page loads is in `_static/`.
"""
import json, sys
from pathlib import Path

site = json.loads((Path(__file__).parent / "site.json").read_text(encoding="utf-8"))
for p in reversed(site["sys_path"]):  # the library (for autodoc) and tools/ (docsite, for the hooks below)
    if p not in sys.path: sys.path.insert(0, p)

project = site["title"]
author = site["author"]
copyright = site["copyright"]
version = release = site["version"]

extensions = ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.viewcode", "sphinx.ext.mathjax"]
root_doc = "index"
exclude_patterns = ["_build", "**.ipynb_checkpoints", "site.json"]
suppress_warnings = ["myst.header"]  # show_doc entries are `###` wherever they appear, as in Quarto

# Notebooks: render the saved outputs, never execute (the test suite runs every notebook once).
nb_execution_mode = "off"
nb_render_markdown_format = "myst"
nb_merge_streams = True
myst_enable_extensions = ["colon_fence", "dollarmath", "amsmath", "html_image", "deflist"]

# Widget snapshots: the state saved in a notebook is rendered by these scripts, all from _static/
# (require.js and @jupyter-widgets/html-manager from the npm registry, anywidget's front end from its wheel).
nb_ipywidgets_js = {
    "npm/require.js": {},
    "widgets-config.js": {},
    "npm/html-manager/embed-amd.js": {},
}
mathjax_path = "mathjax/tex-chtml.js"  # MathJax 3 from the npm registry, relative to _static/

html_theme = "sphinx_book_theme"
html_title = site["title"]
html_static_path = ["_static"]
html_css_files = ["md_probe.css"]
html_copy_source = False
html_show_sourcelink = False
html_context = {"default_mode": "light"}  # without it the theme logs a console error on a reader's first visit
html_theme_options = {
    "repository_url": site["git_url"],
    "repository_branch": site["branch"],
    "path_to_docs": "nbs",
    "use_repository_button": True,
    "use_download_button": False,
    "home_page_in_toc": True,
    "show_navbar_depth": 1,
    "show_toc_level": 2,
    "navigation_with_keys": False,
}

autodoc_default_options = {"member-order": "bysource", "no-value": True}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True


def _plotly(app, pagename, templatename, context, doctree):
    "Pages with plotly figures load plotly.js, before require.js (priority), so it defines the global `Plotly`."
    if "plotly-graph-div" in (context.get("body") or ""):
        app.add_js_file("plotly.min.js", priority=200)


def _docstring(app, what, name, obj, options, lines):
    "nbdev docstrings are markdown; each entry also links to the page that explains it with examples."
    from docsite.build import md_docstring_to_rst
    if what == "data" and getattr(obj, "__doc__", None) == getattr(type(obj), "__doc__", None):
        lines[:] = []  # a constant has no docstring of its own: not its type's (dict's, tuple's) docstring
    lines[:] = md_docstring_to_rst(lines)
    link = site["doc_links"].get(name)
    if link and what in ("function", "class", "method", "property", "data", "attribute"):
        lines += ["", f"`Explained with examples <{link}>`__"]


def setup(app):
    app.connect("html-page-context", _plotly)
    app.connect("autodoc-process-docstring", _docstring)
