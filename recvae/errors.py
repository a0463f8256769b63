"""Errors that carry the offending parameter as data, so the command line can name the flag
the user typed (through its parser) without reading the message text."""

from __future__ import annotations


class ParameterError(ValueError):
    """A bad value of one parameter. ``param``: its name in the library (``latent_dim``,
    ``item_col``, ``name``); ``message``: what was wrong, without the name."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param, self.message = param, message
