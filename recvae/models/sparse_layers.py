"""The sparse side of the layers that touch all I items: a training step never builds a dense input.

* :class:`SparseBatch` carries one batch of user histories (a CSR slice) as torch index tensors,
  plus the item-major (transposed) order of its nonzeros.
* :func:`sparse_input_linear` is the first layer, ``x @ W + b`` for a sparse ``x``: forward is an
  embedding-bag (a weighted sum of the weight rows of each user's items), backward writes
  ``x^T @ grad`` into ``W.grad`` with one sparse-CSR x dense product, i.e. touches only the rows of
  the batch's items.
* :class:`Workspace` keeps the large B x I / I x H buffers between steps; the last layer, fused
  with the multinomial likelihood, is :mod:`recvae.models.output_layer`.

The layers accumulate their weight gradients straight into ``weight.grad`` / ``bias.grad``
(and return no gradient for them through autograd): autograd would otherwise allocate a fresh
I x H tensor per step and then add it, and fresh page-faulted memory is what dominates the
elementwise cost on CPU. Consequence: ``torch.autograd.grad`` w.r.t. these weights is not
supported; ``loss.backward()`` is.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

#: the batch size oneDNN lays a packed weight out for; measured on AVX-512 BF16 (ML-20M's
#: 20,108 x 600 layer), packing for 8 serves batches of 1 to 500 as well as packing for each
PACK_BATCH_HINT = 8


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
