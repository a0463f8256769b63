"""The training loop the neural estimators share: epochs, updates, validation, early stopping,
the checkpointable state and resume. It reads and writes no file: what happens after an epoch
(a checkpoint, a history file) is a callback handed in by the caller (:mod:`recvae.rundir`
provides the run directory's), and validation is a function handed in (or built here from
held-out users with :mod:`recvae.metrics`).

Where the time goes and why it is fast on CPU: :mod:`recvae.models.sparse_layers` and
:mod:`recvae.models.output_layer`.
"""

from __future__ import annotations

import json
import logging
import math
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import scipy.sparse as sp
import torch
from torch.autograd.graph import increment_version

from recvae import distributed
from recvae.errors import RecvaeError
from recvae.models import item_parallel
from recvae.models.device import resolve_device, resolve_precision
from recvae.models.params import json_params
from recvae.models.sparse_layers import BatchPart, SparseBatch
from recvae.progress import bar, interactive, say

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT_VERSION = 1  # of a checkpoint's payload; a saved model's is models.base.FORMAT_VERSION
VALIDATION_METRIC = "val_ndcg@100"
HISTORY_FIELDS = ["epoch", "step", "loss", "nll", "kl", "beta", "l2", VALIDATION_METRIC, "seconds", "val_seconds"]


class NonFiniteLossError(RecvaeError, FloatingPointError):
    """The training loss became NaN or infinite; says at which epoch and update.

    ``epoch``/``update``: where it happened (1-based). ``kept_epoch``: the epoch whose weights the
    estimator kept (the best validation epoch, else the last finished one); the estimator is then
    fitted as if training had ended there. None when no epoch finished: nothing was learnt and
    the estimator is not fitted.
    """

    def __init__(self, message: str, epoch: int, update: int, kept_epoch: int | None = None):
        super().__init__(message)
        self.epoch, self.update, self.kept_epoch = epoch, update, kept_epoch


class CheckpointMismatch(RecvaeError, ValueError):
    """A checkpoint handed to ``fit(resume_from=...)`` belongs to another model, data or settings."""


class Callback(Protocol):
    def on_epoch_end(self, epoch: "EpochEnd") -> None: ...


@dataclass
class EpochEnd:
    """What a callback sees after each finished epoch: the estimator, the epoch's history row,
    the whole history so far, and :meth:`checkpoint`, the state a resume needs (built on demand)."""

    estimator: object
    row: dict
    history: list
    checkpoint: Callable[[], dict]
    is_main: bool = True  # False on the other processes of a data-parallel run: they write nothing


def derived_seed(*key: int) -> int:
    # shift a Python int: numpy 1.x refuses uint64 >> int (no common integer type)
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0]) >> 1


def fingerprint(X: sp.csr_matrix) -> int:
    crc = zlib.crc32(np.ascontiguousarray(X.indptr).tobytes())
    return zlib.crc32(np.ascontiguousarray(X.indices).tobytes(), crc)


def make_optimizer(network, lr: float = 1e-3, lam: float = 0.0, apart: tuple[dict, ...] = ()) -> torch.optim.Adam:
    """Adam as in the notebook; ``lam * sum_W ||W||^2`` enters as coupled weight decay ``2*lam``
    on the weight matrices (biases are not penalised). Fused: one kernel over all parameters.
    ``apart``: groups of their own (``params``, ``lr``, and ``lr_param``: the hyperparameter a
    resume reads that lr from), undecayed; their parameters leave the two groups."""
    own = {id(p) for g in apart for p in g["params"]}
    weights = {id(p) for p in network.weight_matrices()}
    groups = [
        {"params": [p for p in network.parameters() if id(p) in weights], "weight_decay": 2.0 * lam},
        {"params": [p for p in network.parameters() if id(p) not in weights | own], "weight_decay": 0.0},
        *({"weight_decay": 0.0, **g} for g in apart),
    ]
    return torch.optim.Adam(groups, lr=lr, fused=True)


def training_step(network, optimizer: torch.optim.Optimizer, batch: SparseBatch, beta: float,
                  generator: torch.Generator | None, bf16: bool = False,
                  kl_weights: torch.Tensor | None = None) -> np.ndarray | None:
    """One update on ``batch``; returns the batch's (loss, nll, kl). When any is not finite the
    update is skipped (the weights stay as they were) and the caller decides what to do.

    Data parallel (``batch.part`` set): ``batch`` is this process's share of a global batch;
    its loss is scaled to (its users' sum) / (global batch size) and the gradients summed over
    the processes, so the update is the global batch's mean whatever the split; the returned
    values are the global batch's.
    """
    return update_step(optimizer, lambda: network.loss(batch, beta=beta, generator=generator, kl_weights=kl_weights),
                       batch.device.type, bf16, part=batch.part, n_rows=batch.n_rows,
                       parameters=network.parameters)


def update_step(optimizer: torch.optim.Optimizer, compute_loss, device_type: str, bf16: bool = False,
                part: BatchPart | None = None, n_rows: int | None = None, parameters=None) -> np.ndarray:
    """One update of ``optimizer``'s parameters on the ``LossTerms`` that ``compute_loss()`` returns
    (run under bf16 autocast when ``bf16``); returns (loss, nll, kl) and skips the update when any
    is not finite. With ``part`` (data parallel) the values are reduced over the processes and
    the gradients of ``parameters()`` summed (see :func:`training_step`)."""
    optimizer.zero_grad(set_to_none=True)  # lets the sparse layers overwrite their kept buffers
    terms = None
    values = np.zeros(3)  # an empty share (only in an epoch's last, short batch) adds nothing
    if part is None or n_rows:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            terms = compute_loss()
        values = torch.stack([terms.loss.detach(), terms.nll.detach(), terms.kl.detach()]).float().cpu().numpy()
    if part is not None:  # every process sees the same values and takes the same decision
        values = distributed.allreduce_sum(values * n_rows) / part.n_rows
    if not np.isfinite(values).all():
        return values
    if terms is not None:
        (terms.loss if part is None else terms.loss * (n_rows / part.n_rows)).backward()
    if part is not None:
        distributed.allreduce_gradients(parameters())
    optimizer.step()
    # fused Adam writes the weights in place without advancing their version counters: advance
    # them, so what is kept against a version (Workspace.cast's scoring copies) sees the update
    increment_version([p for group in optimizer.param_groups for p in group["params"]])
    return values


def batch_of(X: sp.csr_matrix, rows: np.ndarray, device, group: distributed.Group) -> SparseBatch:
    """The training batch of the users ``rows`` (global batch order); with several processes,
    this process's contiguous share of them, marked with its place in the global batch."""
    if not group.parallel:
        return SparseBatch.from_csr(X[rows], device)
    start, stop = distributed.shard_bounds(len(rows), group.rank, group.world_size)
    batch = SparseBatch.from_csr(X[rows[start:stop]], device)
    batch.part = BatchPart.of(X.indptr[rows + 1] - X.indptr[rows], start, stop)
    return batch


def epoch_line(row: dict, epochs: int, variational: bool = True) -> str:
    """One plain line for a finished epoch (logs): epoch, loss, validation metric, beta, seconds."""
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row['loss']:.4f}"]
    if row.get(VALIDATION_METRIC) is not None:
        parts.append(f"validation NDCG@100 {row[VALIDATION_METRIC]:.4f}")
    if variational:
        parts.append(f"beta {row['beta']:.4f}")
    seconds = row["seconds"] + (row.get("val_seconds") or 0.0)
    return ", ".join(parts) + f" ({seconds:.1f} s)"


def _clone(network) -> dict:
    return {k: v.detach().clone() for k, v in network.state_dict().items()}


# -- the loop --------------------------------------------------------------------------------

class TrainingLoop:
    """One ``fit`` of a neural estimator: the seed, the sampling generator, precision, device,
    the checkpointable state (epoch, step, best epoch, history, ...) and the epochs.

    The estimator provides ``_build_network``, ``_make_optimizer``, ``_train_epoch`` (the
    updates of one epoch, through :meth:`pass_over_users`), ``_l2_penalty``, ``_json_params``,
    ``_resume_keys()`` and ``_variational``.
    ``parallel="items"`` (several processes): see :mod:`recvae.models.item_parallel`.
    """

    def __init__(self, estimator, X: sp.csr_matrix, validate, callbacks=(), resume_from: dict | None = None,
                 show_progress: bool = True):
        self.est, self.X, self.validate = estimator, X, validate
        self.show_progress = bool(show_progress)
        self.callbacks = list(callbacks or ())
        self.device = resolve_device(estimator.device)
        self.group = distributed.current()
        ckpt = resume_from
        if ckpt is not None:
            self._check_checkpoint(ckpt)
            seed = int(ckpt["seed"])
        elif estimator.random_state is not None:
            seed = int(estimator.random_state)
        else:
            seed = distributed.broadcast_int(int(np.random.SeedSequence().entropy % (2**62)))
        self.seed = seed
        init_gen = torch.Generator().manual_seed(derived_seed(seed, 0xC0FFEE))
        self.shard = item_parallel.shard_for(estimator, X.shape[1], self.group)  # None: every item here
        self.batch_group = self.group if self.shard is None else distributed.Group()  # items: whole batches
        sharded = {} if self.shard is None else {"shard": self.shard}  # RecVAE's and the hybrid's take none
        self.network = estimator._build_network(X.shape[1], init_gen, **sharded).to(self.device)
        self.optimizer = estimator._make_optimizer(self.network)
        self.state = dict(epoch=0, step=0, history=[], best_state=None, best_epoch=None,
                          best_score=-math.inf, bad_epochs=0, stopped=False)
        if ckpt is not None:
            # a checkpoint holds the full model (item-parallel: this process's rows of it)
            model_state, optimizer_state, best_state = item_parallel.resumed_states(ckpt, self.optimizer,
                                                                                  self.network, self.shard)
            self.network.load_state_dict(model_state)
            self.optimizer.load_state_dict(optimizer_state)
            for param_group in self.optimizer.param_groups:  # the optimizer's state carries the old lr
                # a group may name the hyperparameter that sets its lr (the hybrid's weight w)
                param_group["lr"] = getattr(estimator, param_group.get("lr_param", "lr"))
            self.state.update({k: ckpt[k] for k in self.state}, best_state=best_state)
            if self.state["best_state"] is None and self.state["best_epoch"] == self.state["epoch"]:
                self.state["best_state"] = _clone(self.network)  # not stored twice: the best epoch was the last
            logger.info("resumed after epoch %d (update %d)", self.state["epoch"], self.state["step"])
            # several processes resume only from one checkpoint they all see (a shared run directory)
            distributed.check_same(self.state["epoch"], "resume: the checkpoint's epoch")
        self.gen = torch.Generator(device=self.device)
        self.precision = resolve_precision(estimator.precision, self.device)
        self.bf16 = self.precision == "bf16"
        # the last finished epoch's weights when there is no validation: what a later divergence keeps
        self.last_state = _clone(self.network) if validate is None and self.state["epoch"] else None
        self.fingerprint = fingerprint(X)

    # -- checkpoint --------------------------------------------------------------------------
    def checkpoint(self) -> dict:
        """The state a resume needs after the epoch just finished (tensors shared, not copied).
        Item-parallel: a collective gathering the full state into rank 0 (the others' payloads
        hold None for the item rows), called by every process after each epoch when there are callbacks."""
        state, X = self.state, self.X
        model_state, optimizer_state, best_state = item_parallel.checkpoint_states(
            self.network, self.optimizer, state["best_state"] if state["best_epoch"] != state["epoch"] else None,
            self.shard)
        payload = {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "class": type(self.est).__name__,
            "params": json.dumps(self.est._json_params()),
            "seed": int(self.seed),
            "n_users": int(X.shape[0]),
            "n_items": int(X.shape[1]),
            "nnz": int(X.nnz),
            "fingerprint": int(self.fingerprint),
            "model": model_state,
            "optimizer": optimizer_state,
            **state,
            # None when the best epoch is the last: the same tensors as "model", a quarter of the file saved
            "best_state": best_state,
        }
        return payload

    def _check_checkpoint(self, ckpt: dict) -> None:
        est, X = self.est, self.X
        if not isinstance(ckpt, dict) or not {"class", "format_version", "params", "fingerprint"} <= set(ckpt):
            raise CheckpointMismatch("is not a recvae checkpoint (no class, format_version, params or fingerprint)")
        if ckpt["format_version"] != CHECKPOINT_FORMAT_VERSION or ckpt["class"] != type(est).__name__:
            raise CheckpointMismatch(f"holds a {ckpt['class']} checkpoint (format {ckpt['format_version']}), "
                                     f"expected {type(est).__name__} format {CHECKPOINT_FORMAT_VERSION}")
        if (ckpt["n_users"], ckpt["n_items"], ckpt["nnz"]) != (X.shape[0], X.shape[1], X.nnz) \
                or ckpt["fingerprint"] != fingerprint(X):
            raise CheckpointMismatch(f"was trained on other data (shape {ckpt['n_users']}x{ckpt['n_items']}, "
                                     f"{ckpt['nnz']} interactions; now {X.shape[0]}x{X.shape[1]}, {X.nnz})")
        now = est._json_params()
        # checkpoints from before an option (kl_weighting, softmax, ...) ran its default
        saved = {**json_params(type(est).PARAMETERS, {}), **json.loads(ckpt["params"])}
        diff = [k for k in est._resume_keys() if saved.get(k) != now.get(k)]
        if diff:
            detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}" for k in diff)
            raise CheckpointMismatch(f"hyperparameters differ ({detail})")

    # -- epochs ------------------------------------------------------------------------------
    def run(self) -> None:
        """Train the remaining epochs; the estimator is fitted when it returns."""
        est, state, network = self.est, self.state, self.network
        # learned attributes are set before the loop: validation scores through est.score
        est.module_ = network
        est.n_items_ = self.X.shape[1]
        est.device_ = self.device
        est.seed_ = self.seed
        est.precision_ = self.precision
        epochs = bar(range(state["epoch"], int(est.epochs)), show=self.show_progress, desc=type(est).__name__,
                     initial=state["epoch"], total=int(est.epochs))
        speak = self.show_progress and self.group.is_main  # one process's lines under torchrun
        plain = speak and not interactive()  # a log file: one line per epoch, no bar
        for epoch in epochs:
            if state["stopped"]:
                break
            t0 = time.perf_counter()
            network.train()
            self.gen.manual_seed(derived_seed(self.seed, epoch, 1))
            means, beta = est._train_epoch(network, self.optimizer, self.X, epoch, self)
            network.workspace.clear()  # buffers are sized by the training batch; free them for scoring
            row = {"epoch": epoch + 1, "step": state["step"], "loss": float(means[0]), "nll": float(means[1]),
                   "kl": float(means[2]), "beta": float(beta), "l2": est._l2_penalty(network),
                   VALIDATION_METRIC: None, "seconds": time.perf_counter() - t0, "val_seconds": None}
            if self.validate is not None:
                t1 = time.perf_counter()
                score = float(self.validate(est))
                row[VALIDATION_METRIC], row["val_seconds"] = score, time.perf_counter() - t1
                if score > state["best_score"]:
                    state.update(best_score=score, best_epoch=epoch + 1, bad_epochs=0, best_state=_clone(network))
                else:
                    state["bad_epochs"] += 1
                if est.patience is not None and state["bad_epochs"] >= est.patience:
                    state["stopped"] = True
            state["epoch"] = epoch + 1
            state["history"].append(row)
            if self.validate is None:  # kept in case a later epoch diverges (with validation, best_state is)
                self.last_state = _clone(network)
            logger.debug("epoch %d: loss %.4f nll %.4f kl %.4f beta %.4f %s %s (%.1fs)", epoch + 1, row["loss"],
                         row["nll"], row["kl"], row["beta"], VALIDATION_METRIC, row[VALIDATION_METRIC], row["seconds"])
            if self.show_progress:
                epochs.set_postfix(loss=f"{row['loss']:.2f}", ndcg=row[VALIDATION_METRIC], refresh=False)
            if plain:
                say(logger, True, "%s", epoch_line(row, int(est.epochs), est._variational))
            if state["stopped"]:
                say(logger, speak, "early stop after epoch %d: no validation NDCG@100 gain in %d epochs; keeping "
                    "epoch %d (patience none trains every epoch)", epoch + 1, est.patience, state["best_epoch"])
            checkpoint = self.checkpoint
            if self.shard is not None and self.callbacks:  # the gather is collective: every process, now
                checkpoint = (lambda payload: lambda: payload)(self.checkpoint())
            info = EpochEnd(est, row, state["history"], checkpoint, self.group.is_main)
            for callback in self.callbacks:
                callback.on_epoch_end(info)
        self.finish()

    def pass_over_users(self, order: np.ndarray, update, epoch: int, desc: str) -> tuple[np.ndarray, float]:
        """Calls ``update(batch, rows) -> ((loss, nll, kl), beta)`` on consecutive batches of
        ``order`` (``rows``: the batch's rows of ``X``); counts the updates in
        ``state["step"]``; stops on a non-finite loss. Returns the per-user mean
        (loss, nll, kl) and the last beta."""
        batch_size = int(self.est.batch_size)
        n_batches = math.ceil(len(order) / batch_size)
        sums = np.zeros(3)
        beta = 0.0
        batches = bar(range(n_batches), show=self.show_progress, desc=desc, leave=False)
        for b in batches:
            rows = order[b * batch_size:(b + 1) * batch_size]
            batch = batch_of(self.X, rows, self.device, self.batch_group)
            values, beta = update(batch, rows)
            if not np.isfinite(values).all():
                self._stop_on_non_finite(values, epoch + 1, b, n_batches)
            self.state["step"] += 1
            sums += values * len(rows)
            if self.show_progress:
                batches.set_postfix(loss=f"{values[0]:.2f}", beta=f"{beta:.3f}", refresh=False)
        return sums / len(order), beta

    def _stop_on_non_finite(self, values, epoch: int, b: int, n_batches: int):
        """A non-finite loss: keep the best (else the last finished) epoch's weights as the fitted
        model and raise :class:`NonFiniteLossError` saying so."""
        state, lr = self.state, self.est.lr
        where = (f"non-finite training loss (loss={float(values[0])}, nll={float(values[1])}, "
                 f"kl={float(values[2])}) at epoch {epoch}, update {state['step'] + 1} "
                 f"(batch {b + 1}/{n_batches}) with lr {lr:g}")
        if state["epoch"] == 0:
            raise NonFiniteLossError(f"{where}: no epoch finished, nothing was learnt. Lower lr, or try "
                                     "precision='fp32'.", epoch, state["step"] + 1)
        if self.validate is None:
            state["best_state"] = self.last_state
        state["stopped"] = True
        self.finish()
        kept = self.est.best_epoch_
        raise NonFiniteLossError(f"{where}; kept the weights of epoch {kept} "
                                 f"({'best validation NDCG@100' if self.validate is not None else 'last finished'}). "
                                 "Continue with a lower lr (resume), or try precision='fp32'.",
                                 epoch, state["step"] + 1, kept_epoch=kept)

    def finish(self) -> None:
        """Fitted attributes from the training state: the best epoch's weights (the last epoch's
        without validation), history, best epoch and score."""
        est, state, network = self.est, self.state, self.network
        if state["best_state"] is not None:
            network.load_state_dict(state["best_state"])
        if self.shard is not None:  # the fitted estimator holds the full model on every process
            item_parallel.unshard(network)
            self.shard = None
        network.eval()
        network.workspace.clear()
        history = state["history"]
        est.history_ = history
        est.stopped_early_ = bool(state["stopped"])
        if self.validate is not None and state["best_epoch"] is not None:
            est.best_epoch_ = int(state["best_epoch"])
            est.best_score_ = float(state["best_score"])
            est.best_beta_ = float(history[est.best_epoch_ - 1]["beta"]) if est._variational else None
        else:
            est.best_epoch_ = int(state["epoch"])
            est.best_score_ = None
            est.best_beta_ = None
