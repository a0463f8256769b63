"""Pages made from the code: the hyperparameter tables of every registered model.

The ``recvae-hyperparameters`` directive (in a Markdown page: a ``{recvae-hyperparameters}``
fence) writes, for each model of ``recvae.models.model_names()``, the table its ``PARAMETERS``
declare: the rows ``__init__``, the flags, ``tune`` and ``run.json`` are made from, so the page
cannot drift from them."""

from __future__ import annotations

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _code(text) -> str:
    return f"``{_cell(text)}``" if "`" in str(text) else f"`{_cell(text)}`"


def hyperparameter_table(name: str) -> list[str]:
    """One model's table, as Markdown (the directive's page is MyST)."""
    from recvae.models import model_class

    cls = model_class(name)
    lines = [
        f"## `{name}`",
        "",
        f"{{class}}`{cls.__module__}.{cls.__qualname__}`; `recvae train --model {name}`.",
        "",
        "| parameter | flag: values | default | role | what it does | tuned: default range; grid |",
        "|---|---|---|---|---|---|",
    ]
    for p in cls.PARAMETERS:
        kind = p.kind.expected + (" or none" if p.optional else "")
        tune = "no"
        if p.tune is not None:
            parts = []
            if p.tune.space:
                parts.append(_code(f"{p.tune_name}={p.tune.space}"))
            if p.tune.grid:
                parts.append("grid " + ", ".join(str(v) for v in p.tune.grid))
            tune = "; ".join(parts) or f"when asked (as {_code(p.tune_name)})"
        lines.append(f"| {_code(p.name)} | {_code(p.option)}: {_cell(kind)} | {_code(repr(p.default))} | {p.role} "
                     f"| {_cell(p.help)} | {tune} |")
    return lines + [""]


class Hyperparameters(SphinxDirective):
    has_content = False

    def run(self):
        from recvae.models import model_names

        lines: list[str] = []
        for name in model_names():
            lines += hyperparameter_table(name)
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source="recvae-hyperparameters"), self.content_offset, container,
                                match_titles=True)
        return container.children


def setup(app):
    app.add_directive("recvae-hyperparameters", Hyperparameters)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
