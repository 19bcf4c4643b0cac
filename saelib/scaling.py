"""Power-law fits for scaling-law plots ([switch] fig. 1: reconstruction MSE
against training FLOPs and against parameters, log-log; [laws] power-law fits).

Two models:

* pure power law ``y = a * x**b`` (``offset=False``): fitted by ordinary least
  squares on ``log y = log a + b log x`` (closed form, no starting point, the
  usual way scaling exponents are read off a log-log plot; it weights every point
  by its *relative* error);
* power law with an irreducible term ``y = a * x**b + c`` (``offset=True``, the
  form of Kaplan et al. 2020 / Hoffmann et al. 2022): fitted with
  ``scipy.optimize.least_squares`` (``method="trf"``, the solver ``curve_fit``
  uses with bounds; analytic Jacobian) on the *log* residuals
  ``log y - log(a x**b + c)`` with ``0 <= c < min(y)``, started from the pure
  fit of ``y - min(y)/2``.

Uncertainty: a nonparametric bootstrap over points (resample the ``n`` points
with replacement ``n_boot`` times, refit, percentile interval). Resamples with
too few distinct ``x`` to identify the model (2 for the pure law, 3 with the
offset) or where the optimiser fails (or needs more than 100 evaluations) are skipped; ``n_boot_ok`` says how many
were used. With the 4-6 points of a typical scaling plot the bootstrap is coarse
(it can only recombine the points you have); the pure fit also reports the OLS
standard error ``b_se`` of the exponent.
"""
from __future__ import annotations

import math
import warnings

import numpy as np

__all__ = ["fit_power_law", "predict", "compute_at_equal_loss", "training_flops", "fit_groups"]


def training_flops(flops_per_token, n_tokens, backward_factor: float = 3.0):
    """Training compute = ``backward_factor * flops_per_token * n_tokens``.

    Convention: one training step costs the forward pass ``F`` plus a backward pass
    of about ``2F`` (the gradient with respect to the inputs of every matrix product
    and the one with respect to its weights, each as costly as the forward product),
    so training ~ ``3 F`` per token (Kaplan et al. 2020, ``C ~ 6 N`` per token = 3 x
    the ``2 N`` forward FLOPs). ``flops_per_token`` is the *forward* cost, e.g.
    ``sae.flops_per_token()`` (2 FLOPs per multiply-add). For TopK SAEs with sparse
    backward kernels the true backward is cheaper than ``2F``; the convention keeps
    architectures comparable, as [switch] fig. 1 does. Works on scalars and arrays."""
    fpt, n = np.asarray(flops_per_token, dtype=float), np.asarray(n_tokens, dtype=float)
    if np.any(~np.isfinite(fpt)) or np.any(fpt <= 0):
        raise ValueError(f"flops_per_token must be positive and finite, got {flops_per_token!r}")
    if np.any(~np.isfinite(n)) or np.any(n <= 0):
        raise ValueError(f"n_tokens must be positive and finite, got {n_tokens!r}")
    if not (isinstance(backward_factor, (int, float)) and not isinstance(backward_factor, bool)
            and math.isfinite(backward_factor) and backward_factor >= 1):
        raise ValueError(f"backward_factor must be a finite number >= 1 (forward only = 1), got {backward_factor!r}")
    out = backward_factor * fpt * n
    return float(out) if out.ndim == 0 else out


# ---------------------------------------------------------------------------
# fitting
# ---------------------------------------------------------------------------
def _check_xy(x, y, offset):
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, got {x.size} and {y.size}")
    need = 4 if offset else 3
    if x.size < need:
        raise ValueError(f"need at least {need} points to fit a power law{' with offset' if offset else ''}, "
                         f"got {x.size}")
    for name, v in (("x", x), ("y", y)):
        if not np.all(np.isfinite(v)) or np.any(v <= 0):
            raise ValueError(f"{name} must be positive and finite for a log-log fit; got min {np.nanmin(v)!r}")
    if np.unique(x).size < (3 if offset else 2):
        raise ValueError(f"x needs at least {3 if offset else 2} distinct values, got {np.unique(x).size}")
    return x, y


def _fit_pure(lx, ly):
    """OLS of ``ly = log a + b lx``: ``(log a, b, b_se)``."""
    A = np.stack([np.ones_like(lx), lx], 1)
    (la, b), *_ = np.linalg.lstsq(A, ly, rcond=None)
    n = lx.size
    resid = ly - (la + b * lx)
    sxx = ((lx - lx.mean()) ** 2).sum()
    b_se = math.sqrt((resid ** 2).sum() / (n - 2) / sxx) if n > 2 and sxx > 0 else float("nan")
    return float(la), float(b), b_se


def _log_model(lx, la, b, c):
    return np.log(np.exp(la + b * lx) + c)


def _fit_offset(lx, ly, max_nfev=2000):
    """Least squares (``scipy.optimize.least_squares``, the solver behind ``curve_fit``'s
    ``method="trf"``, with an analytic Jacobian) of ``ly = log(exp(log a + b lx) + c)``,
    ``0 <= c < min(y)``, in centred ``u = lx - mean(lx)`` for conditioning:
    ``(log a, b, c)``."""
    from scipy.optimize import least_squares

    m = lx.mean()
    u, y = lx - m, np.exp(ly)
    ymin = float(y.min())
    c0 = 0.5 * ymin
    la0, b0, _ = _fit_pure(u, np.log(y - c0))

    def resid(p):
        return np.log(np.exp(p[0] + p[1] * u) + p[2]) - ly

    def jac(p):
        E = np.exp(p[0] + p[1] * u)
        den = E + p[2]
        return np.stack([E / den, u * E / den, 1.0 / den], 1)

    sol = least_squares(resid, [la0, b0, c0], jac=jac, method="trf", x_scale="jac",
                        bounds=([-np.inf, -np.inf, 0.0], [np.inf, np.inf, ymin * (1 - 1e-9)]), max_nfev=max_nfev)
    al, b, c = sol.x
    if not (sol.success and np.all(np.isfinite(sol.x))):
        raise RuntimeError(f"offset fit did not converge: {sol.message}")
    return float(al - b * m), float(b), float(c)


def _r2(ly, pred):
    ss_tot = ((ly - ly.mean()) ** 2).sum()
    return float(1 - ((ly - pred) ** 2).sum() / ss_tot) if ss_tot > 0 else 1.0


def fit_power_law(x, y, offset: bool = False, n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> dict:
    """Fit ``y = a * x**b`` (``offset=False``) or ``y = a * x**b + c`` (``offset=True``).

    Returns a dict: ``a``, ``b`` (the exponent; negative when the loss falls with
    compute), ``c`` (offset only), ``a_ci``, ``b_ci`` (and ``c_ci``): ``(lo, hi)``
    percentile bootstrap intervals at level ``ci`` over ``n_boot`` resamples of the
    points (``(nan, nan)`` when ``n_boot=0`` or fewer than 10 resamples were usable),
    ``b_se`` (OLS standard error, pure law only), ``r2`` (coefficient of
    determination in log space, where the fit is made), ``n`` points, ``n_boot_ok``,
    ``offset``, ``x_min``, ``x_max`` (the fitted range, to flag extrapolation).
    Fitting method: see the module docstring. Raises ValueError for fewer than 3
    points (4 with ``offset``), non-positive or non-finite values, or a bad ``ci``."""
    x, y = _check_xy(x, y, offset)
    if not (isinstance(ci, float) and 0 < ci < 1):
        raise ValueError(f"ci must be a float in (0, 1), got {ci!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise ValueError(f"n_boot must be an integer >= 0, got {n_boot!r}")
    lx, ly = np.log(x), np.log(y)
    if offset:
        la, b, c = _fit_offset(lx, ly)
        pred, b_se = _log_model(lx, la, b, c), float("nan")
    else:
        la, b, b_se = _fit_pure(lx, ly)
        c, pred = None, la + b * lx
    res = {"a": math.exp(la), "b": b}
    if offset:
        res["c"] = c
    res.update(r2=_r2(ly, pred), n=int(x.size), offset=bool(offset), b_se=b_se,
               x_min=float(x.min()), x_max=float(x.max()))

    rng = np.random.default_rng(seed)
    boots, need = [], 3 if offset else 2
    for t in range(n_boot):
        if t == 100 and len(boots) < 10:   # ill-conditioned (e.g. c dwarfs the power-law term): give up early
            break
        i = rng.integers(0, x.size, x.size)
        if np.unique(x[i]).size < need:   # degenerate: the model is not identified
            continue
        try:
            boots.append(_fit_offset(lx[i], ly[i], max_nfev=100) if offset else _fit_pure(lx[i], ly[i])[:2])
        except (RuntimeError, ValueError, np.linalg.LinAlgError):
            continue
    res["n_boot_ok"] = len(boots)
    q = [(1 - ci) / 2 * 100, (1 + ci) / 2 * 100]
    nan2 = (float("nan"), float("nan"))
    if len(boots) >= 10:
        B = np.asarray(boots)
        res["a_ci"] = tuple(float(v) for v in np.exp(np.percentile(B[:, 0], q)))
        res["b_ci"] = tuple(float(v) for v in np.percentile(B[:, 1], q))
        if offset:
            res["c_ci"] = tuple(float(v) for v in np.percentile(B[:, 2], q))
    else:
        if n_boot:
            warnings.warn(f"only {len(boots)} of {n_boot} bootstrap resamples were usable; no interval", stacklevel=2)
        res["a_ci"], res["b_ci"] = nan2, nan2
        if offset:
            res["c_ci"] = nan2
    return res


def predict(fit: dict, x):
    """``a * x**b (+ c)`` for a fit from :func:`fit_power_law` (scalar or array)."""
    x = np.asarray(x, dtype=float)
    y = fit["a"] * np.power(x, fit["b"]) + (fit.get("c") or 0.0)
    return float(y) if y.ndim == 0 else y


def _x_at(fit, y):
    c = fit.get("c") or 0.0
    if fit["b"] == 0:
        raise ValueError("a fit with exponent b=0 is flat: no x reaches a given loss")
    y = np.asarray(y, dtype=float)
    if np.any(y <= c):
        raise ValueError(f"loss y={y!r} is at or below the fit's irreducible term c={c:.4g}: never reached")
    return ((y - c) / fit["a"]) ** (1.0 / fit["b"])


def compute_at_equal_loss(fit_a: dict, fit_b: dict, y) -> dict:
    """The ``x`` (e.g. training FLOPs) each fit needs to reach loss ``y``, inverting
    ``y = a x**b + c``: ``x = ((y - c) / a)**(1 / b)``.

    Returns ``{"x_a", "x_b", "ratio": x_a / x_b, "extrapolated_a", "extrapolated_b"}``
    (``ratio > 1``: fit ``a`` needs more, e.g. "Switch reaches a given MSE with 10x
    less compute" is ``ratio ~ 10`` with ``fit_a`` = TopK, ``fit_b`` = Switch). The
    ``extrapolated_*`` flags say whether ``x`` lies outside the fitted ``[x_min,
    x_max]``. ``y`` may be a scalar or an array. ValueError when ``y`` is not reachable
    (``y <= c`` or a flat fit)."""
    xa, xb = _x_at(fit_a, y), _x_at(fit_b, y)

    def outside(fit, x):
        lo, hi = fit.get("x_min", -np.inf), fit.get("x_max", np.inf)
        return (x < lo * (1 - 1e-9)) | (x > hi * (1 + 1e-9))

    out = {"x_a": xa, "x_b": xb, "ratio": xa / xb, "extrapolated_a": outside(fit_a, xa),
           "extrapolated_b": outside(fit_b, xb)}
    if np.ndim(xa) == 0:
        out = {k: (bool(v) if k.startswith("extra") else float(v)) for k, v in out.items()}
    return out


def fit_groups(df, x: str, y: str, by: str | list[str], **kw):
    """One :func:`fit_power_law` per group of a DataFrame: a tidy DataFrame with the
    group keys, ``a``, ``b``, ``b_lo``, ``b_hi`` (``c``, ``c_lo``, ``c_hi`` with
    ``offset=True``), ``r2``, ``n``. Groups with too few points are skipped with a
    warning (named)."""
    import pandas as pd

    for col in ([x, y] + ([by] if isinstance(by, str) else list(by))):
        if col not in df.columns:
            raise ValueError(f"column {col!r} is not in the DataFrame; columns: {list(df.columns)}")
    rows = []
    for key, g in df.groupby(by, sort=True):
        try:
            f = fit_power_law(g[x].to_numpy(), g[y].to_numpy(), **kw)
        except ValueError as e:
            warnings.warn(f"group {key!r} skipped: {e}", stacklevel=2)
            continue
        keys = dict(zip([by] if isinstance(by, str) else by, key if isinstance(key, tuple) else (key,)))
        row = {**keys, "a": f["a"], "b": f["b"], "b_lo": f["b_ci"][0], "b_hi": f["b_ci"][1]}
        if f["offset"]:
            row.update(c=f["c"], c_lo=f["c_ci"][0], c_hi=f["c_ci"][1])
        rows.append({**row, "r2": f["r2"], "n": f["n"]})
    return pd.DataFrame(rows)
