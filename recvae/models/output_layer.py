"""The last layer, over all I items, fused with the multinomial log-likelihood.

:func:`output_layer_nll` computes ``logits = h @ W^T + b`` over all items and

    NLL = 1/B * sum_u ( n_u * logsumexp_i(logits_ui) - sum_{i in x_u} x_ui * logits_ui ),
    n_u = sum_i x_ui,

which equals ``-1/B sum_u sum_i x_ui log softmax(logits_u)_i`` without a dense ``x``. The
gradient w.r.t. the logits is ``n_u * softmax_u - x_u``; it is formed in place in the softmax
buffer (a scatter at the nonzeros), so the backward pass is two matrix products and nothing
else of size B x I. Together with the forward product these are the three matmuls that bound
the cost of a step. Like :func:`~recvae.models.sparse_layers.sparse_input_linear`, it writes its
weight gradients straight into ``.grad`` and keeps its B x I buffers in a
:class:`~recvae.models.sparse_layers.Workspace`.

:func:`output_logits` is the same layer for scoring, without gradients: a kept (on CPU,
oneDNN-packed) copy of the weight in the scoring dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recvae.models import cpu_kernels
from recvae.models.sparse_layers import SparseBatch, Workspace, _accumulate, _grad_buffer, compute_dtype, version


def _logsumexp_from_softmax(logits, probs, picked, batch: SparseBatch) -> torch.Tensor:
    """Per-row log-sum-exp, read off the softmax: lse_u = logit_ui - log p_ui.

    Uses, per user, the item of the history with the largest logit (no extra pass over the
    B x I logits). Rows where that p is tiny (< 1e-30, where it loses precision) are recomputed
    exactly; rows without items get 0 (they are weighted by n_u = 0).
    """
    B, I = batch.n_rows, batch.n_items
    dev = picked.device
    lse = torch.zeros(B, device=dev)
    if picked.numel() == 0:
        return lse
    row_max = torch.full((B,), -torch.inf, device=dev).scatter_reduce_(0, batch.rows, picked, "amax")
    pos = torch.arange(picked.numel(), device=dev)
    is_max = picked == row_max[batch.rows]
    first = torch.full((B,), picked.numel(), device=dev, dtype=torch.long).scatter_reduce_(
        0, batch.rows[is_max], pos[is_max], "amin")
    has = first < picked.numel()
    idx = first[has]
    p = probs.view(-1)[batch.rows[idx] * I + batch.cols[idx]].float()
    lse[has] = picked[idx] - torch.log(p)
    bad = torch.zeros(B, dtype=torch.bool, device=dev)
    bad[has] = ~(p > 1e-30)
    if bool(bad.any()):
        lse[bad] = torch.logsumexp(logits[bad].float(), dim=1)
    return lse


def _padded(width: int) -> int:
    """``width`` + 1 (the bias's column), rounded up to a multiple of 16 columns."""
    return -(-(width + 1) // 16) * 16


@dataclass
class OutputFactors:
    """The factors of the output layer's product ``h W^T + b`` in the compute dtype, kept for
    its backward: ``w`` (I, H), ``h`` (B, H), and for a frozen layer ``w_t``, a kept (H, I)
    copy of ``w``: at H = 200 (RecVAE's latent) ``g @ w_t.t()`` takes half the time of
    ``g @ w``, with the same result."""

    w: torch.Tensor
    h: torch.Tensor
    w_t: torch.Tensor | None = None

    def grad_input(self, g: torch.Tensor) -> torch.Tensor:
        """``g @ W`` (B, H) for the gradient ``g`` (B, I) w.r.t. the logits."""
        return torch.mm(g, self.w) if self.w_t is None else torch.mm(g, self.w_t.t())


def output_product(h, weight, bias, workspace: Workspace, cd: torch.dtype, out: torch.Tensor,
                   fold_bias: bool = False) -> OutputFactors:
    """``out`` (B, I) := ``h W^T + b`` with the product in the compute dtype ``cd``.

    ``fold_bias`` (low precision only): the bias rides in the product as one more column of
    both factors (``[h, 1] [W, b]^T``, padded to a multiple of 16 columns), which saves
    ``addmm``'s extra pass over the B x I output: a quarter of the product's time at H = 200.
    Where the product sums its H + 1 terms in one block the result is ``addmm``'s bit for bit
    (RecVAE's H = 200, checked at batches of 500 on the committed tables' catalogues; the tables'
    RecVAE runs still parted in bf16 rounding on 4 of 15 splits, cause not pinned down); at Mult-VAE's H = 600
    the sums are split and some bf16 logits round differently, so Mult-VAE, whose committed
    results were made with ``addmm``, keeps it. A frozen layer (no gradient for the weight or
    the bias: RecVAE's encoder phase) keeps its folded factors between steps instead of casting
    them each step."""
    if cd == weight.dtype or not fold_bias:
        h_c = h.to(cd).contiguous()
        if cd == weight.dtype:
            torch.addmm(bias, h_c, weight.t(), out=out)
            return OutputFactors(weight, h_c)
        w_c = workspace.get("weight_lowp", tuple(weight.shape), cd, h.device)
        w_c.copy_(weight)
        torch.addmm(bias.to(cd), h_c, w_c.t(), out=out)
        return OutputFactors(w_c, h_c)
    (I, H), B = weight.shape, h.shape[0]
    Hp = _padded(H)
    h_aug = workspace.get("output_input_lowp", (B, Hp), cd, h.device)
    h_aug[:, :H].copy_(h)
    h_aug[:, H] = 1
    h_aug[:, H + 1:] = 0

    def augmented(w_aug: torch.Tensor) -> torch.Tensor:
        w_aug[:, :H].copy_(weight.detach())
        w_aug[:, H].copy_(bias.detach())
        w_aug[:, H + 1:] = 0
        return w_aug

    if weight.requires_grad or bias.requires_grad:
        w_aug = augmented(workspace.get("weight_lowp_folded", (I, Hp), cd, h.device))
        w_t = None
    else:
        key = (version(weight), version(bias), cd)
        w_aug = workspace.kept("frozen_weight_lowp", key,
                               lambda: augmented(torch.empty(I, Hp, dtype=cd, device=h.device)))
        w_t = workspace.kept("frozen_weight_lowp_t", key, lambda: w_aug[:, :H].t().contiguous())
    torch.mm(h_aug, w_aug.t(), out=out)
    return OutputFactors(w_aug[:, :H], h_aug[:, :H], w_t)


def _fused_loop(fold_bias: bool, cd: torch.dtype, device: torch.device, offset):
    """The compiled loops (:mod:`recvae.models.cpu_kernels`) where they apply: bf16 on CPU, no
    offset, and ``fold_bias`` (RecVAE's layer; Mult-VAE's committed results were made with the
    eager softmax, and keep it). None: the eager code."""
    if not fold_bias or cd != torch.bfloat16 or device.type != "cpu" or offset is not None:
        return None
    return cpu_kernels.library()


def add_offset(logits: torch.Tensor, offset: torch.Tensor, workspace: Workspace,
               scale: torch.Tensor | None = None) -> None:
    """``logits += offset`` (``+= scale * offset`` with a 0-dim ``scale``, read on its device: no
    synchronisation) in place. Low-precision logits and a float32 offset go through a kept float32
    buffer: without ``scale``, the same bits as the mixed-dtype ``add_``, which converts element by
    element (25 ms against 14 at 500 x 20,108 in bf16)."""
    total = logits
    if logits.dtype != offset.dtype:
        total = workspace.get("logits_with_offset", tuple(logits.shape), offset.dtype, logits.device).copy_(logits)
    total.add_(offset) if scale is None else total.addcmul_(offset, scale)
    if total is not logits:
        logits.copy_(total)


class _OutputLayerNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, batch: SparseBatch, workspace: Workspace, cd: torch.dtype, offset=None,
                fold_bias=False, offset_weight=None):
        B, I = batch.n_rows, batch.n_items
        dev = h.device
        logits = workspace.get("logits", (B, I), cd, dev)
        factors = output_product(h, weight, bias, workspace, cd, logits, fold_bias)
        if offset is not None:
            add_offset(logits, offset, workspace, offset_weight)
        ctx.offset = offset if offset_weight is not None and offset_weight.requires_grad else None
        lib = _fused_loop(fold_bias, cd, dev, offset)
        if lib is not None:
            # one loop per row: the softmax, its log-sum-exp and the gradient's bracket, in place
            lse, dot = cpu_kernels.softmax_nll_bf16(lib, logits, batch.crow, batch.cols, batch.values, batch.row_sums)
            probs = logits
        else:
            flat = batch.rows * I + batch.cols
            picked = logits.view(-1)[flat].float()
            probs = workspace.get("probs", (B, I), cd, dev)
            torch.ops.aten._softmax.out(logits, 1, False, out=probs)
            lse = _logsumexp_from_softmax(logits, probs, picked, batch)
            dot = torch.zeros(B, device=dev).index_add_(0, batch.rows, batch.values * picked)
        ctx.bracket_done = lib is not None
        nll = (batch.row_sums * lse - dot).sum() / B
        workspace.generation += 1
        ctx.generation = workspace.generation
        ctx.workspace, ctx.batch, ctx.cd = workspace, batch, cd
        ctx.probs, ctx.factors = probs, factors
        ctx.h_dtype = h.dtype
        ctx.save_for_backward(weight, bias)
        return nll

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.workspace.generation != ctx.generation:
            raise RuntimeError(
                "output_layer_nll: another forward pass reused the softmax buffer before this "
                "backward; call backward() after each forward"
            )
        weight, bias = ctx.saved_tensors
        b, cd, g = ctx.batch, ctx.cd, ctx.probs
        B, I = b.n_rows, b.n_items
        c = grad_out.float() / B
        n = b.row_sums
        # d NLL_u / d logits_u = n_u * (softmax_u - x_u / n_u): write the bracket in place
        if not ctx.bracket_done:  # (the fused loop wrote it in the forward pass)
            has = n[b.rows] > 0
            flat = (b.rows * I + b.cols)[has]
            g.view(-1).index_add_(0, flat, (-b.values[has] / n[b.rows][has]).to(cd))
        cn = c * n  # (B,) per-row scale, applied to the small factors instead of the B x I one
        f = ctx.factors
        grad_h = f.grad_input(g).float().mul_(cn[:, None]).to(ctx.h_dtype) if ctx.needs_input_grad[0] else None
        # an offset's gradient is the logits' own (a B x I tensor: only for an offset that learns)
        grad_offset = g.float() * cn[:, None] if ctx.needs_input_grad[6] else None  # a new tensor: g is read on
        grad_offset_weight = None
        if getattr(ctx, "offset", None) is not None:  # the sharded forward (item_parallel) sets none
            # d NLL / d w = sum_u cn_u sum_i g_ui offset_ui, in the float32 buffer of the forward's
            # add: no B x I gradient of the scaled offset is made (three passes fewer)
            t = ctx.workspace.get("logits_with_offset", (B, I), ctx.offset.dtype, g.device)
            grad_offset_weight = (t.copy_(g).mul_(ctx.offset).sum(dim=1) * cn).sum()
            ctx.offset = None
        if not (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            # a frozen output layer (RecVAE's encoder phase): skip the I x H product
            ctx.probs = ctx.factors = None
            return grad_h, None, None, None, None, None, grad_offset, None, grad_offset_weight
        fresh = _grad_buffer(weight, ctx.workspace, "output_weight_grad")
        if cd == weight.dtype:
            hs = f.h * cn[:, None]
            torch.addmm(weight.grad, g.t(), hs, beta=0 if fresh is not None else 1, out=weight.grad)
            # (1 x B) @ (B x I): a gemm reads g ~3x faster than mv(g.t(), .) on CPU
            _accumulate(bias, torch.mm(cn[None], g).squeeze(0))
        else:
            # the bias gradient g^T cn rides in the weight gradient's product as one more column
            # of the right factor, padded to a multiple of 16 columns: the same time as the
            # product alone, where a separate (1 x B) @ (B x I) product is one more pass over g
            H = f.h.shape[1]
            hs = ctx.workspace.get("output_weight_grad_rhs", (B, _padded(H)), cd, g.device)
            torch.mul(f.h.float(), cn[:, None], out=hs[:, :H])
            hs[:, H] = cn
            hs[:, H + 1:] = 0
            gw = ctx.workspace.get("output_weight_grad_lowp", (I, hs.shape[1]), cd, g.device)
            torch.mm(g.t(), hs, out=gw)
            # a plain conversion when the buffer is fresh; a mixed-dtype add_ is ~4x slower
            weight.grad.copy_(gw[:, :H]) if fresh is not None else weight.grad.add_(gw[:, :H].float())
            _accumulate(bias, gw[:, H])
        ctx.probs = ctx.factors = None
        return grad_h, None, None, None, None, None, grad_offset, None, grad_offset_weight


def output_layer_nll(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, batch: SparseBatch,
                     workspace: Workspace | None = None, offset: torch.Tensor | None = None,
                     fold_bias: bool = False, offset_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch's users of the multinomial NLL of ``batch`` under ``softmax(h W^T + b)``.

    ``weight`` is (I, H) like ``nn.Linear(H, I).weight``. Matmuls run in the autocast dtype when
    autocast is on (bf16), else float32; the softmax reads bf16 logits with float accumulation
    then, so the loss value carries the bf16 rounding of the logits (~1e-2 absolute).
    ``offset`` (B, I), when given, is added to the logits before the softmax (another path's
    scores, :mod:`recvae.models.hybrid`); its gradient flows back when it requires one.
    ``offset_weight`` (0-dim), when given, scales the offset (``logits + w * offset``); a learned
    ``w`` gets its gradient here, without a B x I gradient tensor (``offset`` must then not learn).
    ``fold_bias``: see :func:`output_product`.
    """
    cd = compute_dtype(h.device.type)
    with torch.autocast(h.device.type, enabled=False):
        return _OutputLayerNLL.apply(h, weight, bias, batch, workspace or Workspace(), cd, offset, fold_bias,
                                     offset_weight)


#: dtypes the output layer can score in (see :func:`output_logits`)
SCORE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

def packed_available(dtype: torch.dtype) -> bool:
    """Whether this build (and, for bf16, this CPU's native bf16 instructions) can score in
    ``dtype`` through a oneDNN-packed weight: the mkldnn linear ops are internal to torch, and
    a build may lack them."""
    if dtype not in (torch.float32, torch.bfloat16):
        return False
    if dtype not in _PACKED:
        try:
            ok = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                  and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
            if dtype == torch.bfloat16:
                ok = ok and torch.ops.mkldnn._is_mkldnn_bf16_supported()
            _PACKED[dtype] = bool(ok)
        except (AttributeError, RuntimeError):
            _PACKED[dtype] = False
    return _PACKED[dtype]


_PACKED: dict[torch.dtype, bool] = {}


def output_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, workspace: Workspace,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense float32 logits ``h @ weight^T + bias`` (B, I) of the last layer, the product in
    ``dtype`` (default: ``h``'s, as under autocast).

    With gradients, a plain product (any cast is part of the graph, as ``Tensor.to`` is).
    Without, the weight comes from the workspace's kept copy, made again only after the weight
    changes. On CPU that copy is packed in oneDNN's blocked layout: on ML-20M's 20,108 x 600
    layer (one AVX-512 core) 2.2x faster than ``addmm`` in float32 for batches of 8-64 and 1.5x
    at 500, 1.6-2x faster than a plain bf16 copy for batches of 1-17; and a user's scores do not
    depend on the other rows of the batch (``addmm``'s float32 sums do for 1-3 rows). bf16
    reads half the bytes of the weight, the whole cost of a small batch."""
    dtype = dtype or h.dtype
    grad = torch.is_grad_enabled() and (weight.requires_grad or h.requires_grad)
    if not grad and weight.device.type == "cpu" and packed_available(dtype):
        w_packed = workspace.cast("output_weight", weight, dtype, packed=True)
        b = bias if dtype == bias.dtype else workspace.cast("output_bias", bias, dtype)
        return torch.ops.mkldnn._linear_pointwise(h.to(dtype).contiguous(), w_packed, b.detach(), "none", [],
                                                  "").float()
    if dtype == weight.dtype:
        return torch.addmm(bias, h.to(dtype), weight.t()).float()
    if grad:
        return torch.addmm(bias.to(dtype), h.to(dtype), weight.to(dtype).t()).float()
    w_t = workspace.cast("output_weight", weight, dtype, transpose=True)  # (H, I): 7-11% faster for batches of 1-8
    return torch.addmm(workspace.cast("output_bias", bias, dtype), h.to(dtype), w_t).float()
