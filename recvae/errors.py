"""Errors that carry the offending parameter as data, so the command line can name the flag
the user typed (through its parser) without reading the message text."""

from __future__ import annotations


class ParameterError(ValueError):
    """A bad value of one parameter. ``param``: its name in the library (``latent_dim``,
    ``item_col``, ``dataset``); ``message``: what was wrong, without the name; ``where``: the
    file (and line) it concerns, when there is one. ``names``: other parameters the message
    speaks of, written ``{cutoff}`` in it: the library shows their names, the command line the
    flags the user types (:meth:`text`), so no library message spells a flag."""

    def __init__(self, param: str, message: str, where: str | None = None, names: tuple[str, ...] = ()):
        self.param, self.template, self.where, self.names = param, message, where, tuple(names)
        self.message = self._filled(lambda name: name)
        super().__init__(f"{where + ': ' if where else ''}{param}: {self.message}")

    def _filled(self, spell) -> str:
        return self.template.format(**{n: spell(n) for n in self.names}) if self.names else self.template

    def text(self, spell) -> str:
        """The one line with every parameter spelt by ``spell`` (name -> how the caller writes it)."""
        return f"{self.where + ': ' if self.where else ''}{spell(self.param)}: {self._filled(spell)}"

    def renamed(self, param: str) -> "ParameterError":
        """The same error under the name a higher layer gives the parameter."""
        return type(self)(param, self.template, self.where, self.names)


def shown(value) -> str:
    """A value as a message shows it: numpy scalars as plain numbers (``nan``, not ``np.float64(nan)``)."""
    item = getattr(value, "item", None)
    if callable(item) and type(value).__module__ == "numpy":
        try:
            value = item()
        except (TypeError, ValueError):
            pass
    return repr(value)


class ColumnError(ParameterError, KeyError):
    """A column parameter (``user_col``, ...) names a column the table does not have."""

    __str__ = ValueError.__str__  # the message as it is, not quoted as a KeyError's key
