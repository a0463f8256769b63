"""RecVAE estimator (Shenbin, Alekseev, Tutubalina, Malykh, Nikolenko, WSDM 2020).

Same interface as :class:`~recvae.models.vae.MultVAE` (fit with validation and early stopping,
recommend, save/load, resume): it reuses that estimator's ``fit`` and overrides only the network,
the optimisers and what one epoch does. One outer epoch (defaults from the paper's code):

1. ``encoder_epochs`` (3) passes over the training users, each in a fresh random order, updating
   the encoder only (Adam, lr 5e-4), input dropout 0.5, objective
   ``nll + gamma * 1/B sum_u n_u KL_u`` (``n_u = sum_i x_ui``; KL to the composite prior,
   estimated with one sample, see :mod:`recvae.models.recvae_network`);
2. q_old := the encoder (the prior's middle component; its (mu, logvar) for every training user
   is computed once per outer epoch, as it does not change during the encoder passes);
3. ``decoder_epochs`` (1) passes updating the decoder only (its own Adam), no dropout.

Validation NDCG@100 after each outer epoch; the best outer epoch's weights are kept, and training
stops after ``patience`` (default 20; None: never) outer epochs without a gain.

Under torchrun every pass is data parallel as Mult-VAE's epochs are (:mod:`recvae.distributed`):
each process trains on its share of every global batch, with the dropout and noise drawn for the
whole global batch (:meth:`RecVAENetwork.draw_noise`), and the trained half's gradients summed.
"""

from __future__ import annotations

from recvae.errors import ParameterError


import numpy as np
import scipy.sparse as sp
import torch

from recvae.models.sparse_layers import SparseBatch, version
from recvae.models.recvae_network import MIXTURE_WEIGHTS, WIDE_LOGVAR, RecVAEConfig, RecVAENetwork
from recvae.models.params import Choice, Float, Floats, Int, Param, Tune, table
from recvae.models.training_loop import make_optimizer, update_step
from recvae.models.vae import NETWORK, TRAINING, _AutoencoderRecommender


class _PhaseOptimizers:
    """The encoder's and the decoder's Adam, checkpointed together."""

    def __init__(self, network: RecVAENetwork, lr: float, lam: float) -> None:
        self.encoder = make_optimizer(network.encoder, lr=lr, lam=lam)
        self.decoder = make_optimizer(network.decoder, lr=lr, lam=lam)

    def state_dict(self) -> dict:
        return {"encoder": self.encoder.state_dict(), "decoder": self.decoder.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.encoder.load_state_dict(state["encoder"])
        self.decoder.load_state_dict(state["decoder"])

    @property
    def param_groups(self) -> list[dict]:
        """Both optimisers' groups (a resume sets a changed lr through them)."""
        return self.encoder.param_groups + self.decoder.param_groups


class RecVAE(_AutoencoderRecommender):
    """RecVAE: Mult-VAE with a denser encoder, a composite prior, a per-user KL weight
    ``gamma * n_u`` and alternating encoder/decoder updates.

    Objective of an encoder pass, per batch of B users::

        -1/B sum_u sum_i x_ui log softmax(W z_u + b)_i  +  gamma * 1/B sum_u n_u KL_u,
        KL_u = sum_k [log q(z_uk|x_u) - log p(z_uk)],  z_u ~ q(z|x_u) (one sample),
        p(z_k) = 0.15 N(0, 1) + 0.75 q_old(z_k|x_u) + 0.10 N(0, e^10)

    Parameters as :class:`MultVAE` where shared; ``hidden_dims`` are the encoder's dense layers
    (equal widths), ``activation`` is swish, ``gamma`` the KL weight per interaction,
    ``mixture_weights`` / ``wide_logvar`` the prior's, ``layer_norm_eps`` the layer norms' eps,
    ``encoder_epochs`` / ``decoder_epochs`` the passes per outer epoch (``epochs`` counts outer
    epochs). Learned attributes as :class:`MultVAE`; ``history_`` rows hold the encoder passes'
    mean loss, nll and kl (``1/B sum_u n_u KL_u``), and ``beta`` is gamma.
    """

    _variational = True
    PARAMETERS = table(
        NETWORK, hidden_dims=(600,) * 5, activation="swish",
        changes={"activation": {"kind": Choice(("swish",)), "help": "activation of the hidden layers (RecVAE's: swish)"},
                 "hidden_dims": {"help": "the encoder's dense layers, equal widths (each adds the earlier layers' "
                                         "outputs; paper: 600 x 5)", "tune": None},
                 "latent_dim": {"tune": Tune()}},
        add=(
            Param("gamma", Float(0.0), 0.005, "architecture", "KL weight per interaction: beta_u = gamma * n_u",
                  tune=Tune(space="log:0.001:0.02", grid=(0.0025, 0.005, 0.01))),
            Param("mixture_weights", Floats(3), MIXTURE_WEIGHTS, "architecture",
                  "the composite prior's weights of N(0,1), q_old and N(0,e^10), summing to 1"),
            Param("wide_logvar", Float(), WIDE_LOGVAR, "architecture", "log-variance of the prior's wide component"),
            Param("layer_norm_eps", Float(0.0, low_open=True), 0.1, "architecture", "the layer norms' eps"),
            Param("encoder_epochs", Int(1), 3, "architecture", "encoder passes per epoch"),
            Param("decoder_epochs", Int(1), 1, "architecture", "decoder passes per epoch"),
            # patience 20 of 50 outer epochs: the benchmark tables' 15 RecVAE runs (3 data sets x 5
            # seeds) never went more than 13 epochs without a validation gain before their best
            *table(TRAINING, epochs=50, lr=5e-4, patience=20, changes={"lr": {"tune": Tune(space="log:2e-4:2e-3")}}),
        ),
    )

    def _check_parallel(self) -> None:
        if self.parallel == "items":
            raise ParameterError("parallel", "RecVAE trains data-parallel only: use parallel='data' (parallel='items' "
                                             "is Mult-VAE's, Mult-DAE's and the binary VAE's)")

    def _check_objective_params(self) -> None:
        w = self.mixture_weights
        try:
            ok = len(w) == 3 and all(float(x) > 0 for x in w) and abs(sum(float(x) for x in w) - 1.0) < 1e-6
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ParameterError("mixture_weights", f"expected 3 positive weights summing to 1 (standard normal, "
                             f"q_old, wide normal), got {w!r}")
        dims = tuple(int(d) for d in self.hidden_dims)
        if not dims or len(set(dims)) != 1:
            raise ParameterError("hidden_dims", f"expected one or more equal widths (each layer adds the earlier "
                             f"layers' outputs), got {self.hidden_dims!r}")

    def _config(self, n_items: int) -> RecVAEConfig:
        return RecVAEConfig(n_items=n_items, hidden_dims=tuple(int(d) for d in self.hidden_dims),
                            latent_dim=int(self.latent_dim), dropout=float(self.dropout),
                            layer_norm_eps=float(self.layer_norm_eps),
                            mixture_weights=tuple(float(w) for w in self.mixture_weights),
                            wide_logvar=float(self.wide_logvar))

    def _build_network(self, n_items, generator=None) -> RecVAENetwork:
        return RecVAENetwork(self._config(n_items), generator)

    def _make_optimizer(self, network: RecVAENetwork) -> _PhaseOptimizers:
        return _PhaseOptimizers(network, lr=self.lr, lam=self.lam)

    def _train_epoch(self, network: RecVAENetwork, optimizer: _PhaseOptimizers, X: sp.csr_matrix, epoch: int,
                     loop) -> tuple[np.ndarray, float]:
        """encoder_epochs passes (encoder only), q_old refreshed, decoder_epochs passes (decoder only).
        Returns the encoder passes' mean (loss, nll, kl) per user, and gamma."""
        gamma = float(self.gamma)
        n_enc, n_dec = int(self.encoder_epochs), int(self.decoder_epochs)
        posteriors = None  # q_old's (mu, logvar) of every training user: fixed for a whole phase

        def run_pass(p: int, phase: str) -> np.ndarray:
            encoder_phase = phase == "encoder"
            # only the trained half needs gradients: the fused output layer then skips its I x d product
            network.encoder.requires_grad_(encoder_phase)
            network.decoder.requires_grad_(not encoder_phase)
            trained = network.encoder if encoder_phase else network.decoder
            opt = optimizer.encoder if encoder_phase else optimizer.decoder

            def update(batch, rows):
                part = batch.part  # data parallel: this process's share of the global batch
                if part is not None and not batch.n_rows:
                    # an empty share (an epoch's last, short batch) still draws the global batch's
                    # random numbers: the next pass goes on with the same generator on every process
                    network.draw_noise(batch, encoder_phase, loop.gen)
                mine = rows if part is None else rows[part.start:part.stop]
                idx = torch.as_tensor(mine, device=posteriors[0].device)
                post = (posteriors[0][idx], posteriors[1][idx])
                if encoder_phase:
                    loss = lambda: network.encoder_loss(batch, gamma, loop.gen, post)  # noqa: E731
                else:
                    loss = lambda: network.decoder_loss(batch, loop.gen, post)  # noqa: E731
                return update_step(opt, loss, batch.device.type, loop.bf16, part=part, n_rows=batch.n_rows,
                                   parameters=trained.parameters), gamma

            order = np.random.default_rng([loop.seed, epoch, p]).permutation(X.shape[0])
            means, _ = loop.pass_over_users(order, update, epoch, f"epoch {epoch + 1} {phase} {p + 1}")
            return means

        try:
            posteriors = self._old_posteriors(network, X, loop)
            enc = sum(run_pass(p, "encoder") for p in range(n_enc)) / n_enc
            network.refresh_prior()
            # q_old is now the encoder, which the decoder phase leaves as it is: one pass gives the
            # decoder phase's q(z|x) (no dropout there) and the next epoch's q_old
            posteriors = self._old_posteriors(network, X, loop)
            for p in range(n_enc, n_enc + n_dec):
                run_pass(p, "decoder")
        finally:
            network.encoder.requires_grad_(True)
            network.decoder.requires_grad_(True)
        return enc, gamma

    def _old_posteriors(self, network: RecVAENetwork, X: sp.csr_matrix, loop) -> tuple:
        """q_old's (mu, logvar), each (n_users, latent_dim) on the device, under the training
        precision: computed once per phase instead of once per update, since q_old and its input
        (no dropout) do not change within one. Kept on ``loop`` for the next epoch, whose encoder
        phase starts from the same q_old, unless q_old's weights have changed since."""
        key = tuple(version(p) for p in network.old_encoder.parameters())
        kept = getattr(loop, "recvae_posteriors", None)
        if kept is not None and kept[0] == key:
            return kept[1]
        mus, logvars = [], []
        step = int(self.eval_batch_size)
        for lo in range(0, X.shape[0], step):
            batch = SparseBatch.from_csr(X[lo:lo + step], loop.device)
            with torch.autocast(loop.device.type, dtype=torch.bfloat16, enabled=loop.bf16):
                mu, logvar = network.old_posterior(batch)
            mus.append(mu)
            logvars.append(logvar)
        network.workspace.clear()
        loop.recvae_posteriors = (key, (torch.cat(mus), torch.cat(logvars)))
        return loop.recvae_posteriors[1]
