"""Sphinx configuration of recvae's documentation (``bash scripts/docs.sh`` builds it).

Sphinx rather than MkDocs: the docstrings are written in reStructuredText with Sphinx roles
(``:func:``, ``:class:``), which autodoc renders as they are; the command-line reference is read
from the real argparse parser (sphinx-argparse); pages are Markdown (MyST), so the guides keep
the form they had in the README and the output checks of ``scripts/doc_outputs.py`` read them."""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))  # the checkout's package, not an installed copy
sys.path.insert(0, str(DOCS / "_ext"))

import recvae  # noqa: E402

project = "recvae"
author = "the recvae developers"
copyright = "2026, the recvae developers"
release = version = recvae.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinxarg.ext",
    "recvae_docs",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
myst_heading_anchors = 4
myst_enable_extensions = ["colon_fence", "deflist"]
suppress_warnings = ["myst.header", "myst.domains"]  # the included benchmark tables start at their own levels

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_numpy_docstring = True
napoleon_google_docstring = False

# the doctest builder (`scripts/docs.sh` runs it) also runs the docstrings' >>> examples
doctest_global_setup = "import numpy as np\nimport scipy.sparse as sp"

html_theme = "furo"
html_title = f"recvae {release}"
html_static_path: list[str] = []
html_last_updated_fmt = None
