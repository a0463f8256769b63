"""The family of errors a user can cause: bad arguments, bad or damaged input files, wrong
settings. Each carries what it concerns as data (the parameter, the file and line), so the
command line can name the flag the user typed (through its parser) without reading the
message text, and tell a user's error (one line) from a bug (a traceback)."""

from __future__ import annotations

import re


class RecvaeError(Exception):
    """Base of every error a user can cause. ``param``: the parameter it concerns, by its name
    in the library (``latent_dim``, ``item_col``), when there is one; ``given``: the value shown
    after that name, for a path (``out runs/a: exists and is not a directory``); ``where``: the
    file (and line) it concerns, when there is one; ``names``: parameters the message (or ``where``)
    speaks of, written ``{cutoff}`` in it: the library shows their names, the command line the flags the
    user types (:meth:`text`), so no library message spells a flag."""

    def __init__(self, message: str = "", *, param: str | None = None, where=None, names: tuple[str, ...] = (),
                 given=None):
        self.param, self.template, self.names = param, str(message), tuple(names)
        self.where = None if where is None else str(where)
        self.given = None if given is None else str(given)
        self.message = self._filled(lambda name: name)
        super().__init__(self.text(lambda name: name))

    def _filled(self, spell, text: str | None = None) -> str:
        # only the listed names: a value quoted in the message may hold braces of its own
        text = self.template if text is None else text
        if not self.names:
            return text
        return re.sub(r"\{(\w+)\}", lambda m: spell(m[1]) if m[1] in self.names else m[0], text)

    def __reduce__(self):
        # rebuilt from its data whatever a subclass's __init__ takes (pickle, multiprocessing)
        return _rebuilt, (type(self), self.args, self.__dict__)

    def located(self, where) -> "RecvaeError":
        """The same error about ``where`` (the file a higher layer read the data from), when it
        names no place of its own; else itself."""
        if self.where is not None:
            return self
        error = _rebuilt(type(self), self.args, {**self.__dict__, "where": str(where)})
        error.args = (error.text(lambda name: name),)
        return error

    def text(self, spell, untyped=None) -> str:
        """The one line with every parameter spelt by ``spell`` (name -> how the caller writes it).
        ``untyped`` (name -> a note, or None): for a parameter the user did not give, a note
        (``the default, as --user-col was not given``); the message then does not start with
        that parameter, as if the user had given it a bad value, but ends with the note (unless
        it names the parameter itself, as the remedy: ``give {sep} ';'``)."""
        head = f"{self._filled(spell, self.where)}: " if self.where else ""
        note = untyped(self.param) if untyped is not None and self.param and self.given is None else None
        if self.param and note is None:
            head += spell(self.param) + (f" {self.given}: " if self.given is not None else ": ")
        return head + self._filled(spell) + (f" ({note})" if note and self.param not in self.names else "")


def _rebuilt(cls, args, state):
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


class ParameterError(RecvaeError, ValueError):
    """A bad value of one parameter. ``param``: its name in the library (``latent_dim``,
    ``item_col``, ``dataset``); ``message``: what was wrong, without the name; ``where``: the
    file (and line) it concerns, when there is one; ``names`` and ``given``: see :class:`RecvaeError`."""

    def __init__(self, param: str, message: str, where=None, names: tuple[str, ...] = (), given=None):
        super().__init__(message, param=param, where=where, names=names, given=given)

    def renamed(self, param: str) -> "ParameterError":
        """The same error under the name a higher layer gives the parameter."""
        return type(self)(param, self.template, self.where, self.names, self.given)


class InputError(RecvaeError, ValueError):
    """Bad content of an input: a file that is damaged, of another format or another run, or
    data that cannot be used. ``where``: the file (and line) it concerns; ``message``: what was
    wrong and what was expected; ``names``: see :class:`RecvaeError`."""

    def __init__(self, where, message: str, names: tuple[str, ...] = ()):
        super().__init__(message, where=where, names=names)


def shown(value) -> str:
    """A value as a message shows it: numpy scalars as plain numbers (``nan``, not ``np.float64(nan)``)."""
    item = getattr(value, "item", None)
    if callable(item) and type(value).__module__ == "numpy":
        try:
            value = item()
        except (TypeError, ValueError):
            pass
    return repr(value)


class NotFittedError(RecvaeError, RuntimeError):
    """A model used before ``fit`` (or ``load``). Still a ``RuntimeError`` for the callers that
    catch one. scikit-learn's ``check_is_fitted(model)`` raises scikit-learn's own
    ``NotFittedError`` (the models tell it whether they are fitted)."""


class ColumnError(ParameterError, KeyError):
    """A column parameter (``user_col``, ...) names a column the table does not have."""

    __str__ = ValueError.__str__  # the message as it is, not quoted as a KeyError's key


class FileSystemError(RecvaeError, OSError):
    """A file recvae cannot write or read for a reason of the machine's: a full disk, an exceeded
    quota, a read-only file system. ``where``: the file; ``errno``: the cause's, when known."""

    def __init__(self, where, message: str, errno: int | None = None, names: tuple[str, ...] = ()):
        super().__init__(message, where=where, names=names)
        if errno is not None:
            self.errno = errno


class MissingPathError(RecvaeError, FileNotFoundError):
    """A path parameter (``run_dir``, ``out``) names nothing usable: not there, or not what it
    must be (a run directory). Still a ``FileNotFoundError`` for the callers that catch one."""

    def __init__(self, param: str, message: str, given=None, names: tuple[str, ...] = ()):
        super().__init__(message, param=param, given=given, names=names)


class UnwritablePathError(RecvaeError, PermissionError):
    """A path parameter (``out``, ``output``) names a place this process may not write."""

    def __init__(self, param: str, message: str, given=None, names: tuple[str, ...] = ()):
        super().__init__(message, param=param, given=given, names=names)
