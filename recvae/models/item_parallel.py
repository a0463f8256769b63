"""Item parallelism (``parallel="items"``): the item-indexed parameters split over the processes.

Mult-VAE's memory grows with the catalogue through three parameters, ``input_weight`` (I x d0),
``output_weight`` (I x H) and ``output_bias`` (I), their gradients and Adam's two moments, and
through the B x I logits of a step. With ``parallel="items"`` under torchrun, process r of W
holds only the rows ``[a, b) = shard_bounds(I, r, W)`` of the three (an :class:`ItemShard`) and
the logits of its items, Megatron's vocabulary-parallel cross-entropy with items as the
vocabulary. Every process sees the whole global batch (no data split: it builds the batch's
:class:`~recvae.models.sparse_layers.SparseBatch` and draws its dropout and noise as one process
would), the layers in between are replicated, and per step only batch-sized tensors cross
processes:

* input layer: process r sums ``x[:, a:b] @ W_in[a:b]`` over the nonzeros of its items (the
  dropout and L2 normalisation use the full row), an all-reduce (sum) of the B x d0 result,
  then the bias. Backward: ``W_in[a:b].grad = x[:, a:b]^T grad`` locally; the gradient of the
  all-reduce is the identity (``grad`` is the same on every process).
* output layer fused with the multinomial NLL: local logits B x (b - a); an all-reduce (max) of
  the row maxima, one (sum) of the local sums of ``exp(logit - max)`` together with the local
  sums ``sum_i x_ui logit_ui``; ``lse = max + log(sumexp)`` and
  ``NLL = 1/B sum_u (n_u lse_u - dot_u)`` (``n_u``: the full row sum), the same on every
  process. Backward: the local columns of ``n_u softmax_u - x_u`` (with the global lse), local
  weight and bias gradients, and the partial ``grad_h`` all-reduced (sum).
* the replicated layers get the same gradients everywhere: no gradient all-reduce.

The initialisation is the single process's: a shard draws the full tensors' random stream row
chunk by row chunk (:func:`uniform_rows_`) and keeps its rows, without materialising I x H.

Scoring while training (validation NDCG): local logits, the user's seen items of the range
masked, the local top K (values and global ids) gathered and merged, ties to the lower item id
as :func:`recvae.ranking.top_k` breaks them (:func:`top_k_merged`, :func:`holdout_ndcg`).

Checkpoints hold the full model: at each checkpoint the shards (weights and Adam's moments) are
gathered into the first process, which writes an ordinary checkpoint (that process needs the
full model's and Adam's memory at that moment); a resume slices the full tensors to each
process's range (every process reads the checkpoint). At the end of ``fit`` the shards are
gathered on every process (:func:`unshard`): the fitted estimator holds the full model, so
evaluation, ``save`` and ``recommend`` are unchanged.

Composition: ``items`` uses every process of the group for items (each sees the whole batch);
``data`` uses every process for users. A 2-D grid (data x items: item groups within data
replicas) is not implemented. Outside torchrun (one process) ``items`` is the ordinary run.
RecVAE, the hybrid (``multvae-linear``) and ``softmax="sampled"`` train data-parallel only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from recvae import distributed
from recvae import metrics as M
from recvae.errors import ParameterError
from recvae.models.output_layer import SCORE_DTYPES, _OutputLayerNLL, output_logits, output_product
from recvae.models.sparse_layers import SparseBatch, Workspace, _SparseInputLinear, compute_dtype
from recvae.ranking import mask_rows, top_k

PARALLEL_MODES = ("data", "items")
#: the parameters of :class:`~recvae.models.networks.MultNetwork` split by items (their dim 0)
SHARDED = ("input_weight", "output_weight", "output_bias")
#: elements drawn at once while a shard runs through a full tensor's random stream (16 MB)
INIT_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class ItemShard:
    """The items ``[start, stop)`` of ``n_items`` this process (``rank`` of ``world_size``) holds."""

    n_items: int
    start: int
    stop: int
    rank: int = 0
    world_size: int = 1

    @classmethod
    def of(cls, n_items: int, group: distributed.Group) -> "ItemShard":
        start, stop = distributed.shard_bounds(n_items, group.rank, group.world_size)
        return cls(int(n_items), start, stop, group.rank, group.world_size)

    @property
    def size(self) -> int:
        return self.stop - self.start


def check_catalogue(n_items: int, group: distributed.Group) -> None:
    """Every process needs at least one item."""
    if group.world_size > n_items:
        raise ParameterError("parallel", f"'items' cannot split {n_items} items over {group.world_size} processes; "
                                         f"use at most {n_items} processes or parallel='data'")


def shard_for(estimator, n_items: int, group: distributed.Group) -> ItemShard | None:
    """This process's items when ``estimator`` trains item-parallel in a group of several processes; None otherwise."""
    if getattr(estimator, "parallel", "data") != "items" or not group.parallel:
        return None
    check_catalogue(n_items, group)
    return ItemShard.of(n_items, group)


# -- initialisation ----------------------------------------------------------------------------
def glorot_bound(rows: int, cols: int) -> float:
    """``nn.init.xavier_uniform_``'s bound (gain 1) for a (rows, cols) tensor, by its formula."""
    std = math.sqrt(2.0 / float(cols + rows))
    return math.sqrt(3.0) * std


def uniform_rows_(weight: torch.Tensor, shard: ItemShard, generator: torch.Generator | None) -> torch.Tensor:
    """``weight`` (the shard's rows of an (n_items, cols) tensor) set to the values Glorot uniform
    gives those rows of the full tensor, drawing from ``generator`` as the full draw does.

    On the CPU generator, ``uniform_`` over consecutive pieces gives the stream of one draw over
    the whole (tested): the rows before and after ours are drawn into a scratch chunk and
    dropped, so ``generator`` ends where the full draw leaves it."""
    cols = weight.shape[1]
    bound = glorot_bound(shard.n_items, cols)
    step = max(1, INIT_CHUNK_ELEMENTS // max(cols, 1))
    cuts = sorted({*range(0, shard.n_items, step), shard.start, shard.stop, shard.n_items})
    scratch = None
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        if shard.start <= lo and hi <= shard.stop:
            weight[lo - shard.start:hi - shard.start].uniform_(-bound, bound, generator=generator)
        else:
            if scratch is None:
                scratch = weight.new_empty((step, cols))
            scratch[:hi - lo].uniform_(-bound, bound, generator=generator)
    return weight


# -- the shard's part of a batch ---------------------------------------------------------------
@dataclass
class ItemView:
    """The nonzeros of a batch whose items are the shard's: ``batch`` counts their columns from
    the shard's first item (``n_items`` = the shard's size) and keeps the full rows' ``row_sums``;
    ``select`` are their positions among the whole batch's nonzeros."""

    batch: SparseBatch
    select: torch.Tensor


def item_view(batch: SparseBatch, shard: ItemShard) -> ItemView:
    """The shard's :class:`ItemView` of ``batch`` (made once per batch and kept on it)."""
    kept = getattr(batch, "_item_view", None)
    if kept is not None and kept[0] == shard:
        return kept[1]
    a, b = shard.start, shard.stop
    inside = (batch.cols >= a) & (batch.cols < b)
    select = inside.nonzero().squeeze(1)
    rows = batch.rows[select]
    crow = torch.zeros(batch.n_rows + 1, dtype=torch.long, device=batch.device)
    torch.cumsum(torch.bincount(rows, minlength=batch.n_rows), 0, out=crow[1:])
    position = torch.cumsum(inside, 0) - 1  # a selected nonzero's place among the selected
    t_lo, t_hi = int(batch.t_crow[a]), int(batch.t_crow[b])
    local = SparseBatch(batch.n_rows, b - a, crow, batch.cols[select] - a, rows, batch.values[select],
                        batch.normalized[select], batch.row_sums, batch.t_crow[a:b + 1] - t_lo,
                        position[batch.t_perm[t_lo:t_hi]])
    view = ItemView(local, select)
    batch._item_view = (shard, view)
    return view


# -- the two layers ----------------------------------------------------------------------------
class _ShardedInputLinear(_SparseInputLinear):
    """:class:`_SparseInputLinear` over the shard's nonzeros, its product all-reduced before the
    bias; backward is the parent's (the all-reduce's gradient is the identity)."""

    @staticmethod
    def forward(ctx, values, weight, bias, batch: SparseBatch, workspace: Workspace):
        out = F.embedding_bag(batch.cols, weight, batch.crow[:-1], mode="sum", per_sample_weights=values)
        distributed.allreduce_(out, "sum", "the item-parallel input layer's all-reduce")
        out.add_(bias)
        ctx.batch, ctx.workspace = batch, workspace
        ctx.save_for_backward(values, weight, bias)
        return out


def input_linear(values: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, batch: SparseBatch,
                 shard: ItemShard, workspace: Workspace) -> torch.Tensor:
    """``x @ W_in + b`` (B, d0) with ``weight`` the shard's rows of ``W_in``; ``values`` are the
    (dropped-out, normalised) values of every nonzero of ``batch``. Float32, as the one-process layer."""
    view = item_view(batch, shard)
    with torch.autocast(weight.device.type, enabled=False):
        return _ShardedInputLinear.apply(values.float()[view.select], weight, bias, view.batch, workspace)


class _ShardedOutputNLL(_OutputLayerNLL):
    """:class:`_OutputLayerNLL` over the shard's items (see the module notes); the parent's
    backward on the local columns, then the partial ``grad_h`` all-reduced."""

    @staticmethod
    def forward(ctx, h, weight, bias, batch: SparseBatch, workspace: Workspace, cd: torch.dtype, offset=None,
                fold_bias=False):
        B, I = batch.n_rows, batch.n_items
        dev = h.device
        # one B x I_r buffer: the local logits, then in place exp(logit - max), then the softmax
        probs = workspace.get("probs", (B, I), cd, dev)
        factors = output_product(h, weight, bias, workspace, cd, probs)
        picked = probs.view(-1)[batch.rows * I + batch.cols].float()
        row_max = distributed.allreduce_(probs.amax(1).float(), "max", "the item-parallel softmax's row maxima")
        probs.sub_(row_max[:, None].to(cd)).exp_()
        sums = torch.stack([probs.sum(1, dtype=torch.float32),
                            torch.zeros(B, device=dev).index_add_(0, batch.rows, batch.values * picked)])
        sumexp, dot = distributed.allreduce_(sums, "sum", "the item-parallel softmax's sums")
        lse = row_max + torch.log(sumexp)
        probs.mul_(sumexp.reciprocal()[:, None].to(cd))  # this shard's columns of the softmax over every item
        nll = (batch.row_sums * lse - dot).sum() / B
        workspace.generation += 1
        ctx.generation = workspace.generation
        ctx.workspace, ctx.batch, ctx.cd = workspace, batch, cd
        ctx.probs, ctx.factors = probs, factors
        ctx.bracket_done = False  # the parent's backward writes the gradient's bracket
        ctx.h_dtype, ctx.grad_h_dtype = torch.float32, h.dtype  # the partial grad_h is summed in float32
        ctx.save_for_backward(weight, bias)
        return nll

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, *rest = _OutputLayerNLL.backward(ctx, grad_out)
        if grad_h is not None:
            grad_h = distributed.allreduce_(grad_h.contiguous(), "sum", "the item-parallel output layer's "
                                            "gradient all-reduce").to(ctx.grad_h_dtype)
        return (grad_h, *rest)


def output_nll(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, batch: SparseBatch, shard: ItemShard,
               workspace: Workspace) -> torch.Tensor:
    """The batch's mean multinomial NLL under ``softmax(h W_out^T + b)`` over every item, with
    ``weight``/``bias`` the shard's rows: :func:`~recvae.models.output_layer.output_layer_nll`'s
    value (same on every process) and gradients (the shard's rows of the weight's)."""
    cd = compute_dtype(h.device.type)
    with torch.autocast(h.device.type, enabled=False):
        return _ShardedOutputNLL.apply(h, weight, bias, item_view(batch, shard).batch, workspace, cd, None)


# -- scoring -----------------------------------------------------------------------------------
def local_logits(network, batch: SparseBatch) -> torch.Tensor:
    """Float32 logits (B, shard size) of the shard's items, as the network's forward gives them."""
    z, _ = network._latent(batch, None)
    h = network._hidden(z)
    return output_logits(h, network.output_weight, network.output_bias, network.workspace,
                         None if network.training else network.score_dtype)


def gathered_logits(network, batch: SparseBatch) -> torch.Tensor:
    """Dense (B, I) logits on every process (the scoring of a sharded network through
    ``model.score``, e.g. a validation function: B x I on every process)."""
    local = local_logits(network, batch)
    return distributed.gather_rows(local.t(), network.shard.n_items).t()


def top_k_merged(scores: np.ndarray, shard: ItemShard, k: int) -> np.ndarray:
    """Global item ids (B, k) of the k best items per row, from every process's ``scores`` (B,
    shard size) of its items: each ranks its own, the candidates are gathered and merged by
    (score descending, id ascending), :func:`recvae.ranking.top_k`'s order (-inf last)."""
    k_local = min(k, shard.size)
    ids = top_k(scores, k_local)
    values = np.full((scores.shape[0], k), -np.inf, dtype=np.float32)
    values[:, :k_local] = np.take_along_axis(scores, ids, axis=1)
    padded = np.full((scores.shape[0], k), shard.n_items, dtype=np.int64)  # beyond every item: ranks last
    padded[:, :k_local] = ids + shard.start
    all_values = torch.cat(distributed.all_gather_tensor(torch.from_numpy(values), "the gather of top-K candidates"), 1)
    all_ids = torch.cat(distributed.all_gather_tensor(torch.from_numpy(padded), "the gather of top-K candidates"), 1)
    all_values, all_ids = all_values.numpy(), all_ids.numpy()
    order = np.lexsort((all_ids, -all_values), axis=-1)[:, :k]
    return np.take_along_axis(all_ids, order, axis=1)


def holdout_ndcg(model, fold_in: sp.csr_matrix, heldout: sp.csr_matrix, k: int, batch_size: int) -> float:
    """:func:`recvae.models.training_loop.holdout_ndcg` for a sharded network: every process
    scores every validation user on its items, the top-K candidates are merged
    (:func:`top_k_merged`), and each process gets the same NDCG@k."""
    net = model.module_
    shard = net.shard
    heldout = M.binary_relevance(heldout)
    users = np.flatnonzero(np.diff(heldout.indptr) > 0)
    fold_in, heldout = fold_in[users], heldout[users]
    net.score_dtype = SCORE_DTYPES[model.scoring_precision]
    was_training = net.training
    net.eval()
    values = [np.zeros(0)]
    try:
        with torch.no_grad():
            for lo in range(0, fold_in.shape[0], batch_size):
                x = fold_in[lo:lo + batch_size]
                scores = local_logits(net, SparseBatch.from_csr(x, model.device_)).cpu().numpy()
                mask_rows(scores, x[:, shard.start:shard.stop].tocsr())
                idx = top_k_merged(scores, shard, k)
                h = heldout[lo:lo + batch_size]
                values.append(M.metrics_from_hits(M.ranked_hits(idx, h), np.diff(h.indptr), (k,), ("ndcg",))[f"ndcg@{k}"])
    finally:
        net.train(was_training)
    return M.mean_stderr(np.concatenate(values))[0]


# -- full state: checkpoints, resume and the end of fit ---------------------------------------
def full_state(state: dict, shard: ItemShard, dst: int | None = 0) -> dict:
    """A sharded network's ``state`` (state dict) with its item rows gathered (on ``dst`` only,
    elsewhere None; ``dst`` None: everywhere)."""
    return {k: distributed.gather_rows(v, shard.n_items, dst) if k in SHARDED else v for k, v in state.items()}


def shard_state(state: dict, shard: ItemShard) -> dict:
    """A full ``state`` (state dict) with the shard's rows of the item-indexed tensors."""
    return {k: v[shard.start:shard.stop].clone() if k in SHARDED else v for k, v in state.items()}


def _sharded_indices(optimizer, network) -> set[int]:
    """The indices, in ``optimizer.state_dict()``, of the network's item-indexed parameters."""
    names = {id(p): n for n, p in network.named_parameters()}
    flat = [p for group in optimizer.param_groups for p in group["params"]]
    return {i for i, p in enumerate(flat) if names.get(id(p)) in SHARDED}


def _map_optimizer_state(state: dict, indices: set[int], fn) -> dict:
    """``state`` (an optimizer's state dict) with ``fn`` applied to the per-item tensors (the
    moments, not the step) of the parameters at ``indices``; in index order on every process."""
    out = {}
    for i in sorted(state["state"]):
        out[i] = {k: fn(v) if i in indices and torch.is_tensor(v) and v.dim() > 0 else v
                  for k, v in state["state"][i].items()}
    return {**state, "state": out}


def full_optimizer_state(optimizer, network, shard: ItemShard, dst: int | None = 0) -> dict:
    """``optimizer.state_dict()`` with Adam's moments of the sharded parameters gathered (see :func:`full_state`)."""
    return _map_optimizer_state(optimizer.state_dict(), _sharded_indices(optimizer, network),
                                lambda v: distributed.gather_rows(v, shard.n_items, dst))


def shard_optimizer_state(state: dict, optimizer, network, shard: ItemShard) -> dict:
    """A full optimizer ``state`` (a checkpoint's) with the shard's rows of the sharded parameters' moments."""
    return _map_optimizer_state(state, _sharded_indices(optimizer, network),
                                lambda v: v[shard.start:shard.stop].clone())


def checkpoint_states(network, optimizer, best_state: dict | None, shard: ItemShard | None):
    """The network's, the optimizer's and ``best_state``'s state dicts as a checkpoint holds them:
    full (gathered into rank 0: a collective) for a sharded network, as they are otherwise."""
    model_state, optimizer_state = network.state_dict(), optimizer.state_dict()
    if shard is None:
        return model_state, optimizer_state, best_state
    return (full_state(model_state, shard), full_optimizer_state(optimizer, network, shard),
            None if best_state is None else full_state(best_state, shard))


def resumed_states(ckpt: dict, optimizer, network, shard: ItemShard | None):
    """A checkpoint's model, optimizer and best states as the network loads them: the shard's rows
    of the full tensors for a sharded network, as they are otherwise."""
    model_state, optimizer_state, best_state = ckpt["model"], ckpt["optimizer"], ckpt["best_state"]
    if shard is None:
        return model_state, optimizer_state, best_state
    return (shard_state(model_state, shard), shard_optimizer_state(optimizer_state, optimizer, network, shard),
            None if best_state is None else shard_state(best_state, shard))


def unshard(network) -> None:
    """Gather the item rows on every process: ``network`` becomes the ordinary full network."""
    shard = network.shard
    if shard is None:
        return
    for name in SHARDED:
        p = getattr(network, name)
        setattr(network, name, nn.Parameter(distributed.gather_rows(p.detach(), shard.n_items),
                                            requires_grad=p.requires_grad))
    network.shard = None
    network.workspace.clear()


def sharded_sq_norm(network) -> float:
    """``sum_W ||W||^2`` over the weight matrices of a sharded network (the item rows' part summed over processes)."""
    item_matrices = {id(network.input_weight), id(network.output_weight)}
    with torch.no_grad():
        mats = network.weight_matrices()
        local = sum(float(w.float().pow(2).sum()) for w in mats if id(w) in item_matrices)
        rest = sum(float(w.float().pow(2).sum()) for w in mats if id(w) not in item_matrices)
    return float(distributed.allreduce_sum([local])[0]) + rest
