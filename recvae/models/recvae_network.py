"""The torch module of RecVAE (Shenbin et al., WSDM 2020) and its composite prior.

Defaults follow the paper and its public code (ilya-shenbin/RecVAE):

* encoder q(z|x): the L2-normalised input (dropout 0.5 on it in encoder passes), 5 dense layers of
  width 600 where each layer's input also adds the outputs of all earlier layers,
  ``h_k = LN(swish(W_k h_{k-1} + b_k + sum_{j<k} h_j))`` (``h_1 = LN(swish(W_1 x + b_1))``),
  layer normalisation with eps 0.1, then two linear heads for mu and log-variance (latent 200);
* decoder: one linear layer from z to the items, multinomial likelihood on the raw counts;
* composite prior per latent dimension,
  ``p(z) = 0.15 N(z; 0, 1) + 0.75 q_old(z|x) + 0.10 N(z; 0, e^10)``, where ``q_old`` is a frozen
  copy of the encoder (no dropout) refreshed by the estimator after each encoder phase.

The first encoder layer takes the sparse batch and the decoder is the fused softmax +
multinomial NLL layer of :mod:`recvae.models.output_layer`, as in Mult-VAE: no dense users x
items input is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from recvae.errors import ParameterError
from recvae.models.networks import LossTerms, _init_linear_
from recvae.models.output_layer import output_layer_nll, output_logits
from recvae.models.sparse_layers import SparseBatch, Workspace, sparse_input_linear

LOG_2PI = math.log(2.0 * math.pi)
#: the reference's mixture weights: standard normal, q_old(z|x), wide normal
MIXTURE_WEIGHTS = (0.15, 0.75, 0.10)
#: log-variance of the wide component (the reference's ``logvar_uniform_prior``)
WIDE_LOGVAR = 10.0


@dataclass(frozen=True)
class RecVAEConfig:
    """Architecture of a RecVAE network; ``hidden_dims`` are the dense layers' widths (all equal:
    each layer adds the earlier layers' outputs)."""

    n_items: int
    hidden_dims: tuple[int, ...] = (600,) * 5
    latent_dim: int = 200
    dropout: float = 0.5
    layer_norm_eps: float = 0.1
    mixture_weights: tuple[float, float, float] = MIXTURE_WEIGHTS
    wide_logvar: float = WIDE_LOGVAR

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden_dims", tuple(int(d) for d in self.hidden_dims))
        object.__setattr__(self, "mixture_weights", tuple(float(w) for w in self.mixture_weights))
        if not self.hidden_dims or len(set(self.hidden_dims)) != 1 or self.hidden_dims[0] < 1:
            raise ParameterError("hidden_dims", "expected one or more equal positive widths (each layer adds the "
                             f"earlier layers' outputs), got {self.hidden_dims!r}")


def log_normal(x: torch.Tensor, mu: torch.Tensor | float, logvar: torch.Tensor | float) -> torch.Tensor:
    """Elementwise log N(x; mu, exp(logvar)) = -0.5 (logvar + log 2 pi + (x - mu)^2 / exp(logvar))."""
    logvar = torch.as_tensor(logvar, dtype=x.dtype, device=x.device)
    return -0.5 * (logvar + LOG_2PI + (x - mu).pow(2) * torch.exp(-logvar))


def composite_prior_log_density(z: torch.Tensor, old_mu: torch.Tensor, old_logvar: torch.Tensor,
                                mixture_weights=MIXTURE_WEIGHTS, wide_logvar: float = WIDE_LOGVAR) -> torch.Tensor:
    """Elementwise (B, K) log p(z) of the composite prior, per latent dimension:

    log( w_0 N(z; 0, 1) + w_1 N(z; old_mu, exp(old_logvar)) + w_2 N(z; 0, exp(wide_logvar)) ),
    computed as a logsumexp of the three weighted log-densities.
    """
    w = [math.log(float(v)) for v in mixture_weights]
    parts = torch.stack([log_normal(z, 0.0, 0.0) + w[0],
                         log_normal(z, old_mu, old_logvar) + w[1],
                         log_normal(z, 0.0, float(wide_logvar)) + w[2]], dim=-1)  # (B, K, 3)
    return torch.logsumexp(parts, dim=-1)


def one_sample_kl(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """Per-user (B,) one-sample estimate of KL(q(z|x) || p(z)) at the sample ``z`` ~ q:
    sum_k [log N(z_k; mu_k, exp(logvar_k)) - log p(z_k)]."""
    return (log_normal(z, mu, logvar) - log_prior).sum(dim=1)


class _SampleWithKL(torch.autograd.Function):
    """z = mu + eps * exp(logvar / 2) and the batch's KL term ``mean_u n_u KL_u`` in one
    function, with the gradient in closed form (:func:`sample_with_kl`)."""

    @staticmethod
    def forward(ctx, mu, logvar, eps, old_mu, old_logvar, row_sums, mixture_weights, wide_logvar):
        w = [math.log(float(v)) for v in mixture_weights]
        sigma = torch.exp(0.5 * logvar)
        z = torch.addcmul(mu, eps, sigma)
        # the three weighted log-densities t_c = w_c - (logvar_c + log 2 pi + (z - mean_c)^2 / var_c) / 2
        z2 = z * z
        t0 = z2.mul(-0.5).add_(w[0] - 0.5 * LOG_2PI)
        d1 = z - old_mu
        inv_var1 = torch.exp(-old_logvar)
        t1 = (d1 * d1).mul_(inv_var1).add_(old_logvar).mul_(-0.5).add_(w[1] - 0.5 * LOG_2PI)
        t2 = z2.mul_(-0.5 * math.exp(-wide_logvar)).add_(w[2] - 0.5 * (wide_logvar + LOG_2PI))
        top = torch.maximum(torch.maximum(t0, t1), t2)
        e0, e1, e2 = (t.sub_(top).exp_() for t in (t0, t1, t2))  # the mixture's terms over their largest
        total = e0 + e1 + e2
        log_prior = total.log().add_(top)
        # log q(z) at its own sample: (z - mu)^2 / var is eps^2
        log_q = (eps * eps).add_(logvar).add_(LOG_2PI).mul_(-0.5)
        kl = (log_q.sub_(log_prior).sum(dim=1) * row_sums).mean()
        ctx.save_for_backward(eps, sigma, z, d1, inv_var1, e0, e1, e2, total, row_sums)
        ctx.wide_var_inv = math.exp(-wide_logvar)
        return z, kl

    @staticmethod
    def backward(ctx, grad_z, grad_kl):
        eps, sigma, z, d1, inv_var1, e0, e1, e2, total, row_sums = ctx.saved_tensors
        c = (grad_kl * row_sums / row_sums.shape[0])[:, None]  # d loss / d KL_u, (B, 1)
        # d log p / dz = -(r_0 z + r_1 (z - old_mu) / var_1 + r_2 z / var_2), r: the terms' shares
        minus_dlog_prior = (e0 + e2 * ctx.wide_var_inv).mul_(z).addcmul_(e1, d1 * inv_var1).div_(total)
        grad_z = minus_dlog_prior.mul_(c).add_(grad_z) if grad_z is not None else minus_dlog_prior.mul_(c)
        # z = mu + eps sigma; log q(z) depends on logvar alone (-1/2 each), on mu not at all
        grad_logvar = (grad_z * eps).mul_(sigma).mul_(0.5).sub_(0.5 * c)
        return grad_z, grad_logvar, None, None, None, None, None, None


def sample_with_kl(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor, old_mu: torch.Tensor,
                   old_logvar: torch.Tensor, row_sums: torch.Tensor, mixture_weights=MIXTURE_WEIGHTS,
                   wide_logvar: float = WIDE_LOGVAR) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder phase's sample ``z = mu + eps * exp(logvar / 2)`` (B, K) and its KL term
    ``1/B sum_u n_u KL_u``, KL_u the :func:`one_sample_kl` to the :func:`composite_prior_log_density`
    (``old_mu``, ``old_logvar``: q_old's posterior, no gradient).

    The same values as those two functions; the gradients w.r.t. ``mu`` and ``logvar`` are
    written in closed form (the terms of log q(z) that cancel through z are left out), in ~a
    quarter of autograd's time over the ~30 operations of the two functions."""
    return _SampleWithKL.apply(mu, logvar, eps, old_mu.detach(), old_logvar.detach(), row_sums,
                               tuple(mixture_weights), float(wide_logvar))


class RecVAEEncoder(nn.Module):
    """q(z|x): sparse first layer, dense layers with summed earlier outputs, mu/logvar heads."""

    def __init__(self, config: RecVAEConfig) -> None:
        super().__init__()
        width, d = config.hidden_dims[0], config.latent_dim
        self.input_weight = nn.Parameter(torch.empty(config.n_items, width))  # (I, H): sparse layer layout
        self.input_bias = nn.Parameter(torch.empty(width))
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in config.hidden_dims[1:])
        self.norms = nn.ModuleList(nn.LayerNorm(width, eps=config.layer_norm_eps) for _ in config.hidden_dims)
        self.head = nn.Linear(width, 2 * d)  # [mu, logvar]
        self.latent_dim = d

    def reset_parameters(self, generator: torch.Generator | None) -> None:
        with torch.no_grad():
            _init_linear_(self.input_weight, self.input_bias, generator)
            for layer in list(self.layers) + [self.head]:
                _init_linear_(layer.weight, layer.bias, generator)
            for norm in self.norms:
                norm.reset_parameters()

    def weight_matrices(self) -> list[nn.Parameter]:
        return [self.input_weight] + [l.weight for l in self.layers] + [self.head.weight]

    def forward(self, values: torch.Tensor, batch: SparseBatch, workspace: Workspace
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar), each (B, latent_dim) float32, from the batch's nonzeros ``values``."""
        h = self.norms[0](F.silu(sparse_input_linear(values, self.input_weight, self.input_bias, batch, workspace)))
        earlier = h  # sum of all outputs so far, (B, H)
        for layer, norm in zip(self.layers, self.norms[1:]):
            # under autocast layer(h) is bf16 and ``earlier`` float32: a mixed add is ~10x slower
            # than the conversion and a float32 add, and gives the same values
            h = norm(F.silu(layer(h).float() + earlier))
            earlier = earlier + h
        out = self.head(h).float()  # (B, 2d)
        return out[:, :self.latent_dim], out[:, self.latent_dim:]


class RecVAEDecoder(nn.Module):
    """p(x|z): one linear layer to the items, ``output_weight`` (I, d) and ``output_bias`` (I,)."""

    def __init__(self, config: RecVAEConfig) -> None:
        super().__init__()
        self.output_weight = nn.Parameter(torch.empty(config.n_items, config.latent_dim))
        self.output_bias = nn.Parameter(torch.empty(config.n_items))

    def reset_parameters(self, generator: torch.Generator | None) -> None:
        with torch.no_grad():
            _init_linear_(self.output_weight, self.output_bias, generator)

    def weight_matrices(self) -> list[nn.Parameter]:
        return [self.output_weight]


class RecVAENetwork(nn.Module):
    """``encoder`` (trained in encoder phases), ``old_encoder`` (q_old of the prior, never trained;
    a copy of ``encoder`` made by :meth:`refresh_prior`) and ``decoder`` (trained in decoder phases)."""

    variational = True

    def __init__(self, config: RecVAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        self.encoder = RecVAEEncoder(config)
        self.old_encoder = RecVAEEncoder(config)
        self.old_encoder.requires_grad_(False)
        self.decoder = RecVAEDecoder(config)
        self.workspace = Workspace()  # reused B x I buffers; not part of the state dict
        self.score_dtype: torch.dtype | None = None  # the output layer's product in eval mode (None: z's)
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Encoder then decoder, drawing from ``generator``; q_old starts as a copy of the encoder."""
        self.encoder.reset_parameters(generator)
        self.decoder.reset_parameters(generator)
        self.refresh_prior()

    def refresh_prior(self) -> None:
        """q_old := the encoder as it is now."""
        with torch.no_grad():
            for old, new in zip(self.old_encoder.parameters(), self.encoder.parameters()):
                old.copy_(new)

    def weight_matrices(self) -> list[nn.Parameter]:
        """The trained weight matrices (biases, layer norms and q_old excluded)."""
        return self.encoder.weight_matrices() + self.decoder.weight_matrices()

    def draw_noise(self, batch: SparseBatch, dropout: bool, generator: torch.Generator | None
                   ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The random numbers of one training pass over ``batch``, in the order they are drawn:
        the input's keep mask (None without ``dropout``) and the reparameterisation noise (B,
        latent_dim). Data parallel, both are the global batch's, this process's share kept
        (:class:`~recvae.models.sparse_layers.BatchPart`); a process whose share is empty calls
        this alone to keep its generator in step with the others."""
        p = float(self.config.dropout)
        keep = batch.keep_mask(1.0 - p, generator) if dropout and p > 0 else None
        return keep, batch.row_noise(self.config.latent_dim, generator)

    def _encode(self, batch: SparseBatch, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of the input with the dropout ``keep`` mask applied (None: no dropout)."""
        v = batch.normalized
        if keep is not None:
            p = float(self.config.dropout)
            v = v * keep / (1.0 - p)
        return self.encoder(v, batch, self.workspace)

    def forward(self, batch: SparseBatch, generator: torch.Generator | None = None) -> torch.Tensor:
        """Dense float32 logits (B, I). In eval mode: no dropout and z = mu."""
        if self.training:
            keep, eps = self.draw_noise(batch, True, generator)
            mu, logvar = self._encode(batch, keep)
            z = self._sample(mu, logvar, eps)
        else:
            z, _ = self._encode(batch, None)
        return output_logits(z, self.decoder.output_weight, self.decoder.output_bias, self.workspace,
                             None if self.training else self.score_dtype)

    def latent(self, batch: SparseBatch) -> torch.Tensor:
        """(B, latent_dim): mu without dropout, what the decoder reads in eval mode."""
        return self._encode(batch, None)[0]

    @staticmethod
    def _sample(mu, logvar, eps):
        return mu + eps * torch.exp(0.5 * logvar)

    def _nll(self, z: torch.Tensor, batch: SparseBatch) -> torch.Tensor:
        return output_layer_nll(z, self.decoder.output_weight, self.decoder.output_bias, batch, self.workspace,
                                fold_bias=True)

    def old_posterior(self, batch: SparseBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """q_old's (mu, logvar) for the batch, each (B, latent_dim): no dropout, no gradient."""
        with torch.no_grad():
            return self.old_encoder(batch.normalized, batch, self.workspace)

    def encoder_loss(self, batch: SparseBatch, gamma: float, generator: torch.Generator | None = None,
                     old: tuple[torch.Tensor, torch.Tensor] | None = None) -> LossTerms:
        """Encoder phase: ``nll + gamma * 1/B sum_u n_u KL_u`` with dropout on the input and the
        one-sample KL to the composite prior (q_old without dropout; ``old`` passes its
        :meth:`old_posterior` when already computed). ``kl`` is ``1/B sum_u n_u KL_u``, so
        ``loss = nll + gamma * kl``."""
        keep, eps = self.draw_noise(batch, True, generator)
        mu, logvar = self._encode(batch, keep)
        old_mu, old_logvar = old if old is not None else self.old_posterior(batch)
        z, kl = sample_with_kl(mu, logvar, eps, old_mu, old_logvar, batch.row_sums, self.config.mixture_weights,
                               self.config.wide_logvar)  # z: (B, d)
        nll = self._nll(z, batch)
        return LossTerms(loss=nll + gamma * kl, nll=nll, kl=kl)

    def decoder_loss(self, batch: SparseBatch, generator: torch.Generator | None = None,
                     posterior: tuple[torch.Tensor, torch.Tensor] | None = None) -> LossTerms:
        """Decoder phase: the multinomial NLL at a sample of q(z|x) without input dropout. The KL
        term does not depend on the decoder, so it is neither computed nor differentiated.
        ``posterior``: q(z|x)'s (mu, logvar) of the batch when already computed (the encoder is
        frozen in this phase and its input has no dropout: they are q_old's after the refresh)."""
        _, eps = self.draw_noise(batch, False, generator)
        with torch.no_grad():
            mu, logvar = posterior if posterior is not None else self._encode(batch, None)
            z = self._sample(mu, logvar, eps)
        nll = self._nll(z, batch)
        zero = torch.zeros((), device=nll.device)
        return LossTerms(loss=nll, nll=nll, kl=zero)
