"""Pages made from the code: the hyperparameter tables of every registered model.

``` ```{recvae-hyperparameters} ``` ``` (in Markdown) or ``.. recvae-hyperparameters::`` writes,
for each model of ``recvae.models.model_names()``, the table its ``PARAMETERS`` declare: the
same rows ``__init__``, the flags, ``tune`` and ``run.json`` are made from, so the page cannot
drift from them."""

from __future__ import annotations

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def hyperparameter_rows(name: str) -> list[str]:
    """A reStructuredText list-table of one model's table."""
    from recvae.models import model_class

    cls = model_class(name)
    lines = [
        f".. list-table:: ``{name}`` (:class:`{cls.__module__}.{cls.__qualname__}`)",
        "   :header-rows: 1",
        "   :widths: 14 16 12 10 30 18",
        "",
        "   * - parameter",
        "     - flag and values",
        "     - default",
        "     - role",
        "     - what it does",
        "     - tuned (default range; grid)",
    ]
    for p in cls.PARAMETERS:
        kind = p.kind.expected + (" or none" if p.optional else "")
        tune = "no"
        if p.tune is not None:
            parts = []
            if p.tune.space:
                parts.append(f"``{p.tune_name}={p.tune.space}``")
            if p.tune.grid:
                parts.append("grid " + ", ".join(str(v) for v in p.tune.grid))
            tune = "; ".join(parts) or f"when asked (as ``{p.tune_name}``)"
        lines += [
            f"   * - ``{p.name}``",
            f"     - ``{p.option}``: {_cell(kind)}",
            f"     - ``{p.default!r}``",
            f"     - {p.role}",
            f"     - {_cell(p.help)}",
            f"     - {tune}",
        ]
    return lines


class Hyperparameters(SphinxDirective):
    has_content = False

    def run(self):
        from recvae.models import model_names

        lines: list[str] = []
        for name in model_names():
            lines += hyperparameter_rows(name) + [""]
        container = nodes.section()
        container.document = self.state.document
        self.state.nested_parse(StringList(lines, source="recvae-hyperparameters"), self.content_offset, container)
        return container.children


def setup(app):
    app.add_directive("recvae-hyperparameters", Hyperparameters)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
