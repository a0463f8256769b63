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
import inspect
import io
import json
import logging
import math
import time
import zlib
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from recvae import distributed
from recvae.fileio import write_bytes, write_json
from recvae.models.annealing import ANNEAL_CAP, TOTAL_ANNEAL_STEPS, make_schedule
from recvae.models.base import FORMAT_VERSION, MODEL_FILE, Recommender, as_csr, read_model_meta
from recvae.models.networks import ACTIVATIONS, MultNetwork, NetworkConfig, build_network
from recvae.models.sparse_layers import BatchPart, SparseBatch

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
WEIGHTS_FILE = "weights.pt"
VALIDATION_METRIC = "val_ndcg@100"
HISTORY_FIELDS = ["epoch", "step", "loss", "nll", "kl", "beta", "l2", VALIDATION_METRIC, "seconds", "val_seconds"]

# Hyperparameters a resumed run must share with the checkpoint (epochs, patience, device,
# progress and paths may change between the interrupted run and its continuation).
_RESUME_KEYS = ("hidden_dims", "latent_dim", "dropout", "activation", "lam", "anneal_cap",
                "total_anneal_steps", "beta", "kl_weighting", "batch_size", "lr", "random_state")
KL_WEIGHTINGS = ("uniform", "activity")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; says at which epoch and update."""


def resolve_device(device) -> torch.device:
    """"auto" -> CUDA when available, else CPU; anything else goes to ``torch.device``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or a torch.device, got {device!r}") from e


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
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


def _derived_seed(*key: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0] >> 1)


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
    optimizer.zero_grad(set_to_none=True)  # lets the sparse layers overwrite their kept buffers
    part, n = batch.part, batch.n_rows
    values = np.zeros(3)  # an empty share (only in an epoch's last, short batch) adds nothing
    if n:
        with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=bf16):
            terms = network.loss(batch, beta=beta, generator=generator, kl_weights=kl_weights)
        values = torch.stack([terms.loss.detach(), terms.nll.detach(), terms.kl.detach()]).float().cpu().numpy()
    if part is not None:  # every process sees the same values and takes the same decision
        values = distributed.allreduce_sum(values * n) / part.n_rows
    if not np.isfinite(values).all():
        return values
    if n:
        (terms.loss if part is None else terms.loss * (n / part.n_rows)).backward()
    if part is not None:
        distributed.allreduce_gradients(network.parameters())
    optimizer.step()
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


class _AutoencoderRecommender(Recommender):
    """Shared estimator code; subclasses set ``_variational`` and their ``__init__`` defaults."""

    _variational: bool = True

    # -- scikit-learn style parameters -------------------------------------------------------
    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p for p in sig.parameters if p != "self"]

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
        if p.get("run_dir") is not None:
            p["run_dir"] = str(p["run_dir"])
        return p

    def _check_params(self) -> None:
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
                                              or not isinstance(self.random_state, (int, np.integer))):
            raise ValueError(f"random_state: expected None or an integer, got {self.random_state!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision: expected 'auto', 'fp32' or 'bf16', got {self.precision!r}")
        if self._variational:
            make_schedule(self.beta, self.anneal_cap, self.total_anneal_steps)  # raises on bad values
            if self.kl_weighting not in KL_WEIGHTINGS:
                raise ValueError(f"kl_weighting: expected one of {list(KL_WEIGHTINGS)}, got {self.kl_weighting!r}")
        resolve_device(self.device)

    def _config(self, n_items: int) -> NetworkConfig:
        return NetworkConfig(n_items=n_items, hidden_dims=tuple(int(d) for d in self.hidden_dims),
                             latent_dim=int(self.latent_dim), dropout=float(self.dropout),
                             activation=self.activation, variational=self._variational)

    def _schedule(self):
        if not self._variational:
            return None
        return make_schedule(self.beta, self.anneal_cap, self.total_anneal_steps)

    # -- fit -----------------------------------------------------------------------------------
    def fit(self, train, validation=None, resume: bool = False):
        """Train on ``train`` (CSR users x items, or Interactions); return self.

        ``validation``: a ``HeldOutUsers`` (``.fold_in``/``.heldout``) or a ``(fold_in, heldout)``
        tuple; NDCG@100 on it is computed after every epoch, drives early stopping (``patience``)
        and picks the epoch whose weights are kept. ``resume=True`` continues from
        ``run_dir/checkpoint.pt`` (written after every epoch) when it exists.
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
        network = build_network(self._config(n_items), init_gen).to(device)
        optimizer = make_optimizer(network, lr=self.lr, lam=self.lam)
        schedule = self._schedule()

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
            for k in state:
                state[k] = ckpt[k]
            logger.info("resumed from %s after epoch %d (update %d)", ckpt_path, state["epoch"], state["step"])
        del ckpt
        if resume:  # several processes resume only from one checkpoint they all see (a shared run_dir)
            distributed.check_same(state["epoch"], f"resume: the epoch of {ckpt_path}")

        batch_size = int(self.batch_size)
        n_batches = math.ceil(n_users / batch_size)
        gen = torch.Generator(device=device)
        self.precision_ = resolve_precision(self.precision, device)
        use_bf16 = self.precision_ == "bf16"
        fingerprint = _fingerprint(X)
        # kl_weighting="activity": user u's KL weighted by n_u / (mean n over training users)
        activity = self._variational and self.kl_weighting == "activity"
        kl_scale = n_users / max(float(X.sum()), 1e-12) if activity else None
        epochs = tqdm(range(state["epoch"], int(self.epochs)), desc=type(self).__name__,
                      disable=not self.show_progress, initial=state["epoch"], total=int(self.epochs))
        for epoch in epochs:
            if state["stopped"]:
                break
            t0 = time.perf_counter()
            network.train()
            # every epoch reseeds from (seed, epoch): the checkpoint's seed is the whole RNG state
            order = np.random.default_rng([seed, epoch]).permutation(n_users)
            gen.manual_seed(_derived_seed(seed, epoch, 1))
            sums = np.zeros(3)
            beta = 0.0
            batches = tqdm(range(n_batches), desc=f"epoch {epoch + 1}", leave=False, disable=not self.show_progress)
            for b in batches:
                rows = order[b * batch_size:(b + 1) * batch_size]
                batch = batch_of(X, rows, device, group)
                beta = schedule(state["step"]) if schedule is not None else 0.0
                kl_weights = batch.row_sums * kl_scale if kl_scale is not None else None
                values = training_step(network, optimizer, batch, beta, gen, use_bf16, kl_weights)
                if not np.isfinite(values).all():
                    raise NonFiniteLossError(
                        f"non-finite training loss (loss={values[0]}, nll={values[1]}, kl={values[2]}) at epoch "
                        f"{epoch + 1}, update {state['step'] + 1} (batch {b + 1}/{n_batches}); the last "
                        f"checkpoint{' in ' + str(run_dir) if run_dir else ''} is from epoch {state['epoch']}. "
                        "Lower lr, or try precision='fp32'."
                    )
                state["step"] += 1
                sums += values * len(rows)
                if self.show_progress:
                    batches.set_postfix(loss=f"{values[0]:.2f}", beta=f"{beta:.3f}", refresh=False)
            network.workspace.clear()  # buffers are sized by the training batch; free them for scoring
            means = sums / n_users
            row = {"epoch": epoch + 1, "step": state["step"], "loss": float(means[0]), "nll": float(means[1]),
                   "kl": float(means[2]), "beta": float(beta), "l2": self._l2_penalty(network),
                   VALIDATION_METRIC: None, "seconds": time.perf_counter() - t0, "val_seconds": None}
            if val is not None:
                res = self._validate(val)
                row[VALIDATION_METRIC], row["val_seconds"] = res
                score = row[VALIDATION_METRIC]
                if score > state["best_score"]:
                    state.update(best_score=score, best_epoch=epoch + 1, bad_epochs=0,
                                 best_state={k: v.detach().clone() for k, v in network.state_dict().items()})
                else:
                    state["bad_epochs"] += 1
                if self.patience is not None and state["bad_epochs"] >= self.patience:
                    state["stopped"] = True
                    logger.info("early stop after epoch %d: no improvement for %d epochs", epoch + 1, self.patience)
            state["epoch"] = epoch + 1
            state["history"].append(row)
            logger.debug("epoch %d: loss %.4f nll %.4f kl %.4f beta %.4f %s %s (%.1fs)", epoch + 1, row["loss"],
                        row["nll"], row["kl"], row["beta"], VALIDATION_METRIC, row[VALIDATION_METRIC], row["seconds"])
            if self.show_progress:
                epochs.set_postfix(loss=f"{row['loss']:.2f}", ndcg=row[VALIDATION_METRIC], refresh=False)
            if run_dir is not None and group.is_main:
                self._write_history(run_dir, state["history"])
                self._write_checkpoint(ckpt_path, network, optimizer, state, seed, X, fingerprint)

        distributed.barrier()  # return once rank 0 has written the last checkpoint
        # keep the best epoch's weights (the last epoch's without validation)
        if state["best_state"] is not None:
            network.load_state_dict(state["best_state"])
        network.eval()
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
        return self

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

    def _check_group(self) -> distributed.Group:
        group = distributed.current()
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
            "format_version": FORMAT_VERSION,
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
        _atomic_torch_save(payload, path)

    def _check_checkpoint(self, ckpt: dict, X: sp.csr_matrix) -> None:
        where = f"{Path(self.run_dir) / CHECKPOINT_FILE}"
        if ckpt.get("format_version") != FORMAT_VERSION or ckpt.get("class") != type(self).__name__:
            raise ValueError(f"resume: {where} holds a {ckpt.get('class')} checkpoint "
                             f"(format {ckpt.get('format_version')}), expected {type(self).__name__} format {FORMAT_VERSION}")
        if (ckpt["n_users"], ckpt["n_items"], ckpt["nnz"]) != (X.shape[0], X.shape[1], X.nnz) \
                or ckpt["fingerprint"] != _fingerprint(X):
            raise ValueError(f"resume: {where} was trained on other data (shape {ckpt['n_users']}x{ckpt['n_items']}, "
                             f"{ckpt['nnz']} interactions; now {X.shape[0]}x{X.shape[1]}, {X.nnz})")
        saved, now = json.loads(ckpt["params"]), self._json_params()
        if self._variational:
            saved.setdefault("kl_weighting", "uniform")  # checkpoints from before the option: the paper's
        diff = [k for k in _RESUME_KEYS if saved.get(k) != now.get(k)]
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
    def save(self, path) -> Path:
        """Write ``weights.pt`` (state dict) and ``model.json`` (hyperparameters, item ids,
        training summary) into the folder ``path``; both atomically. No pickle."""
        self._check_fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.module_.state_dict().items()}
        _atomic_torch_save(state, path / WEIGHTS_FILE)
        item_ids = getattr(self, "item_ids_", None)
        meta = {
            "format_version": FORMAT_VERSION,
            "class": type(self).__name__,
            "params": self._json_params(),
            "n_items": int(self.n_items_),
            "item_ids": None if item_ids is None else item_ids.tolist(),
            "seed": int(self.seed_),
            "best_epoch": self.best_epoch_,
            "best_score": self.best_score_,
            "best_beta": self.best_beta_,
            "stopped_early": self.stopped_early_,
            "history": self.history_,
        }
        write_json(path / MODEL_FILE, meta, indent=1)
        return path

    @classmethod
    def load(cls, path, device=None):
        """A fitted estimator from a folder written by :meth:`save` (``device`` overrides the saved one)."""
        path = Path(path)
        meta_file, meta = read_model_meta(path)
        target = cls
        if cls is _AutoencoderRecommender:
            target = _REGISTRY.get(meta.get("class"))
            if target is None:
                raise ValueError(f"{meta_file}: unknown class {meta.get('class')!r}, expected one of {sorted(_REGISTRY)}")
        elif meta.get("class") != cls.__name__:
            raise ValueError(f"{meta_file}: holds a {meta.get('class')}, not a {cls.__name__}; use recvae.models.vae.load")
        params = dict(meta["params"])
        params["hidden_dims"] = tuple(params["hidden_dims"])
        if device is not None:
            params["device"] = device
        model = target(**params)
        dev = resolve_device(model.device)
        network = build_network(model._config(int(meta["n_items"])))
        state = torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True)
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
                 precision="auto", eval_batch_size=2000, show_progress=False, run_dir=None):
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
                 precision="auto", eval_batch_size=2000, show_progress=False, run_dir=None):
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


_REGISTRY = {"MultVAE": MultVAE, "MultDAE": MultDAE}


def load(path, device=None) -> _AutoencoderRecommender:
    """Load a saved MultVAE or MultDAE, whichever ``path/model.json`` names."""
    return _AutoencoderRecommender.load(path, device=device)
