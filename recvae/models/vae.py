"""Mult-VAE and Mult-DAE estimators: the paper's training procedure, checkpoints, save and load.

Training follows the released notebook (dawenl/vae_cf, ``VAE_ML20M_WWW2018.ipynb``): Adam with
lr 1e-3, batches of 500 users shuffled every epoch, up to 200 epochs, the model of the epoch
with the best validation NDCG@100 kept. Beta is annealed per update (see
:mod:`recvae.models.annealing`). L2 penalty: the notebook adds ``2 * l2_regularizer(lam)`` over
the weight matrices (not biases), i.e. ``lam * sum_W ||W||_F^2``, with ``lam=0`` for the VAE and
``lam=0.01/batch_size = 2e-5`` for the DAE. Here it is applied as Adam's (coupled) weight decay
``2 * lam`` on the weight matrices, which adds exactly that penalty's gradient.

Where the time goes and why it is fast on CPU: :mod:`recvae.models.sparse_layers`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import pickle
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from recvae import distributed
from recvae.fileio import atomic_write, write_bytes, write_json
from recvae.models.annealing import ANNEAL_CAP, TOTAL_ANNEAL_STEPS, make_schedule
from recvae.models.base import (
    Recommender, as_csr, check_finite, check_shapes, read_model_meta, verified_file, write_model_meta,
)
from recvae.models.networks import ACTIVATIONS, MultNetwork, NetworkConfig, build_network
from recvae.models.sparse_layers import BatchPart, SparseBatch

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT_VERSION = 1  # of checkpoint.pt; a saved model's is models.base.FORMAT_VERSION
WEIGHTS_FILE = "weights.pt"
VALIDATION_METRIC = "val_ndcg@100"
HISTORY_FIELDS = ["epoch", "step", "loss", "nll", "kl", "beta", "l2", VALIDATION_METRIC, "seconds", "val_seconds"]

MODEL_DIR = "model"  # where an estimator with run_dir saves itself when fit ends
# Hyperparameters a resumed run must share with the checkpoint. epochs, patience, lr (to continue
# after a non-finite loss with a lower one), device, precision, progress and paths may change
# between the interrupted run and its continuation.
RESUME_KEYS = ("hidden_dims", "latent_dim", "dropout", "activation", "lam", "anneal_cap",
               "total_anneal_steps", "beta", "kl_weighting", "batch_size", "random_state")
KL_WEIGHTINGS = ("uniform", "activity")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; says at which epoch and update.

    ``epoch``/``update``: where it happened (1-based). ``kept_epoch``: the epoch whose weights the
    estimator kept (the best validation epoch, else the last finished one); the estimator is then
    fitted as if training had ended there (and saved into ``run_dir/model``). None when no epoch
    finished: nothing was learnt and the estimator is not fitted.
    """

    def __init__(self, message: str, epoch: int, update: int, kept_epoch: int | None = None):
        super().__init__(message)
        self.epoch, self.update, self.kept_epoch = epoch, update, kept_epoch


class CUDAUnavailableError(ValueError):
    """CUDA was asked for explicitly, but this torch has no CUDA device."""


def resolve_device(device) -> torch.device:
    """"auto" -> CUDA when available, else CPU; anything else goes to ``torch.device``.
    Asking for CUDA where torch has none raises :class:`CUDAUnavailableError` (a ValueError)."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or a torch.device, got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "no usable CUDA device"
        raise CUDAUnavailableError(
            f"device: {str(device)!r} asks for CUDA, but this torch ({torch.__version__}) has {build}; use 'cpu' or 'auto'"
        )
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> "bf16" where bf16 matrix products are fast (CUDA with bf16 support; a CPU with
    AVX-512 BF16 or AMX), else "fp32". bf16 matched fp32 within the seed spread on ML-100K
    (benchmarks/results/ml-100k.md), and elsewhere it would be emulated and slower."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp32"


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (Linux: /proc/cpuinfo flags)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def _atomic_torch_save(obj, path: Path) -> None:
    # straight into the temporary file: through a BytesIO the ML-20M checkpoint took 4x longer
    atomic_write(path, lambda f: torch.save(obj, f))


def checkpoint_epoch(run_dir) -> int | None:
    """The last finished epoch stored in ``run_dir/checkpoint.pt``; None without a checkpoint.
    Memory-maps the file: reads the counters, not the tensors."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])


def _clone(network: MultNetwork) -> dict:
    return {k: v.detach().clone() for k, v in network.state_dict().items()}


def _derived_seed(*key: int) -> int:
    # shift a Python int: numpy 1.x refuses uint64 >> int (no common integer type)
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0]) >> 1


def _fingerprint(X: sp.csr_matrix) -> int:
    crc = zlib.crc32(np.ascontiguousarray(X.indptr).tobytes())
    return zlib.crc32(np.ascontiguousarray(X.indices).tobytes(), crc)


def make_optimizer(network: MultNetwork, lr: float = 1e-3, lam: float = 0.0) -> torch.optim.Adam:
    """Adam as in the notebook; ``lam * sum_W ||W||^2`` enters as coupled weight decay ``2*lam``
    on the weight matrices (biases are not penalised). Fused: one kernel over all parameters."""
    weights = {id(p) for p in network.weight_matrices()}
    groups = [
        {"params": [p for p in network.parameters() if id(p) in weights], "weight_decay": 2.0 * lam},
        {"params": [p for p in network.parameters() if id(p) not in weights], "weight_decay": 0.0},
    ]
    return torch.optim.Adam(groups, lr=lr, fused=True)


def training_step(network: MultNetwork, optimizer: torch.optim.Optimizer, batch: SparseBatch, beta: float,
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
    return values


@dataclass
class _Loop:
    """What one training run's epochs share: the seed, the sampling generator, precision, device,
    the checkpointed loop state (epoch, step, best epoch, ...) and the run directory."""

    seed: int
    gen: torch.Generator
    bf16: bool
    device: torch.device
    state: dict
    run_dir: Path | None
    val: tuple | None = None  # validation (fold_in, heldout): which epoch a non-finite loss keeps
    last_state: dict | None = None  # the last finished epoch's weights when there is no validation
    group: distributed.Group | None = None  # the data-parallel processes (one when not parallel)


def batch_of(X: sp.csr_matrix, rows: np.ndarray, device, group: distributed.Group) -> SparseBatch:
    """The training batch of the users ``rows`` (global batch order); with several processes,
    this process's contiguous share of them, marked with its place in the global batch."""
    if not group.parallel:
        return SparseBatch.from_csr(X[rows], device)
    start, stop = distributed.shard_bounds(len(rows), group.rank, group.world_size)
    batch = SparseBatch.from_csr(X[rows[start:stop]], device)
    batch.part = BatchPart.of(X.indptr[rows + 1] - X.indptr[rows], start, stop)
    return batch


class _AutoencoderRecommender(Recommender):
    """Shared estimator code; subclasses set ``_variational`` and their ``__init__`` defaults.

    Training hooks a subclass may override: ``_build_network``, ``_make_optimizer`` (anything
    with ``state_dict``/``load_state_dict``), ``_train_epoch`` (the updates of one epoch),
    ``_check_objective_params`` and ``_resume_keys``; ``fit`` keeps validation, early stopping,
    checkpoints and resume for all of them.
    """

    _variational: bool = True
    #: parameters that are tuples of floats (JSON gives lists back), besides hidden_dims
    _float_tuple_params: tuple[str, ...] = ()

    # -- scikit-learn style parameters -------------------------------------------------------
    def get_params(self, deep: bool = True) -> dict:
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params):
        valid = set(self._param_names())
        for k, v in params.items():
            if k not in valid:
                raise ValueError(f"{k}: not a parameter of {type(self).__name__}; expected one of {sorted(valid)}")
            setattr(self, k, v)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def _json_params(self) -> dict:
        p = self.get_params()
        p["hidden_dims"] = [int(d) for d in p["hidden_dims"]]
        for name in self._float_tuple_params:
            p[name] = [float(v) for v in p[name]]
        if p.get("run_dir") is not None:
            p["run_dir"] = str(p["run_dir"])
        return p

    def _check_params(self, check_device: bool = True) -> None:
        def positive_int(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")

        for name in ("latent_dim", "epochs", "batch_size", "eval_batch_size"):
            positive_int(name)
        try:
            dims = tuple(int(d) for d in self.hidden_dims)
        except TypeError:
            raise ValueError(f"hidden_dims: expected a tuple of positive integers, got {self.hidden_dims!r}") from None
        if any(d < 1 for d in dims):
            raise ValueError(f"hidden_dims: expected positive widths, got {self.hidden_dims!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout: expected a probability in [0, 1), got {self.dropout!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if not (isinstance(self.lam, (int, float)) and self.lam >= 0):
            raise ValueError(f"lam: expected a number >= 0, got {self.lam!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr: expected a finite number > 0, got {self.lr!r}")
        if self.patience is not None:
            positive_int("patience")
        if self.random_state is not None and (isinstance(self.random_state, bool)
                                              or not isinstance(self.random_state, (int, np.integer))
                                              or self.random_state < 0):
            raise ValueError(f"random_state: expected None or a non-negative integer, got {self.random_state!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision: expected 'auto', 'fp32' or 'bf16', got {self.precision!r}")
        self._check_objective_params()
        if check_device:
            resolve_device(self.device)

    def _check_objective_params(self) -> None:
        """The KL weight's parameters (subclasses with another objective override this)."""
        if self._variational:
            make_schedule(self.beta, self.anneal_cap, self.total_anneal_steps)  # raises on bad values
            if self.kl_weighting not in KL_WEIGHTINGS:
                raise ValueError(f"kl_weighting: expected one of {list(KL_WEIGHTINGS)}, got {self.kl_weighting!r}")

    def _config(self, n_items: int) -> NetworkConfig:
        return NetworkConfig(n_items=n_items, hidden_dims=tuple(int(d) for d in self.hidden_dims),
                             latent_dim=int(self.latent_dim), dropout=float(self.dropout),
                             activation=self.activation, variational=self._variational)

    def _schedule(self):
        if not self._variational:
            return None
        return make_schedule(self.beta, self.anneal_cap, self.total_anneal_steps)

    # -- hooks for estimators with another network or update scheme (RecVAE) -------------------
    _resume_keys: tuple[str, ...] = RESUME_KEYS

    def _build_network(self, n_items: int, generator: torch.Generator | None = None):
        return build_network(self._config(n_items), generator)

    def _make_optimizer(self, network):
        return make_optimizer(network, lr=self.lr, lam=self.lam)

    def _train_epoch(self, network, optimizer, X: sp.csr_matrix, epoch: int, loop: "_Loop") -> tuple[np.ndarray, float]:
        """One epoch of updates: every training user once, in batches, in a fresh order.
        Returns the per-user mean (loss, nll, kl) and the beta of the last update."""
        schedule = self._schedule()
        # kl_weighting="activity": user u's KL weighted by n_u / (mean n over training users)
        activity = self._variational and self.kl_weighting == "activity"
        kl_scale = X.shape[0] / max(float(X.sum()), 1e-12) if activity else None

        def update(batch: SparseBatch, rows: np.ndarray) -> tuple[np.ndarray, float]:
            beta = schedule(loop.state["step"]) if schedule is not None else 0.0
            kl_weights = batch.row_sums * kl_scale if kl_scale is not None else None
            return training_step(network, optimizer, batch, beta, loop.gen, loop.bf16, kl_weights), beta

        # every epoch reseeds from (seed, epoch): the checkpoint's seed is the whole RNG state
        order = np.random.default_rng([loop.seed, epoch]).permutation(X.shape[0])
        return self._pass_over_users(X, order, update, epoch, loop, f"epoch {epoch + 1}")

    def _pass_over_users(self, X: sp.csr_matrix, order: np.ndarray, update, epoch: int, loop: "_Loop",
                         desc: str) -> tuple[np.ndarray, float]:
        """Calls ``update(batch, rows) -> ((loss, nll, kl), beta)`` on consecutive batches of
        ``order`` (``rows``: the batch's rows of ``X``); counts the updates in
        ``loop.state["step"]``; stops on a non-finite loss. Returns the per-user mean
        (loss, nll, kl) and the last beta."""
        batch_size = int(self.batch_size)
        n_batches = math.ceil(len(order) / batch_size)
        sums = np.zeros(3)
        beta = 0.0
        batches = tqdm(range(n_batches), desc=desc, leave=False, disable=not self.show_progress)
        for b in batches:
            rows = order[b * batch_size:(b + 1) * batch_size]
            batch = batch_of(X, rows, loop.device, loop.group)
            values, beta = update(batch, rows)
            if not np.isfinite(values).all():
                self._stop_on_non_finite(values, epoch + 1, loop.state, b, n_batches, loop.val, loop.last_state)
            loop.state["step"] += 1
            sums += values * len(rows)
            if self.show_progress:
                batches.set_postfix(loss=f"{values[0]:.2f}", beta=f"{beta:.3f}", refresh=False)
        return sums / len(order), beta

    # -- fit -----------------------------------------------------------------------------------
    def fit(self, train, validation=None, resume: bool = False):
        """Train on ``train`` (CSR users x items, or Interactions); return self.

        ``validation``: a ``HeldOutUsers`` (``.fold_in``/``.heldout``) or a ``(fold_in, heldout)``
        tuple; NDCG@100 on it is computed after every epoch, drives early stopping (``patience``)
        and picks the epoch whose weights are kept. With ``run_dir``: ``history.json/.csv`` and
        ``checkpoint.pt`` are written after every epoch, the fitted model is saved into
        ``run_dir/model`` when fit ends, and the checkpoint is then removed unless
        ``keep_checkpoint``. ``resume=True`` continues from ``run_dir/checkpoint.pt`` when it
        exists (``epochs``, ``patience``, ``lr``, ``device``, ``precision`` may differ from the
        interrupted run; the other hyperparameters and the data must not). A non-finite loss
        raises :class:`NonFiniteLossError` after keeping the best epoch's weights (see there).
        """
        self._check_params()
        X = as_csr(train, "train")
        if X.shape[0] < 1 or X.shape[1] < 1:
            raise ValueError(f"train: expected at least one user and one item, got shape {X.shape}")
        if X.nnz and X.data.min() < 0:
            raise ValueError("train: expected non-negative interaction values (counts or 1s)")
        if not X.has_canonical_format:
            X = X.copy()
            X.sum_duplicates()
        n_users, n_items = X.shape
        val = self._check_validation(validation, n_items)
        if resume and self.run_dir is None:
            raise ValueError("resume: needs run_dir, where the checkpoint of the interrupted run is")

        device = resolve_device(self.device)
        group = self._check_group()
        item_ids = getattr(train, "item_ids", None)
        run_dir = Path(self.run_dir) if self.run_dir is not None else None
        ckpt_path = run_dir / CHECKPOINT_FILE if run_dir is not None else None
        ckpt = None
        if resume and ckpt_path.exists():
            ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
            self._check_checkpoint(ckpt, X)
            seed = int(ckpt["seed"])
        elif self.random_state is not None:
            seed = int(self.random_state)
        else:
            seed = distributed.broadcast_int(int(np.random.SeedSequence().entropy % (2**62)))
        if resume and ckpt is None:
            logger.info("resume: no checkpoint in %s; starting from scratch", run_dir)

        init_gen = torch.Generator().manual_seed(_derived_seed(seed, 0xC0FFEE))
        network = self._build_network(n_items, init_gen).to(device)
        optimizer = self._make_optimizer(network)

        # learned attributes are set before the loop: validation scores through self.score
        self.module_ = network
        self.n_items_ = n_items
        self.device_ = device
        self.seed_ = seed
        if item_ids is not None:
            self.item_ids_ = np.asarray(item_ids)
        elif hasattr(self, "item_ids_"):
            del self.item_ids_

        state = dict(epoch=0, step=0, history=[], best_state=None, best_epoch=None,
                     best_score=-math.inf, bad_epochs=0, stopped=False)
        if ckpt is not None:
            network.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            for param_group in optimizer.param_groups:  # the optimizer's state carries the old lr
                param_group["lr"] = self.lr
            for k in state:
                state[k] = ckpt[k]
            if state["best_state"] is None and state["best_epoch"] == state["epoch"]:
                state["best_state"] = _clone(network)  # not stored twice: the best epoch was the last
            logger.info("resumed from %s after epoch %d (update %d)", ckpt_path, state["epoch"], state["step"])
        del ckpt
        if resume:  # several processes resume only from one checkpoint they all see (a shared run_dir)
            distributed.check_same(state["epoch"], f"resume: the epoch of {ckpt_path}")

        gen = torch.Generator(device=device)
        self.precision_ = resolve_precision(self.precision, device)
        loop = _Loop(seed=seed, gen=gen, bf16=self.precision_ == "bf16", device=device, state=state, run_dir=run_dir,
                     val=val, last_state=_clone(network) if val is None and state["epoch"] else None, group=group)
        fingerprint = _fingerprint(X)
        epochs = tqdm(range(state["epoch"], int(self.epochs)), desc=type(self).__name__,
                      disable=not self.show_progress, initial=state["epoch"], total=int(self.epochs))
        for epoch in epochs:
            if state["stopped"]:
                break
            t0 = time.perf_counter()
            network.train()
            gen.manual_seed(_derived_seed(seed, epoch, 1))
            means, beta = self._train_epoch(network, optimizer, X, epoch, loop)
            network.workspace.clear()  # buffers are sized by the training batch; free them for scoring
            row = {"epoch": epoch + 1, "step": state["step"], "loss": float(means[0]), "nll": float(means[1]),
                   "kl": float(means[2]), "beta": float(beta), "l2": self._l2_penalty(network),
                   VALIDATION_METRIC: None, "seconds": time.perf_counter() - t0, "val_seconds": None}
            if val is not None:
                res = self._validate(val)
                row[VALIDATION_METRIC], row["val_seconds"] = res
                score = row[VALIDATION_METRIC]
                if score > state["best_score"]:
                    state.update(best_score=score, best_epoch=epoch + 1, bad_epochs=0, best_state=_clone(network))
                else:
                    state["bad_epochs"] += 1
                if self.patience is not None and state["bad_epochs"] >= self.patience:
                    state["stopped"] = True
                    logger.info("early stop after epoch %d: no improvement for %d epochs", epoch + 1, self.patience)
            state["epoch"] = epoch + 1
            state["history"].append(row)
            if val is None:  # kept in case a later epoch diverges (with validation, best_state is)
                loop.last_state = _clone(network)
            logger.debug("epoch %d: loss %.4f nll %.4f kl %.4f beta %.4f %s %s (%.1fs)", epoch + 1, row["loss"],
                        row["nll"], row["kl"], row["beta"], VALIDATION_METRIC, row[VALIDATION_METRIC], row["seconds"])
            if self.show_progress:
                epochs.set_postfix(loss=f"{row['loss']:.2f}", ndcg=row[VALIDATION_METRIC], refresh=False)
            if run_dir is not None and group.is_main:
                self._write_history(run_dir, state["history"])
                self._write_checkpoint(ckpt_path, network, optimizer, state, seed, X, fingerprint)

        self._finish(state, val)
        if run_dir is not None and group.is_main:
            self.save(run_dir / MODEL_DIR)
            if not self.keep_checkpoint:
                ckpt_path.unlink(missing_ok=True)  # finished: nothing to resume; model and history stay
        distributed.barrier()  # the other processes return once rank 0 has written the run's model
        return self

    def _stop_on_non_finite(self, values, epoch: int, state: dict, b: int, n_batches: int, val, last_state):
        """A non-finite loss: keep the best (else the last finished) epoch's weights as the fitted
        model, saved into run_dir/model, and raise :class:`NonFiniteLossError` saying so."""
        where = (f"non-finite training loss (loss={values[0]}, nll={values[1]}, kl={values[2]}) at epoch {epoch}, "
                 f"update {state['step'] + 1} (batch {b + 1}/{n_batches}) with lr {self.lr:g}")
        if state["epoch"] == 0:
            raise NonFiniteLossError(f"{where}: no epoch finished, nothing was learnt. Lower lr, or try "
                                     "precision='fp32'.", epoch, state["step"] + 1)
        if val is None:
            state["best_state"] = last_state
        state["stopped"] = True
        self._finish(state, val)
        kept = self.best_epoch_
        saved = ""
        if self.run_dir is not None and distributed.current().is_main:
            saved = f", saved in {self.save(Path(self.run_dir) / MODEL_DIR)}"
        raise NonFiniteLossError(f"{where}; kept the weights of epoch {kept} "
                                 f"({'best validation NDCG@100' if val is not None else 'last finished'}){saved}. "
                                 "Continue with a lower lr (resume), or try precision='fp32'.",
                                 epoch, state["step"] + 1, kept_epoch=kept)

    def _finish(self, state: dict, val) -> None:
        """Fitted attributes from the training state: the best epoch's weights (the last epoch's
        without validation), history, best epoch and score."""
        network = self.module_
        if state["best_state"] is not None:
            network.load_state_dict(state["best_state"])
        network.eval()
        network.workspace.clear()
        history = state["history"]
        self.history_ = history
        self.stopped_early_ = bool(state["stopped"])
        if val is not None and state["best_epoch"] is not None:
            self.best_epoch_ = int(state["best_epoch"])
            self.best_score_ = float(state["best_score"])
            self.best_beta_ = float(history[self.best_epoch_ - 1]["beta"]) if self._variational else None
        else:
            self.best_epoch_ = int(state["epoch"])
            self.best_score_ = None
            self.best_beta_ = None

    @staticmethod
    def _check_validation(validation, n_items):
        if validation is None:
            return None
        if hasattr(validation, "fold_in") and hasattr(validation, "heldout"):
            fold_in, heldout = validation.fold_in, validation.heldout
        elif isinstance(validation, (tuple, list)) and len(validation) == 2:
            fold_in, heldout = validation
        else:
            raise TypeError(
                "validation: expected a HeldOutUsers (with .fold_in and .heldout) or a (fold_in, heldout) "
                f"tuple of CSR matrices, got {type(validation).__name__}"
            )
        fold_in = as_csr(fold_in, "validation fold_in", n_items)
        heldout = as_csr(heldout, "validation heldout", n_items)
        if fold_in.shape != heldout.shape:
            raise ValueError(f"validation: fold_in {fold_in.shape} and heldout {heldout.shape} differ in shape")
        return fold_in, heldout

    def _validate(self, val) -> tuple[float, float]:
        from recvae.evaluation import evaluate  # evaluation imports models.base; keep import lazy

        k = min(100, self.n_items_)  # with fewer items, NDCG@100 ranks them all: the same quantity
        group = distributed.current()
        if not group.parallel:
            res = evaluate(self, val[0], val[1], ks=(k,), batch_size=int(self.eval_batch_size), metrics=("ndcg",))
            return float(res.metrics[f"ndcg@{k}"].mean), float(res.seconds)
        # each process scores its share of the users; the sums and counts are reduced, so every
        # process gets the same score and takes the same early-stopping decision
        t0 = time.perf_counter()
        start, stop = distributed.shard_bounds(val[0].shape[0], group.rank, group.world_size)
        fold_in, heldout = val[0][start:stop], val[1][start:stop]
        total = np.zeros(2)
        if np.diff(heldout.indptr).any():
            s = evaluate(self, fold_in, heldout, ks=(k,), batch_size=int(self.eval_batch_size),
                         metrics=("ndcg",)).metrics[f"ndcg@{k}"]
            total[:] = s.mean * s.n_users, s.n_users
        total = distributed.allreduce_sum(total)
        return float(total[0] / total[1]), time.perf_counter() - t0

    #: whether fit can train data parallel (its random numbers and updates follow BatchPart)
    _data_parallel: bool = True

    def _check_group(self) -> distributed.Group:
        group = distributed.current()
        if group.parallel and not self._data_parallel:
            raise ValueError(f"{type(self).__name__}: data-parallel training (torchrun with several processes) "
                             "is not supported for this model yet; run it in one process")
        distributed.check_batch_split(self.batch_size, group)
        return group

    def _l2_penalty(self, network: MultNetwork) -> float:
        if not self.lam:
            return 0.0
        with torch.no_grad():
            return float(self.lam * sum(float(w.float().pow(2).sum()) for w in network.weight_matrices()))

    # -- run directory ----------------------------------------------------------------------
    @staticmethod
    def _write_history(run_dir: Path, history: list[dict]) -> None:
        write_json(run_dir / "history.json", history, indent=1)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\n")
        w.writeheader()
        for r in history:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in HISTORY_FIELDS})
        write_bytes(run_dir / "history.csv", buf.getvalue().encode())

    def _write_checkpoint(self, path, network, optimizer, state, seed, X, fingerprint) -> None:
        payload = {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "class": type(self).__name__,
            "params": json.dumps(self._json_params()),
            "seed": int(seed),
            "n_users": int(X.shape[0]),
            "n_items": int(X.shape[1]),
            "nnz": int(X.nnz),
            "fingerprint": int(fingerprint),
            "model": network.state_dict(),
            "optimizer": optimizer.state_dict(),
            **state,
        }
        if state["best_epoch"] == state["epoch"]:
            payload["best_state"] = None  # the same tensors as "model": a quarter of the file saved

        _atomic_torch_save(payload, path)

    def _check_checkpoint(self, ckpt: dict, X: sp.csr_matrix) -> None:
        where = f"{Path(self.run_dir) / CHECKPOINT_FILE}"
        if ckpt.get("format_version") != CHECKPOINT_FORMAT_VERSION or ckpt.get("class") != type(self).__name__:
            raise ValueError(f"resume: {where} holds a {ckpt.get('class')} checkpoint "
                             f"(format {ckpt.get('format_version')}), expected {type(self).__name__} format {CHECKPOINT_FORMAT_VERSION}")
        if (ckpt["n_users"], ckpt["n_items"], ckpt["nnz"]) != (X.shape[0], X.shape[1], X.nnz) \
                or ckpt["fingerprint"] != _fingerprint(X):
            raise ValueError(f"resume: {where} was trained on other data (shape {ckpt['n_users']}x{ckpt['n_items']}, "
                             f"{ckpt['nnz']} interactions; now {X.shape[0]}x{X.shape[1]}, {X.nnz})")
        saved, now = json.loads(ckpt["params"]), self._json_params()
        if self._variational:
            saved.setdefault("kl_weighting", "uniform")  # checkpoints from before the option: the paper's
        diff = [k for k in self._resume_keys if saved.get(k) != now.get(k)]
        if diff:
            detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}" for k in diff)
            raise ValueError(f"resume: hyperparameters differ from {where} ({detail})")

    # -- scoring ------------------------------------------------------------------------------
    def _score_batch(self, user_items: sp.csr_matrix) -> np.ndarray:
        """Logits (B, I), float32, eval mode (no dropout, z = mu), in float32 whatever ``precision``."""
        net = self.module_
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                logits = net(SparseBatch.from_csr(user_items, self.device_))
        finally:
            net.train(was_training)
        return logits.cpu().numpy()

    # -- save / load --------------------------------------------------------------------------
    _meta_keys = ("seed", "best_epoch", "best_score", "best_beta", "stopped_early", "history")

    def save(self, path) -> Path:
        """Write ``weights.pt`` (state dict), then ``model.json`` (hyperparameters, item ids,
        the weights' SHA-256, training summary) into the folder ``path``; both atomically. No pickle."""
        self._check_fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.module_.state_dict().items()}
        _atomic_torch_save(state, path / WEIGHTS_FILE)
        write_model_meta(
            path, self, self._json_params(), [WEIGHTS_FILE],
            seed=int(self.seed_), best_epoch=self.best_epoch_, best_score=self.best_score_,
            best_beta=self.best_beta_, stopped_early=self.stopped_early_, history=self.history_,
        )
        return path

    @classmethod
    def load(cls, path, device=None):
        """A fitted estimator from a folder written by :meth:`save`, verified (weights' digest,
        shapes against the stored item count, finite values). ``device`` (e.g. "cpu", "cuda")
        overrides the saved one; the saved one is a preference: a model trained on CUDA loads
        on the CPU where there is no CUDA."""
        path = Path(path)
        target = cls
        if cls is _AutoencoderRecommender:
            meta_file, meta = read_model_meta(path)
            target = _REGISTRY.get(meta.get("class"))
            if target is None:
                raise ValueError(f"{meta_file}: unknown class {meta.get('class')!r}, expected one of {sorted(_REGISTRY)}")
        meta_file, meta = read_model_meta(path, target)
        params = dict(meta["params"])
        dev = resolve_device(device) if device is not None else _stored_device(params.get("device"), meta_file)
        try:
            params["hidden_dims"] = tuple(params["hidden_dims"])
            for name in target._float_tuple_params:
                params[name] = tuple(params[name])
            model = target(**params)
            model._check_params(check_device=False)
            network = model._build_network(int(meta["n_items"]))
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"{meta_file}: params: {e}") from None
        if device is not None:
            model.device = device
        weights_file = verified_file(meta_file, meta, WEIGHTS_FILE)
        try:
            state = torch.load(weights_file, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:  # truncated, not torch's
            detail = " ".join(str(e).split()[:20])
            raise ValueError(f"{weights_file}: not a readable weights file ({type(e).__name__}{': ' if detail else ''}{detail})") from e
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{weights_file}: expected a state dict of tensors")
        expected = {k: tuple(v.shape) for k, v in network.state_dict().items()}
        check_shapes(weights_file, state, expected)
        check_finite(weights_file, {k: v.detach().float().numpy() for k, v in state.items()})
        network.load_state_dict(state)
        network.to(dev).eval()
        model.module_ = network
        model.n_items_ = int(meta["n_items"])
        model.device_ = dev
        model.seed_ = meta["seed"]
        if meta["item_ids"] is not None:
            model.item_ids_ = np.asarray(meta["item_ids"])
        model.best_epoch_ = meta["best_epoch"]
        model.best_score_ = meta["best_score"]
        model.best_beta_ = meta["best_beta"]
        model.stopped_early_ = meta["stopped_early"]
        model.history_ = meta["history"]
        return model


def _stored_device(stored, meta_file: Path) -> torch.device:
    """The device saved with a model is a preference: CUDA where this torch has none means CPU."""
    try:
        return resolve_device(stored)
    except CUDAUnavailableError:
        logger.info("%s: trained on %s; this machine has no CUDA, loading on the CPU", meta_file, stored)
        return torch.device("cpu")


class MultVAE(_AutoencoderRecommender):
    """Mult-VAE (Liang et al., 2018): a VAE with multinomial likelihood and annealed KL weight.

    Objective per batch (averaged over its B users), minimised with Adam::

        -1/B sum_u sum_i x_ui log softmax(f(z_u))_i  +  beta * 1/B sum_u w_u KL(q(z|x_u) || N(0, I))
        + lam * sum_W ||W||^2

    with ``beta = min(anneal_cap, step / total_anneal_steps)`` (or the constant ``beta``). The
    defaults are the released notebook's. ``w_u`` is 1 with ``kl_weighting="uniform"`` (the
    paper); ``"activity"`` sets ``w_u = n_u / mean_v n_v`` (``n_u = sum_i x_ui``, mean over the
    training users), so a user's KL grows with the likelihood term it regularises, as RecVAE
    (Shenbin et al., WSDM 2020) scales beta by the user's number of interactions; the mean weight
    stays 1, so ``beta`` keeps its scale. Learned attributes: ``module_`` (the torch network),
    ``n_items_``, ``history_`` (one dict per epoch: loss, nll, kl (with ``w_u``), beta, l2, val_ndcg@100,
    seconds), ``best_epoch_``, ``best_score_`` (validation NDCG@100), ``best_beta_`` (the beta
    at the best epoch: the cap to use in a second run after annealing to 1.0),
    ``item_ids_`` (when fitted on Interactions), ``seed_``, ``device_``, ``stopped_early_``.

    ``precision="bf16"`` runs the training step's matmuls under bf16 autocast (weights, Adam and
    the softmax's accumulation stay float32); scoring is float32 either way. The default
    ``"auto"`` takes bf16 where bf16 products are native (see :func:`resolve_precision`): a
    departure from the notebook's float32, made because bf16 matched fp32 within the seed spread
    on ML-100K at 1.4-1.9x the speed (benchmarks/results/ml-100k.md, train_speed.md).
    """

    _variational = True

    def __init__(self, hidden_dims=(600,), latent_dim=200, dropout=0.5, activation="tanh", lam=0.0,
                 anneal_cap=ANNEAL_CAP, total_anneal_steps=TOTAL_ANNEAL_STEPS, beta=None, kl_weighting="uniform",
                 epochs=200, batch_size=500, lr=1e-3, patience=None, random_state=None, device="auto",
                 precision="auto", eval_batch_size=2000, show_progress=False, run_dir=None, keep_checkpoint=False):
        self.hidden_dims = hidden_dims
        self.latent_dim = latent_dim
        self.dropout = dropout
        self.activation = activation
        self.lam = lam
        self.anneal_cap = anneal_cap
        self.total_anneal_steps = total_anneal_steps
        self.beta = beta
        self.kl_weighting = kl_weighting
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.patience = patience
        self.random_state = random_state
        self.device = device
        self.precision = precision
        self.eval_batch_size = eval_batch_size
        self.show_progress = show_progress
        self.run_dir = run_dir
        self.keep_checkpoint = keep_checkpoint


class MultDAE(_AutoencoderRecommender):
    """Mult-DAE (Liang et al., 2018): denoising autoencoder with multinomial likelihood.

    Objective per batch: ``-1/B sum_u sum_i x_ui log softmax(f(g(dropout(x_u))))_i
    + lam * sum_W ||W||^2``. Defaults are the released notebook's: architecture ``I-200-I``
    (``hidden_dims=()``; tanh on the 200-d code) and ``lam = 0.01 / 500 = 2e-5`` (the notebook
    passes ``lam=0.01/batch_size``). Learned attributes as :class:`MultVAE` (``best_beta_`` is None).
    """

    _variational = False

    def __init__(self, hidden_dims=(), latent_dim=200, dropout=0.5, activation="tanh", lam=0.01 / 500,
                 epochs=200, batch_size=500, lr=1e-3, patience=None, random_state=None, device="auto",
                 precision="auto", eval_batch_size=2000, show_progress=False, run_dir=None, keep_checkpoint=False):
        self.hidden_dims = hidden_dims
        self.latent_dim = latent_dim
        self.dropout = dropout
        self.activation = activation
        self.lam = lam
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.patience = patience
        self.random_state = random_state
        self.device = device
        self.precision = precision
        self.eval_batch_size = eval_batch_size
        self.show_progress = show_progress
        self.run_dir = run_dir
        self.keep_checkpoint = keep_checkpoint


_REGISTRY = {"MultVAE": MultVAE, "MultDAE": MultDAE}


def load(path, device=None) -> _AutoencoderRecommender:
    """Load a saved MultVAE, MultDAE, BinaryMultVAE or RecVAE, whichever ``path/model.json`` names
    (the last two register themselves when :mod:`recvae.models` is imported)."""
    return _AutoencoderRecommender.load(path, device=device)
