"""Mult-VAE with a binary latent: each user gets a K-bit code (compact storage, Hamming retrieval).

The second form of the ELBO in the project's seed: q(z|x) is a product of Bernoullis (one logit
per bit from the encoder), the prior Bernoulli(0.5) per bit, so

    KL_u = sum_k [p_k log p_k + (1 - p_k) log(1 - p_k)] + K log 2

beside the multinomial reconstruction term; beta, its annealing and ``kl_weighting`` are
:class:`~recvae.models.vae.MultVAE`'s. The bits are sampled with a straight-through estimator
(forward: a 0/1 bit drawn with probability p; backward: the gradient of p) or, with a
``temperature``, a relaxed Gumbel-sigmoid sample whose temperature decays per epoch.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from recvae.models.base import as_csr
from recvae.models.networks import NetworkConfig
from recvae.models.sparse_layers import SparseBatch
from recvae.models.params import Choice, Float, Param, table
from recvae.models.vae import MultVAE

BINARY_INFERENCE = ("probabilities", "bits")


class BinaryMultVAE(MultVAE):
    """Mult-VAE whose latent is ``latent_dim`` Bernoulli bits (prior Bernoulli(0.5)).

    Parameters as :class:`MultVAE`, plus ``temperature``: None (default) samples hard bits with
    the straight-through estimator; a number t0 > 0 uses the relaxed (Gumbel-sigmoid) sample at
    temperature ``max(min_temperature, t0 * exp(-temperature_decay * epoch))`` (epoch from 0).
    ``binary_inference``: what the decoder reads when scoring, ``"probabilities"`` (default) or
    ``"bits"`` (thresholded at 0.5, i.e. exactly the user's code). :meth:`codes` gives the packed codes.
    """

    PARAMETERS = table(MultVAE.PARAMETERS, add=(
        Param("temperature", Float(0.0, low_open=True), None, "architecture",
              "relaxed Gumbel-sigmoid sample at this temperature (None: straight-through bits)", optional=True),
        Param("min_temperature", Float(0.0, low_open=True), 0.5, "architecture",
              "the relaxed sample's temperature never decays below this"),
        Param("temperature_decay", Float(0.0), 0.0, "architecture", "the temperature's decay rate per epoch"),
        Param("binary_inference", Choice(BINARY_INFERENCE), "probabilities", "architecture",
              "what the decoder reads when scoring: the bits' probabilities or the bits themselves"),
    ))

    def _config(self, n_items: int) -> NetworkConfig:
        c = super()._config(n_items)
        return NetworkConfig(n_items=c.n_items, hidden_dims=c.hidden_dims, latent_dim=c.latent_dim,
                             dropout=c.dropout, activation=c.activation, variational=True, latent="bernoulli")

    def _build_network(self, n_items, generator=None, shard=None):
        network = super()._build_network(n_items, generator, shard)
        network.binary_inference = self.binary_inference
        return network

    def _epoch_temperature(self, epoch: int) -> float | None:
        if self.temperature is None:
            return None
        return max(float(self.min_temperature), float(self.temperature) * math.exp(-self.temperature_decay * epoch))

    def _train_epoch(self, network, optimizer, X, epoch, loop):
        network.temperature = self._epoch_temperature(epoch)
        return super()._train_epoch(network, optimizer, X, epoch, loop)

    def _score_batch(self, user_items):
        self.module_.binary_inference = self.binary_inference  # set_params after fit applies too
        return super()._score_batch(user_items)

    def _user_factors(self, user_items):
        self.module_.binary_inference = self.binary_inference  # as scoring reads them
        return super()._user_factors(user_items)

    def codes(self, user_items) -> np.ndarray:
        """Packed binary codes, uint8 (users, ceil(latent_dim / 8)): bit k of a user is 1 when
        its probability is above 0.5; ``np.unpackbits(codes, axis=1, count=latent_dim)`` gives
        the bits back (big-endian within a byte, as ``np.packbits``)."""
        self._check_fitted()
        user_items = as_csr(user_items, "user_items", self.n_items_)
        net = self.module_
        out = []
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                for start in range(0, user_items.shape[0], int(self.eval_batch_size)):
                    batch = SparseBatch.from_csr(user_items[start:start + int(self.eval_batch_size)], self.device_)
                    bits = (net.encode(batch) > 0).cpu().numpy()  # p > 0.5  <=>  logit > 0
                    out.append(np.packbits(bits.astype(np.uint8), axis=1))
        finally:
            net.train(was_training)
        if not out:
            return np.zeros((0, (int(self.latent_dim) + 7) // 8), dtype=np.uint8)
        return np.concatenate(out)
