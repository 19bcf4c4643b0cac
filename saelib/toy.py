"""Toy models of superposition (Elhage et al. 2022, "Toy Models of Superposition").

``n`` sparse features ``x`` live in ``m < n`` hidden dimensions: ``h = W x`` with
``W`` [m, n], and the model reconstructs ``x' = ReLU(W^T W x + b)``. Each feature is
zero with probability ``S`` (the sparsity) and uniform on [0, 1] otherwise, so
``p = 1 - S`` is the feature probability. The loss is the importance-weighted MSE
``L = E_x sum_i I_i (x_i - x'_i)^2`` (paper sec. 2, "the ReLU output model").

Many models train at once, batched over a leading *instances* dimension (the
Anthropic notebook / ARENA layout, ``W`` [I, m, n]), so a sweep over sparsities
is one training run. Measures (sec. 3-4 of the paper):

* :func:`represented_features`: features with ``||W_i|| > threshold`` (the paper's
  plots show ``||W_i||`` near 1 for represented, near 0 for dropped features);
* :func:`feature_dimensionality`: ``D_i = ||W_i||^2 / sum_j (W_i_hat . W_j)^2``
  (sec. 4, "feature dimensionality"; 1 for a dedicated dimension, 1/2 for an
  antipodal pair, 0 for an unrepresented feature);
* :func:`dimensions_per_feature`: ``D* = m / ||W||_F^2`` (sec. 4);
* :func:`compressed_sensing_degree`: the degree of superposition
  ``n/m = -1 / (C (1-S) ln(1-S))`` that the compressed-sensing bound
  ``m = Omega(-n (1-S) log(1-S))`` (sec. 10 of the paper, used by the note
  ``scaling-laws-and-superposition.txt``) allows, with :func:`fit_cs_constant`
  for the constant ``C`` that ``Omega`` hides. The note writes
  ``n/m = 1/((1-S) log(1-S))``, which is negative for every ``0 < S < 1``; we
  implement the positive form.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .utils import check_positive_int

__all__ = ["forward", "sample_features", "train_toy", "represented_features", "feature_dimensionality",
           "dimensions_per_feature", "compressed_sensing_degree", "fit_cs_constant"]


def forward(W: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x' = ReLU(W^T W x + b)`` for a batch of instances.

    W: [I, m, n]; b: [I, n]; x: [I, batch, n] -> x': [I, batch, n]
    (Elhage et al. 2022, sec. 2, the ReLU output model)."""
    h = torch.bmm(x, W.transpose(1, 2))                          # [I, batch, m]
    return torch.relu(torch.baddbmm(b[:, None, :], h, W))


def sample_features(p: torch.Tensor, batch_size: int, n_features: int, generator: torch.Generator) -> torch.Tensor:
    """Synthetic inputs [I, batch, n]: each feature is U[0, 1] with probability
    ``p[i]`` (per instance) and 0 otherwise (Elhage et al. 2022, sec. 2)."""
    p = p.view(-1, 1, 1)
    u = torch.rand(len(p), batch_size, n_features, generator=generator)
    return torch.where(u < p, u / p, 0.0)       # given u < p, u / p is U[0, 1]: one draw per entry


def train_toy(n_features: int, n_hidden: int, feature_probability, importance=None, *, steps: int = 5000,
              batch_size: int = 1024, lr: float = 1e-3, seed: int = 0, n_instances: int | None = None):
    """Train toy models ``x' = ReLU(W^T W x + b)`` (Elhage et al. 2022) with Adam on
    the importance-weighted MSE ``mean_batch sum_i I_i (x_i - x'_i)^2``.

    ``feature_probability`` ``p = 1 - S``: a number in (0, 1] (one model) or a 1-D
    sequence [I] (I models trained at once, one per value; repeat a value for
    several seeds). ``importance``: None (all 1), a vector [n_features] shared by
    every instance, or a matrix [I, n_features]. ``n_instances``: with a scalar
    ``feature_probability``, train this many models (different initialisations).
    W is initialised Xavier-normal, b at 0, as in the paper's notebook; ``lr``
    constant.

    Returns ``(W, b)``: W [n_hidden, n_features] and b [n_features] for one model
    (scalar ``feature_probability`` and ``n_instances`` None), else W
    [I, n_hidden, n_features] and b [I, n_features]. Detached, float32, CPU.
    Deterministic for ``seed`` (and the thread count).

    Raises ValueError for non-positive sizes, probabilities outside (0, 1] or an
    importance of the wrong shape / with negative entries."""
    for name in ("n_features", "n_hidden", "steps", "batch_size"):
        check_positive_int(name, locals()[name])
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    p = torch.as_tensor(feature_probability, dtype=torch.float32)
    if p.ndim > 1 or p.numel() == 0:
        raise ValueError(f"feature_probability must be a number or a non-empty 1-D sequence, got shape {tuple(p.shape)}")
    if not bool(((p > 0) & (p <= 1)).all()):
        raise ValueError(f"feature_probability must lie in (0, 1] (1 - S, S the sparsity), got {p.tolist()}")
    single = p.ndim == 0 and n_instances is None
    if n_instances is not None:
        check_positive_int("n_instances", n_instances)
        if p.ndim == 1:
            raise ValueError("n_instances goes with a scalar feature_probability; pass a sequence instead to vary p")
    I = len(p) if p.ndim == 1 else (n_instances or 1)
    p = p.reshape(-1).expand(I).contiguous() if p.ndim == 0 else p
    imp = torch.ones(n_features) if importance is None else torch.as_tensor(importance, dtype=torch.float32)
    if imp.shape not in ((n_features,), (I, n_features)):
        raise ValueError(f"importance must have shape [n_features]=[{n_features}] or [I, n_features]=[{I}, {n_features}], "
                         f"got {tuple(imp.shape)}")
    if bool((imp < 0).any()):
        raise ValueError("importance must be >= 0")
    imp = imp.expand(I, n_features)[:, None, :]
    g = torch.Generator().manual_seed(seed)
    std = math.sqrt(2.0 / (n_hidden + n_features))        # xavier_normal_ on each [m, n] matrix
    W = (torch.randn(I, n_hidden, n_features, generator=g) * std).requires_grad_()
    b = torch.zeros(I, n_features, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=lr)
    for _ in range(steps):
        x = sample_features(p, batch_size, n_features, g)
        loss = (imp * (x - forward(W, b, x)) ** 2).mean(dim=(1, 2)).sum()   # instances train independently
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    W, b = W.detach(), b.detach()
    return (W[0], b[0]) if single else (W, b)


def _check_W(W) -> torch.Tensor:
    W = torch.as_tensor(W, dtype=torch.float32)
    if W.ndim < 2:
        raise ValueError(f"W must be [n_hidden, n_features] or [I, n_hidden, n_features], got shape {tuple(W.shape)}")
    return W


def represented_features(W, threshold: float = 0.5) -> torch.Tensor:
    """Which features the model represents: ``||W_i|| > threshold`` (the norm of
    feature i's column of W). W: [..., n_hidden, n_features] -> bool [..., n_features];
    ``.sum(-1)`` counts them. Raises ValueError for a negative threshold."""
    if not (isinstance(threshold, (int, float)) and threshold >= 0):
        raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
    return _check_W(W).norm(dim=-2) > threshold


def feature_dimensionality(W, eps: float = 1e-12) -> torch.Tensor:
    """Elhage et al.'s per-feature dimensionality (sec. 4)

        D_i = ||W_i||^2 / sum_j (W_i_hat . W_j)^2

    (W_i the column of feature i, W_i_hat = W_i / ||W_i||; the sum includes j = i).
    W: [..., n_hidden, n_features] -> D [..., n_features]. 1 for a feature with a
    dimension of its own, 1/2 for each member of an antipodal pair, 0 for a feature
    with W_i = 0 (norm below ``sqrt(eps)``)."""
    W = _check_W(W)
    norm = W.norm(dim=-2, keepdim=True)                               # [..., 1, n]
    unit = W / norm.clamp_min(math.sqrt(eps))
    overlap = (unit.transpose(-1, -2) @ W) ** 2                      # [..., n_i, n_j]: (W_i_hat . W_j)^2
    D = norm.squeeze(-2) ** 2 / overlap.sum(-1).clamp_min(eps)
    return torch.where(norm.squeeze(-2) > math.sqrt(eps), D, torch.zeros_like(D))


def dimensions_per_feature(W) -> torch.Tensor:
    """``D* = m / ||W||_F^2`` (Elhage et al. sec. 4): hidden dimensions per
    (norm-weighted) feature; ``1 / D*`` is features per dimension.
    W: [..., m, n] -> [...]."""
    W = _check_W(W)
    return W.shape[-2] / (W ** 2).sum(dim=(-2, -1))


def _check_S(S) -> np.ndarray:
    S = np.asarray(S, dtype=float)
    if not np.all((S > 0) & (S < 1)):
        raise ValueError(f"S (sparsity) must lie strictly between 0 and 1, got {S.tolist()}")
    return S


def compressed_sensing_degree(S, C: float = 1.0):
    """The degree of superposition the compressed-sensing bound allows,

        n/m = -1 / (C (1-S) ln(1-S))

    from ``m = Omega(-n (1-S) log(1-S))`` (Elhage et al. 2022 sec. 10, quoted by
    the note): features per hidden dimension at sparsity S (``1-S`` = feature
    probability), with ``C`` the constant that Omega hides (fit it with
    :func:`fit_cs_constant`). The note's ``1/((1-S) log(1-S))`` drops the minus sign.
    The curve has its minimum ``e/C`` at ``1-S = 1/e`` and diverges as
    ``S -> 0`` (dense features), where the asymptotic bound says nothing.
    Array in, array out; raises ValueError unless 0 < S < 1 and C > 0."""
    if not (isinstance(C, (int, float, np.floating)) and C > 0):
        raise ValueError(f"C must be a positive number, got {C!r}")
    S = _check_S(S)
    p = 1.0 - S
    return -1.0 / (C * p * np.log(p))


def fit_cs_constant(S, n_over_m) -> dict:
    """Least-squares fit, in log space, of ``n_over_m = compressed_sensing_degree(S, C)``:
    ``ln C = mean(ln(-1/(p ln p)) - ln n_over_m)``. Pass only points where the
    bound is meant to hold (sparse features, ``1-S < 1/e``, and not capped by the
    number of features the model has). Returns ``{"C", "log_rmse", "n"}``
    (``log_rmse``: RMS of the natural-log residuals). Raises ValueError for no
    points, mismatched lengths or non-positive measurements."""
    S = _check_S(S).ravel()
    y = np.asarray(n_over_m, dtype=float).ravel()
    if len(S) != len(y) or len(S) == 0:
        raise ValueError(f"S and n_over_m must be non-empty and of equal length, got {len(S)} and {len(y)}")
    if not np.all(y > 0):
        raise ValueError("n_over_m must be > 0")
    base = compressed_sensing_degree(S, 1.0)
    logC = float(np.mean(np.log(base) - np.log(y)))
    resid = np.log(y) - (np.log(base) - logC)
    return {"C": math.exp(logC), "log_rmse": float(np.sqrt(np.mean(resid ** 2))), "n": int(len(S))}


@torch.no_grad()
def toy_loss(W, b, feature_probability, importance=None, *, n_samples: int = 65536, seed: int = 1) -> torch.Tensor:
    """The training objective ``mean_x sum_i I_i (x_i - x'_i)^2 / n`` of each model on
    ``n_samples`` fresh inputs (a fixed ``seed``, so models are compared on the same
    draws). W [m, n] or [I, m, n], b [n] or [I, n] as :func:`train_toy` returns them;
    ``feature_probability`` a number or [I]. Returns a scalar or [I] tensor. Use it to
    keep the best of several restarts (a model can stall in a local minimum with a
    feature dropped, e.g. 2 features in 1 dimension)."""
    W, b = _check_W(W), torch.as_tensor(b, dtype=torch.float32)
    single = W.ndim == 2
    W, b = (W[None], b[None]) if single else (W, b)
    I, n = W.shape[0], W.shape[-1]
    check_positive_int("n_samples", n_samples)
    p = torch.as_tensor(feature_probability, dtype=torch.float32).reshape(-1).expand(I)
    imp = torch.ones(n) if importance is None else torch.as_tensor(importance, dtype=torch.float32)
    imp = imp.expand(I, n)[:, None, :]
    g = torch.Generator().manual_seed(seed)
    total = torch.zeros(I)
    chunk = max(1, min(n_samples, 2**22 // max(1, I * n)))
    done = 0
    while done < n_samples:
        bs = min(chunk, n_samples - done)
        x = sample_features(p, bs, n, g)
        total += (imp * (x - forward(W, b, x)) ** 2).sum(dim=(1, 2))
        done += bs
    out = total / (n_samples * n)
    return out[0] if single else out


def sparsity_sweep(n_hidden: int, ratios, probabilities, *, restarts: int = 1, threshold: float = 0.5, seed: int = 0,
                   importance=None, **train_kw):
    """Toy models over feature probabilities ``p = 1 - S`` for several ``n / m``
    (``ratios``), ``restarts`` instances per ``p`` of which the lowest :func:`toy_loss`
    is kept. One :func:`train_toy` call per ratio (all p and restarts as instances).
    ``train_kw``: ``steps``, ``batch_size``, ``lr``. Returns a DataFrame with one row
    per (ratio, p): ``ratio, n_features, n_hidden, p, S, loss, n_represented,
    represented_per_dim`` (= n_represented / m), ``inv_mean_D`` (1 / mean D_i over the
    represented features) and ``features_per_dim`` (``1 / D* = ||W||_F^2 / m``)."""
    import pandas as pd

    check_positive_int("n_hidden", n_hidden)
    check_positive_int("restarts", restarts)
    ps = np.asarray(probabilities, dtype=float).ravel()
    rows = []
    for r in ratios:
        check_positive_int("ratios[i]", r)
        n = int(r) * n_hidden
        p_all = torch.tensor(np.repeat(ps, restarts), dtype=torch.float32)
        W, b = train_toy(n, n_hidden, p_all, importance, seed=seed, **train_kw)
        loss = toy_loss(W, b, p_all, importance).view(len(ps), restarts)
        best = loss.argmin(1) + torch.arange(len(ps)) * restarts
        Wb = W[best]
        rep = represented_features(Wb, threshold)
        D = feature_dimensionality(Wb)
        for i, p in enumerate(ps):
            d_rep = D[i][rep[i]]
            rows.append({"ratio": int(r), "n_features": n, "n_hidden": n_hidden, "p": float(p), "S": 1 - float(p),
                         "loss": float(loss[i].min()), "n_represented": int(rep[i].sum()),
                         "represented_per_dim": float(rep[i].sum()) / n_hidden,
                         "inv_mean_D": float(1 / d_rep.mean()) if len(d_rep) else float("nan"),
                         "features_per_dim": float(1 / dimensions_per_feature(Wb[i]))})
    return pd.DataFrame(rows)
