"""Checkpoints of a library-level fit, kept the way `recvae train` keeps them: in a run directory."""

from __future__ import annotations

from recvae.rundir import CHECKPOINT_FILE, RunDir


def ckpt(path):
    """The callback that checkpoints each epoch into ``path``."""
    return RunDir(path).checkpoints()


def resume(path):
    """The checkpoint in ``path`` to resume from; None when there is none."""
    run = RunDir(path)
    return run.read_checkpoint() if run.file(CHECKPOINT_FILE).is_file() else None
