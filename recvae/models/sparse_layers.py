"""The two layers that touch all I items, written so a training step never builds a dense input.

* :class:`SparseBatch` carries one batch of user histories (a CSR slice) as torch index tensors,
  plus the item-major (transposed) order of its nonzeros.
* :func:`sparse_input_linear` is the first layer, ``x @ W + b`` for a sparse ``x``: forward is an
  embedding-bag (a weighted sum of the weight rows of each user's items), backward writes
  ``x^T @ grad`` into ``W.grad`` with one sparse-CSR x dense product, i.e. touches only the rows of
  the batch's items.
* :func:`output_layer_nll` is the last layer fused with the multinomial log-likelihood:
  ``logits = h @ W^T + b`` over all items and

      NLL = 1/B * sum_u ( n_u * logsumexp_i(logits_ui) - sum_{i in x_u} x_ui * logits_ui ),
      n_u = sum_i x_ui,

  which equals ``-1/B sum_u sum_i x_ui log softmax(logits_u)_i`` without a dense ``x``. The
  gradient w.r.t. the logits is ``n_u * softmax_u - x_u``; it is formed in place in the softmax
  buffer (a scatter at the nonzeros), so the backward pass is two matrix products and nothing
  else of size B x I. Together with the forward product these are the three matmuls that bound
  the cost of a step.

Both functions accumulate their weight gradients straight into ``weight.grad`` / ``bias.grad``
(and return no gradient for them through autograd): autograd would otherwise allocate a fresh
I x H tensor per step and then add it, and fresh page-faulted memory is what dominates the
elementwise cost on CPU. Consequence: ``torch.autograd.grad`` w.r.t. these weights is not
supported; ``loss.backward()`` is. Large B x I / I x H buffers are reused across steps through a
:class:`Workspace`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

# tf.nn.l2_normalize's epsilon: x / sqrt(max(sum x^2, eps)); an empty row stays all-zero
L2_NORMALIZE_EPS = 1e-12


def _csr_tensor(crow, col, values, size) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


@dataclass(frozen=True)
class BatchPart:
    """Where one process's rows sit in a global batch split over data-parallel processes.

    The random numbers of a training step (dropout per nonzero, noise per user) are drawn for
    the whole global batch, as a single process would, and each process keeps its share: so
    the number of processes does not change them.
    """

    n_rows: int  # users in the global batch
    start: int  # this process's rows are [start, stop) of the global batch
    stop: int
    nnz: int  # nonzeros of the global batch
    nnz_start: int  # this process's nonzeros are [nnz_start, nnz_stop) of them
    nnz_stop: int

    @classmethod
    def of(cls, row_nnz: np.ndarray, start: int, stop: int) -> "BatchPart":
        """The part ``[start, stop)`` of a global batch whose rows hold ``row_nnz`` nonzeros."""
        offsets = np.concatenate([[0], np.cumsum(row_nnz, dtype=np.int64)])
        return cls(len(row_nnz), start, stop, int(offsets[-1]), int(offsets[start]), int(offsets[stop]))


@dataclass
class SparseBatch:
    """One batch of user rows of a users x items CSR matrix, as torch tensors on one device.

    ``values`` are the raw entries (used by the likelihood); ``normalized`` the same entries
    divided by the row's L2 norm (the encoder input). ``t_perm`` lists the nonzeros in
    item-major order and ``t_crow`` are the row pointers of the transpose (items x users).
    """

    n_rows: int
    n_items: int
    crow: torch.Tensor  # (B+1,) int64
    cols: torch.Tensor  # (nnz,) int64
    rows: torch.Tensor  # (nnz,) int64, row of each nonzero
    values: torch.Tensor  # (nnz,) float32 raw x
    normalized: torch.Tensor  # (nnz,) float32 x / ||x_u||
    row_sums: torch.Tensor  # (B,) float32, n_u = sum_i x_ui
    t_crow: torch.Tensor  # (I+1,) int64
    t_perm: torch.Tensor  # (nnz,) int64
    part: BatchPart | None = None  # set in data-parallel training; None: the batch is the global one

    @classmethod
    def from_csr(cls, matrix: sp.csr_matrix, device: torch.device | str = "cpu") -> "SparseBatch":
        matrix = sp.csr_matrix(matrix, dtype=np.float32)
        if not matrix.has_canonical_format:
            matrix = matrix.copy()
            matrix.sum_duplicates()  # also sorts indices; the in-place scatter needs unique (u, i)
        n_rows, n_items = matrix.shape
        crow = matrix.indptr.astype(np.int64)
        cols = matrix.indices.astype(np.int64)
        vals = matrix.data.astype(np.float32, copy=False)
        rows = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(crow))
        sq = np.bincount(rows, weights=vals.astype(np.float64) ** 2, minlength=n_rows)
        inv_norm = 1.0 / np.sqrt(np.maximum(sq, L2_NORMALIZE_EPS))
        normalized = (vals * inv_norm[rows]).astype(np.float32)
        row_sums = np.bincount(rows, weights=vals, minlength=n_rows).astype(np.float32)
        # the item-major order of the nonzeros (a stable argsort of cols) from a CSR -> CSC
        # conversion of their positions: linear time, ~9x faster than the sort at 36k nonzeros
        csc = sp.csr_matrix((np.arange(len(cols), dtype=np.int64), matrix.indices, matrix.indptr),
                            shape=matrix.shape).tocsc()
        t_perm = csc.data
        t_crow = csc.indptr.astype(np.int64)

        def to(a):
            return torch.from_numpy(np.ascontiguousarray(a)).to(device)

        return cls(n_rows, n_items, to(crow), to(cols), to(rows), to(vals), to(normalized),
                   to(row_sums), to(t_crow), to(t_perm))

    @property
    def device(self) -> torch.device:
        return self.values.device

    # The random numbers of a training step. With ``part`` set they are drawn for the whole
    # global batch (the same on every process) and this process's share is kept: see BatchPart.
    def keep_mask(self, keep_prob: float, generator: torch.Generator | None) -> torch.Tensor:
        """Bernoulli(``keep_prob``) per nonzero (input dropout), shaped like ``values``."""
        part = self.part
        if part is None:
            return torch.empty_like(self.values).bernoulli_(keep_prob, generator=generator)
        return self.values.new_empty(part.nnz).bernoulli_(keep_prob, generator=generator)[part.nnz_start:part.nnz_stop]

    def row_noise(self, width: int, generator: torch.Generator | None, uniform: bool = False,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(n_rows, width) draws per user: N(0, 1), or U[0, 1) when ``uniform``."""
        part = self.part
        draw = torch.rand if uniform else torch.randn
        noise = draw((self.n_rows if part is None else part.n_rows, width), generator=generator, device=self.device,
                     dtype=dtype)
        return noise if part is None else noise[part.start:part.stop]

    def to_dense(self) -> torch.Tensor:
        """Dense (B, I) raw x: for tests and reference implementations only."""
        out = torch.zeros(self.n_rows, self.n_items, device=self.device)
        out[self.rows, self.cols] = self.values
        return out


def version(tensor: torch.Tensor) -> tuple:
    """What changes when ``tensor`` does: its storage, device, or version counter (which every
    in-place update, an optimizer step or ``load_state_dict``, advances)."""
    return tensor.data_ptr(), tensor._version, tensor.device


class Workspace:
    """Reusable large buffers, keyed by name; ``generation`` detects reuse before backward.
    Also keeps copies of weights in another dtype for scoring (:meth:`cast`)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._casts: dict[str, tuple[tuple, torch.Tensor]] = {}
        self.generation = 0

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A tensor of ``shape`` (uninitialised), a leading-dim slice of a kept buffer."""
        buf = self._buffers.get(name)
        if (buf is None or buf.dtype != dtype or buf.device != device or buf.shape[1:] != shape[1:]
                or buf.shape[0] < shape[0]):
            buf = torch.empty(shape, dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf[: shape[0]]

    def kept(self, name: str, key: tuple, make) -> torch.Tensor:
        """``make()``'s tensor, kept under ``name`` and made again only when ``key`` changes."""
        held = self._casts.get(name)
        if held is None or held[0] != key:
            held = self._casts[name] = (key, make())
        return held[1]

    def cast(self, name: str, tensor: torch.Tensor, dtype: torch.dtype, transpose: bool = False,
             packed: bool = False) -> torch.Tensor:
        """``tensor`` (transposed if ``transpose``) in ``dtype``, contiguous: a copy kept under
        ``name`` and made again only once ``tensor`` has changed (its storage, or its version
        counter, which every in-place update such as an optimizer step or ``load_state_dict``
        advances). Not differentiable: for scoring.

        ``packed``: an (out, in) weight in oneDNN's blocked layout for
        :func:`torch.ops.mkldnn._linear_pointwise` instead (CPU only; see :func:`output_logits`)."""
        def make():
            source = tensor.detach().t() if transpose else tensor.detach()
            copy = source.to(dtype, memory_format=torch.contiguous_format, copy=True)
            return torch.ops.mkldnn._reorder_linear_weight(copy, PACK_BATCH_HINT) if packed else copy

        return self.kept(name, (version(tensor), dtype, transpose, packed), make)

    def clear(self) -> None:
        self._buffers.clear()
        self._casts.clear()

    def __getstate__(self) -> dict:
        """Pickled (and deep-copied) empty: what it keeps is made again when needed, and a
        oneDNN-packed weight cannot be pickled at all (a scored model could not be, before)."""
        return {"_buffers": {}, "_casts": {}, "generation": self.generation}


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = grad.to(param.dtype, copy=True)
    else:
        param.grad.add_(grad)


def _grad_buffer(param: torch.Tensor, workspace: Workspace, name: str) -> torch.Tensor | None:
    """Where to write ``param``'s gradient: None when ``param.grad`` holds one to add to.

    Otherwise a kept buffer, installed as ``param.grad`` (to be overwritten). With
    ``optimizer.zero_grad()`` (set_to_none) every step, this reuses one I x H tensor for the
    whole run instead of allocating and page-faulting a new one per step.
    """
    if param.grad is not None:
        return None
    buf = workspace.get(name, tuple(param.shape), param.dtype, param.device)
    param.grad = buf
    return buf


def compute_dtype(device_type: str) -> torch.dtype:
    """bf16/fp16 when autocast is on for ``device_type``, else float32."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.float32


class _SparseInputLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, weight, bias, batch: SparseBatch, workspace: Workspace):
        out = F.embedding_bag(batch.cols, weight, batch.crow[:-1], mode="sum", per_sample_weights=values)
        out.add_(bias)
        ctx.batch, ctx.workspace = batch, workspace
        ctx.save_for_backward(values, weight, bias)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        values, weight, bias = ctx.saved_tensors
        b = ctx.batch
        grad_out = grad_out.float().contiguous()
        xt = _csr_tensor(b.t_crow, b.rows[b.t_perm], values[b.t_perm], (b.n_items, b.n_rows))
        fresh = _grad_buffer(weight, ctx.workspace, "input_weight_grad")
        # x^T @ grad as one CSR x dense product; beta=0 overwrites a reused buffer
        torch.addmm(weight.grad, xt, grad_out, beta=0 if fresh is not None else 1, out=weight.grad)
        _accumulate(bias, grad_out.sum(0))
        return None, None, None, None, None


def sparse_input_linear(values: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, batch: SparseBatch,
                        workspace: Workspace | None = None) -> torch.Tensor:
    """``x @ weight + bias`` for the sparse batch ``x`` whose nonzeros are ``values``.

    ``weight`` is (I, H) (the transpose of an ``nn.Linear`` weight). Runs in float32 whatever
    the autocast state: it is cheap, and a bf16 copy of an I x H weight per step would not be.
    """
    device_type = weight.device.type
    with torch.autocast(device_type, enabled=False):
        return _SparseInputLinear.apply(values.float(), weight, bias, batch, workspace or Workspace())


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
        h_c = h.to(cd).contiguous()
        torch.addmm(bias, h_c, weight.t(), out=out)
        return OutputFactors(weight, h_c)
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


class _OutputLayerNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, batch: SparseBatch, workspace: Workspace, cd: torch.dtype, offset=None,
                fold_bias=False):
        B, I = batch.n_rows, batch.n_items
        dev = h.device
        logits = workspace.get("logits", (B, I), cd, dev)
        factors = output_product(h, weight, bias, workspace, cd, logits, fold_bias)
        if offset is not None:
            logits.add_(offset)
        flat = batch.rows * I + batch.cols
        picked = logits.view(-1)[flat].float()
        probs = workspace.get("probs", (B, I), cd, dev)
        torch.ops.aten._softmax.out(logits, 1, False, out=probs)
        lse = _logsumexp_from_softmax(logits, probs, picked, batch)
        dot = torch.zeros(B, device=dev).index_add_(0, batch.rows, batch.values * picked)
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
        has = n[b.rows] > 0
        flat = (b.rows * I + b.cols)[has]
        g.view(-1).index_add_(0, flat, (-b.values[has] / n[b.rows][has]).to(cd))
        cn = c * n  # (B,) per-row scale, applied to the small factors instead of the B x I one
        f = ctx.factors
        grad_h = f.grad_input(g).float().mul_(cn[:, None]).to(ctx.h_dtype) if ctx.needs_input_grad[0] else None
        # an offset's gradient is the logits' own (a B x I tensor: only for an offset that learns)
        grad_offset = g.float() * cn[:, None] if ctx.needs_input_grad[6] else None  # a new tensor: g is read on
        if not (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            # a frozen output layer (RecVAE's encoder phase): skip the I x H product
            ctx.probs = ctx.factors = None
            return grad_h, None, None, None, None, None, grad_offset, None
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
        return grad_h, None, None, None, None, None, grad_offset, None


def output_layer_nll(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, batch: SparseBatch,
                     workspace: Workspace | None = None, offset: torch.Tensor | None = None,
                     fold_bias: bool = False) -> torch.Tensor:
    """Mean over the batch's users of the multinomial NLL of ``batch`` under ``softmax(h W^T + b)``.

    ``weight`` is (I, H) like ``nn.Linear(H, I).weight``. Matmuls run in the autocast dtype when
    autocast is on (bf16), else float32; the softmax reads bf16 logits with float accumulation
    then, so the loss value carries the bf16 rounding of the logits (~1e-2 absolute).
    ``offset`` (B, I), when given, is added to the logits before the softmax (another path's
    scores, :mod:`recvae.models.hybrid`); its gradient flows back when it requires one.
    ``fold_bias``: see :func:`output_product`.
    """
    cd = compute_dtype(h.device.type)
    with torch.autocast(h.device.type, enabled=False):
        return _OutputLayerNLL.apply(h, weight, bias, batch, workspace or Workspace(), cd, offset, fold_bias)


#: dtypes the output layer can score in (see :func:`output_logits`)
SCORE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

#: the batch size oneDNN lays a packed weight out for; measured on AVX-512 BF16 (ML-20M's
#: 20,108 x 600 layer), packing for 8 serves batches of 1 to 500 as well as packing for each
PACK_BATCH_HINT = 8


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
