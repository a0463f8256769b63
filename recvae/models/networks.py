"""The torch modules of Mult-VAE and Mult-DAE (Liang et al., WWW 2018) and their configuration.

Defaults follow the paper's released notebook (dawenl/vae_cf, ``VAE_ML20M_WWW2018.ipynb``):

* Mult-VAE: q-network ``I -> 600 -> 2x200`` (tanh on the hidden layer; the last layer gives mu
  and logvar), p-network ``200 -> 600 -> I`` (tanh on the hidden layer).
* Mult-DAE: ``I -> 200 -> I``, i.e. no hidden layer (the notebook's ``p_dims=[200, n_items]``),
  tanh on the 200-d code. (The paper's text reports ``I-600-200-600-I`` for both; pass
  ``hidden_dims=(600,)`` for that.)
* input: rows L2-normalised (``tf.nn.l2_normalize``), then dropout with keep probability 0.5,
  kept entries scaled by ``1/keep`` (``tf.nn.dropout``); training only.
* weights Xavier/Glorot uniform, biases truncated normal with std 0.001 (cut at 2 std, as
  ``tf.truncated_normal_initializer``).

The first layer takes the sparse batch directly and the output layer is fused with the
multinomial likelihood (see :mod:`recvae.models.sparse_layers` and :mod:`recvae.models.output_layer`), so a training step never
builds a dense users x items matrix. Dropout acts on the stored nonzeros only, which is the
same as dense dropout: a zero entry stays zero whether it is dropped or scaled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from recvae.errors import ParameterError
from recvae.models import item_parallel
from recvae.models.item_parallel import ItemShard
from recvae.models.sampled_softmax import NegativeSampler, sampled_output_nll
from recvae.models.output_layer import output_layer_nll, output_logits
from recvae.models.sparse_layers import SparseBatch, Workspace, sparse_input_linear

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "swish": torch.nn.functional.silu,  # x * sigmoid(x), RecVAE's
    "identity": lambda x: x,
}

LATENTS = ("gaussian", "bernoulli")
BIAS_INIT_STD = 0.001  # notebook: tf.truncated_normal_initializer(stddev=0.001)


@dataclass(frozen=True)
class NetworkConfig:
    """Architecture of a Mult-VAE / Mult-DAE network.

    ``hidden_dims`` are the encoder's hidden widths (the decoder mirrors them); ``latent_dim``
    is the size of z (VAE) or of the code (DAE). ``variational`` picks VAE (True) or DAE;
    ``latent`` the VAE's q(z|x): ``"gaussian"`` (the paper) or ``"bernoulli"`` (one bit per dimension).
    """

    n_items: int
    hidden_dims: tuple[int, ...] = (600,)
    latent_dim: int = 200
    dropout: float = 0.5
    activation: str = "tanh"
    variational: bool = True
    latent: str = "gaussian"

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden_dims", tuple(int(d) for d in self.hidden_dims))
        if not isinstance(self.n_items, int) or self.n_items < 1:
            raise ParameterError("n_items", f"expected a positive integer, got {self.n_items!r}")
        if any(d < 1 for d in self.hidden_dims):
            raise ParameterError("hidden_dims", f"expected positive widths, got {self.hidden_dims!r}")
        if not isinstance(self.latent_dim, int) or self.latent_dim < 1:
            raise ParameterError("latent_dim", f"expected a positive integer, got {self.latent_dim!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ParameterError("dropout", f"expected a probability in [0, 1), got {self.dropout!r}")
        if self.activation not in ACTIVATIONS:
            raise ParameterError("activation", f"expected one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.latent not in LATENTS:
            raise ParameterError("latent", f"expected one of {list(LATENTS)}, got {self.latent!r}")


@dataclass
class LossTerms:
    """One batch's objective: ``loss = nll + beta * kl`` (kl is 0 for the DAE)."""

    loss: torch.Tensor
    nll: torch.Tensor
    kl: torch.Tensor


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) averaged over users, each weighted by ``weights`` (default 1):

    KL = 1/B sum_u w_u * 0.5 * sum_k (-logvar_uk + exp(logvar_uk) + mu_uk^2 - 1).
    """
    mu, logvar = mu.float(), logvar.float()
    per_user = (0.5 * (-logvar + logvar.exp() + mu.pow(2) - 1.0)).sum(dim=1)  # (B,)
    if weights is not None:
        assert weights.shape == per_user.shape, f"weights {tuple(weights.shape)} != users {tuple(per_user.shape)}"
        per_user = per_user * weights.float()
    return per_user.mean()


def _init_linear_(weight: torch.Tensor, bias: torch.Tensor, generator: torch.Generator | None,
                  shard: ItemShard | None = None, bias_by_items: bool = False) -> None:
    # Glorot uniform is symmetric in fan-in/fan-out, so the (I, H) layout of the sparse and
    # output layers needs no special case.
    # ``shard``: ``weight`` holds the shard's rows of the (I, H) tensor, and ``bias`` too when
    # ``bias_by_items``: they get the full tensors' values at those rows (the (I,) bias is drawn whole)
    if shard is None:
        nn.init.xavier_uniform_(weight, generator=generator)
    else:
        item_parallel.uniform_rows_(weight, shard, generator)
    full_bias = bias.new_empty(shard.n_items) if shard is not None and bias_by_items else bias
    nn.init.trunc_normal_(full_bias, std=BIAS_INIT_STD, a=-2 * BIAS_INIT_STD, b=2 * BIAS_INIT_STD, generator=generator)
    if full_bias is not bias:
        bias.copy_(full_bias[shard.start:shard.stop])


class MultNetwork(nn.Module):
    """Encoder/decoder shared by :class:`MultVAENetwork` and :class:`MultDAENetwork`.

    Parameters: ``input_weight`` (I, d0) and ``input_bias`` for the sparse first layer,
    ``encoder`` / ``decoder`` ``nn.Linear`` stacks in between, ``output_weight`` (I, d_last) and
    ``output_bias`` (I,) for the logits.
    """

    variational = False
    #: encoder outputs per latent dimension: mu and logvar (Gaussian), one logit (Bernoulli), the code (DAE)
    outputs_per_latent = 1

    def __init__(self, config: NetworkConfig, generator: torch.Generator | None = None,
                 shard: ItemShard | None = None) -> None:
        super().__init__()
        if config.variational != self.variational:
            raise ValueError(f"config: variational={config.variational} does not fit {type(self).__name__}")
        self.config = config
        self.act = ACTIVATIONS[config.activation]
        enc = list(config.hidden_dims) + [config.latent_dim * self.outputs_per_latent]
        dec = [config.latent_dim] + list(reversed(config.hidden_dims))
        self.shard = shard
        rows = config.n_items if shard is None else shard.size
        self.input_weight = nn.Parameter(torch.empty(rows, enc[0]))
        self.input_bias = nn.Parameter(torch.empty(enc[0]))
        self.encoder = nn.ModuleList(nn.Linear(a, b) for a, b in zip(enc[:-1], enc[1:]))
        self.decoder = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dec[:-1], dec[1:]))
        self.output_weight = nn.Parameter(torch.empty(rows, dec[-1]))
        self.output_bias = nn.Parameter(torch.empty(rows))
        self.workspace = Workspace()  # reused B x I buffers; not part of the state dict
        self.score_dtype: torch.dtype | None = None  # the output layer's product in eval mode (None: h's)
        #: set by the estimator for ``softmax="sampled"``: :meth:`loss` then draws shared negatives
        #: (:mod:`recvae.models.sampled_softmax`); None: the full softmax. Scoring is always full.
        self.sampler: NegativeSampler | None = None
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Notebook initialisation, layer by layer from input to output, drawing from ``generator``."""
        with torch.no_grad():
            _init_linear_(self.input_weight, self.input_bias, generator, self.shard)
            for layer in list(self.encoder) + list(self.decoder):
                _init_linear_(layer.weight, layer.bias, generator)
            _init_linear_(self.output_weight, self.output_bias, generator, self.shard, bias_by_items=True)

    def weight_matrices(self) -> list[nn.Parameter]:
        """The weights the notebook's L2 penalty applies to (biases excluded)."""
        return [self.input_weight] + [l.weight for l in self.encoder] + [l.weight for l in self.decoder] + [self.output_weight]

    # -- pieces -----------------------------------------------------------------------------
    def _input_values(self, batch: SparseBatch, generator: torch.Generator | None) -> torch.Tensor:
        v = batch.normalized
        p = float(self.config.dropout)
        if self.training and p > 0:
            v = v * batch.keep_mask(1.0 - p, generator) / (1.0 - p)
        return v

    def _encode(self, batch: SparseBatch, generator: torch.Generator | None) -> torch.Tensor:
        """Last encoder output (pre-activation): [mu, logvar] for the VAE, the code for the DAE."""
        values = self._input_values(batch, generator)
        if self.shard is not None:
            h = item_parallel.input_linear(values, self.input_weight, self.input_bias, batch, self.shard, self.workspace)
        else:
            h = sparse_input_linear(values, self.input_weight, self.input_bias, batch, self.workspace)
        for layer in self.encoder:
            h = layer(self.act(h))
        return h

    def _hidden(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder up to (and including) the last activation: the input of the output layer."""
        h = z
        for layer in self.decoder:
            h = self.act(layer(h))
        return h

    def _latent(self, batch: SparseBatch, generator: torch.Generator | None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """(z, posterior parameters) for the VAE, (code, None) for the DAE."""
        raise NotImplementedError

    def _kl(self, posterior: tuple[torch.Tensor, ...], kl_weights: torch.Tensor | None) -> torch.Tensor:
        """KL(q(z|x) || prior) averaged over the batch, users weighted by ``kl_weights``."""
        return gaussian_kl(*posterior, weights=kl_weights)

    def _offset(self, batch: SparseBatch) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``(scores, w)``: (B, I) float32 scores of another path added to the logits
        (:mod:`recvae.models.hybrid`), times ``w`` when ``w`` is not None (a learned 0-dim weight,
        whose gradient the fused output layer computes); None here."""
        return None

    @staticmethod
    def _scaled(offset: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        scores, w = offset
        return scores if w is None else w * scores

    # -- public -----------------------------------------------------------------------------
    def forward(self, batch: SparseBatch, generator: torch.Generator | None = None) -> torch.Tensor:
        """Dense float32 logits (B, I). In eval mode: no dropout and z = mu. A sharded network
        gathers them on every process (see :func:`~recvae.models.item_parallel.gathered_logits`)."""
        if self.shard is not None:
            return item_parallel.gathered_logits(self, batch)
        z, _ = self._latent(batch, generator)
        h = self._hidden(z)
        logits = output_logits(h, self.output_weight, self.output_bias, self.workspace,
                               None if self.training else self.score_dtype)
        offset = self._offset(batch)
        return logits if offset is None else logits + self._scaled(offset)

    def latent(self, batch: SparseBatch) -> torch.Tensor:
        """(B, latent_dim): what the decoder reads in eval mode (mu, the code, the bits' probabilities)."""
        return self._latent(batch, None)[0]

    def loss(self, batch: SparseBatch, beta: float = 1.0, generator: torch.Generator | None = None,
             kl_weights: torch.Tensor | None = None) -> LossTerms:
        """Training objective of one batch: multinomial NLL (averaged over users) + beta * KL.
        The NLL is the full softmax's, or its sampled estimate when :attr:`sampler` is set.

        ``kl_weights`` (B,) scale each user's KL term (see ``MultVAE(kl_weighting=...)``); None: 1.
        """
        z, posterior = self._latent(batch, generator)
        h = self._hidden(z)
        offset = self._offset(batch)
        if self.shard is not None:
            if self.sampler is not None or offset is not None:
                raise ParameterError("parallel", "'items' trains the full softmax of the network alone: use "
                                                 "parallel='data'")
            nll = item_parallel.output_nll(h, self.output_weight, self.output_bias, batch, self.shard,
                                           self.workspace)
        elif self.sampler is None:
            scores, w = offset if offset is not None else (None, None)
            nll = output_layer_nll(h, self.output_weight, self.output_bias, batch, self.workspace, scores,
                                   offset_weight=w)
        elif offset is not None:
            raise ParameterError("softmax", "the sampled softmax does not take a linear path trained with the "
                                            "network (linear_weight_mode 'fixed' or 'learned'): use softmax='full'")
        else:  # drawn after the step's other random numbers: the full softmax's draws are unchanged
            nll = sampled_output_nll(h, self.output_weight, self.output_bias, batch,
                                     self.sampler.draw(generator, h.device), self.workspace)
        if posterior is None:
            kl = torch.zeros((), device=nll.device)
        else:
            kl = self._kl(posterior, kl_weights)
        return LossTerms(loss=nll + beta * kl, nll=nll, kl=kl)


class MultVAENetwork(MultNetwork):
    """Mult-VAE: Gaussian q(z|x) with reparameterised sampling in training, z = mu otherwise."""

    variational = True
    outputs_per_latent = 2

    def encode(self, batch: SparseBatch, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar), each (B, latent_dim), float32."""
        out = self._encode(batch, generator).float()
        d = self.config.latent_dim
        return out[:, :d], out[:, d:]

    def _latent(self, batch, generator):
        mu, logvar = self.encode(batch, generator)
        if self.training:
            z = mu + batch.row_noise(mu.shape[1], generator, dtype=mu.dtype) * torch.exp(0.5 * logvar)
        else:
            z = mu
        return z, (mu, logvar)


class MultDAENetwork(MultNetwork):
    """Mult-DAE: deterministic code ``act(encoder(x))``, no KL term."""

    variational = False

    def encode(self, batch: SparseBatch, generator: torch.Generator | None = None) -> torch.Tensor:
        """The (B, latent_dim) code."""
        return self.act(self._encode(batch, generator))

    def _latent(self, batch, generator):
        return self.encode(batch, generator), None


def bernoulli_kl(logits: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """KL(Bernoulli(p) || Bernoulli(0.5)) summed over the K bits, averaged over users (each
    weighted by ``weights``, default 1), with ``p = sigmoid(logits)``:

    KL_u = sum_k [p_k log p_k + (1 - p_k) log(1 - p_k)] + K log 2,

    with ``log p = logsigmoid(l)`` and ``log(1 - p) = logsigmoid(-l)``: finite at any logit.
    """
    logits = logits.float()
    p = torch.sigmoid(logits)
    per_bit = p * F.logsigmoid(logits) + (1.0 - p) * F.logsigmoid(-logits) + math.log(2.0)
    per_user = per_bit.sum(dim=1)  # (B,)
    if weights is not None:
        assert weights.shape == per_user.shape, f"weights {tuple(weights.shape)} != users {tuple(per_user.shape)}"
        per_user = per_user * weights.float()
    return per_user.mean()


class MultBernoulliNetwork(MultNetwork):
    """Mult-VAE with a binary latent: one logit per bit, prior Bernoulli(0.5) per bit.

    Training: a sampled 0/1 bit forward with the gradient of its probability backward
    (straight-through, ``temperature=None``), or a relaxed Gumbel-sigmoid sample
    ``sigmoid((logit + log u - log(1 - u)) / temperature)``. Eval mode: the bit probabilities,
    or the bits thresholded at 0.5 with ``binary_inference="bits"``. ``temperature`` and
    ``binary_inference`` are set by the estimator (not part of the state dict).
    """

    variational = True
    outputs_per_latent = 1

    def __init__(self, config: NetworkConfig, generator: torch.Generator | None = None,
                 shard: ItemShard | None = None) -> None:
        super().__init__(config, generator, shard)
        self.temperature: float | None = None
        self.binary_inference = "probabilities"

    def encode(self, batch: SparseBatch, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, latent_dim) float32 logits of the bits."""
        return self._encode(batch, generator).float()

    def _latent(self, batch, generator):
        logits = self.encode(batch, generator)
        p = torch.sigmoid(logits)
        if not self.training:
            return (p > 0.5).float() if self.binary_inference == "bits" else p, (logits,)
        u = batch.row_noise(logits.shape[1], generator, uniform=True)
        if self.temperature is None:
            bits = (u < p).float()
            z = bits + (p - p.detach())  # forward: the bit; backward: d bit / d p := 1
        else:
            noise = torch.log(u) - torch.log1p(-u)  # logistic: sigmoid((l + noise) / t) is relaxed Bernoulli(p)
            z = torch.sigmoid((logits + noise) / self.temperature)
        return z, (logits,)

    def _kl(self, posterior, kl_weights):
        return bernoulli_kl(*posterior, weights=kl_weights)


def build_network(config: NetworkConfig, generator: torch.Generator | None = None,
                  shard: ItemShard | None = None) -> MultNetwork:
    """The VAE (Gaussian or Bernoulli latent) or DAE module that ``config`` asks for (holding
    ``shard``'s items only, when given)."""
    if not config.variational:
        return MultDAENetwork(config, generator, shard)
    return (MultBernoulliNetwork if config.latent == "bernoulli" else MultVAENetwork)(config, generator, shard)
