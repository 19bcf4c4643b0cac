"""Chapter 04 helpers: models of equal parameter count and different aspect ratio,
features per layer at a matched reconstruction target, feature matching across
models, and cross-layer dictionaries.

The note ``scaling-laws-and-superposition.txt`` (Katta 2024) compares two GPT-2
models of equal non-embedding parameter count ``N = 12 d_model^2 n_layer``: model
B has twice model A's ``d_model`` and a quarter of its layers. This module builds
such families (:func:`shapes_at_fixed_params`), counts parameters as Kaplan et al.
(2020) do (:func:`non_embedding_params`), and gives the measurements the chapter's
experiments need:

* :func:`features_at_fvu`: the number of alive SAE latents at which a layer's
  dictionary reaches a target fraction of variance unexplained (FVU), read off a
  sweep over dictionary widths (log-log interpolation);
* :func:`firing_frequency` / :func:`latent_activations`: how often each latent
  fires, and the dense latent activations on given rows;
* :func:`max_correlation` / :func:`match_summary`: features matched across two
  models by the Pearson correlation of their activations on the same tokens
  (max over the other model's features, in both directions);
* :func:`depth_pairs`: layers at the same relative depth ``(i + 1) / n_layer``;
* :func:`concat_layers` / :func:`pooled_fvu`: inputs and the matched error measure
  for one SAE on two adjacent layers against two per-layer SAEs;
* :func:`cylinder`: the note's analogy (volume = parameters, surface = neurons).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import metrics
from .utils import check_positive_int

__all__ = ["shapes_at_fixed_params", "non_embedding_params", "depth_pairs", "features_at_fvu", "common_target", "firing_frequency",
           "latent_activations", "max_correlation", "match_summary", "concat_layers", "pooled_fvu", "cylinder",
           "wilson_interval"]


# ----------------------------------------------------------------------------- shapes
def _n_head(d: int, head_dim: int) -> int:
    divisors = [h for h in range(1, d + 1) if d % h == 0]
    return min(divisors, key=lambda h: (abs(d / h - head_dim), -h))


def shapes_at_fixed_params(n_embd: int, n_layer: int, n_layers, head_dim: int = 16) -> list[dict]:
    """GPT-2 shapes with the non-embedding parameter count ``12 d^2 L`` of the
    reference ``(n_embd, n_layer)`` (Kaplan et al. 2020, eq. 2.1 with d_ff = 4 d):
    for each ``L`` in ``n_layers``, ``d = round(n_embd * sqrt(n_layer / L))`` and the
    head count whose head width is closest to ``head_dim`` (a divisor of d).
    Returns dicts ``n_layer, n_embd, n_head, aspect (= d / L), params (= 12 d^2 L),
    neurons (= d L)``, in the order of ``n_layers``. The note's pair: A = the
    reference, B = ``L / 4`` layers (``d`` doubles, aspect ratio x8).
    Raises ValueError for non-positive sizes."""
    check_positive_int("n_embd", n_embd)
    check_positive_int("n_layer", n_layer)
    check_positive_int("head_dim", head_dim)
    out = []
    for L in n_layers:
        check_positive_int("n_layers[i]", L)
        d = int(round(n_embd * math.sqrt(n_layer / L)))
        out.append({"n_layer": int(L), "n_embd": d, "n_head": _n_head(d, head_dim), "aspect": d / L,
                    "params": 12 * d * d * L, "neurons": d * L})
    return out


def non_embedding_params(model) -> int:
    """Parameters of a causal LM without its token and position embeddings (Kaplan et
    al.'s N; a tied unembedding counts with the embedding). Works for HF models with
    ``get_input_embeddings`` (GPT-2's ``wpe`` is also removed)."""
    skip = {id(p) for p in model.get_input_embeddings().parameters()}
    wpe = getattr(getattr(model, "transformer", None), "wpe", None)
    if wpe is not None:
        skip |= {id(p) for p in wpe.parameters()}
    out = getattr(model, "get_output_embeddings", lambda: None)()
    if out is not None:
        skip |= {id(p) for p in out.parameters()}
    return int(sum(p.numel() for p in model.parameters() if id(p) not in skip))


def depth_pairs(n_layer_a: int, n_layer_b: int) -> list[tuple[int, int]]:
    """Pairs ``(i_a, i_b)`` of layers at the same relative depth ``(i + 1) / n_layer``
    (block outputs). E.g. 8 and 2 layers -> [(3, 0), (7, 1)]. Raises ValueError
    unless both counts are positive integers."""
    check_positive_int("n_layer_a", n_layer_a)
    check_positive_int("n_layer_b", n_layer_b)
    pairs = []
    for ib in range(n_layer_b):
        num = (ib + 1) * n_layer_a
        if num % n_layer_b == 0:
            pairs.append((num // n_layer_b - 1, ib))
    return pairs


# ----------------------------------------------------------------------------- features at a target
def features_at_fvu(n_features, fvu, target: float) -> dict:
    """The dictionary size at which FVU reaches ``target``, from a sweep (one point per
    width: ``n_features`` = alive latents, ``fvu`` = held-out FVU): the first swept size
    whose FVU is at or below the target, with linear interpolation of ``log fvu``
    against ``log n_features`` from the size before it. No extrapolation: when the
    smallest size already reaches the target, ``F`` is that size and an upper bound;
    when no size reaches it, ``F`` is the largest size and a lower bound. Returns
    ``{"F": float, "status": "interpolated" | "upper bound" | "lower bound"}``.
    Raises ValueError for fewer than two points, non-positive values or a target
    outside (0, 1)."""
    x = np.asarray(n_features, dtype=float).ravel()
    y = np.asarray(fvu, dtype=float).ravel()
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"n_features and fvu need the same length >= 2, got {len(x)} and {len(y)}")
    if not (np.all(x > 0) and np.all(y > 0)):
        raise ValueError("n_features and fvu must be > 0")
    if not (0 < target < 1):
        raise ValueError(f"target must be an FVU in (0, 1), got {target!r}")
    o = np.argsort(x, kind="stable")
    x, y = x[o], y[o]
    hit = np.flatnonzero(y <= target)
    if len(hit) == 0:
        return {"F": float(x[-1]), "status": "lower bound"}
    i = int(hit[0])
    if i == 0:
        return {"F": float(x[0]), "status": "upper bound"}
    lx0, lx1, ly0, ly1 = np.log([x[i - 1], x[i], y[i - 1], y[i]])
    F = math.exp(lx0 + (math.log(target) - ly0) * (lx1 - lx0) / (ly1 - ly0))
    return {"F": float(F), "status": "interpolated"}


def common_target(frame, by=("model", "layer")) -> float:
    """A target FVU that every group (layer) of a width sweep crosses if possible: with
    ``lo = max over groups of their smallest FVU`` and ``hi = min over groups of their
    largest FVU``, the geometric mean of ``lo`` and ``hi`` when ``lo < hi`` (every
    group's FVU passes through it inside its swept widths), else ``lo`` (every group
    reaches it; some already at their smallest width)."""
    g = frame.groupby(list(by)).fvu
    lo, hi = float(g.min().max()), float(g.max().min())
    return math.sqrt(lo * hi) if lo < hi else lo


# ----------------------------------------------------------------------------- activations of latents
def firing_frequency(sae, x, batch_size: int = 4096, device="auto") -> torch.Tensor:
    """Fraction of the rows of ``x`` (tensor [n, d] or an activation store) on which each
    latent is active (nonzero after the sparsifying activation): [n_latents], float64."""
    ev = metrics.evaluate_sae(sae, x, batch_size=batch_size, device=device, return_counts=True)
    return ev["counts"].double() / ev["n_rows"]


def latent_activations(sae, x, batch_size: int = 4096, device="auto") -> torch.Tensor:
    """Dense latent activations [n, n_latents] (float32, CPU) of the rows of ``x``."""
    v, j = metrics.sparse_codes(sae, x, batch_size=batch_size, device=device)
    out = torch.zeros(len(v), sae.n_latents)
    return out.scatter_add_(1, j, v)


def max_correlation(a: torch.Tensor, b: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """For each column (feature) of ``a`` [T, F_a], the largest Pearson correlation with
    a column of ``b`` [T, F_b] over the same T rows (tokens), and its index.
    Constant columns of ``a`` get NaN; constant columns of ``b`` never win. Returns
    ``(corr [F_a] float64, index [F_a] long)``. Raises ValueError when the row
    counts differ or fewer than 2 rows are given."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.ndim != 2 or b.ndim != 2 or len(a) != len(b) or len(a) < 2:
        raise ValueError(f"a and b must be [T, F] with the same T >= 2, got {tuple(a.shape)} and {tuple(b.shape)}")

    def z(m):
        m = m.double()
        m = m - m.mean(0)
        s = m.norm(dim=0)
        return m / s.clamp_min(1e-12), s > 1e-12

    za, oka = z(a)
    zb, okb = z(b)
    best, idx = torch.full((a.shape[1],), -math.inf, dtype=torch.float64), torch.zeros(a.shape[1], dtype=torch.long)
    for s in range(0, b.shape[1], chunk):
        c = za.T @ zb[:, s:s + chunk]                      # [F_a, chunk]
        c[:, ~okb[s:s + chunk]] = -math.inf
        v, i = c.max(1)
        better = v > best
        best[better], idx[better] = v[better], i[better] + s
    best[~oka] = math.nan
    best[torch.isinf(best)] = math.nan
    return best, idx


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (``(nan, nan)`` for n = 0)."""
    from scipy.stats import norm

    if n == 0:
        return math.nan, math.nan
    zz = float(norm.ppf(0.5 + level / 2))
    p = k / n
    den = 1 + zz ** 2 / n
    c = (p + zz ** 2 / (2 * n)) / den
    h = zz * math.sqrt(p * (1 - p) / n + zz ** 2 / (4 * n * n)) / den
    return c - h, c + h


def match_summary(acts_a: torch.Tensor, acts_b: torch.Tensor, threshold: float = 0.7) -> dict:
    """Match the features of two dictionaries on the same tokens (``acts_a`` [T, F_a],
    ``acts_b`` [T, F_b], e.g. :func:`latent_activations` of two SAEs on aligned rows).
    Features that never vary on these rows are left out. Returns, for each direction,
    the max correlations (``corr_a``: each feature of a against all of b; ``corr_b``:
    b against a), the share with a partner above ``threshold`` and its Wilson 95%
    interval (``frac_a``, ``frac_a_ci``, ``frac_b``, ``frac_b_ci``), the median max
    correlation, and the partner index (``idx_a``: b's feature best matching each a)."""
    if not (0 < threshold < 1):
        raise ValueError(f"threshold must be a correlation in (0, 1), got {threshold!r}")
    ca, ia = max_correlation(acts_a, acts_b)
    cb, ib = max_correlation(acts_b, acts_a)
    out = {"corr_a": ca, "corr_b": cb, "idx_a": ia, "idx_b": ib, "threshold": threshold}
    for name, c in (("a", ca), ("b", cb)):
        c = c[~torch.isnan(c)]
        k, n = int((c > threshold).sum()), len(c)
        out[f"frac_{name}"] = k / n if n else math.nan
        out[f"frac_{name}_ci"] = wilson_interval(k, n)
        out[f"median_{name}"] = float(c.median()) if n else math.nan
        out[f"n_{name}"] = n
    return out


# ----------------------------------------------------------------------------- cross-layer
def concat_layers(xs, scales=None) -> tuple[torch.Tensor, list[float]]:
    """Concatenate the activations of several layers on the same rows (tensors [n, d_l])
    after scaling each to ``E||x||^2 = d_l`` (residual norms grow with depth; without
    this the last layer dominates a joint reconstruction). ``scales``: the divisors to
    use (e.g. those computed on the training rows, applied to held-out rows); None:
    computed here. Returns ``(x [n, sum d_l], scales)``."""
    xs = [torch.as_tensor(x, dtype=torch.float32) for x in xs]
    if len({len(x) for x in xs}) != 1 or any(x.ndim != 2 for x in xs):
        raise ValueError("xs must be 2-D tensors with the same number of rows")
    if scales is None:
        scales = [float(torch.sqrt((x.double() ** 2).sum(1).mean() / x.shape[1])) for x in xs]
    if len(scales) != len(xs):
        raise ValueError(f"scales needs one value per layer ({len(xs)}), got {len(scales)}")
    return torch.cat([x / s for x, s in zip(xs, scales)], dim=1), list(scales)


def pooled_fvu(fvus, total_vars) -> float:
    """FVU of several reconstructions pooled into one: ``sum_l FVU_l V_l / sum_l V_l``
    with ``V_l`` the total variance of layer l's (scaled) activations, i.e. the FVU of
    the concatenation when each layer has its own SAE."""
    f, v = np.asarray(fvus, dtype=float), np.asarray(total_vars, dtype=float)
    if f.shape != v.shape or f.size == 0 or np.any(v < 0):
        raise ValueError("fvus and total_vars must be non-empty, of equal length, total_vars >= 0")
    return float((f * v).sum() / v.sum())


def total_variance(x) -> float:
    """``sum_j Var(x_j)`` over the columns of a tensor [n, d]."""
    x = torch.as_tensor(x).double()
    return float(((x - x.mean(0)) ** 2).sum() / len(x))


# ----------------------------------------------------------------------------- the cylinder
def cylinder(n_params, aspect):
    """The note's analogy made exact for ``N = 12 d^2 L``: at fixed parameters N and
    aspect ratio ``a = d / L``, ``d = (a N / 12)^(1/3)``, ``L = d / a`` and the
    neurons are ``d L = (N / 12)^(2/3) a^(-1/3)``. Arrays broadcast; returns
    ``(d, L, neurons)``. Raises ValueError for non-positive inputs."""
    N, a = np.asarray(n_params, dtype=float), np.asarray(aspect, dtype=float)
    if not (np.all(N > 0) and np.all(a > 0)):
        raise ValueError("n_params and aspect must be > 0")
    d = np.cbrt(a * N / 12)
    return d, d / a, d * d / a


# ----------------------------------------------------------------------------- tables
def features_per_layer(frame, target: float, by=("model", "layer")):
    """Per group (default: model and layer) of a width sweep ``frame`` (a DataFrame with
    columns ``alive`` = latents active on held-out rows, ``fvu`` and ``n_latents``): the
    features at the target FVU (:func:`features_at_fvu` on ``alive``), its status, and
    the smallest swept ``n_latents`` whose FVU reaches the target (the largest if none
    does) as ``chosen_latents``. Returns a DataFrame with the group columns plus
    ``F, status, chosen_latents``."""
    import pandas as pd

    rows = []
    for key, g in frame.groupby(list(by), sort=False):
        g = g.sort_values("n_latents")
        r = features_at_fvu(g["alive"].clip(lower=1), g["fvu"], target)
        ok = g[g["fvu"] <= target]
        chosen = int(ok["n_latents"].iloc[0]) if len(ok) else int(g["n_latents"].iloc[-1])
        rows.append({**dict(zip(by, key if isinstance(key, tuple) else (key,))), "F": r["F"], "status": r["status"],
                     "chosen_latents": chosen})
    return pd.DataFrame(rows)


def bootstrap_ci(x, stat=np.median, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, tuple]:
    """``stat(x)`` and its percentile bootstrap interval over the entries of ``x``
    (NaN dropped). Fewer than two values -> ``(stat, (nan, nan))``."""
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan, (math.nan, math.nan)
    s = float(stat(x))
    if x.size < 2 or n_boot < 1:
        return s, (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    boots = np.array([stat(x[rng.integers(0, x.size, x.size)]) for _ in range(n_boot)])
    a = (1 - level) / 2
    return s, (float(np.quantile(boots, a)), float(np.quantile(boots, 1 - a)))


# ----------------------------------------------------------------------------- plumbing for the chapter
def lm_configs(cfg: dict, shapes, seeds, *, steps: int, batch_size: int, lr: float, warmup: int,
               eval_batches: int) -> list[dict]:
    """Full profile dicts for :func:`saelib.lm.train_many`: one per (shape, seed), all on
    the data of ``cfg`` (corpus, tokenizer and tokens fixed by ``cfg["data"]`` and
    ``cfg["seed"]``, so only the model and its seed differ), dense GPT-2, the same
    token budget ``steps x batch_size x n_ctx``; evaluated once, at the end."""
    out = []
    for sh in shapes:
        for s in seeds:
            m = {**cfg["lm"], "name": None, "n_layer": sh["n_layer"], "n_embd": sh["n_embd"], "n_head": sh["n_head"],
                 "steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup, "eval_every": steps,
                 "eval_batches": eval_batches}
            if "n_experts" in m:
                m["n_experts"] = 1
            out.append({**cfg, "seed": int(s), "data": {**cfg["data"], "seed": cfg["data"].get("seed", cfg["seed"])},
                        "lm": m})
    return out


def final_loss(history: dict, domain: str = "all") -> float:
    """The last held-out loss (nats/token) of an LM training history for ``domain``."""
    ev = [e for e in history["eval"] if e["domain"] == domain]
    if not ev:
        raise ValueError(f"history has no eval rows for domain={domain!r}")
    return float(ev[-1]["loss"])


def collect_layers(sm, layers, split: str, n_tokens: int, site: str = "resid_post", device="auto") -> dict:
    """``{layer: ActivationStore}`` of ``blocks.<layer>.<site>`` of a subject model on its
    ``tokenized[split]`` (:func:`saelib.activations.collect`, cached). Two models with the
    same tokens get row-aligned stores (the same token at the same row)."""
    from . import activations

    return {int(i): activations.collect(sm.model, sm.tokenized[split], f"blocks.{int(i)}.{site}", n_tokens,
                                        device=device) for i in layers}
