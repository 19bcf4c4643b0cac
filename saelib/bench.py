"""Wall-clock cost of one SAE training step, for every kind and for the baselines.

``python -m saelib.bench`` (``--quick`` for tiny shapes, ``--help`` for the rest) prints,
and :func:`run` returns as a DataFrame, for each row: seconds per step, tokens/s, peak
memory, analytic forward FLOPs per token and how much of the FLOP saving shows up as
time saving.

A *step* is what training does: forward, loss, backward, removal of the gradient
component parallel to each decoder row, gradient-norm clipping, Adam, decoder
renormalisation. saelib rows run ``saelib.train._train_step`` (the code path of
``train.fit``, AuxK off) on SAEs from ``saelib.saes.build``; the baselines run the same
step around their own forward pass:

* ``naive``: dense TopK the way an unoptimised implementation writes it: dense
  pre-activations, ``topk`` under autograd, the code scattered into a dense
  ``[B, n_latents]`` matrix, dense decode ``z @ W_dec``. Forward FLOPs ``2nd + 2nd``.
* ``official_switch16`` / ``official_scale16x2``: the official Switch SAE / Scale SAE
  codes' strategy: every expert's encoder computed densely, then masked by the router,
  TopK of the masked dense code (autograd through the dense tensor), sparse decode.
  Forward FLOPs ``2Ed + 2nd + 2kd``: no saving over dense, which is the point.
* ``sparsify``: EleutherAI sparsify's ``SparseCoder`` (PyPI ``eai-sparsify``; fused
  encoder with sparse backward, ``embedding_bag`` decoder), when importable.
* saelib ``topk``, ``batchtopk``, ``relu``, ``gated``, ``switch16``, ``switch64``
  (width-matched: the same ``n_latents`` split over the experts), ``scale16x2``,
  ``scale16x4`` (``n_active`` 2 and 4, feature scaling on). FLOPs from
  ``sae.flops_per_token()``.

Columns: ``s_per_step`` (wall clock, median over rounds), ``cpu_s_per_step`` (process
CPU time; with one thread it is immune to other processes taking the cores),
``tokens_per_s`` (batch / s_per_step), ``peak_mem_mb``, ``flops_per_token``;
``speedup_vs_X = t_X / t_row`` (X = ``naive`` and ``topk``, the saelib dense
TopK of the same width, the comparison the Switch SAE paper makes);
``flop_ratio_vs_X = F_X / F_row`` (forward FLOPs per token, as the papers count them);
``realised_vs_X = speedup_vs_X / flop_ratio_vs_X``: the fraction of the FLOP saving
that becomes a wall-clock saving (1 = all of it; > 1 when the backward saves more than
the forward FLOPs show, as for sparse backward passes). All ratios come from one run.

Timing protocol (the 2-core CPU this is built on is shared and its speed drifts by 2x
over seconds): every row is built and warmed up first, then ``rounds`` rounds each run
``steps`` steps of every row in turn; a row's time is the median over rounds. Ratios
therefore compare rows measured side by side, not minutes apart. When other processes
keep the cores busy (the printed load average exceeds the CPU count), multi-threaded
wall times inflate several-fold and unevenly (every parallel region waits for a
descheduled sibling thread); ``--threads 1`` then gives steady ratios.

Where the time goes: every step of a saelib row runs inside
``kernels.timed_sections()``, so the same steps also give the time spent in each
named section (router, dispatch, encoder matmul, select, decode, decoder backward,
encoder backward, optimizer; ``other`` = the rest). :func:`breakdown` tabulates it
and the bound it implies for the expert rows.

On CUDA (``--device cuda``, or ``auto`` with a GPU present): the same rows and steps,
each round's steps of a row timed between two CUDA events after a
``torch.cuda.synchronize()`` (so the figure is the device's time for the queued work,
not the host's time to queue it), with section timing off: ``section`` synchronises at
every edge, which would add host round trips to the step it measures. The per-section
split then comes from one more pass of ``steps`` steps per round under
``kernels.timed_sections``; its own step time is the column ``s_per_step_sectioned``,
which :func:`breakdown` uses as the step. ``--device cuda`` on a machine without a CUDA
device stops before any work with ``--device cuda: no CUDA device is available``.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during one step minus the
allocated memory before it. On CPU there is no allocator counter, so each row is
built again in a fresh Python process (the timing process keeps freed blocks in its
heap, see ``utils.tune_malloc``, which would hide new tensors from the RSS), warmed up,
and one more step runs with glibc's mmap threshold pinned to 128 KiB (every tensor of 128 KiB or
more gets its own mapping, returned to the OS when freed) while a thread samples the
process RSS every 0.5 ms; the figure is the peak RSS minus the RSS before the step:
the step's transient memory (activations, gradients, temporaries), not the resting
weights and Adam state. Short-lived peaks under 0.5 ms can be missed; treat it as a
lower bound good to a few MB.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import math
import os
import statistics
import threading
import time
import types

import pandas as pd
import torch
import torch.nn.functional as F

from . import kernels, utils
from .utils import check_choice, check_positive_int, resolve_device

SHAPES = {
    "small": dict(d=256, n_latents=4096, k=32, batch=8192),
    "paper": dict(d=768, n_latents=24576, k=32, batch=4096),   # GPT-2 small width, 32x
    "quick": dict(d=32, n_latents=512, k=8, batch=512),
}
# row name -> how to build it (impl: saelib | naive | official | sparsify)
ROWS = {
    "naive": dict(impl="naive", label="naive dense TopK"),
    "official_switch16": dict(impl="official", n_experts=16, n_active=1, label="official switch, 16 experts"),
    "official_scale16x2": dict(impl="official", n_experts=16, n_active=2, feature_scaling=True,
                               label="official scale, 16 experts, n_active 2"),
    "sparsify": dict(impl="sparsify", label="EleutherAI sparsify SparseCoder"),
    "topk": dict(impl="saelib", kind="topk", label="saelib topk"),
    "batchtopk": dict(impl="saelib", kind="batchtopk", label="saelib batchtopk"),
    "relu": dict(impl="saelib", kind="relu", label="saelib relu"),
    "gated": dict(impl="saelib", kind="gated", label="saelib gated"),
    "switch16": dict(impl="saelib", kind="switch", n_experts=16, label="saelib switch, 16 experts"),
    "switch64": dict(impl="saelib", kind="switch", n_experts=64, label="saelib switch, 64 experts"),
    "scale16x2": dict(impl="saelib", kind="scale", n_experts=16, n_active=2,
                      label="saelib scale, 16 experts, n_active 2"),
    "scale16x4": dict(impl="saelib", kind="scale", n_experts=16, n_active=4,
                      label="saelib scale, 16 experts, n_active 4"),
}
# (row, reference, minimum speedup) the library is built to meet at the "small" shape
TARGETS = (("topk", "naive", 2.0), ("topk", "sparsify", 1.5), ("switch16", "topk", 6.0), ("scale16x2", "topk", 3.5))
LR = 1e-4


# ---------------------------------------------------------------------------
# the training step shared by the baselines (saelib rows use train._train_step)
# ---------------------------------------------------------------------------
def _decoder_hooks(W_dec):
    """The saelib SAE's own decoder hooks (``remove_parallel_grad_``, ``normalize_decoder_``)
    applied to a bare ``W_dec``, so every row pays the same post-processing."""
    from . import saes

    holder = types.SimpleNamespace(W_dec=W_dec, _buffers={})   # no per-latent decoder scale
    return (lambda: saes.SAE.remove_parallel_grad_(holder)), (lambda: saes.SAE.normalize_decoder_(holder))


def _baseline_step(params, hooks, opt, loss_fn, x):
    remove_parallel_grad, normalize_decoder = hooks
    loss = loss_fn(x)                            # no host read: train.fit checks finiteness at log rows
    opt.zero_grad(set_to_none=True)
    loss.backward()
    remove_parallel_grad()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    normalize_decoder()


def _init_weights(n, d, gen, device):
    W_dec = F.normalize(torch.randn(n, d, generator=gen), dim=-1)
    return (torch.nn.Parameter(W_dec.clone().to(device)), torch.nn.Parameter(W_dec.to(device)))


def _make_naive(shape, gen, device):
    n, d, k = shape["n_latents"], shape["d"], shape["k"]
    W_enc, W_dec = _init_weights(n, d, gen, device)
    b_enc, b_pre = (torch.nn.Parameter(torch.zeros(s, device=device)) for s in (n, d))

    def loss_fn(x):
        pre = (x - b_pre) @ W_enc.T + b_enc
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        z = torch.zeros_like(pre).scatter(1, idx, F.relu(vals))
        x_hat = z @ W_dec + b_pre
        return (x - x_hat).pow(2).sum(-1).mean()

    return [W_enc, b_enc, W_dec, b_pre], W_dec, loss_fn, 2 * n * d + 2 * n * d


def _make_official(shape, gen, device, n_experts, n_active, feature_scaling=False, alpha=3.0):
    """Dense encoder over all experts, router mask, TopK of the masked code (amudide/switch_sae
    ``SwitchAutoEncoder.encode``; the Scale SAE code keeps ``n_active`` experts unmasked)."""
    n, d, k, E = shape["n_latents"], shape["d"], shape["k"], n_experts
    m = n // E
    W_enc, W_dec = _init_weights(n, d, gen, device)
    b_pre, b_router = (torch.nn.Parameter(torch.zeros(d, device=device)) for _ in range(2))
    W_router = torch.nn.Parameter((torch.randn(E, d, generator=gen) / math.sqrt(d)).to(device))
    omega = torch.nn.Parameter(torch.zeros(E, device=device))
    params = [W_enc, W_dec, b_pre, b_router, W_router] + ([omega] if feature_scaling else [])

    def loss_fn(x):
        W = W_enc
        if feature_scaling:
            Wv = W_enc.view(E, m, d)
            low = Wv.mean(1, keepdim=True)
            W = (low + (1 + omega).view(E, 1, 1) * (Wv - low)).reshape(n, d)
        z = F.relu((x - b_pre) @ W.T)                                   # every expert, [B, n]
        p = torch.softmax((x - b_router) @ W_router.T, dim=-1)
        top_p, top_e = p.topk(n_active, dim=-1)
        gate = torch.zeros_like(p).scatter(1, top_e, top_p).repeat_interleave(m, dim=1)
        vals, idx = (z * gate).topk(k, dim=-1, sorted=False)            # masked dense code
        x_hat = F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum") + b_pre
        f = torch.bincount(top_e.flatten(), minlength=E).to(x.dtype) / top_e.numel()
        lb = alpha * d * E * (f * p.mean(0)).sum()
        return (x - x_hat).pow(2).sum(-1).mean() + lb

    return params, W_dec, loss_fn, 2 * E * d + 2 * n * d + 2 * k * d


def sparsify_available() -> bool:
    try:
        with contextlib.redirect_stdout(io.StringIO()):   # it prints a Triton notice on import
            import sparsify  # noqa: F401
        return True
    except Exception:
        return False


def _make_sparsify(shape, gen, device):
    with contextlib.redirect_stdout(io.StringIO()):
        from sparsify import SparseCoder, SparseCoderConfig
    n, d, k = shape["n_latents"], shape["d"], shape["k"]
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    sae = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k), device=device)

    def step(opt, x):
        loss = sae(x).fvu
        float(loss.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        sae.set_decoder_norm_to_unit_norm()

    return list(sae.parameters()), step, 2 * n * d + 2 * k * d


def _make_saelib(shape, spec, seed, device):
    from . import saes, train

    kind = spec["kind"]
    kw = dict(d_in=shape["d"], n_latents=shape["n_latents"], seed=seed)
    if kind in saes.TOPK_KINDS:
        kw["k"] = shape["k"]
    if kind in saes.MOE_KINDS:
        kw["n_experts"] = spec["n_experts"]
    if kind == "scale":
        kw["n_active"] = spec["n_active"]
    sae = saes.build(kind, **kw).to(device).train()
    train_step = getattr(train, "_train_step", None)     # train.fit's own step, AuxK off

    def step(opt, x):
        if train_step is not None:
            train_step(sae, opt, x, LR, 0, 0.0, None, 0)
        else:
            _baseline_step(list(sae.parameters()), (sae.remove_parallel_grad_, sae.normalize_decoder_), opt,
                           lambda x: sae.loss(x, sae(x))[0], x)

    return list(sae.parameters()), step, sae.flops_per_token()


def build_row(name, shape, seed=0, device="cpu", fused_adam=True):
    """``(step(x), flops_per_token)`` for one row: ``step`` runs one full training step."""
    spec = ROWS[name]
    gen = torch.Generator().manual_seed(seed)
    if spec["impl"] == "saelib":
        params, step, flops = _make_saelib(shape, spec, seed, device)
    elif spec["impl"] == "sparsify":
        params, step, flops = _make_sparsify(shape, gen, device)
    else:
        make = _make_naive if spec["impl"] == "naive" else _make_official
        keys = () if spec["impl"] == "naive" else ("n_experts", "n_active", "feature_scaling")
        extra = {key: spec[key] for key in keys if key in spec}
        params, W_dec, loss_fn, flops = make(shape, gen, device, **extra)
        hooks = _decoder_hooks(W_dec)
        step = lambda opt, x, p=params, h=hooks, f=loss_fn: _baseline_step(p, h, opt, f, x)  # noqa: E731
    kw = {"fused": True} if fused_adam else {}
    opt = torch.optim.Adam(params, lr=LR, betas=(0.9, 0.999), **kw)
    return (lambda x: step(opt, x)), flops


# ---------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------
def _loadavg():
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _RssPeak:
    """Samples this process's RSS from a thread; ``peak - start`` in bytes."""

    def __init__(self, period=5e-4):
        import psutil

        self.proc, self.period, self.peak, self._stop = psutil.Process(), period, 0, threading.Event()

    def __enter__(self):
        self.start = self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.period)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def delta(self):
        return self.peak - self.start


def _peak_memory(step, x, device):
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step(x)
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    # glibc's defaults, but every block of 128 KiB or more mmapped and unmapped when freed, so
    # the step's tensors enter and leave the RSS (run in a fresh process: _memory_probe)
    utils.mallopt(mmap_threshold=128 * 2**10, trim_threshold=128 * 2**10, trim=True)
    step(x)                                       # settle the allocator under the new threshold
    gc.collect()
    with _RssPeak() as rss:
        step(x)
    return rss.delta


def _memory_probe(row, shape, seed, fused_adam, threads):
    """Peak transient memory (bytes) of one CPU step of ``row``, measured in this process
    with glibc's default allocator settings (run by :func:`_peak_memory_isolated`)."""
    torch.set_num_threads(threads)
    step, _ = build_row(row, shape, seed=seed, device=torch.device("cpu"), fused_adam=fused_adam)
    x = torch.randn(shape["batch"], shape["d"], generator=torch.Generator().manual_seed(seed))
    step(x)
    return _peak_memory(step, x, torch.device("cpu"))


def _peak_memory_isolated(row, shape, seed, fused_adam):
    """:func:`_memory_probe` in a fresh Python process. The timed steps run under
    ``utils.tune_malloc`` (freed blocks stay in the heap), so in the timing process a
    step's new tensors come from memory that is already resident and the RSS does not
    show them; a fresh process with glibc's defaults does."""
    import json
    import subprocess
    import sys

    args = json.dumps([row, shape, seed, fused_adam, torch.get_num_threads()])
    code = ("import json, sys; from saelib import bench; "
            "print(json.dumps(bench._memory_probe(*json.loads(sys.argv[1]))))")
    env = {**os.environ, "SAELIB_QUIET": "1"}
    res = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"peak-memory probe of row {row!r} failed:\n{res.stderr[-2000:]}")
    return float(res.stdout.strip().splitlines()[-1])


def run(shape="small", rows=None, *, steps=2, rounds=5, warmup=2, seed=0, device="auto",
        d=None, n_latents=None, k=None, batch=None, memory=True, fused_adam=True,
        progress=True) -> pd.DataFrame:
    """Benchmark the training step of ``rows`` (default: all of :data:`ROWS`, ``sparsify``
    only when importable) at ``shape`` (a key of :data:`SHAPES`, or override ``d``,
    ``n_latents``, ``k``, ``batch``). Each row is warmed up ``warmup`` steps, then
    ``rounds`` rounds run ``steps`` steps of every row in turn; the reported time is the
    median over rounds. Returns one DataFrame row per benchmark row (see the module doc
    for the columns). ``device``: ``"cpu"``, ``"cuda[:i]"`` or ``"auto"`` (CUDA when
    available); a CUDA device that is not there raises a ValueError before any work."""
    dev = check_device(device)
    check_choice("shape", shape, SHAPES)
    shp = dict(SHAPES[shape])
    for key, val in dict(d=d, n_latents=n_latents, k=k, batch=batch).items():
        if val is not None:
            check_positive_int(key, val)
            shp[key] = int(val)
    for key, val in dict(steps=steps, rounds=rounds).items():
        check_positive_int(key, val)
    if not (isinstance(warmup, int) and warmup >= 0):
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
    if rows is None:
        rows = [r for r in ROWS if r != "sparsify" or sparsify_available()]
    rows = list(rows)
    for r in rows:
        check_choice("rows", r, ROWS)
        if ROWS[r].get("n_experts") and shp["n_latents"] % ROWS[r]["n_experts"]:
            raise ValueError(f"n_latents={shp['n_latents']} is not divisible by the "
                             f"{ROWS[r]['n_experts']} experts of row {r!r}")
    if "sparsify" in rows and not sparsify_available():
        raise ValueError("rows includes 'sparsify' but it is not importable: pip install --no-deps eai-sparsify==1.3.3 "
                         "(+ einops natsort simple-parsing schedulefree accelerate)")
    utils.tune_malloc()                # what train.fit does; every row runs under the same allocator
    from .utils import progress as bar

    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(shp["batch"], shp["d"], generator=gen).to(dev) for _ in range(2)]
    built = {}
    for r in bar(rows, desc="build + warm up", disable=not progress):
        step, flops = build_row(r, shp, seed=seed, device=dev, fused_adam=fused_adam)
        for i in range(warmup):
            step(xs[i % 2])
        built[r] = (step, flops)
    _sync(dev)
    times, cpu, sectioned = {r: [] for r in rows}, {r: [] for r in rows}, {r: [] for r in rows}
    parts = {r: {sec: [] for sec in kernels.SECTIONS} for r in rows}
    cuda = dev.type == "cuda"
    load0 = _loadavg()
    for _ in bar(range(rounds), desc="rounds", disable=not progress):
        for r in rows:
            step = built[r][0]
            if cuda:   # device time between two events, no section syncs inside the step
                t, c = _time_steps_cuda(step, xs, steps, dev)
                times[r].append(t)
                cpu[r].append(c)
            _sync(dev)
            with kernels.timed_sections(dev) as sec:
                t0, c0 = time.perf_counter(), time.process_time()
                for i in range(steps):
                    step(xs[i % 2])
                _sync(dev)
                (sectioned if cuda else times)[r].append((time.perf_counter() - t0) / steps)
                if not cuda:
                    cpu[r].append((time.process_time() - c0) / steps)
            for name in kernels.SECTIONS:
                parts[r][name].append(sec.get(name, 0.0) / steps)
    out = []
    for r in rows:
        t = statistics.median(times[r])
        row = dict(row=r, label=ROWS[r]["label"], s_per_step=t, s_min=min(times[r]),
                   cpu_s_per_step=statistics.median(cpu[r]), tokens_per_s=shp["batch"] / t,
                   flops_per_token=built[r][1])
        if cuda:
            row["s_per_step_sectioned"] = statistics.median(sectioned[r])
        if ROWS[r]["impl"] == "saelib":   # the baselines do not run saelib's sections
            for name in kernels.SECTIONS:
                row[f"t_{name}"] = statistics.median(parts[r][name])
        out.append(row)
    df = pd.DataFrame(out)
    if memory:
        if dev.type == "cuda":
            df["peak_mem_mb"] = [_peak_memory(built[r][0], xs[0], dev) / 2**20 for r in rows]
        else:   # a fresh process per row: this one's heap holds every earlier row's freed blocks
            df["peak_mem_mb"] = [_peak_memory_isolated(r, shp, seed, fused_adam) / 2**20
                                 for r in bar(rows, desc="peak memory", disable=not progress)]
    for ref in ("naive", "topk"):
        if ref in rows:
            t_ref, f_ref = df.set_index("row").loc[ref, ["s_per_step", "flops_per_token"]]
            df[f"speedup_vs_{ref}"] = t_ref / df["s_per_step"]
            df[f"flop_ratio_vs_{ref}"] = f_ref / df["flops_per_token"]
            df[f"realised_vs_{ref}"] = df[f"speedup_vs_{ref}"] / df[f"flop_ratio_vs_{ref}"]
    df.attrs.update(shape=shp, device=str(dev), threads=torch.get_num_threads(), steps=steps, rounds=rounds,
                    warmup=warmup, torch=torch.__version__, loadavg=max(load0, _loadavg()), cpus=os.cpu_count())
    if cuda:
        df.attrs.update(gpu=torch.cuda.get_device_name(dev), tf32=bool(torch.backends.cuda.matmul.allow_tf32))
    return df


def check_device(device) -> torch.device:
    """``device`` as a ``torch.device`` (``"auto"``: CUDA when available, else CPU), or a
    ValueError when it names no device this machine has: ``"cuda"`` without a CUDA device,
    ``"cuda:3"`` with fewer devices, a name torch does not know."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r}: no CUDA device is available "
                             "(torch.cuda.is_available() is False; this torch build is "
                             f"{torch.__version__}, CUDA {torch.version.cuda or 'none'})")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device={str(device)!r}: there are only {n} CUDA device(s) (cuda:0 .. cuda:{n - 1})")
    elif dev.type != "cpu":
        raise ValueError(f"device={str(device)!r}: the benchmark runs on 'cpu', 'cuda[:i]' or 'auto'")
    return dev


def _time_steps_cuda(step, xs, steps, dev):
    """Seconds per step on ``dev`` (CUDA events around ``steps`` steps, queue drained
    before and after) and process CPU seconds per step."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    _sync(dev)
    c0 = time.process_time()
    start.record()
    for i in range(steps):
        step(xs[i % 2])
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / steps, (time.process_time() - c0) / steps


SHARED = ("decode", "decoder backward", "encoder backward", "optimizer")


def breakdown(df: pd.DataFrame) -> pd.DataFrame:
    """Milliseconds per step in each of ``kernels.SECTIONS`` for the TopK-style saelib rows of ``df``
    (medians over rounds, from the same steps as ``s_per_step``), ``other`` (the rest of
    the step: loss, elementwise work, allocation, autograd bookkeeping) and ``step``.

    On CUDA the sections come from their own steps (section edges synchronise), so
    ``step`` is ``s_per_step_sectioned``, the time of those steps.

    ``shared`` = decode + decoder backward + encoder backward + optimizer: O(B k d) sparse
    work plus the Adam update of every parameter, which every TopK-style SAE of the same
    width pays whatever its encoder. ``bound_vs_topk`` = t_topk / (shared + encoder
    matmul): the speed-up over saelib ``topk`` this row would reach if its routing,
    dispatch, TopK selection and all other work were free -- an upper bound for the
    expert decomposition with these sparse kernels on this machine (MoE rows only)."""
    cols = [f"t_{s}" for s in kernels.SECTIONS]
    if not set(cols) <= set(df.columns):
        return pd.DataFrame()
    from .saes import TOPK_KINDS      # relu/gated run plain autograd: their sections would be empty

    keep = df[cols[0]].notna() & df["row"].map(lambda r: ROWS[r].get("kind") in TOPK_KINDS)
    b = df[keep].set_index("row")[cols] * 1e3
    b.columns = list(kernels.SECTIONS)
    step_col = "s_per_step_sectioned" if "s_per_step_sectioned" in df else "s_per_step"
    b["other"] = df.set_index("row").loc[b.index, step_col] * 1e3 - b.sum(axis=1)
    b["step"] = df.set_index("row").loc[b.index, step_col] * 1e3
    b["shared"] = b[list(SHARED)].sum(axis=1)
    if "topk" in b.index:
        moe = [r for r in b.index if ROWS[r].get("n_experts")]
        b["bound_vs_topk"] = (b.loc["topk", "step"] / (b["shared"] + b["encoder matmul"]))[moe]
    return b


def check_targets(df: pd.DataFrame, targets=TARGETS) -> pd.DataFrame:
    """The speed targets whose rows are in ``df``: ``row``, ``vs``, ``target`` (minimum
    speedup), ``speedup`` (``t_vs / t_row``), ``met``."""
    t = df.set_index("row")["s_per_step"]
    res = [dict(row=r, vs=ref, target=goal, speedup=t[ref] / t[r], met=bool(t[ref] / t[r] >= goal))
           for r, ref, goal in targets if r in t and ref in t]
    return pd.DataFrame(res, columns=["row", "vs", "target", "speedup", "met"])


def format_table(df: pd.DataFrame) -> str:
    cols = ["row", "s_per_step", "cpu_s_per_step", "tokens_per_s", "peak_mem_mb", "flops_per_token",
            "speedup_vs_naive", "speedup_vs_topk", "flop_ratio_vs_topk", "realised_vs_topk"]
    show = df[[c for c in cols if c in df]].copy()
    fmt = {"s_per_step": "{:.4f}", "cpu_s_per_step": "{:.4f}", "tokens_per_s": "{:,.0f}",
           "peak_mem_mb": "{:,.0f}", "flops_per_token": "{:,.0f}"}
    for c in show:
        if c in fmt:
            show[c] = show[c].map(fmt[c].format)
        elif show[c].dtype.kind == "f":
            show[c] = show[c].map("{:.2f}".format)
    return show.to_string(index=False)


def sweep_throughput(d: int = 128, n_latents: int = 2048, k: int = 32, n_experts: int = 16, n_saes: int = 4,
                     steps: int = 400, batch_size: int = 2048, workers=(1, 2), seed: int = 0) -> pd.DataFrame:
    """SAEs per minute when independent SAEs train one after another (``workers=1``)
    and side by side (:func:`saelib.sweep.sweep` with ``workers=N``, one torch thread
    each), measured in one call at the chapter 01 shape by default (d=128, 2048
    latents, k=32, 400 steps of 2048 rows): ``n_saes`` SAEs, alternately TopK and a
    width-matched Switch SAE with ``n_experts`` experts, each with its own seed, on
    Gaussian data [``steps * batch_size``, d]. Each worker count trains into a fresh
    temporary cache (nothing is a cache hit).

    Returns a DataFrame: ``workers``, ``n_saes``, ``seconds`` (wall clock of the sweep;
    the worker processes are started before, :func:`saelib.pool.warm`, once per
    notebook in real use), ``startup_s`` (that start-up), ``saes_per_min``, ``speedup``
    (vs the first worker count), ``identical`` (every SAE's weights equal the first
    count's, bit for bit) and ``loadavg`` (1-min load average before the sweep).
    Raises ValueError for bad sizes or worker counts."""
    import os
    import tempfile

    from . import pool, sweep as sweep_mod

    for name, v in dict(d=d, n_latents=n_latents, k=k, n_saes=n_saes, steps=steps, batch_size=batch_size).items():
        check_positive_int(name, v)
    workers = [pool.resolve_workers(w) for w in workers]
    x = torch.randn(steps * batch_size, d, generator=torch.Generator().manual_seed(seed))
    specs = [dict(kind="topk", n_latents=n_latents, k=k, seed=seed + i) if i % 2 == 0 else
             dict(kind="switch", n_latents=n_latents, k=k, n_experts=n_experts, seed=seed + i) for i in range(n_saes)]
    rows, first = [], None
    old = os.environ.get("SAELIB_CACHE")
    try:
        for w in workers:
            with tempfile.TemporaryDirectory(prefix="saelib-sweep-bench-") as tmp:
                os.environ["SAELIB_CACHE"] = tmp
                startup = pool.warm(w, 1)
                load = _loadavg()
                t0 = time.perf_counter()
                runs = sweep_mod.sweep(x, specs, steps=steps, batch_size=batch_size, workers=w, threads=1,
                                       desc=f"{w} worker(s)")
                sec = time.perf_counter() - t0
                states = [r.sae.state_dict() for r in runs]
            first = states if first is None else first
            same = all(torch.equal(a[n], b[n]) for a, b in zip(first, states) for n in a)
            rows.append(dict(workers=w, n_saes=n_saes, seconds=sec, startup_s=startup, saes_per_min=60 * n_saes / sec,
                             identical=same, loadavg=load))
    finally:
        if old is None:
            os.environ.pop("SAELIB_CACHE", None)
        else:
            os.environ["SAELIB_CACHE"] = old
    df = pd.DataFrame(rows)
    df["speedup"] = df.seconds.iloc[0] / df.seconds
    return df[["workers", "n_saes", "seconds", "startup_s", "saes_per_min", "speedup", "identical", "loadavg"]]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m saelib.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", action="append", choices=list(SHAPES),
                   help="shape(s) to run (repeatable; default: small and paper)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 1 round: a smoke test")
    p.add_argument("--rows", help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--steps", type=int, default=2, help="steps per row per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    for key in ("d", "n-latents", "k", "batch"):
        p.add_argument(f"--{key}", type=int, help=f"override the shape's {key}")
    p.add_argument("--device", default="cpu",
                   help="cpu (default), cuda[:i], or auto (cuda when available); on CUDA each row's steps "
                        "are timed with CUDA events, the queue drained before and after")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--no-fused-adam", dest="fused_adam", action="store_false",
                   help="plain Adam instead of Adam(fused=True) (train.fit's optimizer) for every row")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--csv", help="also write the table(s) here (shape name appended)")
    a = p.parse_args(argv)
    try:                               # before any work: a missing GPU is not found after the CPU rows
        check_device(a.device)
    except ValueError as e:
        why = "no CUDA device is available" if "no CUDA device is available" in str(e) else str(e)
        p.error(f"--device {a.device}: {why.removeprefix(f'device={a.device!r}: ')}")
    if a.threads:
        torch.set_num_threads(a.threads)
    shapes = ["quick"] if a.quick else (a.shape or ["small", "paper"])
    kw = dict(steps=1 if a.quick else a.steps, rounds=1 if a.quick else a.rounds, warmup=1 if a.quick else a.warmup,
              device=a.device, d=a.d, n_latents=a.n_latents, k=a.k, batch=a.batch, memory=not a.no_memory,
              fused_adam=a.fused_adam, rows=a.rows.split(",") if a.rows else None)
    for shape in shapes:
        df = run(shape, **kw)
        s = df.attrs["shape"]
        print(f"\n== {shape}: d={s['d']} n_latents={s['n_latents']} k={s['k']} batch={s['batch']} | "
              f"{df.attrs['device']}" + (f" ({df.attrs['gpu']}, TF32 matmul {'on' if df.attrs['tf32'] else 'off'})"
                                          if "gpu" in df.attrs else "") +
              f", {df.attrs['threads']} threads, torch {df.attrs['torch']}, "
              f"median of {df.attrs['rounds']} rounds x {df.attrs['steps']} steps ==")
        if df.attrs["loadavg"] > 1.25 * df.attrs["cpus"]:
            print(f"WARNING: load average {df.attrs['loadavg']:.1f} on {df.attrs['cpus']} CPUs: other processes "
                  "compete for the cores; with more than one thread, wall times suffer most (threads wait at "
                  "every parallel region for a descheduled sibling). --threads 1 gives steadier ratios.")
        print(format_table(df))
        bd = breakdown(df)
        if len(bd):
            print("\nwhere the time goes (ms per step; shared = decode + decoder backward + encoder "
                  "backward + optimizer; bound_vs_topk = t_topk / (shared + encoder matmul)):")
            print(bd.to_string(float_format="{:.1f}".format))
        tg = check_targets(df)
        if len(tg):
            print("\ntargets (speedup = t_vs / t_row; set for the small shape" + ("" if shape == "small" else ", not this one") + "):")
            print(tg.to_string(index=False, float_format="{:.2f}".format))
        if a.csv:
            df.to_csv(f"{a.csv.removesuffix('.csv')}_{shape}.csv", index=False)


if __name__ == "__main__":
    main()
