"""What data and expert parallelism (:mod:`saelib.distributed`) cost: measured on this
machine (:func:`measure_scaling`) and modelled for N devices (:func:`cost_model`,
:func:`pays_from_batch`). Re-exported by :mod:`saelib.distributed`.

The model counts exactly the messages :func:`saelib.distributed.fit` sends (the counted
bytes of a 2-process run are checked against it in ``tests/test_distributed.py``) and
times them with a bandwidth and a per-message latency; compute is FLOPs over a sustained
rate. Both the rate and the interconnect are inputs: the defaults are assumptions, to be
replaced by the numbers of the machine at hand.
"""
from __future__ import annotations

import math
import os

import pandas as pd
import torch

from . import saes
from .utils import check_choice, check_positive_int

MOE = ("switch", "scale")


# ---------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------
def _check(n_gpus, d_in, n_latents, k, n_experts, batch_size, n_active, kind, flops_per_s,
           bandwidth_bytes_per_s, latency_s, balance):
    for name, v in dict(n_gpus=n_gpus, d_in=d_in, n_latents=n_latents, k=k, n_experts=n_experts,
                        batch_size=batch_size, n_active=n_active).items():
        check_positive_int(name, v)
    check_choice("kind", kind, MOE)
    if n_latents % n_experts:
        raise ValueError(f"n_latents={n_latents} is not divisible by n_experts={n_experts}")
    if n_experts % n_gpus:
        raise ValueError(f"n_experts={n_experts} is not divisible by n_gpus={n_gpus}")
    if n_active > n_experts or (kind == "switch" and n_active != 1):
        raise ValueError(f"n_active={n_active} is not allowed for kind={kind!r} with n_experts={n_experts}")
    for name, v in dict(flops_per_s=flops_per_s, bandwidth_bytes_per_s=bandwidth_bytes_per_s).items():
        if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
            raise ValueError(f"{name} must be a positive finite number, got {v!r}")
    if not latency_s >= 0:
        raise ValueError(f"latency_s must be >= 0, got {latency_s!r}")
    if not balance >= 1:
        raise ValueError(f"balance must be >= 1 (the busiest device's share of the compute), got {balance!r}")


def _step_model(N, d, n, k, E, B, A, kind, F, BW, lat, balance):
    """Per-device bytes and seconds of one step for the three modes (see cost_model)."""
    m = n // E
    kk = min(k, m)
    fwd = 2 * E * d + 2 * A * m * d + 2 * k * d                 # router, routed experts, sparse decode
    compute1 = 3 * B * fwd / F                                   # forward + backward (2x)
    ring = 2 * (N - 1) / N
    small = 8 * (4 + 2 * d) + n + 8 * E                          # stats, firing mask, expert counts
    replicated = E * d + 2 * d                                   # W_router, b_pre, b_router
    params = 2 * n * d + replicated + (E if kind == "scale" else 0)
    dp_reduce = 4 * params + small
    ep_reduce = 4 * replicated + small + 8                       # + the shards' squared gradient norm
    pairs_out = A * B / N * (N - 1) / N                          # (row, slot) pairs that change device
    a2a = pairs_out * ((3 * d + 4 * kk) * 4 + (kk + 1) * 8) + 8 * (N - 1)
    rows = [("1 device", compute1, 0.0, 0.0, 0),
            ("data parallel", compute1 / N, 0.0, dp_reduce, 4),
            ("expert parallel", compute1 / N * (balance if N > 1 else 1), a2a, ep_reduce, 15)]
    out = []
    for mode, comp, a, r, msgs in rows:
        if N == 1 and mode != "1 device":
            a, r, msgs = 0.0, 0.0, 0
        wire = a + ring * r
        out.append(dict(mode=mode, compute_s=comp, all_to_all_bytes=a, all_reduce_bytes=r, wire_bytes=wire,
                        comm_s=wire / BW + msgs * lat))
    return out


def cost_model(n_gpus: int, d_in: int = 768, n_latents: int = 24576, k: int = 32, n_experts: int = 16,
               batch_size: int = 4096, n_active: int = 1, kind: str = "switch", flops_per_s: float = 50e12,
               bandwidth_bytes_per_s: float = 100e9, latency_s: float = 20e-6, balance: float = 1.0) -> pd.DataFrame:
    """Seconds per training step of a switch/scale SAE on ``n_gpus`` devices: one device,
    data parallel and expert parallel, as :func:`saelib.distributed.fit` runs them.

    Compute: forward FLOPs per row ``2 E d + 2 n_active m d + 2 k d`` (router, the routed
    experts' encoders, the sparse decode, as :meth:`saelib.saes.SAE.flops_per_token`),
    backward twice that: ``3 B fwd / flops_per_s`` on one device, ``1/N`` of it per device
    in both parallel modes (each device computes on ``B/N`` rows; expert parallel with
    balanced experts, ``balance >= 1`` scales the busiest device).

    Bytes each device hands to collectives per step (``m = n/E``, ``kk = min(k, m)``):

    * data parallel: all-reduce payload of every parameter (``2 n d + E d + 2 d`` float32,
      + ``E`` for scale's omega) and the statistics (``8 (4 + 2 d) + n + 8 E``);
    * expert parallel: ``all_to_all_bytes`` = the ``n_active B/N (N-1)/N`` (row, slot) pairs
      that change device times ``(3 d + 4 kk)`` float32 (forward: the row ``x``, the
      expert's ``kk`` candidates, the coefficients, the partial reconstruction ``[d]``;
      backward: gradients of the last three) + ``kk + 1`` int64 ids, i.e. ``~3 B d (N-1)/N^2``
      values: issue 14's "2 B d x fraction of rows that change device" plus the
      reconstruction's gradient; all-reduce payload of the replicated router, ``b_pre`` and
      ``b_router`` (``E d + 2 d``) and the statistics.

    ``wire_bytes`` = all-to-all bytes + ``2 (N-1)/N`` x all-reduce payload (ring);
    ``comm_s = wire_bytes / bandwidth_bytes_per_s + collectives x latency_s`` (data
    parallel 4 all-reduces per step, expert parallel 10 all-to-alls + 5 all-reduces;
    ``latency_s`` is the fixed cost of one small collective); no overlap of compute and
    communication. ``step_s = compute_s + comm_s``, ``speedup`` = one device's step over
    this one. Units: seconds, bytes (per device per step).

    Returns a DataFrame with rows ``1 device``, ``data parallel``, ``expert parallel``;
    ``attrs`` hold the inputs, ``pays_from_batch`` (:func:`pays_from_batch`) and
    ``ep_beats_dp_below_batch`` (the batch under which expert parallel is faster than data
    parallel, ``inf`` if always). The defaults (50 TFLOP/s sustained, 100 GB/s per device,
    20 us per collective) are assumptions. ValueError: non-positive sizes, ``n_experts`` not
    divisible by ``n_gpus`` or ``n_latents`` not by ``n_experts``."""
    _check(n_gpus, d_in, n_latents, k, n_experts, batch_size, n_active, kind, flops_per_s,
           bandwidth_bytes_per_s, latency_s, balance)
    args = (n_gpus, d_in, n_latents, k, n_experts)
    rest = (n_active, kind, flops_per_s, bandwidth_bytes_per_s, latency_s, balance)
    df = pd.DataFrame(_step_model(*args, batch_size, *rest))
    df["step_s"] = df["compute_s"] + df["comm_s"]
    df["speedup"] = df["step_s"].iloc[0] / df["step_s"]
    (a1, c1), (ad, cd), (ae, ce) = _lines(args, rest)
    df.attrs.update(n_gpus=n_gpus, d_in=d_in, n_latents=n_latents, k=k, n_experts=n_experts, batch_size=batch_size,
                    n_active=n_active, kind=kind, flops_per_s=flops_per_s, bandwidth_bytes_per_s=bandwidth_bytes_per_s,
                    latency_s=latency_s, balance=balance, pays_from_batch=_crossing(ae, ce, a1, c1),
                    ep_beats_dp_below_batch=_below(ae, ce, ad, cd))
    return df


def _lines(args, rest):
    """Step time = a + c B for each mode: intercepts and slopes (the model is linear in B)."""
    t0 = [r["compute_s"] + r["comm_s"] for r in _step_model(*args, 0, *rest)]
    t1 = [r["compute_s"] + r["comm_s"] for r in _step_model(*args, 1, *rest)]
    return [(a, b - a) for a, b in zip(t0, t1)]


def _crossing(a, c, a1, c1):
    """Smallest B with a + c B < a1 + c1 B (inf if none)."""
    if c >= c1:
        return math.inf if a >= a1 else 0.0
    return max(0.0, (a - a1) / (c1 - c))


def _below(ae, ce, ad, cd):
    """Largest B with ae + ce B < ad + cd B, when that holds for small B (inf: for all B)."""
    if ce <= cd:     # (not reached by cost_model: all-to-all bytes grow with B)
        return math.inf if ae < ad else (0.0 if ce == cd else math.nan)
    return max(0.0, (ad - ae) / (ce - cd))


def pays_from_batch(n_gpus: int, d_in: int = 768, n_latents: int = 24576, k: int = 32, n_experts: int = 16,
                    n_active: int = 1, kind: str = "switch", flops_per_s: float = 50e12,
                    bandwidth_bytes_per_s: float = 100e9, latency_s: float = 20e-6, balance: float = 1.0) -> float:
    """The batch size (rows per step) from which expert parallelism on ``n_gpus`` devices
    is faster than one device under :func:`cost_model`; ``inf`` when it never is.

    The compute saved per row, ``3 fwd (1 - balance/N) / flops_per_s``, must exceed the
    seconds per row spent sending, ``n_active (N-1)/N^2 (3 d + 4 kk) 4 bytes /
    bandwidth``; then the batch must be large enough for the saving to cover the fixed
    cost per step (latencies, the router's all-reduce). ``d`` cancels in the first
    condition: with ``k << d`` it reads ``m > 2 flops_per_s / (N bandwidth)`` (4-byte
    values), i.e. the experts must be wide enough; the second grows with the latency."""
    _check(n_gpus, d_in, n_latents, k, n_experts, 1, n_active, kind, flops_per_s, bandwidth_bytes_per_s,
           latency_s, balance)
    if n_gpus == 1:
        return math.inf
    (a1, c1), _, (ae, ce) = _lines((n_gpus, d_in, n_latents, k, n_experts),
                                    (n_active, kind, flops_per_s, bandwidth_bytes_per_s, latency_s, balance))
    return _crossing(ae, ce, a1, c1)


def paper_shape(profile: str = "paper") -> tuple[dict, int]:
    """``(shape, batch_size)`` of the Switch SAE at the paper's settings, read from the
    ``profile`` (default ``paper``: GPT-2 small, d = 768, ``frontier.width`` x d latents in
    ``geometry.n_experts`` experts, ``scaling.k``, batch 8192, [switch] sec. 4); ``shape``
    holds :func:`cost_model`'s keyword arguments (``d_in``, ``n_latents``, ``k``,
    ``n_experts``, ``kind``). Chapters 01 and 05 model the multi-GPU claim at this shape."""
    from . import config

    pp = config.load_profile(profile)
    c1 = pp["chapter01"]
    shape = dict(d_in=pp["lm"]["n_embd"], n_latents=c1["frontier"]["width"] * pp["lm"]["n_embd"],
                 k=c1["scaling"]["k"], n_experts=c1["geometry"]["n_experts"], kind="switch")
    return shape, int(c1["batch_size"])


def modelled_speedup(n_gpus: int, bandwidth_bytes_per_s: float = 100e9, profile: str = "paper", **kw) -> float:
    """Expert-parallel speed-up over one device of the paper-shaped Switch SAE
    (:func:`paper_shape`) on ``n_gpus`` devices under :func:`cost_model` (default: NVLink-class
    100 GB/s, 50 TFLOP/s sustained per device, both assumptions). ``kw`` go to
    :func:`cost_model` (``flops_per_s``, ``latency_s``, ``balance``)."""
    shape, batch = paper_shape(profile)
    df = cost_model(n_gpus, **shape, batch_size=batch, bandwidth_bytes_per_s=bandwidth_bytes_per_s, **kw)
    return float(df.set_index("mode").loc["expert parallel", "speedup"])


# ---------------------------------------------------------------------------
# measured on this machine
# ---------------------------------------------------------------------------
def _measure_worker(spec, n_rows, steps, batch_size, expert_parallel, warmup):
    from . import distributed

    data = torch.randn(n_rows, spec["d_in"], generator=torch.Generator().manual_seed(0))
    sae = saes.build(**spec)
    hist = distributed.fit(sae, data, steps=steps, batch_size=batch_size, seed=0, log_every=1, progress=False,
                           device="cpu", expert_parallel=expert_parallel)
    t = hist["wall_time"].to_numpy()
    return {"steps_per_s": (steps - warmup) / (t[-1] - t[warmup - 1]), "traffic": hist.attrs["traffic_per_step"]}


def measure_scaling(d_in: int = 128, n_latents: int = 4096, k: int = 32, n_experts: int = 8,
                    kind: str = "switch", batch_size: int = 2048, steps: int = 30, warmup: int = 5,
                    with_two_threads: bool = True) -> pd.DataFrame:
    """Measured training throughput of one switch/scale SAE on this machine: 1 process vs 2
    processes (gloo, one torch thread each) in data- and expert-parallel mode, and the bytes
    each rank hands to collectives per step, counted (:func:`saelib.distributed.count_traffic`),
    beside :func:`cost_model`'s bytes for 2 devices. ``with_two_threads`` adds one process
    with 2 threads (the same 2 cores used by intra-op parallelism instead).

    Returns a DataFrame, one row per setting: ``setting``, ``processes``, ``threads``,
    ``steps_per_s`` (steps ``warmup+1 .. steps``; the slower rank), ``speedup`` (vs 1
    process, 1 thread), ``all_to_all_bytes``, ``all_reduce_bytes``, ``all_gather_bytes``
    (counted, per rank per step), ``model_all_to_all_bytes``, ``model_all_reduce_bytes``.
    ``attrs["load_average"]``: the machine's 1-minute load before and after (a shared
    machine makes throughput noisy; bytes do not depend on it). Data: ``4 * batch_size``
    Gaussian rows. ValueError for bad sizes (before any process starts)."""
    from .distributed import launch

    for name, v in dict(d_in=d_in, n_latents=n_latents, k=k, n_experts=n_experts, batch_size=batch_size,
                        steps=steps, warmup=warmup).items():
        check_positive_int(name, v)
    check_choice("kind", kind, MOE)
    if warmup >= steps:
        raise ValueError(f"warmup={warmup} must be smaller than steps={steps}")
    if batch_size % 2 or n_experts % 2:
        raise ValueError(f"batch_size={batch_size} and n_experts={n_experts} must be even (2 processes)")
    spec = dict(kind=kind, d_in=d_in, n_latents=n_latents, k=k, n_experts=n_experts, seed=0)
    n_active = saes.build(**spec).n_active              # bad shapes fail here
    settings = [("1 process", 1, 1, False)]
    if with_two_threads:
        settings.append(("1 process, 2 threads", 1, 2, False))
    settings += [("data parallel", 2, 1, False), ("expert parallel", 2, 1, True)]
    load0 = os.getloadavg()[0]
    rows = []
    for name, procs, threads, ep in settings:
        res = launch(_measure_worker, procs, spec, 4 * batch_size, steps, batch_size, ep, warmup, threads=threads)
        tr = res[0]["traffic"]
        rows.append(dict(setting=name, processes=procs, threads=threads,
                         steps_per_s=min(r["steps_per_s"] for r in res),
                         all_to_all_bytes=tr.get("all_to_all", 0.0), all_reduce_bytes=tr.get("all_reduce", 0.0),
                         all_gather_bytes=tr.get("all_gather", 0.0)))
    df = pd.DataFrame(rows)
    df.insert(4, "speedup", df["steps_per_s"] / df["steps_per_s"].iloc[0])
    model = cost_model(2, d_in=d_in, n_latents=n_latents, k=k, n_experts=n_experts, batch_size=batch_size,
                       n_active=n_active, kind=kind).set_index("mode")
    pick = {"data parallel": "data parallel", "expert parallel": "expert parallel"}
    df["model_all_to_all_bytes"] = [model.loc[pick[s], "all_to_all_bytes"] if s in pick else 0.0 for s in df["setting"]]
    df["model_all_reduce_bytes"] = [model.loc[pick[s], "all_reduce_bytes"] if s in pick else 0.0 for s in df["setting"]]
    df.attrs.update(spec=spec, batch_size=batch_size, steps=steps, warmup=warmup,
                    load_average=(load0, os.getloadavg()[0]), cpus=os.cpu_count())
    return df
