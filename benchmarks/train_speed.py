"""Training speed of Mult-VAE and RecVAE on data shaped like preprocessed ML-20M, against the cost
floor measured in the same run, and against a straightforward implementation.

Measures, in one process and on one synthetic data set (20,108 items, ~136k users, ~10M
interactions, long-tailed item popularity; seeded):

* ``multvae_{fp32,bf16}``: the library's Mult-VAE training step
  (``recvae.models.training_loop.training_step``: sparse batch -> sparse first layer -> ... ->
  fused softmax/NLL output layer -> Adam), batches of 500 users, fp32 and bf16 (autocast).
  Includes building the batch from the CSR matrix.
* ``recvae_{encoder,decoder}_bf16``: RecVAE's two kinds of update (``update_step`` on
  ``RecVAENetwork.encoder_loss`` / ``decoder_loss``, the other half frozen, as
  ``recvae.models.recvae.RecVAE`` trains them: an outer epoch is 3 encoder passes and 1
  decoder pass). q_old's posterior of the batch is computed before the timed update: the
  estimator computes it once per outer epoch for all users (q_old for the encoder phase, and,
  after q_old's refresh, the frozen encoder's q(z|x) for the decoder phase and the next epoch's
  q_old), and ``recvae_posterior_bf16`` times that forward pass per batch. The outer epoch's
  row adds them up per batch of users: 3 encoder updates + 1 decoder update + 1 posterior pass.
* The floor of each step, as two parts measured separately in the same rounds:
  ``gemm``: every dense matrix product of that step (forward, input gradient, weight gradient of
  each dense layer; the output layer's three dominate), at the step's precision, on
  preallocated operands into preallocated outputs, each product in the operand layout it runs
  fastest in here (whatever layout the step itself uses); and ``optim``: one fused Adam step
  (``torch.optim.Adam(fused=True)``) over fp32 tensors of the sizes of the parameters the step
  updates, i.e. one memory pass over parameters, gradients and Adam's two states. No
  implementation of the architecture with dense Adam does less work per step; the step is
  reported against their sum (and against the GEMMs alone).
* ``straightforward_fp32``: what peer libraries do: dense input batch, fp32, ``nn.Linear``
  stack, dense ``log_softmax`` loss, ``torch.optim.Adam`` (default settings).

All variants run round-robin (one batch each per round; the slow straightforward step every 4th
round), so load from other processes affects them alike. Reports ms per batch (median over the
timed batches after warm-up), projected seconds per epoch, ratios to the floors, the speed-up over
the straightforward step and peak RSS, with the machine (CPU model, AMX or not, cores, load
average before and after), printed and written as JSON and markdown. A profile of each bf16 step
(3 batches) says where its time goes, by kind of work. Targets: bf16 Mult-VAE step and each of
RecVAE's two bf16 updates <= 1.3x (GEMMs + optimizer pass), >= 4x faster than the
straightforward fp32 step, peak RSS < 4 GB.

    python benchmarks/train_speed.py            # full size, writes benchmarks/results/train_speed.*
    python benchmarks/train_speed.py --quick    # small run, prints only (unless --out is given)
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from recvae.fileio import write_bytes, write_json  # noqa: E402
from recvae.models.networks import MultVAENetwork, NetworkConfig  # noqa: E402
from recvae.models.recvae_network import RecVAEConfig, RecVAENetwork  # noqa: E402
from recvae.models.sparse_layers import SparseBatch  # noqa: E402
from recvae.models.training_loop import make_optimizer, training_step, update_step  # noqa: E402

N_ITEMS = 20_108  # ML-20M after the paper's preprocessing
N_USERS = 136_677
N_INTERACTIONS = 10_000_000
BATCH = 500
GAMMA = 0.005  # RecVAE's default KL weight per interaction
TARGETS = {"ratio_to_floor_bf16": 1.3, "speedup_over_straightforward": 4.0, "peak_rss_gb": 4.0}
RECVAE_UPDATES = ("encoder", "decoder")


def synthetic_ml20m(n_users: int, n_items: int, n_interactions: int, seed: int = 0) -> sp.csr_matrix:
    """Binary users x items CSR with lognormal user activity (>= 5) and Zipf-like item popularity.

    Built as CSR directly: draw every user's items at once (with replacement), then drop
    repeats within a user; a first draw measures the share of repeats, a second one asks for
    that many more so about ``n_interactions`` remain.
    """
    first = _draw(n_users, n_items, n_interactions, seed)
    return _draw(n_users, n_items, int(n_interactions * n_interactions / first.nnz), seed)


def _draw(n_users: int, n_items: int, n_interactions: int, seed: int) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    lengths = np.maximum(5, rng.lognormal(mean=0.0, sigma=1.1, size=n_users))
    lengths = np.maximum(5, np.round(lengths * n_interactions / lengths.sum())).astype(np.int64)
    lengths = np.minimum(lengths, n_items // 2)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.9
    popularity = rng.permutation(popularity / popularity.sum())
    items = rng.choice(n_items, size=int(lengths.sum()), p=popularity).astype(np.int32)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    X = sp.csr_matrix((np.ones(len(items), np.float32), items, indptr), shape=(n_users, n_items))
    X.sum_duplicates()
    X.data[:] = 1.0
    return X


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def machine() -> dict:
    """CPU model, its bf16 matrix instructions (AMX, AVX-512 BF16), cores, torch threads."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu": model, "amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "cores": usable, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__}


def interleaved(steps: dict, batches: list, warmup: int, every: dict) -> dict[str, list[float]]:
    """Run the variants round-robin, one batch each per round, so that load from other
    processes hits all of them alike; ``every[name] = k`` runs that variant every k-th round."""
    times = {name: [] for name in steps}
    for r, rows in enumerate(batches):
        for name, step in steps.items():
            if r % every.get(name, 1):
                continue
            t = time.perf_counter()
            step(rows)
            if r >= warmup:
                times[name].append(time.perf_counter() - t)
    return times


# -- the library's steps ---------------------------------------------------------------------

def multvae_step(X, bf16: bool):
    net = MultVAENetwork(NetworkConfig(X.shape[1]), torch.Generator().manual_seed(0)).train()
    opt = make_optimizer(net, lr=1e-3)
    gen = torch.Generator().manual_seed(0)

    def step(rows):
        values = training_step(net, opt, SparseBatch.from_csr(X[rows]), beta=0.1, generator=gen, bf16=bf16)
        assert np.isfinite(values).all()

    return step, net


class RecVAESteps:
    """RecVAE's encoder and decoder updates, each with its Adam (lr 5e-4), as
    ``RecVAE._train_epoch`` runs them: the trained half requires gradients, the other is frozen.

    Each kind of update has a network of its own. Training runs a whole pass of one kind before
    the other, so the half an update keeps frozen stays as it is from batch to batch, and the
    output layer's low-precision copy of a frozen decoder is made once per encoder pass. Were
    the interleaved rounds to run both kinds on one network, each decoder update would change
    the weights the next encoder update reads, and every encoder update would pay for a copy
    that training makes once in ~270 batches (6 ms of its ~75 here)."""

    def __init__(self, X, bf16: bool):
        self.X, self.bf16 = X, bf16
        self.nets, self.opt = {}, {}
        for phase in RECVAE_UPDATES:
            net = RecVAENetwork(RecVAEConfig(X.shape[1]), torch.Generator().manual_seed(0)).train()
            net.encoder.requires_grad_(phase == "encoder")
            net.decoder.requires_grad_(phase == "decoder")
            self.nets[phase], self.opt[phase] = net, make_optimizer(getattr(net, phase), lr=5e-4)
        self.nets["posterior"] = self.nets["encoder"]  # q_old's forward pass
        self.gen = torch.Generator().manual_seed(0)

    def posterior(self, batch):
        """q_old's posterior of the batch, as the estimator computes it once per outer epoch."""
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return self.nets["posterior"].old_posterior(batch)

    def prepare(self, phase: str, rows):
        """The batch and q_old's posterior of it (not part of the update)."""
        batch = SparseBatch.from_csr(self.X[rows])
        return batch, self.posterior(batch)

    def update(self, phase: str, batch, post) -> None:
        if phase == "posterior":
            self.posterior(batch)
            return
        net = self.nets[phase]
        if phase == "encoder":
            loss = lambda: net.encoder_loss(batch, GAMMA, self.gen, post)  # noqa: E731
        else:
            loss = lambda: net.decoder_loss(batch, self.gen, post)  # noqa: E731
        values = update_step(self.opt[phase], loss, "cpu", self.bf16)
        assert np.isfinite(values).all()

    def step(self, phase: str):
        """A step for :func:`interleaved` that returns the update's own time (``phase``:
        "encoder", "decoder" or "posterior", the forward pass of q_old alone)."""
        def run(rows):
            batch, post = self.prepare(phase, rows)
            t = time.perf_counter()
            self.update(phase, batch, post)
            return time.perf_counter() - t
        return run


def timed_inside(run):
    """A step whose function returns its own time (RecVAE's excludes q_old's precomputed posterior):
    the interleaving clock would count the setup, so this one replaces it."""
    times = []

    def step(rows):
        times.append(run(rows))

    return step, times


# -- the floors ------------------------------------------------------------------------------

def dense_products(net) -> list[tuple[str, int, int, int]]:
    """(label, m, k, n) of every dense matrix product a training step of ``net`` does (batch B):
    for each layer that trains or passes a gradient down, forward ``B x in @ in x out``, input
    gradient ``B x out @ out x in`` and weight gradient ``out x B @ B x in``."""
    out = []

    def layer(name, n_in, n_out, forward=True, grad_in=True, grad_w=True):
        if forward:
            out.append((f"{name} forward", BATCH, n_in, n_out))
        if grad_in:
            out.append((f"{name} input gradient", BATCH, n_out, n_in))
        if grad_w:
            out.append((f"{name} weight gradient", n_out, BATCH, n_in))

    if isinstance(net, MultVAENetwork):
        for i, lin in enumerate(list(net.encoder) + list(net.decoder)):
            layer(f"dense {i}", lin.in_features, lin.out_features)
        I, H = net.output_weight.shape
        layer("output", H, I)
    return out


def recvae_products(net: RecVAENetwork, phase: str) -> list[tuple[str, int, int, int]]:
    """RecVAE's dense products: the encoder phase trains the dense layers and passes the gradient
    through the frozen decoder (no decoder weight gradient); the decoder phase reads q(z|x) from
    the posterior pass and needs no gradient w.r.t. z; the posterior pass is the encoder's
    forward alone."""
    enc = phase == "encoder"
    out = []
    if phase != "decoder":
        for i, lin in enumerate(list(net.encoder.layers) + [net.encoder.head]):
            out.append((f"encoder {i} forward", BATCH, lin.in_features, lin.out_features))
            if enc:
                out += [(f"encoder {i} input gradient", BATCH, lin.out_features, lin.in_features),
                        (f"encoder {i} weight gradient", lin.out_features, BATCH, lin.in_features)]
    if phase == "posterior":
        return out
    I, d = net.decoder.output_weight.shape
    out.append(("output forward", BATCH, d, I))
    out.append(("output input gradient", BATCH, I, d) if enc else ("output weight gradient", I, BATCH, d))
    return out


#: the four ways to lay out a product's two operands in memory: each as given, or each the
#: transpose of a contiguous matrix (which layout a BLAS runs fastest differs by shape: at
#: RecVAE's (500 x 20,108) @ (20,108 x 200) a transposed right factor takes half the time)
LAYOUTS = ("NN", "NT", "TN", "TT")


def _operand(rows: int, cols: int, transposed: bool, scale: float, dtype, g) -> torch.Tensor:
    t = torch.randn(cols, rows, generator=g).t() if transposed else torch.randn(rows, cols, generator=g)
    return t.mul(scale).to(dtype, memory_format=torch.preserve_format)


def best_layouts(products, dtype, reps: int = 5) -> list[str]:
    """For each product, the layout of :data:`LAYOUTS` it runs fastest in here (median of
    ``reps``): the floor is what the products cost at their best, whatever layout a step uses."""
    g = torch.Generator().manual_seed(0)
    best = []
    for _, m, k, n in products:
        times = {}
        for lay in LAYOUTS:
            a = _operand(m, k, lay[0] == "T", 1.0, dtype, g)
            b = _operand(k, n, lay[1] == "T", 0.05, dtype, g)
            c = torch.empty(m, n, dtype=dtype)
            torch.mm(a, b, out=c)
            runs = []
            for _ in range(reps):
                t = time.perf_counter()
                torch.mm(a, b, out=c)
                runs.append(time.perf_counter() - t)
            times[lay] = statistics.median(runs)
        best.append(min(times, key=times.get))
    return best


def gemm_floor(products, dtype, layouts=None):
    """The products on random operands of ``dtype`` into preallocated outputs, each in its
    fastest layout (:func:`best_layouts`, unless ``layouts`` are given)."""
    layouts = layouts or best_layouts(products, dtype)
    g = torch.Generator().manual_seed(0)
    ops = [(_operand(m, k, lay[0] == "T", 1.0, dtype, g), _operand(k, n, lay[1] == "T", 0.05, dtype, g),
            torch.empty(m, n, dtype=dtype)) for (_, m, k, n), lay in zip(products, layouts)]

    def step(_):
        for a, b, c in ops:
            torch.mm(a, b, out=c)

    step.layouts = layouts
    return step


def optimizer_floor(params):
    """One fused Adam step over fresh fp32 tensors the sizes of ``params``, gradients set: the
    memory pass over parameters, gradients and Adam's two states that any dense Adam makes."""
    g = torch.Generator().manual_seed(0)
    like = [nn.Parameter(torch.randn(p.shape, generator=g).mul_(0.05)) for p in params]
    for p in like:
        p.grad = torch.randn(p.shape, generator=g).mul_(1e-3)
    opt = torch.optim.Adam(like, lr=1e-3, fused=True)

    def step(_):
        opt.step()

    return step, sum(p.numel() for p in like)


# -- the straightforward implementation ------------------------------------------------------

class StraightforwardVAE(nn.Module):
    """The usual PyTorch Mult-VAE: dense input, nn.Linear layers, dense log-softmax loss."""

    def __init__(self, n_items, hidden=600, latent=200):
        super().__init__()
        self.latent = latent
        self.enc = nn.Linear(n_items, hidden)
        self.mu_logvar = nn.Linear(hidden, 2 * latent)
        self.dec = nn.Linear(latent, hidden)
        self.out = nn.Linear(hidden, n_items)
        self.drop = nn.Dropout(0.5)

    def loss(self, x, beta):
        h = self.drop(F.normalize(x, dim=1))
        h = self.mu_logvar(torch.tanh(self.enc(h)))
        mu, logvar = h[:, : self.latent], h[:, self.latent:]
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        logits = self.out(torch.tanh(self.dec(z)))
        nll = -(F.log_softmax(logits, 1) * x).sum(1).mean()
        kl = (0.5 * (-logvar + logvar.exp() + mu**2 - 1)).sum(1).mean()
        return nll + beta * kl


def straightforward_step(X):
    torch.manual_seed(0)
    net = StraightforwardVAE(X.shape[1]).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def step(rows):
        x = torch.from_numpy(X[rows].toarray())
        opt.zero_grad()
        loss = net.loss(x, 0.1)
        loss.backward()
        opt.step()

    return step


# -- where the time goes ---------------------------------------------------------------------

CATEGORIES = (
    ("optimizer step", None),
    ("matrix products", {"aten::mm", "aten::addmm", "aten::bmm", "aten::addmv", "aten::mv", "aten::linear"}),
    ("softmax", {"aten::_softmax", "aten::_log_softmax", "aten::logsumexp"}),
    ("dtype casts and copies", {"aten::copy_", "aten::_to_copy", "aten::to"}),
    ("sparse first layer (embedding-bag)", {"aten::_embedding_bag", "aten::embedding_bag",
                                            "aten::_embedding_bag_forward_only"}),
    ("fills", {"aten::fill_", "aten::zero_", "aten::zeros", "aten::empty", "aten::empty_strided"}),
)


def _category(event) -> str:
    parent = event
    while parent is not None:
        if parent.name.startswith("Optimizer.step"):
            return "optimizer step"
        parent = parent.cpu_parent
    for name, ops in CATEGORIES[1:]:
        if event.name in ops:
            return name
    return "other (elementwise, indexing, autograd, Python)"


def profile_steps(step, batches) -> dict:
    """Profile ``step`` on ``batches``: the wall time per step, each kind of work's self CPU time
    per step (the optimizer step's ops counted under it), and the top operators."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t = time.perf_counter()
        for rows in batches:
            step(rows)
        wall = (time.perf_counter() - t) / len(batches)
    per = {}
    for e in prof.events():
        if e.device_type.name == "CPU":
            per[_category(e)] = per.get(_category(e), 0.0) + e.self_cpu_time_total / 1000 / len(batches)
    total = sum(per.values())
    kinds = sorted(per.items(), key=lambda kv: -kv[1])
    table = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=32, max_shapes_column_width=60)
    return {"wall_ms_per_step": wall * 1000, "self_cpu_ms_per_step": total,
            "by_kind_ms_per_step": {k: v for k, v in kinds},
            "by_kind_share": {k: v / total for k, v in kinds}, "top_ops": table}


def summarise(times):
    ms = [t * 1000 for t in times]
    return {"median_ms": statistics.median(ms), "mean_ms": statistics.fmean(ms), "min_ms": min(ms), "n": len(ms)}


# -- main ------------------------------------------------------------------------------------

def speed_arguments(doc: str, name: str, batches: str, steps: str) -> argparse.ArgumentParser:
    """The options every training-speed script takes (this one's and ``hybrid_speed.py``'s)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="2,000 users x 2,000 items, 2 timed batches: only "
                    "checks that the script runs (the tests); prints only unless --out is given")
    ap.add_argument("--batches", type=int, default=None, help=f"timed batches per variant ({batches})")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-profile", action="store_true", help=f"skip the profiles of the {steps}")
    ap.add_argument("--out", default=None, help="output path without extension (default "
                    f"benchmarks/results/{name}; a small run writes nothing unless given)")
    return ap


def parse_speed_arguments(ap: argparse.ArgumentParser, name: str, argv) -> tuple[argparse.Namespace, str]:
    """The parsed options (``--threads`` applied) and the command line to report."""
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args, f"python benchmarks/{name}.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))


def main(argv=None) -> dict:
    ap = speed_arguments(__doc__, "train_speed", "default 20; quick 5", "bf16 steps")
    ap.add_argument("--quick", action="store_true", help="small data and few batches (a smoke run)")
    ap.add_argument("--no-recvae", action="store_true", help="Mult-VAE only")
    args, command = parse_speed_arguments(ap, "train_speed", argv)
    load_before = os.getloadavg()
    n_users, n_items, n_int = ((2_000, 2_000, 40_000) if args.tiny else (20_000, N_ITEMS, 1_470_000) if args.quick
                               else (N_USERS, N_ITEMS, N_INTERACTIONS))
    n_timed = args.batches or (2 if args.tiny else 5 if args.quick else 20)
    small = args.quick or args.tiny
    out = args.out or (None if small else str(REPO / "benchmarks" / "results" / "train_speed"))
    info = machine()
    print(f"machine: {info['cpu']}, AMX {'yes' if info['amx_bf16'] else 'no'}, AVX-512 BF16 "
          f"{'yes' if info['avx512_bf16'] else 'no'}, {info['cores']} cores, {info['threads']} torch threads, "
          f"load average {load_before[0]:.2f}")

    t0 = time.perf_counter()
    X = synthetic_ml20m(n_users, n_items, n_int, seed=0)
    print(f"data: {X.shape[0]} users x {X.shape[1]} items, {X.nnz} interactions "
          f"({X.nnz / X.shape[0]:.1f}/user), generated in {time.perf_counter() - t0:.1f}s")
    rng = np.random.default_rng(1)
    order = rng.permutation(X.shape[0])
    n = max(n_timed + args.warmup, 4 * (args.warmup + 3))  # the straightforward step gets a quarter
    batches = [np.take(order, np.arange(i * BATCH, (i + 1) * BATCH), mode="wrap") for i in range(n)]
    n_batches_epoch = int(np.ceil(X.shape[0] / BATCH))

    steps, nets, inside = {}, {}, {}
    floors = {}  # step name -> (gemm variant, optimizer variant)
    for prec, bf16 in (("fp32", False), ("bf16", True)):
        steps[f"multvae_{prec}"], nets[prec] = multvae_step(X, bf16)
        steps[f"gemm_multvae_{prec}"] = gemm_floor(dense_products(nets[prec]), torch.bfloat16 if bf16 else torch.float32)
        floors[f"multvae_{prec}"] = (f"gemm_multvae_{prec}", "optim_multvae")
    steps["optim_multvae"], n_params = optimizer_floor(list(nets["bf16"].parameters()))
    sizes = {"multvae": n_params}
    rec = None
    if not args.no_recvae:
        rec = RecVAESteps(X, bf16=True)
        for phase in (*RECVAE_UPDATES, "posterior"):
            name = f"recvae_{phase}_bf16"
            steps[name], inside[name] = timed_inside(rec.step(phase))
            steps[f"gemm_recvae_{phase}_bf16"] = gemm_floor(recvae_products(rec.nets[phase], phase), torch.bfloat16)
            if phase == "posterior":  # a forward pass: no optimizer
                floors[name] = (f"gemm_recvae_{phase}_bf16", None)
                continue
            steps[f"optim_recvae_{phase}"], sizes[f"recvae_{phase}"] = optimizer_floor(
                list(getattr(rec.nets[phase], phase).parameters()))
            floors[name] = (f"gemm_recvae_{phase}_bf16", f"optim_recvae_{phase}")
    steps["straightforward_fp32"] = straightforward_step(X)
    every = {"straightforward_fp32": 4}  # slow: a quarter of the rounds
    raw = interleaved(steps, batches, args.warmup, every)
    for name, times in inside.items():
        raw[name] = times[-len(raw[name]):]  # the same rounds, the update's own clock
    results = {name: summarise(t) for name, t in raw.items()}
    load_after = os.getloadavg()

    sf = results["straightforward_fp32"]["median_ms"]
    for name, r in results.items():
        r["seconds_per_epoch"] = r["median_ms"] * n_batches_epoch / 1000
        r["speedup_over_straightforward_fp32"] = sf / r["median_ms"]
        if name in floors:
            gemm, optim = (results[v]["median_ms"] if v else 0.0 for v in floors[name])
            r["floor_ms"] = gemm + optim
            r["ratio_to_floor"] = r["median_ms"] / (gemm + optim)
            r["ratio_to_gemm"] = r["median_ms"] / gemm
            r["floor_parts"] = {"gemm": floors[name][0], "optim": floors[name][1]}
        print(f"{name}: {r['median_ms']:.1f} ms/batch (median of {r['n']})"
              + (f", {r['ratio_to_floor']:.2f}x its floor (GEMMs + optimizer pass), {r['ratio_to_gemm']:.2f}x its GEMMs"
                 if name in floors else ""))
    if rec is not None:  # an outer epoch, per batch of users: 3 encoder + 1 decoder update + 1 posterior pass
        e, d, q = (results[f"recvae_{k}_bf16"] for k in ("encoder", "decoder", "posterior"))
        ms = 3 * e["median_ms"] + d["median_ms"] + q["median_ms"]
        floor = 3 * e["floor_ms"] + d["floor_ms"] + q["floor_ms"]
        results["recvae_outer_epoch_bf16"] = {"median_ms": ms, "floor_ms": floor, "ratio_to_floor": ms / floor,
                                              "seconds_per_epoch": ms * n_batches_epoch / 1000}

    summary = {
        "ratio_to_floor_bf16": results["multvae_bf16"]["ratio_to_floor"],
        "ratio_to_gemm_bf16": results["multvae_bf16"]["ratio_to_gemm"],
        "speedup_over_straightforward": results["multvae_bf16"]["speedup_over_straightforward_fp32"],
        "speedup_over_straightforward_fp32_ours": results["multvae_fp32"]["speedup_over_straightforward_fp32"],
        "peak_rss_gb": peak_rss_gb(),
    }
    met = {
        "ratio_to_floor_bf16": summary["ratio_to_floor_bf16"] <= TARGETS["ratio_to_floor_bf16"],
        "speedup_over_straightforward": summary["speedup_over_straightforward"] >= TARGETS["speedup_over_straightforward"],
        "peak_rss_gb": summary["peak_rss_gb"] < TARGETS["peak_rss_gb"],
    }
    if rec is not None:
        summary["recvae_ratio_to_floor_bf16"] = results["recvae_outer_epoch_bf16"]["ratio_to_floor"]
        for phase in RECVAE_UPDATES:
            summary[f"recvae_{phase}_ratio_to_floor_bf16"] = results[f"recvae_{phase}_bf16"]["ratio_to_floor"]
            met[f"recvae_{phase}_ratio_to_floor_bf16"] = (summary[f"recvae_{phase}_ratio_to_floor_bf16"]
                                                          <= TARGETS["ratio_to_floor_bf16"])
    profiles = {}
    if not args.no_profile:
        prof_batches = batches[:3]  # seen in warm-up: buffers allocated
        profiles["multvae_bf16"] = profile_steps(steps["multvae_bf16"], prof_batches)
        if rec is not None:
            for phase in RECVAE_UPDATES:
                prepared = iter([rec.prepare(phase, rows) for rows in prof_batches])
                profiles[f"recvae_{phase}_bf16"] = profile_steps(
                    lambda _, phase=phase: rec.update(phase, *next(prepared)), prof_batches)
    report = {
        "command": command,
        "data": {"n_users": X.shape[0], "n_items": X.shape[1], "nnz": int(X.nnz), "batch_size": BATCH,
                 "batches_per_epoch": n_batches_epoch, "quick": args.quick, "tiny": args.tiny},
        "machine": {**info, "load_average_before": list(load_before), "load_average_after": list(load_after)},
        "timed_batches": n_timed, "warmup": args.warmup, "optimizer_floor_parameters": sizes,
        "results": results, "summary": summary, "targets": TARGETS, "targets_met": met, "profiles": profiles,
    }
    md = markdown(report, X, args)
    print(md)
    write_report(out, report, md)
    return report


def machine_line(info: dict, command: str) -> str:
    """The results' line naming the machine, its load before and after, and the command."""
    la, lb = info["load_average_before"], info["load_average_after"]
    return (f"Machine: {info['cpu']}, {'with' if info['amx_bf16'] else 'without'} AMX, AVX-512 BF16 "
            f"{'yes' if info['avx512_bf16'] else 'no'}; {info['cores']} cores, {info['threads']} torch threads; "
            f"load average {la[0]:.2f} before, {lb[0]:.2f} after (1 min); torch {info['torch']}. "
            f"Command: `{command}`.")


def kind_rows(profile: dict) -> list[str]:
    """A profile's table of self CPU time by kind of work (:func:`profile_steps`)."""
    return ["| work | ms / step | share |", "|---|---:|---:|",
            *(f"| {k} | {v:.1f} | {100 * profile['by_kind_share'][k]:.0f}% |"
              for k, v in profile["by_kind_ms_per_step"].items())]


def write_report(out: str | None, report: dict, md: str) -> None:
    """``<out>.json`` and ``<out>.md`` (atomically), when ``out`` is given."""
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out.with_suffix(".json"), report, indent=1)
        write_bytes(out.with_suffix(".md"), md.encode())
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


def markdown(report: dict, X, args) -> str:
    results, summary, met = report["results"], report["summary"], report["targets_met"]
    lines = [
        "# Training speed (CPU): Mult-VAE and RecVAE against their floors",
        "",
        machine_line(report["machine"], report["command"]),
        "",
        f"Synthetic ML-20M-shaped data: {X.shape[0]:,} users x {X.shape[1]:,} items, {X.nnz:,} interactions; "
        f"batches of {BATCH}; all variants interleaved, median of {results['multvae_bf16']['n']} batches after "
        f"{args.warmup} warm-up rounds (straightforward: {results['straightforward_fp32']['n']}). "
        "Floor of a step = its dense matrix products alone (same shapes and precision, preallocated, each in "
        "its fastest operand layout here) + one fused Adam step alone over fp32 tensors of the sizes it updates; "
        "both measured in the same rounds. `recvae_posterior_bf16` is q(z|x)'s forward pass, once per outer "
        "epoch per user (its floor: its products).",
        "",
        "| step | ms / batch | s / epoch | GEMMs ms | optimizer pass ms | x floor (GEMMs + optimizer) | x GEMMs | "
        "speed-up vs straightforward fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        if "floor_parts" not in r:
            continue
        gemm, optim = (results[r["floor_parts"][k]]["median_ms"] if r["floor_parts"][k] else 0.0
                       for k in ("gemm", "optim"))
        lines.append(f"| {name} | {r['median_ms']:.1f} | {r['seconds_per_epoch']:.1f} | {gemm:.1f} | {optim:.1f} | "
                     f"{r['ratio_to_floor']:.2f} | {r['ratio_to_gemm']:.2f} | "
                     f"{r['speedup_over_straightforward_fp32']:.1f} |")
    if "recvae_outer_epoch_bf16" in results:
        r = results["recvae_outer_epoch_bf16"]
        lines.append(f"| RecVAE outer epoch, bf16 (per batch of users: 3 encoder + 1 decoder updates + 1 posterior "
                     f"pass) | {r['median_ms']:.1f} | "
                     f"{r['seconds_per_epoch']:.1f} | | | {r['ratio_to_floor']:.2f} | | |")
    r = results["straightforward_fp32"]
    lines.append(f"| straightforward_fp32 | {r['median_ms']:.1f} | {r['seconds_per_epoch']:.1f} | | | | | 1.0 |")
    sizes = report["optimizer_floor_parameters"]
    lines += [
        "",
        "Parameters updated per step (the optimizer pass): "
        + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in sizes.items()) + f". Peak RSS: {summary['peak_rss_gb']:.2f} GB (the whole process, every variant's model, "
        "optimizer and floor tensors alive).",
        "",
        "| target | value | met |",
        "|---|---:|:---:|",
        f"| bf16 Mult-VAE step <= {TARGETS['ratio_to_floor_bf16']}x (GEMMs + optimizer pass) | "
        f"{summary['ratio_to_floor_bf16']:.2f} | {'yes' if met['ratio_to_floor_bf16'] else 'no'} |",
        f"| >= {TARGETS['speedup_over_straightforward']}x faster than straightforward fp32 (bf16 step) | "
        f"{summary['speedup_over_straightforward']:.1f} | {'yes' if met['speedup_over_straightforward'] else 'no'} |",
        f"| peak RSS < {TARGETS['peak_rss_gb']} GB | {summary['peak_rss_gb']:.2f} | {'yes' if met['peak_rss_gb'] else 'no'} |",
    ]
    for phase in RECVAE_UPDATES:
        key = f"recvae_{phase}_ratio_to_floor_bf16"
        if key in met:
            lines.append(f"| bf16 RecVAE {phase} update <= {TARGETS['ratio_to_floor_bf16']}x (GEMMs + optimizer pass) | "
                         f"{summary[key]:.2f} | {'yes' if met[key] else 'no'} |")
    for name, p in report["profiles"].items():
        lines += ["", f"Where the time of `{name}` goes (torch profiler, 3 batches; self CPU time by kind of work, "
                  f"ms per step; the profiler adds its own overhead: {p['wall_ms_per_step']:.1f} ms per step "
                  "under it):", "", *kind_rows(p)]
    for name, p in report["profiles"].items():
        lines += ["", f"Top operators of `{name}` (3 batches):", "", "```", p["top_ops"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
