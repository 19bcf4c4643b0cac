"""Claim verdicts: small pure rule functions that every chapter's claims table calls.

A chapter states a paper's claim, measures it, and prints a verdict with the rule
that produced it. The rules live here, not in the notebooks, so that they are
unit-tested on hand cases and read the same in every chapter:

* :func:`compare` -- one number against another, in the direction the claim's
  wording gives: ``"a<b"`` / ``"a>b"`` (a strict improvement, which must clear a
  noise floor or separate 95% intervals), ``"a<=b"`` / ``"a>=b"`` (one-sided
  "no increase" / "without a significant reduction" claims: only a significant
  move the wrong way refutes them), ``"a==b"`` ("similar": within the noise floor
  or overlapping intervals).
* :func:`share` -- a claim checked on several comparisons: all hold ->
  reproduced, at least ``at_least`` -> partly, fewer -> not reproduced.
* :func:`threshold` -- one measured value against a stated bound.
* :func:`cap` -- weaker evidence (extrapolated fits, one seed) caps
  "reproduced" at "partly"; :func:`both` combines the parts of a compound claim;
  :func:`across_budgets` reports a verdict at two training budgets with the trend.
* :func:`claims_table` -- the DataFrame a chapter glues as ``claims_NN``.

Every function returns a :class:`Verdict`: ``str(v)`` is the verdict word and
``v.rule`` the text for the "why" column: the numbers, then ``rule: ...``, the
rule exactly as applied.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

VERDICTS = ("reproduced", "partly", "not reproduced", "not testable here")
_RANK = {"reproduced": 3, "partly": 2, "not reproduced": 1, "not testable here": 0}
CLAIMS = ("a<b", "a>b", "a<=b", "a>=b", "a==b")
OPS = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal}


@dataclass(frozen=True)
class Verdict:
    """A verdict word (one of :data:`VERDICTS`) and the rule text with its numbers."""
    verdict: str
    rule: str

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")

    def __str__(self) -> str:
        return self.verdict


def _finite(x) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _check_ci(name: str, ci):
    if ci is None:
        return None
    lo, hi = (float(v) for v in ci)
    if not (_finite(lo) and _finite(hi)) or lo > hi:
        raise ValueError(f"{name} must be a (low, high) pair of finite numbers with low <= high, got {ci!r}")
    return lo, hi


def _num(x, fmt: str, ci=None) -> str:
    s = format(float(x), fmt)
    return s if ci is None else f"{s} [{format(ci[0], fmt)}, {format(ci[1], fmt)}]"


def compare(a, b, claim: str, *, noise: float = 0.0, a_ci=None, b_ci=None, names=("A", "B"),
            fmt: str = ".3g") -> Verdict:
    """Test a claim about two measured numbers ``a`` and ``b`` (e.g. Switch's and
    TopK's MSE), in the direction the claim's wording gives.

    ``claim``: ``"a<b"`` / ``"a>b"``: a strict difference; reproduced when the
    difference in the claimed direction exceeds ``noise`` (>= 0, in the units of
    ``a``) and, when both 95% intervals ``a_ci``, ``b_ci`` are given, the intervals
    do not overlap; otherwise not reproduced. ``"a<=b"`` / ``"a>=b"``: one-sided
    "not higher" / "not lower" (a "no significant reduction" claim); not reproduced
    only when ``a`` is on the wrong side by more than ``noise`` (and the intervals
    are separated when given); otherwise reproduced. ``"a==b"``: similar; reproduced
    when ``|a - b| <= noise`` or the intervals overlap, else not reproduced.
    A NaN on either side -> "not testable here".

    Hand case (the chapter 01 review): "without a significant reduction in
    interpretability", Switch 0.709 [0.687, 0.732] vs TopK 0.642 [0.620, 0.664],
    ``compare(0.709, 0.642, "a>=b", a_ci=..., b_ci=...)`` -> reproduced (Switch is
    significantly *higher*; the claim only rules out lower).

    Raises ValueError for an unknown ``claim``, a negative ``noise`` or a malformed
    interval."""
    if claim not in CLAIMS:
        raise ValueError(f"claim must be one of {CLAIMS}, got {claim!r}")
    if not (_finite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    a_ci, b_ci = _check_ci("a_ci", a_ci), _check_ci("b_ci", b_ci)
    na, nb = names
    if not (_finite(a) and _finite(b)):
        return Verdict("not testable here", f"{na} {a} vs {nb} {b}: nothing to compare")
    a, b = float(a), float(b)
    cis = a_ci is not None and b_ci is not None
    nums = f"{na} {_num(a, fmt, a_ci)} vs {nb} {_num(b, fmt, b_ci)}"
    floor = f"noise floor {format(noise, fmt)}" + (" and 95% intervals" if cis else "")
    if claim in ("a<b", "a>b", "a<=b", "a>=b"):
        lower = claim[1] == "<"
        gap = (b - a) if lower else (a - b)           # > 0: a on the claimed side
        sep = wrong_sep = True                        # no intervals: the noise floor alone decides
        if cis:
            sep = a_ci[1] < b_ci[0] if lower else a_ci[0] > b_ci[1]
            wrong_sep = a_ci[0] > b_ci[1] if lower else a_ci[1] < b_ci[0]
        word = "lower" if lower else "higher"
        if "=" not in claim:
            ok = gap > noise and sep
            rule = (f"rule: reproduced if {na} is {word} by more than the {floor}"
                    f"{' (intervals separate)' if cis else ''}, else not reproduced")
        else:
            ok = not (-gap > noise and wrong_sep)
            anti = "higher" if lower else "lower"
            rule = (f"rule (one-sided): not reproduced only if {na} is {anti} by more than the {floor}"
                    f"{' (intervals separate)' if cis else ''}, else reproduced")
        diff = f"difference {na} - {nb} = {format(a - b, '+' + fmt)}"
        return Verdict("reproduced" if ok else "not reproduced", f"{nums}; {diff}; {rule}")
    overlap = cis and a_ci[0] <= b_ci[1] and b_ci[0] <= a_ci[1]
    ok = abs(a - b) <= noise or overlap
    rule = (f"rule (two-sided): reproduced if |{na} - {nb}| <= {format(noise, fmt)}"
            f"{' or the 95% intervals overlap' if cis else ''}")
    direction = "higher" if a > b else "lower" if a < b else "equal"
    return Verdict("reproduced" if ok else "not reproduced",
                   f"{nums}; {na} {direction} by {format(abs(a - b), fmt)}; {rule}")


def share(holds, at_least: float = 0.5, what: str = "comparisons") -> Verdict:
    """A claim checked on several comparisons. ``holds``: booleans (NaN / None = not
    comparable, dropped). All hold -> reproduced; a share ``>= at_least`` (and > 0)
    -> partly; fewer -> not reproduced; none comparable -> not testable here. The
    rule text prints ``at_least`` as used (no hidden rescaling).

    Hand case (the chapter 01 review): 3 of 8 = 38% with ``at_least=0.5`` -> not
    reproduced. Raises ValueError unless ``0 <= at_least <= 1``."""
    if not (_finite(at_least) and 0 <= at_least <= 1):
        raise ValueError(f"at_least must be in [0, 1], got {at_least!r}")
    vals = [bool(h) for h in np.asarray(holds, dtype=object).ravel()
            if h is not None and not (isinstance(h, float) and math.isnan(h))]
    rule = f"rule: all -> reproduced, >= {at_least:.0%} -> partly, fewer -> not reproduced"
    if not vals:
        return Verdict("not testable here", f"no comparable {what}")
    n_ok, n = sum(vals), len(vals)
    frac = n_ok / n
    v = "reproduced" if n_ok == n else "partly" if frac >= at_least and n_ok > 0 else "not reproduced"
    return Verdict(v, f"holds in {n_ok}/{n} = {frac:.0%} of {what}; {rule}")


def threshold(value, op: str, bound, what: str = "value", fmt: str = ".3g") -> Verdict:
    """``value op bound`` (``op`` in ``<, <=, >, >=``) -> reproduced, else not
    reproduced; NaN -> not testable here. E.g. ``threshold(0.0, "<", 0.01,
    "TopK duplicate share")``. Raises ValueError for an unknown ``op``."""
    if op not in OPS:
        raise ValueError(f"op must be one of {list(OPS)}, got {op!r}")
    if not _finite(value):
        return Verdict("not testable here", f"{what}: {value} (not measured)")
    ok = bool(OPS[op](float(value), float(bound)))
    return Verdict("reproduced" if ok else "not reproduced",
                   f"{what} = {format(float(value), fmt)}; rule: reproduced if {op} {format(float(bound), fmt)}")


def cap(v: Verdict, reason: str) -> Verdict:
    """Weaker evidence: "reproduced" becomes "partly" with ``reason`` appended
    (e.g. "extrapolated: the MSE ranges do not overlap"); other verdicts keep their
    word and get the reason appended."""
    word = "partly" if v.verdict == "reproduced" else v.verdict
    return Verdict(word, f"{v.rule}; capped at partly: {reason}" if word != v.verdict else f"{v.rule}; {reason}")


def both(*parts: Verdict, labels=None) -> Verdict:
    """A compound claim ("A, while B"): the weakest of its parts' verdicts (a part
    "not testable here" makes the whole "partly" at best when another part is
    tested), rules joined with their labels."""
    if not parts:
        raise ValueError("both() needs at least one verdict")
    labels = labels or [f"part {i + 1}" for i in range(len(parts))]
    tested = [p for p in parts if p.verdict != "not testable here"]
    if not tested:
        word = "not testable here"
    else:
        word = min(tested, key=lambda p: _RANK[p.verdict]).verdict
        if len(tested) < len(parts) and word == "reproduced":
            word = "partly"
    rule = " | ".join(f"{lab}: {p.verdict} ({p.rule})" for lab, p in zip(labels, parts))
    return Verdict(word, f"{rule}; rule: the weakest part decides")


def across_budgets(by_budget: dict) -> Verdict:
    """One claim tested at several training budgets (``{"1x": v1, "4x": v2}``, in
    increasing budget order): the verdict of the largest budget decides; the rule
    names each budget's verdict and whether it changed ("flips" or "stable")."""
    if not by_budget:
        raise ValueError("by_budget must name at least one budget")
    items = list(by_budget.items())
    words = [v.verdict for _, v in items]
    trend = "stable" if len(set(words)) == 1 else f"changes {' -> '.join(words)}"
    last_label, last = items[-1]
    per = "; ".join(f"{lab}: {v.verdict}" for lab, v in items)
    return Verdict(last.verdict, f"{last.rule} [at {last_label}]; by budget: {per} ({trend}); "
                                 f"rule: the largest budget decides")


def not_testable(why: str) -> Verdict:
    """A claim our set-up cannot test, with the reason."""
    return Verdict("not testable here", why)


def multi_gpu_speedup(modelled: float, n_gpus: int, measured: str | None = None, bound: float = 2.0) -> Verdict:
    """[switch] sec. 5, "each expert can be placed on a separate GPU, leading to significant
    wall clock training speed ups", judged on a *modelled* expert-parallel speed-up over one
    GPU (``modelled`` on ``n_gpus`` devices, :func:`saelib.parallel_cost.modelled_speedup`):
    "significant" read as ``>= bound`` (default 2x); capped at "partly" because the GPU
    numbers are assumptions, not measurements. ``measured``: what this machine measured
    (e.g. the 2-process CPU speed-up), appended to the rule. Chapters 01 and 05 both use it."""
    v = threshold(modelled, ">=", bound, what=f"modelled: {n_gpus} GPUs (NVLink-class), the paper's shape and batch, "
                                             "expert-parallel speed-up over 1 GPU")
    reason = "modelled from assumed GPU numbers, not measured (no GPU here)"
    return cap(v, reason + (f"; {measured}" if measured else ""))


def mean_ci(values, level: float = 0.95) -> tuple[float, tuple[float, float]]:
    """Mean of ``values`` (NaN dropped) and its normal-approximation interval
    ``mean +- z * sd / sqrt(n)`` (``sd`` with ``ddof=1``), e.g. a per-feature true
    positive rate over the features scored. Hand case: ``[0, 1, 2, 3]`` -> mean 1.5,
    sd 1.291, 95%: 1.5 +- 1.96 * 0.6455 = [0.235, 2.765]. Fewer than two values ->
    ``(mean, (nan, nan))``. Raises ValueError unless ``0 < level < 1``."""
    from scipy.stats import norm

    if not (_finite(level) and 0 < level < 1):
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), (float("nan"), float("nan"))
    m = float(x.mean())
    if x.size < 2:
        return m, (float("nan"), float("nan"))
    half = float(norm.ppf(0.5 + level / 2) * x.std(ddof=1) / math.sqrt(x.size))
    return m, (m - half, m + half)


def noise_floor(groups, z: float = 2.0, relative: bool = False) -> float:
    """The seed-to-seed noise of a measurement: ``z`` times the pooled within-group
    standard deviation of ``groups`` (each a list of replicate values of one setting,
    e.g. one SAE's MSE over seeds; groups with fewer than two values are skipped).
    ``relative=True`` divides each group by its mean first (a noise floor for ratios:
    a ratio within ``1 +- noise`` is noise). Hand case: groups ``[[1, 3], [2, 2]]`` ->
    variances 2 and 0, pooled sd 1, ``z=2`` -> 2.0. No group with two values -> NaN."""
    if not (_finite(z) and z > 0):
        raise ValueError(f"z must be a positive number, got {z!r}")
    var, dof = 0.0, 0
    for g in groups:
        g = np.asarray(g, dtype=float)
        g = g[np.isfinite(g)]
        if g.size < 2:
            continue
        if relative:
            g = g / g.mean()
        var += float(((g - g.mean()) ** 2).sum())
        dof += g.size - 1
    return float("nan") if dof == 0 else float(z * math.sqrt(var / dof))


CLAIM_COLUMNS = ["section", "claim", "paper", "ours", "paper_value", "our_value", "verdict", "why"]


def claims_table(rows) -> "pd.DataFrame":
    """The claims table a chapter glues (``claims_NN``) and the scorecard gathers.

    ``rows``: dicts with ``section``, ``claim`` (quoted), ``paper`` (the paper's
    figure), ``ours`` (our figure), ``verdict`` (a :class:`Verdict`), and optional
    ``paper_value`` / ``our_value`` (short strings: the paper's number, ours).
    Returns a DataFrame with :data:`CLAIM_COLUMNS`; ``why`` is the verdict's rule.
    Raises ValueError when a row's verdict is not a :class:`Verdict`."""
    import pandas as pd

    out = []
    for i, r in enumerate(rows):
        v = r.get("verdict")
        if not isinstance(v, Verdict):
            raise ValueError(f"rows[{i}]['verdict'] must be a Verdict (from saelib.verdicts), got {type(v).__name__}")
        out.append({"section": str(r.get("section", "")), "claim": r["claim"], "paper": r.get("paper", "-"),
                    "ours": r.get("ours", "-"), "paper_value": r.get("paper_value", "-"),
                    "our_value": r.get("our_value", "-"), "verdict": v.verdict, "why": v.rule})
    return pd.DataFrame(out, columns=CLAIM_COLUMNS)
