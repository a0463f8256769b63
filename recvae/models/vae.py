"""Mult-VAE and Mult-DAE estimators: hyperparameters, the paper's training procedure, save and load.

Training follows the released notebook (dawenl/vae_cf, ``VAE_ML20M_WWW2018.ipynb``): Adam with
lr 1e-3, batches of 500 users shuffled every epoch, up to 200 epochs, the model of the epoch
with the best validation NDCG@100 kept. One departure: with validation, training stops after
``patience`` (:data:`PATIENCE`, 50) epochs without a gain, where the notebook trains every epoch
(``patience=None``). benchmarks/paper_table.py always passes its own ``--patience`` (default 50,
as its committed tables were made), so this default never reaches it.

Beta is annealed per update (see :mod:`recvae.models.annealing`). L2 penalty: the notebook adds ``2 * l2_regularizer(lam)`` over
the weight matrices (not biases), i.e. ``lam * sum_W ||W||_F^2``, with ``lam=0`` for the VAE and
``lam=0.01/batch_size = 2e-5`` for the DAE. Here it is applied as Adam's (coupled) weight decay
``2 * lam`` on the weight matrices, which adds exactly that penalty's gradient.

The loop itself (epochs, validation, early stopping, resume) is :mod:`recvae.models.training_loop`;
an estimator writes no file during ``fit``: checkpoints and history are callbacks of the caller.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from recvae import distributed
from recvae.data.user_items import training_matrix
from recvae.errors import InputError, ParameterError
from recvae.fileio import atomic_write, read_torch
from recvae.models.params import Choice, Float, Int, Param, Text, Tune, Widths, forced, table
from recvae.models.annealing import ANNEAL_CAP, TOTAL_ANNEAL_STEPS, make_schedule
from recvae.models.base import (
    SCORING_PRECISIONS, Recommender, check_finite, check_shapes, read_model_meta, verified_file,
    warn_if_not_binary, write_model_meta,
)
from recvae.models.device import resolve_device, stored_device
from recvae.models.item_parallel import PARALLEL_MODES, ItemShard, check_catalogue, sharded_sq_norm
from recvae.models.networks import ACTIVATIONS, MultNetwork, NetworkConfig, build_network
from recvae.models.sampled_softmax import PROPOSALS, SOFTMAXES, NegativeSampler
from recvae.models.output_layer import SCORE_DTYPES
from recvae.models.sparse_layers import SparseBatch
from recvae.models.training_loop import (  # noqa: F401  (NonFiniteLossError: part of this module's interface)
    NonFiniteLossError, TrainingLoop, make_optimizer, training_step,
)
from recvae.models.validation import as_validation

WEIGHTS_FILE = "weights.pt"
KL_WEIGHTINGS = ("uniform", "activity")
#: default early stopping: 50 epochs without a validation gain. The benchmark tables
#: (benchmarks/results/ml-*.json: 80 runs of Mult-VAE, Mult-DAE and the binary VAE, ML-100K, ML-1M
#: and ml-latest-small x 5 seeds, made with paper_table's --patience 50, so 50 reproduces them
#: exactly) never went 50 epochs without a gain before their best epoch, while 40, 30 or 20 would
#: have cut 7, 16 or 37 of them short (up to 6.9%, 6.9% or 17% of the best NDCG@100 lost): on
#: small data the validation curve dips for dozens of epochs while beta grows. A run that peaks
#: at epoch 5 stops at 55 instead of 200.
PATIENCE = 50
PRECISIONS = ("auto", "fp32", "bf16")

#: the autoencoders' shared rows: network and regulariser first (each model adds its objective's
#: rows after them), then how training runs (:data:`TRAINING`)
NETWORK = (
    Param("hidden_dims", Widths(), (600,), "architecture",
          "hidden layer widths of the encoder; the decoder mirrors them (paper: 600)",
          tune=Tune(name="hidden_dim", kind=Int(1), to_param=lambda width: (width,))),
    Param("latent_dim", Int(1), 200, "architecture", "latent size (paper: 200)",
          tune=Tune(space="int:25:300", grid=(50, 200))),
    Param("dropout", Float(0.0, 1.0, high_open=True), 0.5, "architecture", "input dropout rate (paper: 0.5)",
          tune=Tune(space="float:0.3:0.7")),
    Param("activation", Choice(tuple(sorted(ACTIVATIONS))), "tanh", "architecture",
          "activation of the hidden layers (paper: tanh)"),
    Param("lam", Float(0.0), 0.0, "architecture",
          "L2 weight on the weight matrices (paper: 0 for the VAE, 0.01/500 for the DAE)"),
)
KL_SCHEDULE = (
    Param("anneal_cap", Float(0.0), ANNEAL_CAP, "architecture", "largest KL weight beta (paper: 0.2)"),
    Param("total_anneal_steps", Int(1), TOTAL_ANNEAL_STEPS, "architecture",
          "updates to reach beta = 1 before capping (paper: 200000)"),
    Param("beta", Float(0.0), None, "architecture", "a constant KL weight instead of annealing (None: anneal)",
          optional=True),
    Param("kl_weighting", Choice(KL_WEIGHTINGS), "uniform", "architecture",
          "each user's KL weight: uniform (paper) or activity (n_u / mean n)", tune=Tune()),
)
TRAINING = (
    Param("epochs", Int(1), 200, "training", "training epochs (paper: 200)"),
    Param("batch_size", Int(1), 500, "architecture", "users per gradient update (paper: 500)"),
    Param("lr", Float(0.0, low_open=True), 1e-3, "training", "Adam's learning rate (paper: 1e-3)",
          tune=Tune(space="log:3e-4:3e-3")),
    Param("patience", Int(1), PATIENCE, "training",
          "early stopping: stop after this many epochs without a validation NDCG@100 gain, keeping the best "
          "epoch's weights; none: train every epoch (the paper); without validation users it does not apply",
          optional=True),
    Param("random_state", Int(0), 0, "architecture", "model seed (initialisation, dropout, sampling, order)",
          optional=True, flag="--seed"),
    Param("device", Text(), "auto", "runtime", "auto (CUDA when available), cpu or cuda"),
    Param("precision", Choice(PRECISIONS), "auto", "runtime",
          "training matmul precision: auto (bf16 where bf16 products are native, else fp32), fp32 or bf16"),
    Param("eval_batch_size", Int(1), 2000, "runtime", "users scored at once for validation"),
    Param("parallel", Choice(PARALLEL_MODES), "data", "runtime",
          "under torchrun: data (each process trains on its share of every batch and holds the whole model) "
          "or items (each process holds a range of the items' input and output rows and sees every batch: "
          "catalogues too large for one process; Mult-VAE, Mult-DAE, the binary VAE); one process: the same"),
)

#: the training loss's softmax (Mult-VAE, Mult-DAE and the binary VAE): the full one over every
#: item, or a sampled estimate for catalogues too large for it (:mod:`recvae.models.sampled_softmax`)
SOFTMAX = (
    Param("softmax", Choice(SOFTMAXES), "full", "architecture",
          "the training loss's softmax: full (every item, the paper) or sampled (each user's items and "
          "n_negatives negatives shared by the batch, log-Q corrected; for very large catalogues); "
          "scoring and validation always use every item"),
    Param("n_negatives", Int(1), 1000, "architecture", "softmax=sampled: negatives drawn per batch",
          tune=Tune()),
    Param("proposal", Choice(PROPOSALS), "uniform", "architecture",
          "softmax=sampled: the negatives' distribution: uniform (distinct items) or popularity "
          "(item count ** proposal_alpha, with replacement)", tune=Tune()),
    Param("proposal_alpha", Float(0.0), 0.75, "architecture", "proposal=popularity: the item counts' exponent"),
)


class _AutoencoderRecommender(Recommender):
    """Shared estimator code; subclasses set ``_variational`` and their ``__init__`` defaults.

    Training hooks a subclass may override: ``_build_network``, ``_make_optimizer`` (anything
    with ``state_dict``/``load_state_dict``), ``_train_epoch`` (the updates of one epoch) and
    ``_check_objective_params``; :class:`TrainingLoop` keeps validation, early stopping,
    checkpoints and resume for all of them. What a resume must keep is the table's
    ``architecture`` role (:attr:`_resume_keys`).
    """

    _variational: bool = True
    #: the values are counts in a multinomial likelihood: ``fit`` refuses negative ones (and
    #: scikit-learn's tags say so)
    _non_negative_input = True

    @classmethod
    def _resume_keys(cls) -> tuple[str, ...]:
        return forced(cls.PARAMETERS)

    def _check_params(self, check_device: bool = True) -> None:
        super()._check_params()
        self._check_objective_params()
        self._check_parallel()
        if check_device:
            resolve_device(self.device)

    def _check_parallel(self) -> None:
        """``parallel="items"`` splits the full softmax of the network: not the sampled one."""
        if self.parallel == "items" and getattr(self, "softmax", "full") != "full":
            raise ParameterError("parallel", "'items' splits the full softmax over the processes; the sampled "
                                             "softmax trains data-parallel: use parallel='data' or softmax='full'")

    def _check_objective_params(self) -> None:
        """The KL weight's parameters (subclasses with another objective override this)."""
        if self._variational:
            make_schedule(self.beta, self.anneal_cap, self.total_anneal_steps)  # raises on bad values

    def _config(self, n_items: int) -> NetworkConfig:
        return NetworkConfig(n_items=n_items, hidden_dims=tuple(int(d) for d in self.hidden_dims),
                             latent_dim=int(self.latent_dim), dropout=float(self.dropout),
                             activation=self.activation, variational=self._variational)

    def _schedule(self):
        if not self._variational:
            return None
        return make_schedule(self.beta, self.anneal_cap, self.total_anneal_steps)

    # -- hooks for estimators with another network or update scheme (RecVAE) -------------------
    def _build_network(self, n_items: int, generator: torch.Generator | None = None, shard: ItemShard | None = None):
        return build_network(self._config(n_items), generator, shard)

    def _make_optimizer(self, network):
        return make_optimizer(network, lr=self.lr, lam=self.lam)

    def _train_epoch(self, network, optimizer, X: sp.csr_matrix, epoch: int, loop: TrainingLoop) -> tuple[np.ndarray, float]:
        """One epoch of updates: every training user once, in batches, in a fresh order.
        Returns the per-user mean (loss, nll, kl) and the beta of the last update."""
        schedule = self._schedule()
        network.sampler = self._sampler(X)
        # kl_weighting="activity": user u's KL weighted by n_u / (mean n over training users)
        activity = self._variational and self.kl_weighting == "activity"
        kl_scale = X.shape[0] / max(float(X.sum()), 1e-12) if activity else None

        def update(batch: SparseBatch, rows: np.ndarray) -> tuple[np.ndarray, float]:
            beta = schedule(loop.state["step"]) if schedule is not None else 0.0
            kl_weights = batch.row_sums * kl_scale if kl_scale is not None else None
            return training_step(network, optimizer, batch, beta, loop.gen, loop.bf16, kl_weights), beta

        # every epoch reseeds from (seed, epoch): the checkpoint's seed is the whole RNG state
        order = np.random.default_rng([loop.seed, epoch]).permutation(X.shape[0])
        return loop.pass_over_users(order, update, epoch, f"epoch {epoch + 1}")

    def _sampler(self, X: sp.csr_matrix) -> NegativeSampler | None:
        """The negatives' sampler of ``softmax="sampled"`` for the training matrix ``X``; None: full."""
        if getattr(self, "softmax", "full") == "full":
            return None
        return NegativeSampler.from_matrix(X, int(self.n_negatives), self.proposal, float(self.proposal_alpha))

    def _l2_penalty(self, network: MultNetwork) -> float:
        if not self.lam:
            return 0.0
        if getattr(network, "shard", None) is not None:
            return float(self.lam * sharded_sq_norm(network))
        with torch.no_grad():
            return float(self.lam * sum(float(w.float().pow(2).sum()) for w in network.weight_matrices()))

    # -- fit -----------------------------------------------------------------------------------
    def fit(self, train, validation=None, callbacks=(), resume_from: dict | None = None, show_progress: bool = True):
        """Train on ``train`` (users x items: sparse, a dense 2-d array, or Interactions; values
        non-negative); return self.

        ``show_progress`` (on by default, as in implicit): a bar over the epochs where stderr is a
        terminal; elsewhere one plain line per epoch, an INFO record of the logger
        ``recvae.models.training_loop``: the application's logging configuration decides where it
        goes, and where there is none it is written to stderr (:func:`recvae.progress.say`).
        ``False``: nothing.

        ``validation``: a ``HeldOutUsers`` (``.fold_in``/``.heldout``), a ``(fold_in, heldout)``
        tuple (scored by NDCG@100) or a function ``model -> score``; it is computed after every
        epoch, drives early stopping (``patience`` epochs without a gain: 50 by default, RecVAE's
        20; None trains every epoch) and picks the epoch whose weights are kept. Without it every
        epoch trains and the last one is kept (``patience`` does not apply). scikit-learn's ``y``
        (a 1-d array, one value per row), which its pipelines pass here, is ignored: a recommender
        has no target.
        ``callbacks``: objects with ``on_epoch_end(epoch)`` (see
        :class:`~recvae.models.training_loop.EpochEnd`), e.g. the run directory's checkpoint
        writer; ``fit`` itself writes no file. ``resume_from``: a checkpoint payload (what
        ``EpochEnd.checkpoint()`` gave) to continue from (``epochs``, ``patience``, ``lr``,
        ``device``, ``precision`` may differ from the interrupted run; the other
        hyperparameters and the data must not:
        :class:`~recvae.models.training_loop.CheckpointMismatch` otherwise). A non-finite loss
        raises :class:`NonFiniteLossError` after keeping the best epoch's weights (see there).
        """
        self._check_params()
        X = training_matrix(train, non_negative=self._non_negative_input)
        warn_if_not_binary(X, type(self).__name__, "counts (each item's weight in the multinomial likelihood "
                           "and in the L2-normalised input)")
        validate = as_validation(validation, X.shape[1], int(self.eval_batch_size), n_users=X.shape[0])
        self._check_group(X.shape[1])
        item_ids = getattr(train, "item_ids", None)
        if item_ids is not None:
            self.item_ids_ = np.asarray(item_ids)
        elif hasattr(self, "item_ids_"):
            del self.item_ids_
        TrainingLoop(self, X, validate, callbacks, resume_from, show_progress=show_progress).run()
        distributed.barrier()  # the processes return together (rank 0 may write the run after)
        return self

    def _check_group(self, n_items: int) -> distributed.Group:
        group = distributed.current()
        if getattr(self, "parallel", "data") == "items":  # every process sees every batch
            check_catalogue(n_items, group)
        else:
            distributed.check_batch_split(self.batch_size, group)
        return group

    # -- scoring ------------------------------------------------------------------------------
    def _score_batch(self, user_items: sp.csr_matrix) -> np.ndarray:
        """Logits (B, I), float32, eval mode (no dropout, z = mu), in float32 whatever ``precision``;
        the output layer's product in ``scoring_precision`` (see :meth:`set_scoring_precision`)."""
        net = self.module_
        net.score_dtype = SCORE_DTYPES[self.scoring_precision]
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                logits = net(SparseBatch.from_csr(user_items, self.device_))
        finally:
            net.train(was_training)
        return logits.cpu().numpy()

    def _item_factors(self) -> np.ndarray:
        """The rows of the output layer (I, d): the item side of the multinomial's logits."""
        weight = next(v for k, v in self.module_.state_dict().items() if k.endswith("output_weight"))
        return weight.detach().float().cpu().numpy()

    def _user_factors(self, user_items: sp.csr_matrix) -> np.ndarray:
        """The latent code the decoder reads when scoring (eval mode: no dropout, z = mu)."""
        net = self.module_
        was_training = net.training
        net.eval()
        out = [np.zeros((0, int(self.latent_dim)), dtype=np.float32)]
        try:
            with torch.no_grad():
                for start in range(0, user_items.shape[0], int(self.eval_batch_size)):
                    batch = SparseBatch.from_csr(user_items[start:start + int(self.eval_batch_size)], self.device_)
                    out.append(net.latent(batch).float().cpu().numpy())
        finally:
            net.train(was_training)
        return np.concatenate(out)

    def _item_similarities(self, items: np.ndarray) -> np.ndarray:
        """Cosine similarity of the decoder's item vectors (:attr:`item_factors`)."""
        vectors = self._item_factors()
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors[items] @ vectors.T

    # -- save / load --------------------------------------------------------------------------
    _meta_keys = ("seed", "best_epoch", "best_score", "best_beta", "stopped_early", "history")
    _scoring_precisions = SCORING_PRECISIONS

    def save(self, path) -> Path:
        """Write ``weights.pt`` (state dict), then ``model.json`` (hyperparameters, item ids,
        the weights' SHA-256, training summary) into the folder ``path``; both atomically. No pickle."""
        self._check_fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.module_.state_dict().items()}
        # straight into the temporary file: through a BytesIO the ML-20M weights took 4x longer
        atomic_write(path / WEIGHTS_FILE, lambda f: torch.save(state, f))
        write_model_meta(
            path, self, self._json_params(), [WEIGHTS_FILE, *self._save_more(path)],
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
        meta_file, meta = read_model_meta(path, cls)
        params = cls._params_from_json(meta["params"])
        dev = resolve_device(device) if device is not None else stored_device(params.get("device"), meta_file)
        try:
            model = cls(**params)
            model._check_params(check_device=False)
            network = model._build_network(int(meta["n_items"]))
        except (TypeError, ValueError, KeyError) as e:
            raise InputError(meta_file, f"params: {e}") from None
        if device is not None:
            model.device = device
        weights_file = verified_file(meta_file, meta, WEIGHTS_FILE)
        state = read_torch(weights_file, "weights file")
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise InputError(weights_file, "expected a state dict of tensors")
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
        model._load_more(meta_file, meta)
        return model

    def _save_more(self, path: Path) -> list[str]:
        """Files beside the weights a subclass writes into ``path`` (atomically); their names,
        whose digests ``model.json`` records. None here."""
        return []

    def _load_more(self, meta_file: Path, meta: dict) -> None:
        """Read what :meth:`_save_more` wrote (verified against ``meta``'s digests). Nothing here."""



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
    PARAMETERS = (*NETWORK, *KL_SCHEDULE, *TRAINING, *SOFTMAX)


class MultDAE(_AutoencoderRecommender):
    """Mult-DAE (Liang et al., 2018): denoising autoencoder with multinomial likelihood.

    Objective per batch: ``-1/B sum_u sum_i x_ui log softmax(f(g(dropout(x_u))))_i
    + lam * sum_W ||W||^2``. Defaults are the released notebook's: architecture ``I-200-I``
    (``hidden_dims=()``; tanh on the 200-d code) and ``lam = 0.01 / 500 = 2e-5`` (the notebook
    passes ``lam=0.01/batch_size``). Learned attributes as :class:`MultVAE` (``best_beta_`` is None).
    """

    _variational = False
    PARAMETERS = table(MultVAE.PARAMETERS, drop=tuple(p.name for p in KL_SCHEDULE), hidden_dims=(), lam=0.01 / 500)
