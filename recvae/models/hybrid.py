"""VAEs with a shallow linear path: hybrids of the VAE and EASE / EDLAE (``--model multvae-linear``,
``--model recvae-linear``).

On small data the item-item models (EASE, Steck WWW 2019; EDLAE, Steck NeurIPS 2020) beat every
VAE: the pairs of items that go together are there to count, while the VAE's low-rank code blurs
them. VASP (Vančura & Kordík, ICANN 2021) runs a VAE and a shallow EASE-like path in parallel and
combines their outputs. Here the combination is in the multinomial's logits::

    logits_u = f(z_u) + w * (x_u B),        x_u B = sum_j x_uj B_j.

``f(z_u)`` is Mult-VAE's decoder (:mod:`recvae.models.networks`) and ``B`` the closed-form
item-item matrix of EDLAE with zero diagonal (:func:`recvae.models.edlae.edlae_weights`; ``p = 0``
gives EASE's), computed once from the training matrix at the start of ``fit`` and then fixed.
How the VAE is trained (``linear_weight_mode``):

* ``"scoring"`` (default): the VAE is trained alone, with Mult-VAE's objective and updates (the
  same bits as :class:`~recvae.models.vae.MultVAE`), and ``w * x B`` is added when scoring,
  validation included, so the epoch kept is the best one of the sum;
* ``"fixed"``: the likelihood of training is over the sum (a joint fit), so the VAE learns what
  the linear path leaves, with ``w`` as declared;
* ``"learned"``: as ``"fixed"``, ``w`` trained by Adam at its own rate ``linear_weight_lr``.

On ML-100K's validation users the joint fits peaked at epoch 1-3 (the VAE's residual of an
in-sample ``B`` did not carry over to new users: validation NDCG@100 at or below EDLAE's alone,
with a fixed, learned or dropped-out input to the linear path, ``linear_input="dropout"``), while
the VAE trained alone plus ``w * x B`` was above EDLAE's on both split seeds tried; hence the
default.

Why not VASP itself: VASP multiplies the two paths' sigmoid outputs and trains its linear path
(a dense layer) by gradient descent with a focal loss. A closed-form ``B`` needs no training, is
the one the linear baselines of this library compute (so ``w`` large recovers EDLAE's ranking,
and ``w = 0`` is Mult-VAE bit for bit), and keeps the VAE's objective as the paper wrote it.
Joint training through the fused output layer is there (``"fixed"``, ``"learned"``), measured
and not the default.

RecVAE plus the same path (:class:`RecVAELinear`) is the ``"scoring"`` mode only: RecVAE trains
alone (its alternating encoder / decoder passes and composite prior, the same bits as
:class:`~recvae.models.recvae.RecVAE`) and ``w * x B`` is added to its logits when scoring,
validation included. The joint fits are not offered: they lost to the VAE trained alone on
Mult-VAE, and RecVAE's objective has two phases to decide how ``B`` would enter.

What both hybrids share is here once: the estimator's :class:`LinearPathModel` (``B`` computed
in ``fit`` under the memory bound and sent to every process under torchrun, ``linear.npz`` saved
and loaded with its digest), the network's :class:`LinearPath` (``B`` as a buffer and the
embedding-bag ``x B``) and the hyperparameter rows :data:`LINEAR_PATH`.

Memory: ``B`` is a dense items x items matrix: fitting holds it in float64 for the inverse and
keeps a float32 copy, ``n_items**2 * 12`` bytes at the peak (25 MB for ML-100K's 1,447 items,
4.9 GB for ML-20M's 20,108, 20 GB for the Million Song Dataset's 41,140); the model keeps
``n_items**2 * 4``. ``fit`` refuses a catalogue whose peak exceeds ``max_linear_gb``
(:func:`check_linear_memory`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from recvae import distributed
from recvae.data.user_items import training_matrix
from recvae.errors import ParameterError
from recvae.fileio import atomic_write, read_npz
from recvae.models.base import check_finite, check_shapes, verified_file
from recvae.models.ease import gram_matrix
from recvae.models.edlae import P_ROW, edlae_weights
from recvae.models.networks import MultVAENetwork, NetworkConfig
from recvae.models.params import Choice, Float, Param, Tune, by_name, table
from recvae.models.recvae import RecVAE
from recvae.models.recvae_network import RecVAEConfig, RecVAENetwork
from recvae.models.sparse_layers import SparseBatch
from recvae.models.training_loop import make_optimizer
from recvae.models.vae import MultVAE

logger = logging.getLogger(__name__)

LINEAR_FILE = "linear.npz"
#: bytes per entry of B at the peak of ``fit``: the float64 inverse and the float32 copy kept
PEAK_BYTES_PER_ENTRY = 8 + 4
WEIGHT_MODES = ("fixed", "learned", "scoring")
LINEAR_INPUTS = ("full", "dropout")


def check_linear_memory(n_items: int, max_gb: float, instead: str = "multvae") -> None:
    """:class:`ParameterError` (on ``max_linear_gb``) when the linear path of ``n_items`` items
    would need more than ``max_gb`` GB at the peak of ``fit``, saying what to use instead (the
    model ``instead``, the VAE without the path)."""
    need = n_items ** 2 * PEAK_BYTES_PER_ENTRY / 1e9
    if need > max_gb:
        raise ParameterError(
            "max_linear_gb", f"the linear path's dense item-item matrix for {n_items:,} items needs about "
            f"{need:.1f} GB while fitting ({n_items:,}^2 entries x {PEAK_BYTES_PER_ENTRY} bytes), above "
            f"{{max_linear_gb}} = {max_gb:g}; use the model {instead} (no item-item matrix), or raise {{max_linear_gb}} "
            f"where the memory is there (the model ease alone needs about {n_items ** 2 * 8 / 1e9:.1f} GB)",
            names=("max_linear_gb",))


def linear_path(X: sp.csr_matrix, l2: float, p: float) -> np.ndarray:
    """EDLAE's ``B`` (zero diagonal; ``p = 0``: EASE's) of the training matrix ``X``, float32,
    computed in float64 in place of the Gram matrix."""
    return edlae_weights(gram_matrix(X, np.float64), l2, p, "full", overwrite=True).astype(np.float32)


#: the linear path's rows, declared once for every hybrid (one help per flag: the command line
#: shows one text for all the models that take it)
LINEAR_PATH = (
    Param("l2", Float(0.0, low_open=True), 200.0, "architecture",
          "the linear path's L2 weight lambda, EASE's (ML-100K and ml-latest-small: 100-300)",
          tune=Tune(space="log:30:3000")),
    Param("p", P_ROW.kind, 0.25, "architecture",
          "the linear path's input dropout, EDLAE's: its L2 weight on item j is p/(1-p) (X^T X)_jj (0: EASE)",
          tune=Tune(space="float:0:0.75")),
    Param("linear_weight", Float(0.0), 30.0, "architecture",
          "w in logits = decoder(z) + w * x B (0: the VAE alone, bit for bit; the starting value of a learned w)",
          tune=Tune(space="log:3:300", grid=(3.0, 10.0, 30.0, 100.0, 300.0))),
    Param("max_linear_gb", Float(0.0, low_open=True), 8.0, "runtime",
          "refuse a catalogue whose item-item matrix needs more GB while fitting (n_items^2 x 12 bytes)"),
)


class LinearPath:
    """What a network (an ``nn.Module``) with a linear path has: ``linear``, the item-item matrix
    ``B`` (a buffer outside the state dict, set by :meth:`set_linear`: the estimator computes it
    from the data, or reads it from its own file), ``linear_weight`` (w: a learned parameter or a
    buffer) and :meth:`linear_scores`, ``x B``."""

    def _init_linear_path(self, weight: float, learned: bool = False) -> None:
        """Called by the network's ``__init__`` after its own layers (no random draw here)."""
        w = torch.tensor(float(weight), dtype=torch.float32)
        if learned:
            self.linear_weight = nn.Parameter(w)
        else:
            self.register_buffer("linear_weight", w)
        self.register_buffer("linear", torch.empty(0, 0), persistent=False)

    def set_linear(self, B: np.ndarray) -> None:
        """The item-item matrix ``B`` (I, I), onto the network's device (shared with ``B`` on the CPU)."""
        n = self.config.n_items
        if tuple(B.shape) != (n, n):
            raise ValueError(f"linear: expected a {n} x {n} matrix, got {tuple(B.shape)}")
        # the empty buffer moved with the network: its device is the network's
        self.linear = torch.from_numpy(np.ascontiguousarray(B, dtype=np.float32)).to(self.linear.device)

    def linear_scores(self, batch: SparseBatch, values: torch.Tensor | None = None) -> torch.Tensor:
        """(B, I) float32 ``x B`` of the batch's raw values (EASE's scores; ``values``: other values
        at the batch's nonzeros): a weighted sum of rows of ``B``."""
        if self.linear.shape != (batch.n_items, batch.n_items):
            raise RuntimeError("the linear path's matrix is not set (fit, load, or set_linear)")
        values = batch.values if values is None else values
        with torch.autocast(batch.device.type, enabled=False):
            return F.embedding_bag(batch.cols, self.linear, batch.crow[:-1], mode="sum",
                                   per_sample_weights=values.float())


class LinearPathNetwork(LinearPath, MultVAENetwork):
    """Mult-VAE's network whose logits add ``linear_weight * (x B)`` (:class:`LinearPath`), in
    training too unless ``in_training`` is False."""

    def __init__(self, config: NetworkConfig, generator: torch.Generator | None = None, weight: float = 1.0,
                 learned: bool = False, linear_input: str = "full", in_training: bool = True) -> None:
        super().__init__(config, generator)  # the VAE's initialisation draws as Mult-VAE's does
        self.linear_input = linear_input
        self.in_training = in_training  # False: the likelihood of training is the VAE's alone
        self._kept: torch.Tensor | None = None  # training: the encoder's dropped-out input, as raw values
        self._init_linear_path(weight, learned)

    def _input_values(self, batch: SparseBatch, generator: torch.Generator | None) -> torch.Tensor:
        v = super()._input_values(batch, generator)
        if self.training and self.linear_input == "dropout":
            # the same entries dropped and the kept ones scaled by 1/(1-p), in raw values (EDLAE's input)
            self._kept = v * (batch.values / batch.normalized)
        return v

    def _offset(self, batch: SparseBatch) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        kept, self._kept = (self._kept if self.training else None), None
        if self.training and not self.in_training:
            return None
        scores = self.linear_scores(batch, kept)  # a new tensor: a fixed w scales it in place
        if self.linear_weight.requires_grad and torch.is_grad_enabled():
            return scores, self.linear_weight  # learned: scaled where its gradient is computed
        return scores.mul_(self.linear_weight), None


class RecVAELinearNetwork(LinearPath, RecVAENetwork):
    """RecVAE's network whose logits add ``linear_weight * (x B)`` in eval mode (scoring and
    validation); its training losses (:meth:`encoder_loss`, :meth:`decoder_loss`) are RecVAE's."""

    def __init__(self, config: RecVAEConfig, generator: torch.Generator | None = None, weight: float = 1.0) -> None:
        super().__init__(config, generator)  # the initialisation draws as RecVAE's does
        self._init_linear_path(weight)

    def forward(self, batch: SparseBatch, generator: torch.Generator | None = None) -> torch.Tensor:
        logits = super().forward(batch, generator)
        if self.training:  # RecVAE trains through its losses; a training-mode forward stays the VAE's
            return logits
        return logits + self.linear_weight * self.linear_scores(batch)


class LinearPathModel:
    """What an estimator with a linear path does beside its VAE's (a mixin before the VAE's class):
    ``B`` computed in ``fit`` (refused beyond ``max_linear_gb``; under torchrun the first process
    computes it and sends it to the others), set on the network it builds (:meth:`_with_linear`),
    saved to ``linear.npz`` (its digest in ``model.json``) and read back verified. ``_VAE_NAME``:
    the registered name of the model without the path (what the memory refusal proposes)."""

    _VAE_NAME: str

    def _check_parallel(self) -> None:
        if self.parallel == "items":
            raise ParameterError("parallel", "the hybrid (multvae-linear) trains data-parallel only: use "
                                             "parallel='data' (its I x I linear path is not split by items)")

    def _check_catalogue(self, n_items: int) -> None:
        check_linear_memory(n_items, float(self.max_linear_gb), self._VAE_NAME)

    def _with_linear(self, network: LinearPath) -> LinearPath:
        B = getattr(self, "_linear", None)  # set by fit; load sets B itself
        if B is not None:
            network.set_linear(B)
        return network

    def fit(self, train, validation=None, callbacks=(), resume_from: dict | None = None, show_progress: bool = True):
        """As the VAE's ``fit``, after computing the linear path's ``B`` from ``train`` (refused
        beyond ``max_linear_gb``, with a :class:`~recvae.errors.ParameterError` saying why)."""
        self._check_params()
        X = training_matrix(train, non_negative=self._non_negative_input)
        n = X.shape[1]
        self._check_catalogue(n)
        t0 = time.perf_counter()
        B = linear_path(X, float(self.l2), float(self.p)) if distributed.current().rank == 0 else None
        self._linear = distributed.broadcast_array(B, (n, n), np.float32)
        self.linear_seconds_ = time.perf_counter() - t0
        logger.debug("linear path: %d items, l2=%g, p=%g, %.2fs", n, self.l2, self.p, self.linear_seconds_)
        try:
            return super().fit(train, validation, callbacks, resume_from, show_progress)
        finally:
            del self._linear  # the network holds it

    # -- save / load: B in its own file, its digest in model.json ------------------------------
    def _save_more(self, path: Path) -> list[str]:
        B = self.module_.linear.detach().cpu().numpy()
        atomic_write(path / LINEAR_FILE, lambda f: np.savez(f, B=B))
        return [LINEAR_FILE, *super()._save_more(path)]

    def _load_more(self, meta_file: Path, meta: dict) -> None:
        super()._load_more(meta_file, meta)
        path = verified_file(meta_file, meta, LINEAR_FILE)
        arrays = read_npz(path, "linear path")
        n = int(meta["n_items"])
        check_shapes(path, arrays, {"B": (n, n)})
        check_finite(path, arrays)
        self.module_.set_linear(arrays["B"])


_LINEAR = by_name(LINEAR_PATH)


class MultVAELinear(LinearPathModel, MultVAE):
    """Mult-VAE plus a shallow linear item-item path: ``logits = f(z) + w * (x B)`` with EDLAE's
    closed-form ``B`` (zero diagonal; ``p = 0`` is EASE's), computed once from the training data at
    the start of ``fit`` (the model and the reasons: :mod:`recvae.models.hybrid`).

    Parameters as :class:`MultVAE` (network, KL schedule, training), plus the linear path's:
    ``l2`` and ``p`` (EDLAE's, see :class:`~recvae.models.edlae.EDLAE`), ``linear_weight`` (w, or
    its starting value), ``linear_weight_mode`` (``"fixed"`` or ``"learned"``), ``linear_weight_lr``
    (Adam's lr for a learned w) and ``max_linear_gb`` (refuse a catalogue whose ``B`` would need
    more at the peak of ``fit``: ``n_items**2 * 12`` bytes).

    Learned attributes as :class:`MultVAE`; the network ``module_`` holds ``B`` as ``module_.linear``
    (a tensor, not in its state dict: ``save`` writes it to ``linear.npz``) and w as
    ``module_.linear_weight``. ``similar_items`` ranks by the VAE's item vectors, as Mult-VAE's.
    Under torchrun the first process computes ``B`` and sends it to the others, so every process
    trains with the same bits; a resume computes it again from the same data (the same bits on
    the same machine).
    """

    _VAE_NAME = "multvae"
    PARAMETERS = table(MultVAE.PARAMETERS, add=(
        _LINEAR["l2"], _LINEAR["p"], _LINEAR["linear_weight"],
        Param("linear_weight_mode", Choice(WEIGHT_MODES), "scoring", "architecture",
              "fixed: w as declared; learned: w trained with the network (Adam, linear_weight_lr); scoring: the VAE "
              "trained alone, w * x B added when scoring (validation included)", tune=Tune()),
        Param("linear_input", Choice(LINEAR_INPUTS), "full", "architecture",
              "what the linear path reads in training: full (x) or dropout (the encoder's dropped-out x, "
              "kept entries scaled by 1/(1-dropout)); scoring reads x", tune=Tune()),
        Param("linear_weight_lr", Float(0.0, low_open=True), 0.05, "training",
              "Adam's learning rate of a learned w (the network's is lr)"),
        _LINEAR["max_linear_gb"],
    ))

    def _build_network(self, n_items: int, generator: torch.Generator | None = None) -> LinearPathNetwork:
        return self._with_linear(LinearPathNetwork(
            self._config(n_items), generator, weight=float(self.linear_weight),
            learned=self.linear_weight_mode == "learned", linear_input=self.linear_input,
            in_training=self.linear_weight_mode != "scoring"))

    def _make_optimizer(self, network: LinearPathNetwork):
        apart = ()
        if isinstance(network.linear_weight, nn.Parameter):
            apart = ({"params": [network.linear_weight], "lr": float(self.linear_weight_lr),
                      "lr_param": "linear_weight_lr"},)
        return make_optimizer(network, lr=self.lr, lam=self.lam, apart=apart)


class RecVAELinear(LinearPathModel, RecVAE):
    """RecVAE plus a shallow linear item-item path: ``logits = f(z) + w * (x B)`` with EDLAE's
    closed-form ``B`` (zero diagonal; ``p = 0`` is EASE's), computed once from the training data at
    the start of ``fit``. RecVAE trains alone, bit for bit :class:`~recvae.models.recvae.RecVAE`'s
    updates; ``w * x B`` is added when scoring, validation included, so the epoch kept is the best
    one of the sum (Mult-VAE's hybrid's ``"scoring"`` mode, the only one here: see
    :mod:`recvae.models.hybrid`).

    Parameters as :class:`~recvae.models.recvae.RecVAE`, plus the linear path's: ``l2`` and ``p``
    (EDLAE's), ``linear_weight`` (w; 0 gives RecVAE's scores) and ``max_linear_gb`` (refuse a
    catalogue whose ``B`` would need more at the peak of ``fit``: ``n_items**2 * 12`` bytes).
    Learned attributes as RecVAE's; ``module_.linear`` is ``B`` (not in the state dict: ``save``
    writes it to ``linear.npz``), ``module_.linear_weight`` w. ``similar_items`` ranks by the
    decoder's item vectors, as RecVAE's. Under torchrun and on resume ``B`` is made as for
    :class:`MultVAELinear`.
    """

    _VAE_NAME = "recvae"
    PARAMETERS = table(RecVAE.PARAMETERS, add=LINEAR_PATH)

    def _build_network(self, n_items: int, generator: torch.Generator | None = None) -> RecVAELinearNetwork:
        return self._with_linear(RecVAELinearNetwork(self._config(n_items), generator,
                                                     weight=float(self.linear_weight)))
