"""Sampled softmax: the multinomial NLL of a training step over a few items instead of all I.

With ``softmax="sampled"`` a training step of Mult-VAE / Mult-DAE draws ``n_negatives`` items
from a proposal ``q`` once for the whole batch (shared negatives, Jean et al. 2015; Yi et al.,
RecSys 2019) and replaces each user's normaliser ``Z_u = sum_i exp(l_ui)`` by the
importance-sampling estimate (Bengio & Senecal, 2008)

    Z_u ~= sum_{i in P_u} exp(l_ui) + sum_{j in N, j not in P_u} exp(l_uj - log E[c_j] + log c_j)

where ``P_u`` are the user's items (always counted exactly), ``N`` the distinct sampled items,
``c_j`` how often ``j`` was drawn and ``E[c_j]`` its expected count under the proposal (the
*log-Q correction*). The estimate of ``Z_u`` is unbiased (every item can be drawn), so the
sampled loss

    NLL_u = n_u * log Z_u - sum_{i in P_u} x_ui l_ui

and its gradient estimate the full ones (the log makes them biased by O(1/n_negatives), the
usual sampled-softmax trade). Proposals:

* ``uniform``: ``n_negatives`` distinct items, drawn without replacement; ``E[c_j] = S / I``.
  With ``n_negatives >= I`` the sample is the whole catalogue, every correction is 0 and the
  sampled loss *is* the full NLL (tests check this).
* ``popularity``: ``n_negatives`` draws with replacement from ``q_j`` proportional to
  ``max(n_j, 1) ** alpha`` (``n_j``: item j's total count in the training matrix; an item never
  seen still gets the weight of one count, so every item can be drawn and the estimate stays
  unbiased); ``E[c_j] = S q_j``. Duplicates are merged into one column with ``+ log c_j``,
  which is the same sum.

The step gathers the output layer's rows of the batch's items and the negatives (``M``
distinct items), computes a B x M block of logits and writes the weight gradient into those
rows only (:func:`gather_rows`): nothing of size B x I is built. Draws take the training
loop's seeded generator, one draw per global batch (the same on every data-parallel process,
as :class:`~recvae.models.sparse_layers.BatchPart` draws the step's other random numbers), so
resume and torchrun give the same numbers as one uninterrupted process. Evaluation,
validation and recommendations always score every item (the full softmax's logits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from recvae.errors import ParameterError
from recvae.models.sparse_layers import SparseBatch, Workspace, _grad_buffer

SOFTMAXES = ("full", "sampled")
PROPOSALS = ("uniform", "popularity")


@dataclass(frozen=True)
class Negatives:
    """One step's shared negatives: distinct item indices (sorted) and the constant added to
    each one's logit, ``log c_j - log E[c_j]`` (the log-Q correction with the draw's count)."""

    items: torch.Tensor  # (S',) int64
    log_weight: torch.Tensor  # (S',) float32


class NegativeSampler:
    """Draws :class:`Negatives` from a proposal over ``n_items`` items.

    Parameters
    ----------
    n_items : int
        The catalogue size I.
    n_negatives : int
        Draws per step, S.
    proposal : str
        ``"uniform"`` (without replacement) or ``"popularity"`` (with replacement, from
        ``max(count, 1) ** alpha``).
    alpha : float
        The popularity proposal's exponent (0: uniform, with replacement).
    item_counts : numpy.ndarray, optional
        (I,) each item's count in the training matrix; required for ``"popularity"``.
    """

    def __init__(self, n_items: int, n_negatives: int, proposal: str = "uniform", alpha: float = 0.75,
                 item_counts: np.ndarray | None = None) -> None:
        if proposal not in PROPOSALS:
            raise ParameterError("proposal", f"expected one of {', '.join(map(repr, PROPOSALS))}, got {proposal!r}")
        self.n_items, self.n_negatives, self.proposal = int(n_items), int(n_negatives), proposal
        self.probabilities: np.ndarray | None = None  # q (float64), popularity only
        self._cdf: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        if proposal == "popularity":
            if item_counts is None or len(item_counts) != self.n_items:
                raise ValueError("popularity proposal: item_counts must hold one count per item")
            w = np.maximum(np.asarray(item_counts, dtype=np.float64), 1.0) ** float(alpha)
            self.probabilities = w / w.sum()

    @classmethod
    def from_matrix(cls, X: sp.csr_matrix, n_negatives: int, proposal: str, alpha: float) -> "NegativeSampler":
        """The sampler of a training matrix (users x items): popularity counts are its column sums."""
        counts = np.asarray(X.sum(axis=0)).ravel() if proposal == "popularity" else None
        return cls(X.shape[1], n_negatives, proposal, alpha, counts)

    def draw(self, generator: torch.Generator | None, device: torch.device | str = "cpu") -> Negatives:
        """One step's negatives, drawn from ``generator`` (on ``device``, as the generator is)."""
        S, I = self.n_negatives, self.n_items
        if self.proposal == "uniform":
            if S >= I:  # the whole catalogue, each item once: E[c_j] = 1, the full softmax
                items = torch.arange(I, device=device)
            else:
                items = torch.randperm(I, generator=generator, device=device)[:S].sort().values
            log_weight = torch.full((len(items),), -math.log(min(S, I) / I), device=device)
            return Negatives(items, log_weight)
        kept = self._cdf.get(torch.device(device))
        if kept is None:  # (cumulative q, q) on the device, made once
            kept = (torch.as_tensor(np.cumsum(self.probabilities), device=device),
                    torch.as_tensor(self.probabilities, device=device))
            self._cdf[torch.device(device)] = kept
        cdf, q = kept
        u = torch.rand(S, generator=generator, device=device, dtype=torch.float64) * cdf[-1]
        draws = torch.searchsorted(cdf, u, right=True).clamp_(max=I - 1)
        items, counts = torch.unique(draws, return_counts=True)
        return Negatives(items, (counts.double().log() - (S * q[items]).log()).float())


class _GatherRows(torch.autograd.Function):
    """``param[index]`` whose backward writes the rows' gradient straight into ``param.grad``
    (zeros elsewhere), through the workspace's kept buffer as the fused layers do."""

    @staticmethod
    def forward(ctx, param, index, workspace: Workspace, name: str):
        ctx.param, ctx.index, ctx.workspace, ctx.name = param, index, workspace, name
        return param.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        param, index = ctx.param, ctx.index
        grad = grad.to(param.dtype)
        if _grad_buffer(param, ctx.workspace, ctx.name) is not None:
            param.grad.zero_().index_copy_(0, index, grad)  # index: distinct items
        else:
            param.grad.index_add_(0, index, grad)
        ctx.param = ctx.index = None
        return None, None, None, None


def gather_rows(param: torch.Tensor, index: torch.Tensor, workspace: Workspace, name: str) -> torch.Tensor:
    """The rows ``index`` (distinct) of ``param``; the gradient goes into those rows of
    ``param.grad`` only. Like the fused layers, ``torch.autograd.grad`` w.r.t. ``param`` is not
    supported; ``loss.backward()`` is."""
    if not (torch.is_grad_enabled() and param.requires_grad):
        return param.index_select(0, index)
    return _GatherRows.apply(param, index, workspace, name)


def sampled_output_nll(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, batch: SparseBatch,
                       negatives: Negatives, workspace: Workspace | None = None) -> torch.Tensor:
    """Mean over the batch's users of the sampled multinomial NLL (see the module's docstring).

    ``weight`` (I, H) and ``bias`` (I,) are the output layer's, as in
    :func:`~recvae.models.output_layer.output_layer_nll`; the logits of the ``M`` items of
    ``batch.cols`` and ``negatives.items`` are a B x M product (in the autocast dtype when
    autocast is on), the rest in float32.
    """
    workspace = workspace or Workspace()
    nnz = batch.cols.numel()
    cand, inverse = torch.unique(torch.cat([batch.cols, negatives.items]), sorted=True, return_inverse=True)
    pos_col, neg_col = inverse[:nnz], inverse[nnz:]
    w = gather_rows(weight, cand, workspace, "output_weight_grad")
    b = gather_rows(bias, cand, workspace, "output_bias_grad")
    logits = (h @ w.t()).float() + b  # the product under autocast's dtype when it is on
    # each user's candidates: its own items exactly (offset 0), the negatives it does not hold
    # with their correction, the other users' items not at all (-inf)
    offset = torch.full((cand.numel(),), -math.inf, device=h.device)
    offset[neg_col] = negatives.log_weight.to(offset.dtype)
    offset = offset.expand(batch.n_rows, -1).clone()
    offset[batch.rows, pos_col] = 0.0
    lse = torch.logsumexp(logits + offset, dim=1)
    picked = logits[batch.rows, pos_col]
    dot = torch.zeros(batch.n_rows, device=h.device).index_add_(0, batch.rows, batch.values * picked)
    # users without items (n_u = 0) add nothing, whatever their lse
    per_user = torch.where(batch.row_sums > 0, batch.row_sums * lse, torch.zeros_like(lse)) - dot
    return per_user.sum() / max(batch.n_rows, 1)

