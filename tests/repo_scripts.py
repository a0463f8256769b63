"""The repository's scripts (``benchmarks/``, ``scripts/``) imported as modules by the tests, one way."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_script(relative: str, name: str | None = None, monkeypatch=None):
    """The script at ``REPO/relative`` imported as the module ``name`` (default: its stem) and
    registered in ``sys.modules`` (dataclasses look their module up there), its folder on
    ``sys.path`` (the benchmarks import each other). Through ``monkeypatch`` when given, so both
    end with the test; ``main()`` is not run."""
    path = REPO / relative
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    if monkeypatch is not None:
        monkeypatch.syspath_prepend(str(path.parent))
        monkeypatch.setitem(sys.modules, name, module)
    else:
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
