"""The documentation site: it builds with every warning an error, its examples run, a headless
browser opens it and every internal link and anchor resolves (scripts/check_site.py), and the
README stays a README (a screen or two, linking into the site)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from repo_scripts import load_script
from test_doc_outputs import ro

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def _load(name: str):
    return load_script(f"scripts/{name}.py")


check_site = _load("check_site")
doc_outputs = ro  # scripts/doc_outputs.py, loaded once by its own tests


def _sphinx(builder: str, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-q", "-b", builder, str(DOCS), str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("sphinx", reason="the docs extra is not installed (scripts/setup.sh installs it)")
    out = tmp_path_factory.mktemp("site")
    r = _sphinx("html", out / "html")
    assert r.returncode == 0, f"the site does not build without warnings:\n{r.stderr[-4000:]}"
    return out / "html"


@pytest.mark.slow
def test_the_site_builds_without_a_warning_and_has_its_pages(site):
    for page in ("index", "quickstart", "install", "movielens", "paper", "benchmarks", "changelog",
                 "guide/tuning", "guide/refit-and-serve", "guide/recommendations", "guide/distributed",
                 "reference/cli", "reference/hyperparameters", "reference/api/models"):
        assert (site / f"{page}.html").is_file(), page
    api = (site / "reference/api/models.html").read_text()
    for name in ("recvae.models.MultVAE", "recvae.models.EASE", "recvae.models.RecVAE"):
        assert f'id="{name}"' in api, name  # autodoc documented the class
    cli = (site / "reference/cli.html").read_text()
    assert "--anneal-cap" in cli and "--all-users" in cli  # a hyperparameter flag and a command's own
    tables = (site / "reference/hyperparameters.html").read_text()
    from recvae.models import MultVAE, model_names

    assert tables.count("<table") == len(model_names())  # one rendered table per model
    for name in model_names():
        assert f'<h2><code class="docutils literal notranslate"><span class="pre">{name}</span>' in tables, name
    assert all(f'<span class="pre">{p.option}</span>' in tables for p in MultVAE.PARAMETERS)  # a row each


def test_the_docstring_examples_run():
    """The docstrings' >>> examples (the API reference shows them), run as doctests with the
    names `scripts/docs.sh`'s doctest builder gives them (numpy as np, scipy.sparse as sp)."""
    import doctest
    import importlib
    import pkgutil

    import numpy as np
    import scipy.sparse as sp

    import recvae

    attempted = 0
    for info in pkgutil.walk_packages(recvae.__path__, "recvae."):
        spec = importlib.util.find_spec(info.name)
        if spec is None or spec.origin is None or ">>>" not in Path(spec.origin).read_text():
            continue
        module = importlib.import_module(info.name)
        result = doctest.testmod(module, extraglobs={"np": np, "sp": sp}, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, f"{info.name}: {result.failed} docstring example(s) fail (run it with -s to see)"
        attempted += result.attempted
    assert attempted >= 20  # the metrics' hand-computed examples, at least


@pytest.mark.slow
def test_a_headless_browser_opens_the_site_and_every_link_resolves(site):
    browser = check_site.chromium()
    if browser is None:
        pytest.skip("no Chromium (Debian package chromium; .ci/run installs it)")
    assert check_site.check_links(site) == []
    assert check_site.check_in_browser(site, browser) == []


def test_the_link_check_finds_a_missing_page_and_a_missing_anchor(tmp_path):
    (tmp_path / "index.html").write_text(
        '<html><body><h1 id="top">x</h1><a href="#top">ok</a><a href="a.html#here">ok</a>'
        '<a href="gone.html">missing</a><a href="a.html#nowhere">bad anchor</a>'
        '<a href="https://example.org/x.html">external</a><link href="_static/s.css?v=1"></body></html>'
    )
    (tmp_path / "a.html").write_text('<html><body><p id="here">a</p></body></html>')
    (tmp_path / "_static").mkdir()
    (tmp_path / "_static" / "s.css").write_text("")
    assert check_site.check_links(tmp_path) == [
        "index.html: link 'gone.html': no such page",
        "index.html: link 'a.html#nowhere': no anchor 'nowhere' in a.html",
    ]


@pytest.mark.slow
def test_the_browser_check_fails_on_a_page_that_is_not_there(tmp_path):
    browser = check_site.chromium()
    if browser is None:
        pytest.skip("no Chromium (Debian package chromium; .ci/run installs it)")
    (tmp_path / "index.html").write_text('<html><head><title>t</title></head><body><a href="#gone">x</a>'
                                         "<p>Quickstart</p></body></html>")
    problems = check_site.check_in_browser(tmp_path, browser, {"index.html": "Quickstart", "missing.html": "x"})
    assert problems[0] == "index.html: link '#gone': no such anchor in the rendered page"
    assert problems[1] == "missing.html: the server answered an error page"
    assert len(problems) == 2


# ---- every Python example of the pages runs ------------------------------------------------


def python_blocks(page: Path) -> list[str]:
    lines = page.read_text().splitlines()
    return ["\n".join(lines[s + 1:e]) for s, e in doc_outputs._fences(lines) if lines[s].strip() == "```python"]


# the README's example is the library guide's first, run there
PYTHON_PAGES = [p for p in doc_outputs.pages() if python_blocks(p) and p.name != "README.md"]


def test_the_pages_with_python_examples_are_found():
    names = {doc_outputs.page_name(p) for p in PYTHON_PAGES}
    assert {"docs/quickstart.md", "docs/guide/library.md"} <= names, names


def test_the_readmes_example_is_the_library_guides_first():
    assert python_blocks(REPO / "README.md") == python_blocks(DOCS / "guide" / "library.md")[:1]


@pytest.mark.slow
@pytest.mark.parametrize("page", PYTHON_PAGES, ids=[doc_outputs.page_name(p) for p in PYTHON_PAGES])
def test_each_pages_python_examples_run(page, request):
    """A page's Python blocks, in order, as one script, from a directory that looks like the
    repository root (``docs/examples/shop.csv`` and ``data`` resolve); a page that loads MovieLens
    needs the real files."""
    code = "\n\n".join(python_blocks(page))
    data = None
    if "load_movielens" in code:
        data = request.getfixturevalue("real_data_dir")
    with doc_outputs.scratch(data) as work:
        env = doc_outputs.child_env()
        if data is not None:
            env["RECVAE_DATA"] = str(data)
        r = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{doc_outputs.page_name(page)}: its Python examples fail:\n{r.stderr[-3000:]}"


# ---- the README ----------------------------------------------------------------------------


def test_the_readme_is_a_readme_and_its_links_lead_somewhere():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) < 200
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert any(link.startswith("docs/quickstart.md") for link in links)
    missing = [link for link in links if not link.startswith("http") and not (REPO / link).exists()]
    assert not missing, missing


def test_every_benchmark_table_has_a_page():
    results = sorted(p.stem for p in (REPO / "benchmarks" / "results").glob("*.md"))
    pages = sorted(p.stem for p in (DOCS / "results").glob("*.md"))
    assert results == pages
    toc = (DOCS / "benchmarks.md").read_text()
    assert all(f"results/{name}\n" in toc for name in results)


def test_the_docs_build_command_is_one_script():
    script = (REPO / "scripts" / "docs.sh").read_text()
    assert "-W" in script and "-b html" in script and "-b doctest" in script
    assert "doctest_global_setup" in (DOCS / "conf.py").read_text()  # np and sp, as the test above
    assert os.access(REPO / "scripts" / "docs.sh", os.X_OK)
