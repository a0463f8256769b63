"""Training speed of the Mult-VAE hybrid's joint fits (``multvae-linear`` with
``linear_weight_mode="fixed"`` or ``"learned"``) against their floor, beside Mult-VAE's step.

In its default ``"scoring"`` mode the hybrid trains Mult-VAE's step bit for bit (the linear path
is added only when scoring), and ``recvae-linear`` trains RecVAE's: those steps are measured by
``benchmarks/train_speed.py``. The joint fits add the linear path to the logits of every
training step, ``logits = f(z) + w * (x B)``, so a step does more work:

* ``x B``, the batch's sum of rows of the dense items x items ``B`` (an embedding-bag over the
  batch's nonzeros: for each interaction one row of I floats read, ~2.9 GB per batch of 500 at
  ML-20M's shape), scaled by ``w`` and added to the bf16 logits;
* ``"learned"``: the gradient w.r.t. ``w``, ``sum(dNLL/dlogits * x B)``, and Adam's update of it.

Floor of a joint step = the same dense matrix products as Mult-VAE's floor (each in its fastest
operand layout, :func:`train_speed.gemm_floor`) + the product ``x B`` alone, in the faster of its
two forms here (an embedding-bag, or a sparse CSR x dense product into a preallocated output)
+ one fused Adam step over fp32 tensors of the sizes the step updates. All measured in the same
rounds, interleaved with the steps (:func:`train_speed.interleaved`), on ML-20M-shaped synthetic
data (``train_speed.synthetic_ml20m``) with a seeded random ``B`` (its values do not change the
work). Target: each joint step <= 1.3x its floor, like every training step of the library.

    python benchmarks/hybrid_speed.py            # full size, writes benchmarks/results/hybrid_speed.*
    python benchmarks/hybrid_speed.py --tiny     # a check that it runs; prints only unless --out
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from train_speed import (  # noqa: E402
    BATCH, N_INTERACTIONS, N_ITEMS, N_USERS, TARGETS, dense_products, gemm_floor, interleaved, machine,
    kind_rows, machine_line, multvae_step, optimizer_floor, parse_speed_arguments, peak_rss_gb, profile_steps, speed_arguments,
    summarise, synthetic_ml20m, write_report,
)

from recvae.models.hybrid import MultVAELinear  # noqa: E402
from recvae.models.networks import MultVAENetwork, NetworkConfig  # noqa: E402
from recvae.models.sparse_layers import SparseBatch  # noqa: E402
from recvae.models.training_loop import training_step  # noqa: E402

MODES = ("fixed", "learned")
LINEAR_WEIGHT = 10.0  # a weight of the declared grid; its value does not change the work
B_SCALE = 1e-3  # the random B's entries: small, so the sum stays a sensible logit


def random_linear(n_items: int, seed: int = 0) -> np.ndarray:
    """A dense float32 (I, I) B with zero diagonal, drawn in row blocks (no float64 copy)."""
    g = torch.Generator().manual_seed(seed)
    B = torch.empty(n_items, n_items)
    step = max(1, (1 << 24) // n_items)
    for i in range(0, n_items, step):
        B[i:i + step].normal_(0.0, B_SCALE, generator=g)
    B.fill_diagonal_(0.0)
    return B.numpy()


def hybrid_step(X, B: np.ndarray, mode: str):
    """The joint fit's training step, as ``MultVAELinear(linear_weight_mode=mode)`` trains it:
    its network, its optimizer (a learned w in a group of its own), bf16 autocast."""
    model = MultVAELinear(linear_weight_mode=mode, linear_weight=LINEAR_WEIGHT)
    net = model._build_network(X.shape[1], torch.Generator().manual_seed(0)).train()
    net.set_linear(B)  # shares B's memory: every variant reads the same matrix
    opt = model._make_optimizer(net)
    gen = torch.Generator().manual_seed(0)

    def step(rows):
        values = training_step(net, opt, SparseBatch.from_csr(X[rows]), beta=0.1, generator=gen, bf16=True)
        assert np.isfinite(values).all()

    return step, net


def linear_product_forms(X, B_t: torch.Tensor):
    """``x B`` of a batch in its two forms, each a step for :func:`interleaved`."""
    out = torch.empty(BATCH, B_t.shape[1])

    def embedding_bag(rows):
        b = SparseBatch.from_csr(X[rows])
        F.embedding_bag(b.cols, B_t, b.crow[:-1], mode="sum", per_sample_weights=b.values)

    def csr_mm(rows):
        x = X[rows]
        csr = torch.sparse_csr_tensor(torch.from_numpy(x.indptr.astype(np.int64)),
                                      torch.from_numpy(x.indices.astype(np.int64)),
                                      torch.from_numpy(x.data), size=x.shape, check_invariants=False)
        torch.addmm(out, csr, B_t, beta=0, out=out)

    return {"embedding_bag": embedding_bag, "csr_mm": csr_mm}


def main(argv=None) -> dict:
    args, command = parse_speed_arguments(speed_arguments(__doc__, "hybrid_speed", "default 20", "joint steps"),
                                          "hybrid_speed", argv)
    load_before = os.getloadavg()
    n_users, n_items, n_int = (2_000, 2_000, 40_000) if args.tiny else (N_USERS, N_ITEMS, N_INTERACTIONS)
    n_timed = args.batches or (2 if args.tiny else 20)
    out = args.out or (None if args.tiny else str(REPO / "benchmarks" / "results" / "hybrid_speed"))
    info = machine()
    X = synthetic_ml20m(n_users, n_items, n_int, seed=0)
    t0 = time.perf_counter()
    B = random_linear(n_items)
    print(f"data: {X.shape[0]} users x {X.shape[1]} items, {X.nnz} interactions; B drawn in "
          f"{time.perf_counter() - t0:.1f}s")
    order = np.random.default_rng(1).permutation(X.shape[0])
    batches = [np.take(order, np.arange(i * BATCH, (i + 1) * BATCH), mode="wrap") for i in range(n_timed + args.warmup)]

    steps, nets = {"multvae_bf16": multvae_step(X, bf16=True)[0]}, {}
    for mode in MODES:
        steps[f"hybrid_{mode}_bf16"], nets[mode] = hybrid_step(X, B, mode)
    B_t = nets["fixed"].linear
    steps["gemm_bf16"] = gemm_floor(dense_products(nets["fixed"]), torch.bfloat16)
    forms = linear_product_forms(X, B_t)
    for form, step in forms.items():
        steps[f"linear_{form}"] = step
    sizes = {}
    for mode in MODES:
        steps[f"optim_{mode}"], sizes[mode] = optimizer_floor([p for p in nets[mode].parameters()])
    steps["optim_multvae"], sizes["multvae"] = optimizer_floor(
        list(MultVAENetwork(NetworkConfig(n_items)).parameters()))
    raw = interleaved(steps, batches, args.warmup, {})
    results = {name: summarise(t) for name, t in raw.items()}
    load_after = os.getloadavg()

    linear_form = min(forms, key=lambda f: results[f"linear_{f}"]["median_ms"])
    linear_ms = results[f"linear_{linear_form}"]["median_ms"]
    gemm_ms = results["gemm_bf16"]["median_ms"]
    floors = {"multvae_bf16": {"gemm": gemm_ms, "linear": 0.0, "optim": results["optim_multvae"]["median_ms"]}}
    for mode in MODES:
        floors[f"hybrid_{mode}_bf16"] = {"gemm": gemm_ms, "linear": linear_ms,
                                         "optim": results[f"optim_{mode}"]["median_ms"]}
    for name, parts in floors.items():
        r = results[name]
        r["floor_parts_ms"] = parts
        r["floor_ms"] = sum(parts.values())
        r["ratio_to_floor"] = r["median_ms"] / r["floor_ms"]
        print(f"{name}: {r['median_ms']:.1f} ms/batch, {r['ratio_to_floor']:.2f}x its floor")
    met = {name: results[name]["ratio_to_floor"] <= TARGETS["ratio_to_floor_bf16"] for name in floors}
    profiles = {}
    if not args.no_profile:
        for mode in MODES:
            profiles[f"hybrid_{mode}_bf16"] = profile_steps(steps[f"hybrid_{mode}_bf16"], batches[:3])
    report = {
        "command": command,
        "data": {"n_users": X.shape[0], "n_items": X.shape[1], "nnz": int(X.nnz), "batch_size": BATCH,
                 "linear_weight": LINEAR_WEIGHT},
        "machine": {**info, "load_average_before": list(load_before), "load_average_after": list(load_after)},
        "timed_batches": n_timed, "warmup": args.warmup, "optimizer_floor_parameters": sizes,
        "linear_product_form": linear_form, "results": results, "target": TARGETS["ratio_to_floor_bf16"],
        "targets_met": met, "peak_rss_gb": peak_rss_gb(), "profiles": profiles,
    }
    md = markdown(report)
    print(md)
    write_report(out, report, md)
    return report


def markdown(report: dict) -> str:
    r, d = report["results"], report["data"]
    lines = [
        "# Training speed (CPU): the Mult-VAE hybrid's joint fits against their floor",
        "",
        machine_line(report["machine"], report["command"]),
        "",
        f"Synthetic ML-20M-shaped data: {d['n_users']:,} users x {d['n_items']:,} items, {d['nnz']:,} interactions; "
        f"batches of {d['batch_size']}; a seeded random dense B (float32, {d['n_items']**2 * 4 / 1e9:.2f} GB), "
        f"w = {d['linear_weight']:g}; bf16; all variants interleaved, median of {r['multvae_bf16']['n']} batches "
        f"after {report['warmup']} warm-up rounds. Floor = the dense matrix products of Mult-VAE's step (each in "
        "its fastest layout) + the product x B alone (its faster form here: "
        f"`{report['linear_product_form']}`; the other: "
        + ", ".join(f"`{k[len('linear_'):]}` {v['median_ms']:.1f} ms" for k, v in r.items()
                    if k.startswith("linear_") and k != f"linear_{report['linear_product_form']}")
        + ") + one fused Adam step over fp32 tensors of the sizes the step updates. In its default `scoring` "
        "mode the hybrid trains Mult-VAE's step (the first row) bit for bit.",
        "",
        "| step | ms / batch | GEMMs ms | x B ms | optimizer pass ms | x floor | target <= "
        f"{report['target']}x met |",
        "|---|---:|---:|---:|---:|---:|:---:|",
    ]
    for name, met in report["targets_met"].items():
        s, p = r[name], r[name]["floor_parts_ms"]
        lines.append(f"| {name} | {s['median_ms']:.1f} | {p['gemm']:.1f} | {p['linear']:.1f} | {p['optim']:.1f} | "
                     f"{s['ratio_to_floor']:.2f} | {'yes' if met else 'no'} |")
    lines += ["", f"Peak RSS: {report['peak_rss_gb']:.2f} GB (the whole process: B, every variant's model and "
              "optimizer, the floors' tensors)."]
    for name, p in report["profiles"].items():
        lines += ["", f"Where the time of `{name}` goes (torch profiler, 3 batches; self CPU time by kind of work, "
                  f"ms per step; {p['wall_ms_per_step']:.1f} ms per step under the profiler):", "",
                  *kind_rows(p)]
        lines += ["", "```", p["top_ops"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
