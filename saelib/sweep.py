"""Train many SAEs once, cache them, and evaluate them side by side.

The sweeps of [switch] (Mudide et al., full text in ``../shared/papers``) train
dozens of SAEs that differ in one or two settings: widths for the scaling laws
(sec. 4.1, fig. 1), ``k`` / L1 values for the sparsity-reconstruction frontier
(sec. 4.2, fig. 3), expert counts for the geometry of sec. 4.3. This module is
the loop around :func:`saelib.train.fit` that makes them cheap to re-run:

* :func:`train_sae` builds one SAE (:func:`saelib.saes.build`), trains it with
  the recipe of [switch] app. A (:func:`saelib.train.fit`) and caches the weights
  (``sae.save``), the training history and the wall-clock seconds under
  ``cache_dir("saes", <hash>)``, written atomically. The hash covers everything
  that changes the result: the data's identity (an activation store's content
  key, or a hash of a tensor's bytes), ``kind``, the build kwargs, ``steps``,
  ``batch_size``, ``seed``, ``lr``, ``normalize``, ``aux_k`` and the code of
  ``saes.py`` and ``train.py`` (their syntax trees without docstrings: a change
  to what the recipe computes retrains, a comment or docstring edit does not;
  nor does the presentation-only ``name``). A second call with the same arguments
  loads instead of training. Two notebooks asking for the same SAE share it.
* :func:`sweep` runs :func:`train_sae` over a list of specs with a progress bar.
* :func:`evaluate_runs` measures every run on held-out activations (L0, MSE,
  FVU, dead latents; :func:`saelib.metrics.evaluate_sae`), adds the cost
  columns (forward FLOPs per token, parameters, training FLOPs by the
  ``3 x forward`` convention of :func:`saelib.scaling.training_flops`, wall
  seconds) and, given the subject model, the fraction of cross-entropy loss
  recovered (:func:`saelib.metrics.loss_recovered`, zero ablation).
* :func:`expert_counts`, :func:`match_frontier` and :func:`compare_to_dense` are the small
  pieces of logic the chapter's comparisons are built from (the verdict rules are in
  :mod:`saelib.verdicts`).

Every kind trains on inputs scaled to ``E||x||^2 = d`` by default
(``normalize="unit"``), so the L1 coefficients, the ``1/sqrt(M)`` learning rate
and the load-balancing weight ``alpha * d`` ([switch] sec. 3.3) mean the same on
any subject model; metrics are reported in the raw units of the activations.
"""
from __future__ import annotations

import ast
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import kernels, metrics, saes, scaling, train
from .utils import (atomic_path, cache_dir, check_choice, check_positive_int, config_hash, entry_lock, progress,
                    usable_entry)

CACHE_VERSION = 1
RUN_FILE, HISTORY_FILE, SAE_DIR = "run.json", "history.json", "sae"
CHECKPOINT_SUFFIX = ".ckpt"          # <entry>.ckpt beside the entry while it trains
AUTO_CHECKPOINT_MIN_STEPS = 2000     # "auto": runs this long or longer checkpoint ...
AUTO_CHECKPOINT_FRACTION = 0.05      # ... every 5% of their steps


def checkpoint_steps(steps: int, checkpoint_every="auto") -> int | None:
    """Steps between the resumable checkpoints :func:`train_sae` writes (None: none).

    ``"auto"``: every 5% of ``steps`` for a run of at least :data:`AUTO_CHECKPOINT_MIN_STEPS`
    steps (the paper's 100k steps: every 5000, ~1-2 minutes on a GPU, so a kill loses at most
    that much), none for shorter runs (seconds to minutes here; a checkpoint would cost more
    than it saves and add file writes to the wall-clock times the chapters compare).
    An int: that interval; None or 0: never.
    >>> checkpoint_steps(100_000), checkpoint_steps(400), checkpoint_steps(400, 50)
    (5000, None, 50)"""
    if checkpoint_every == "auto":
        return max(1, int(steps * AUTO_CHECKPOINT_FRACTION)) if steps >= AUTO_CHECKPOINT_MIN_STEPS else None
    if checkpoint_every is None or checkpoint_every == 0:
        return None
    check_positive_int("checkpoint_every", checkpoint_every)
    return int(checkpoint_every)


@dataclass
class Run:
    """One trained SAE: the model, its training history (:func:`saelib.train.fit`'s
    DataFrame), the wall-clock seconds its training took when it was trained (a
    cache hit returns the recorded time, not ~0), and the config it was keyed by
    (``config["name"]`` is a label; ``path`` is its cache folder; ``cached`` says
    whether this call loaded it). ``tags``: labels a :func:`sweep` spec attached (e.g.
    ``{"setting": "width-matched"}``); :func:`evaluate_runs` turns them into columns."""
    sae: saes.SAE
    history: pd.DataFrame
    seconds: float
    config: dict
    path: Path | None = None
    cached: bool = False
    info: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.get("name") or default_name(self.config)


def default_name(cfg: dict) -> str:
    """A readable label, e.g. ``topk n=2048 k=32`` or ``switch N=8 n=16384 k=32`` (N experts)."""
    b = cfg["build"]
    parts = [cfg["kind"]]
    if b.get("n_experts", 1) != 1:
        parts.append(f"N={b['n_experts']}")
    parts.append(f"n={b['n_latents']}")
    if b.get("k") is not None:
        parts.append(f"k={b['k']}")
    if b.get("l1_coef") is not None:
        parts.append(f"l1={b['l1_coef']:g}")
    return " ".join(parts)


# ---------------------------------------------------------------------------
# identity of the data and of the code
# ---------------------------------------------------------------------------
def data_key(data) -> str:
    """What the cache key knows about ``data``: an activation store's content key
    (``meta["key"]``: a hash of model weights, tokens, site, n_tokens, dtype), or
    else its resolved path; a tensor's shape, dtype and a SHA-256 of its bytes."""
    if torch.is_tensor(data) or isinstance(data, np.ndarray):
        t = torch.as_tensor(data).detach().cpu().contiguous()
        h = hashlib.sha256(t.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
        return f"tensor:{list(t.shape)}:{t.dtype}:{h}"
    meta = getattr(data, "meta", None)
    if isinstance(meta, dict) and meta.get("key"):
        return f"store:{meta['key']}:{len(data)}"
    path = getattr(data, "path", None)
    if path is not None:
        return f"store-path:{Path(path).resolve()}:{len(data)}"
    raise ValueError(f"data must be a tensor [n, d] or an ActivationStore (with .meta['key'] or .path), "
                     f"got {type(data).__name__}")


def code_key(source: str) -> str:
    """A hash of Python ``source`` that ignores comments, docstrings and formatting
    (its syntax tree with docstrings removed)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree, annotate_fields=False).encode()).hexdigest()[:12]


def _code_hash() -> str:
    """:func:`code_key` of ``saes.py``, ``train.py`` and ``kernels.py``: a change to what
    the recipe computes (or to the order of its floating-point sums) retrains, a comment
    or docstring edit does not."""
    files = [Path(m.__file__) for m in (saes, train, kernels)]
    stamp = tuple(f.stat().st_mtime_ns for f in files)
    if _CODE_HASH.get("stamp") != stamp:
        _CODE_HASH.update(stamp=stamp, key=config_hash([code_key(f.read_text()) for f in files]))
    return _CODE_HASH["key"]


_CODE_HASH: dict = {}


def run_config(data, kind: str, *, steps: int, batch_size: int, seed: int = 0, lr: float | None = None,
               normalize: str | None = "unit", aux_k: bool | int = False, **build_kwargs) -> dict:
    """The dict :func:`train_sae` hashes (without the ``name`` label)."""
    return {"data": data_key(data), "kind": kind, "build": dict(sorted(build_kwargs.items())), "steps": int(steps),
            "batch_size": int(batch_size), "seed": int(seed), "lr": None if lr is None else float(lr),
            "normalize": normalize, "aux_k": aux_k, "code": _code_hash(), "v": CACHE_VERSION}


# ---------------------------------------------------------------------------
# training with a cache
# ---------------------------------------------------------------------------
def lr_law(n_latents: int, base: float = 2e-4) -> float:
    """The learning rate of [switch] app. A / Gao et al.'s ``1/sqrt(M)`` law,
    ``base / sqrt(n_latents / 2**14)`` (``train.fit``'s default uses ``base = 2e-4``,
    tuned for ~100k-step runs; a short run needs a larger ``base``)."""
    check_positive_int("n_latents", n_latents)
    if not (isinstance(base, (int, float)) and base > 0 and math.isfinite(base)):
        raise ValueError(f"lr_base must be a positive number, got {base!r}")
    return float(base) / math.sqrt(n_latents / 2**14)


def _resolve(data, kind: str, *, steps: int, batch_size: int, seed: int, lr, lr_base, normalize, aux_k,
             build_kwargs: dict):
    """Validate the arguments of :func:`train_sae` and return ``(sae, lr, cfg, path)``
    without training: the built SAE, the learning rate, the hashed config and the cache folder."""
    check_positive_int("steps", steps)
    check_positive_int("batch_size", batch_size)
    check_choice("normalize", normalize, (None, "unit"))
    if getattr(data, "allow_repeat", True) is False and steps * batch_size > len(data):
        raise ValueError(f"steps x batch_size = {steps * batch_size} rows exceed the {len(data)} rows of the "
                         "stream, which must not repeat rows (activations.allow_repeat: false); size the source "
                         "for the longest run, or lower steps / batch_size")
    d_in = _d_of(data)
    build_kwargs = {k: v for k, v in build_kwargs.items() if k != "d_in"}
    sae = saes.build(kind, d_in=d_in, seed=seed, **build_kwargs)        # validates before any work
    if lr is None and lr_base is not None:
        lr = lr_law(sae.n_latents, lr_base)
    cfg = run_config(data, kind, steps=steps, batch_size=batch_size, seed=seed, lr=lr, normalize=normalize,
                     aux_k=aux_k, **build_kwargs)
    return sae, lr, cfg, cache_dir("saes") / config_hash(cfg, 16)


def train_sae(data, kind: str, *, steps: int, batch_size: int, seed: int = 0, lr: float | None = None,
              lr_base: float | None = None, normalize: str | None = "unit", aux_k: bool | int = False,
              name: str | None = None, device="auto", progress_bar: bool = False, checkpoint_every="auto",
              **build_kwargs) -> Run:
    """Build ``saes.build(kind, d_in=data's d, seed=seed, **build_kwargs)``, train it with
    ``train.fit(sae, data, steps, batch_size, lr, seed, normalize=..., aux_k=...)`` and
    cache the result; a second call with the same arguments loads it (``run.cached``).

    ``lr``: a fixed learning rate; else ``lr_base`` gives ``lr_law(n_latents, lr_base)``;
    both None: ``train.fit``'s default law. The key holds the resulting number.
    ``build_kwargs``: ``n_latents``, ``k``, ``n_experts``, ``l1_coef``, ``alpha``, ...
    (bad values raise :func:`saelib.saes.build`'s ValueError before anything trains).
    ``name``: a label for tables and plots, not part of the key. ``device``: where to
    train (not part of the key: same seed and thread count -> same numbers on CPU).
    Trains with the calling process's torch thread count (:func:`sweep` sets it).

    ``checkpoint_every`` (:func:`checkpoint_steps`; default "auto": every 5% of the steps of
    runs of 2000 steps or more): while it trains, the SAE is checkpointed to ``<entry>.ckpt``
    beside its cache entry (``train.fit``'s resumable checkpoint: model, Adam state, step,
    history); the same call after a kill resumes from it and gives the numbers of an
    uninterrupted run. The checkpoint is removed once the entry is written. Not part of the key."""
    sae, lr, cfg, path = _resolve(data, kind, steps=steps, batch_size=batch_size, seed=seed, lr=lr, lr_base=lr_base,
                                  normalize=normalize, aux_k=aux_k, build_kwargs=build_kwargs)
    every = checkpoint_steps(steps, checkpoint_every)      # validated before any work
    with entry_lock(path):            # a second process asking for the same SAE waits, then loads it
        if usable_entry(path, "SAE") and (path / RUN_FILE).exists():
            return _load(path, name)
        return _train_and_save(sae, data, path, cfg, name, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                               normalize=normalize, aux_k=aux_k, device=device, progress_bar=progress_bar,
                               checkpoint_every=every)


def checkpoint_path(path) -> Path:
    """The resumable checkpoint of the SAE cache entry ``path`` while it trains: ``<entry>.ckpt``."""
    path = Path(path)
    return path.with_name(path.name + CHECKPOINT_SUFFIX)


def _train_and_save(sae, data, path, cfg, name, *, steps, batch_size, lr, seed, normalize, aux_k, device,
                    progress_bar, checkpoint_every=None) -> Run:
    ckpt = checkpoint_path(path) if checkpoint_every else None
    resumed = ckpt is not None and ckpt.exists()
    t0 = time.perf_counter()
    history = train.fit(sae, data, steps=steps, batch_size=batch_size, lr=lr, seed=seed, normalize=normalize,
                        aux_k=aux_k, device=device, progress=progress_bar, checkpoint_path=ckpt,
                        checkpoint_every=checkpoint_every)
    seconds = time.perf_counter() - t0
    if resumed and "wall_time" in history and len(history):
        seconds = float(history["wall_time"].iloc[-1])     # the training loop's time over every segment
    sae = sae.cpu().eval()
    info = {"seconds": seconds, "threads": torch.get_num_threads(), "device": str(next(sae.parameters()).device),
            "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "lr_used": history.attrs.get("lr")}
    if resumed:
        info["resumed"] = True
    with atomic_path(path) as tmp:
        tmp.mkdir()
        sae.save(tmp / SAE_DIR)
        (tmp / HISTORY_FILE).write_text(json.dumps({"rows": history.to_dict(orient="records"),
                                                    "attrs": history.attrs}, default=_jsonable))
        (tmp / RUN_FILE).write_text(json.dumps({"config": cfg, **info}, indent=1, default=_jsonable))
    if ckpt is not None:          # the entry is written: the checkpoint has done its job
        ckpt.unlink(missing_ok=True)
    return Run(sae, history, seconds, {**cfg, "name": name}, path, False, info)


def _d_of(data) -> int:
    if torch.is_tensor(data) or isinstance(data, np.ndarray):
        if data.ndim != 2:
            raise ValueError(f"data must be a tensor [n, d_in], got shape {tuple(data.shape)}")
        return int(data.shape[1])
    if not hasattr(data, "d"):
        raise ValueError(f"data must be a tensor [n, d_in] or an ActivationStore, got {type(data).__name__}")
    return int(data.d)


def _jsonable(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if torch.is_tensor(o):
        return o.tolist()
    return str(o)


def _load(path: Path, name: str | None) -> Run:
    meta = json.loads((path / RUN_FILE).read_text())
    hist = json.loads((path / HISTORY_FILE).read_text())
    history = pd.DataFrame(hist["rows"])
    history.attrs.update(hist["attrs"])
    info = {k: v for k, v in meta.items() if k != "config"}
    return Run(saes.load(path / SAE_DIR), history, float(meta["seconds"]), {**meta["config"], "name": name},
               path, True, info)


def _portable(data, workers: int = 2):
    """What a worker process needs to open ``data``: a tensor as is (it travels through
    shared memory), an activation store as its class, folder and RAM limit (a memmap must
    not be pickled by value), a source with a ``portable()`` hook (an activation stream,
    :meth:`saelib.stream.ActivationStream.portable`) as the ``(opener, state)`` it returns,
    nothing written to disk; with one worker (no process spawned) the source itself."""
    if torch.is_tensor(data) or isinstance(data, np.ndarray):
        return ("tensor", torch.as_tensor(data))
    hook = getattr(data, "portable", None)
    if callable(hook):
        return ("object", data) if workers == 1 else ("portable", *hook())
    path = getattr(data, "path", None)
    if path is None:
        raise ValueError(f"data must be a tensor [n, d_in], an ActivationStore or an ActivationStream, "
                         f"got {type(data).__name__}")
    return ("store", type(data), str(path), getattr(data, "ram_limit_bytes", 2**30))


def _open(ref):
    """The data of a :func:`_portable` reference."""
    if ref[0] in ("tensor", "object"):
        return ref[1]
    if ref[0] == "portable":
        return ref[1](ref[2])
    return ref[1](ref[2], ram_limit_bytes=ref[3])


def _train_job(job) -> str:
    """Worker side of :func:`sweep`: open the data, train one spec into the cache, return its folder."""
    ref, kind, kw = job
    return str(train_sae(_open(ref), kind, **kw).path)


def sweep(data, specs: list[dict], *, steps: int, batch_size: int, seed: int = 0, lr: float | None = None,
          lr_base: float | None = None, normalize: str | None = "unit", desc: str = "sweep",
          workers: int | None = None, threads: int = 1, **common) -> list[Run]:
    """:func:`train_sae` for every spec (a dict with ``kind``, build kwargs, an optional
    ``name``, optional ``tags`` (a dict of labels kept on the run) and optional per-spec
    ``steps``/``batch_size``/``seed``/``lr``/``lr_base``/``normalize`` overriding the shared values).
    Returns the runs in the order of ``specs``.

    Cached runs load; the others (each distinct config once) train in ``workers`` processes
    (None: the machine's cores, :func:`saelib.pool.default_workers`) with ``threads`` torch
    threads each (:func:`saelib.pool.map_processes`), so the same seed gives the same weights
    and history whether an SAE trained alone (with ``threads`` threads), in a pool of one or
    of N. Every spec is validated (``saes.build``'s ValueError) before anything trains. One
    progress bar, advanced as SAEs finish; a failing spec raises
    :class:`saelib.pool.WorkerError` naming it, and the SAEs finished before stay cached."""
    from . import pool

    workers = pool.resolve_workers(workers)
    plans = []
    for i, spec in enumerate(specs):
        spec = dict(spec)
        if "kind" not in spec:
            raise ValueError(f"every spec needs a 'kind' (one of {list(saes.KINDS)}), got {spec}")
        tags = dict(spec.pop("tags", None) or {})
        name = spec.pop("name", None)
        kw = dict(steps=steps, batch_size=batch_size, seed=seed, lr=lr, lr_base=lr_base, normalize=normalize, **common)
        kw.update({k: spec.pop(k) for k in list(spec) if k in kw})
        kind = spec.pop("kind")
        _, _, _, path = _resolve(data, kind, steps=kw["steps"], batch_size=kw["batch_size"], seed=kw["seed"],
                                 lr=kw["lr"], lr_base=kw["lr_base"], normalize=kw["normalize"],
                                 aux_k=kw.get("aux_k", False), build_kwargs=spec)
        plans.append((path, name, tags, kind, {**kw, **spec}, name or f"spec {i} ({kind})"))
    todo = {}
    for path, _, _, kind, kw, label in plans:
        if not (usable_entry(path, "SAE") and (path / RUN_FILE).exists()) and path not in todo:
            todo[path] = (kind, kw, label)
    if todo:
        ref = _portable(data, workers)
        jobs = [(ref, kind, kw) for kind, kw, _ in todo.values()]
        pool.map_processes(_train_job, jobs, workers=workers, threads=threads,
                           labels=[lab for _, _, lab in todo.values()], desc=desc, unit="sae")
    runs = []
    for path, name, tags, *_ in plans:
        run = _load(path, name)
        run.cached = path not in todo
        run.tags = tags
        runs.append(run)
    return runs


# ---------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------
EVAL_COLUMNS = ["name", "kind", "n_experts", "n_latents", "expert_width", "k", "l1", "L0", "mse", "fvu", "dead",
                "flops_per_token", "params", "train_tokens", "train_flops", "seconds", "loss_recovered"]


@torch.no_grad()
def evaluate_runs(runs: list[Run], eval_x, model=None, tokens=None, site: str | None = None,
                  batch_size: int = 4096, lr_batch_size: int = 8, device="auto") -> pd.DataFrame:
    """One row per run, columns :data:`EVAL_COLUMNS`:

    ``L0``, ``mse`` (per element, [scale] eq. A.1, raw units), ``fvu`` and ``dead`` (the
    fraction of latents that never fire on ``eval_x``; it depends on how many rows you
    pass) from :func:`saelib.metrics.evaluate_sae` on ``eval_x`` (held-out activations,
    tensor or store); ``flops_per_token`` (analytic forward FLOPs, ``sae.flops_per_token()``),
    ``params`` (all trainable parameters), ``train_tokens = steps * batch_size``,
    ``train_flops`` (:func:`saelib.scaling.training_flops`: 3 x forward x tokens),
    ``seconds`` (training wall clock as recorded). ``loss_recovered`` ([scale] eq. A.2,
    zero ablation) when ``model``, ``tokens`` ([n_seq, n_ctx] ids) and ``site`` are given,
    else NaN. Each run's ``tags`` become extra columns after these."""
    if (model is None) != (tokens is None) or (model is not None and site is None):
        raise ValueError("pass model, tokens and site together (for loss recovered), or none of them")
    rows = []
    for run in progress(runs, desc="evaluate", unit="sae"):
        sae, cfg = run.sae, run.config
        ev = metrics.evaluate_sae(sae, eval_x, batch_size=batch_size, device=device)
        tokens_seen = cfg["steps"] * cfg["batch_size"]
        fpt = sae.flops_per_token()
        row = {"name": run.name, "kind": sae.kind, "n_experts": sae.n_experts, "n_latents": sae.n_latents,
               "expert_width": sae.m, "k": sae.k, "l1": sae.config.get("l1_coef"), "L0": ev["l0"],
               "mse": ev["mse"], "fvu": ev["fvu"], "dead": ev["dead_fraction"], "flops_per_token": fpt,
               "params": sum(p.numel() for p in sae.parameters()), "train_tokens": tokens_seen,
               "train_flops": scaling.training_flops(fpt, tokens_seen), "seconds": run.seconds,
               "loss_recovered": math.nan, **run.tags}
        if model is not None:
            row["loss_recovered"] = metrics.loss_recovered(model, tokens, site, sae, batch_size=lr_batch_size,
                                                           device=device)["loss_recovered"]
        rows.append(row)
        sae.cpu()
    extra = [k for row in rows for k in row if k not in EVAL_COLUMNS]
    return pd.DataFrame(rows, columns=EVAL_COLUMNS + list(dict.fromkeys(extra)))


# ---------------------------------------------------------------------------
# small pieces of the chapter's comparisons
# ---------------------------------------------------------------------------
def expert_counts(width: int, wanted, min_expert_width: int = 32) -> list[int]:
    """Expert counts for width-matched Switch SAEs of total ``width``: ``wanted`` (the
    paper's 16, 32, 64, 128) when every expert keeps at least ``min_expert_width``
    latents, else the same number of the largest powers of two that do (e.g. width
    1024, wanted [16, 32, 64] -> [8, 16, 32])."""
    check_positive_int("width", width)
    check_positive_int("min_expert_width", min_expert_width)
    wanted = sorted(int(e) for e in wanted)
    if not wanted:
        raise ValueError("wanted must name at least one expert count")
    if all(width % e == 0 and width // e >= min_expert_width for e in wanted):
        return wanted
    ok = [2 ** i for i in range(1, 31) if width % 2 ** i == 0 and width // 2 ** i >= min_expert_width]
    if not ok:
        raise ValueError(f"width={width} cannot hold 2 experts of >= min_expert_width={min_expert_width} latents")
    return ok[-len(wanted):]


def match_frontier(points: pd.DataFrame, frontier: pd.DataFrame, x: str = "L0", y: str = "mse") -> np.ndarray:
    """``y`` of ``frontier`` interpolated (linearly in ``log x``, ``log y``) at each
    ``points[x]``: the value a frontier architecture would have at the same L0. NaN
    where ``points[x]`` lies outside the frontier's range (no extrapolation). Use
    ``points[y] / match_frontier(...)`` (< 1: ``points`` are better on MSE)."""
    f = frontier[[x, y]].dropna().sort_values(x)
    fx, fy = f[x].to_numpy(float), f[y].to_numpy(float)
    px = points[x].to_numpy(float)
    if fx.size < 2:
        return np.full(px.size, np.nan)
    logy = np.log(fy) if np.all(fy > 0) else fy
    out = np.interp(np.log(px), np.log(fx), logy, left=np.nan, right=np.nan)
    return np.exp(out) if np.all(fy > 0) else out


def compare_to_dense(points: pd.DataFrame, frame: pd.DataFrame, ys=("mse", "loss_recovered")) -> pd.DataFrame:
    """``points`` (rows of :func:`evaluate_runs`, e.g. Switch SAEs) against the dense
    SAEs in ``frame``: for each ``y`` in ``ys``, ``{y}_vs_topk`` compares with the TopK
    SAE of the same ``k`` and ``{y}_vs_relu`` / ``{y}_vs_gated`` with the L1 frontier
    interpolated at the same L0 (:func:`match_frontier`; NaN outside its range). MSE
    columns are ratios (< 1: ``points`` reconstruct better), loss-recovered columns
    differences (> 0: ``points`` recover more)."""
    out = points.copy()
    topk = frame[frame["kind"] == "topk"].drop_duplicates("k").set_index("k")
    for y in ys:
        ratio = y == "mse"
        ref = topk[y].reindex(out["k"]).to_numpy(float)
        out[f"{y}_vs_topk"] = out[y].to_numpy(float) / ref if ratio else out[y].to_numpy(float) - ref
        for kind in ("relu", "gated"):
            base = frame[frame["kind"] == kind]
            ref = match_frontier(out, base, y=y) if len(base) else np.full(len(out), np.nan)
            out[f"{y}_vs_{kind}"] = out[y].to_numpy(float) / ref if ratio else out[y].to_numpy(float) - ref
    return out


def knn_purity(points, labels, k: int = 10) -> float:
    """Mean over points of the share of their ``k`` nearest neighbours (Euclidean, self
    excluded) that carry the same label: 1 = labels form separate clusters, ``~1/L``
    (for ``L`` equally common labels) = no clustering. Used on t-SNE maps ([switch]
    fig. 5: do encoder features cluster by expert?)."""
    from sklearn.neighbors import NearestNeighbors

    P, lab = np.asarray(points, dtype=float), np.asarray(labels)
    check_positive_int("k", k)
    if len(P) <= k:
        raise ValueError(f"k={k} needs more than k points, got {len(P)}")
    idx = NearestNeighbors(n_neighbors=k + 1).fit(P).kneighbors(P, return_distance=False)[:, 1:]
    return float((lab[idx] == lab[:, None]).mean())


def partner_rank(points, i, j, n: int = 5) -> np.ndarray:
    """For pairs ``(i[t], j[t])``: is ``j`` among the ``n`` nearest neighbours of ``i`` in
    ``points`` (bool array)? On a t-SNE map this asks whether duplicated features sit
    in one tight group ([switch] sec. 4.3.2)."""
    from sklearn.neighbors import NearestNeighbors

    P = np.asarray(points, dtype=float)
    i, j = np.asarray(i, dtype=int), np.asarray(j, dtype=int)
    if i.size == 0:
        return np.zeros(0, bool)
    idx = NearestNeighbors(n_neighbors=min(n + 1, len(P))).fit(P).kneighbors(P[i], return_distance=False)[:, 1:]
    return (idx == j[:, None]).any(1)
