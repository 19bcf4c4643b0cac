"""Verdict rules on hand cases, including the ones the chapter 01 review found."""
import math

import pytest

from saelib import verdicts as V


def test_one_sided_no_reduction_claim_holds_when_significantly_higher():
    # "without a significant reduction in interpretability": Switch 0.709 [0.687, 0.732] vs TopK 0.642 [0.620, 0.664]
    v = V.compare(0.709, 0.642, "a>=b", a_ci=(0.687, 0.732), b_ci=(0.620, 0.664), names=("Switch", "TopK"))
    assert v.verdict == "reproduced"
    assert "one-sided" in v.rule and "0.709 [0.687, 0.732]" in v.rule and "+0.067" in v.rule
    # significantly lower refutes it
    v = V.compare(0.600, 0.700, "a>=b", a_ci=(0.58, 0.62), b_ci=(0.68, 0.72))
    assert v.verdict == "not reproduced"
    # lower, but the intervals overlap: not a significant reduction
    assert V.compare(0.65, 0.66, "a>=b", a_ci=(0.62, 0.68), b_ci=(0.63, 0.69)).verdict == "reproduced"


def test_two_sided_similar_says_the_direction():
    v = V.compare(0.709, 0.642, "a==b", a_ci=(0.687, 0.732), b_ci=(0.620, 0.664), names=("Switch", "TopK"))
    assert v.verdict == "not reproduced" and "Switch higher by 0.067" in v.rule
    v = V.compare(0.597, 0.621, "a==b", a_ci=(0.57, 0.62), b_ci=(0.60, 0.64))
    assert v.verdict == "reproduced" and "lower" in v.rule


def test_strict_claim_needs_to_clear_the_noise_floor():
    # loss recovered decided by 1e-4 differences: within a 1e-3 noise floor -> not shown
    assert V.compare(0.9901, 0.9900, "a>b", noise=1e-3).verdict == "not reproduced"
    assert V.compare(0.995, 0.990, "a>b", noise=1e-3).verdict == "reproduced"
    assert V.compare(1.0, 2.0, "a<b").verdict == "reproduced"
    assert V.compare(2.0, 1.0, "a<b").verdict == "not reproduced"
    # intervals overlapping -> not separated -> not reproduced even with a difference above the floor
    assert V.compare(1.0, 1.2, "a<b", a_ci=(0.8, 1.25), b_ci=(1.1, 1.3)).verdict == "not reproduced"
    assert V.compare(1.0, 1.2, "a<b", a_ci=(0.9, 1.05), b_ci=(1.1, 1.3)).verdict == "reproduced"


def test_one_sided_le_with_noise():
    assert V.compare(1.05, 1.0, "a<=b", noise=0.1).verdict == "reproduced"
    assert V.compare(1.2, 1.0, "a<=b", noise=0.1).verdict == "not reproduced"


def test_nan_is_not_testable_and_bad_input_raises():
    assert V.compare(math.nan, 1.0, "a<b").verdict == "not testable here"
    with pytest.raises(ValueError, match="claim"):
        V.compare(1, 2, "less")
    with pytest.raises(ValueError, match="noise"):
        V.compare(1, 2, "a<b", noise=-1)
    with pytest.raises(ValueError, match="a_ci"):
        V.compare(1, 2, "a<b", a_ci=(2, 1), b_ci=(0, 1))


def test_share_prints_the_threshold_it_applies():
    # "for the most part outperforming Gated and ReLU": 3 of 8 = 38% with "at least half" -> not reproduced
    v = V.share([True] * 3 + [False] * 5, at_least=0.5)
    assert v.verdict == "not reproduced" and "3/8 = 38%" in v.rule and ">= 50%" in v.rule
    assert V.share([True] * 4 + [False] * 4, at_least=0.5).verdict == "partly"
    assert V.share([True, True, None, float("nan")]).verdict == "reproduced"
    assert V.share([False, False], at_least=0.0).verdict == "not reproduced"
    assert V.share([]).verdict == "not testable here"
    with pytest.raises(ValueError, match="at_least"):
        V.share([True], at_least=1.5)


def test_threshold_cap_both_budgets():
    assert V.threshold(0.0, "<", 0.01, "TopK duplicates").verdict == "reproduced"
    assert V.threshold(0.02, "<", 0.01).verdict == "not reproduced"
    assert V.threshold(float("nan"), "<", 0.01).verdict == "not testable here"
    with pytest.raises(ValueError, match="op"):
        V.threshold(1, "=<", 2)
    # one extrapolation cap, applied by one function, for every row that rests on the same numbers
    r = V.cap(V.Verdict("reproduced", "x"), "extrapolated")
    assert r.verdict == "partly" and "capped" in r.rule
    assert V.cap(V.Verdict("not reproduced", "x"), "extrapolated").verdict == "not reproduced"
    b = V.both(V.Verdict("reproduced", "a"), V.Verdict("not reproduced", "b"), labels=["compute", "interp"])
    assert b.verdict == "not reproduced" and "compute: reproduced" in b.rule
    assert V.both(V.Verdict("reproduced", "a"), V.not_testable("no GPU")).verdict == "partly"
    t = V.across_budgets({"1x": V.Verdict("not reproduced", "r1"), "4x": V.Verdict("reproduced", "r4")})
    assert t.verdict == "reproduced" and "not reproduced -> reproduced" in t.rule
    assert "stable" in V.across_budgets({"1x": V.Verdict("partly", "a"), "4x": V.Verdict("partly", "b")}).rule


def test_claims_table_columns_and_refusal():
    df = V.claims_table([{"section": "4.1", "claim": "c", "verdict": V.Verdict("partly", "why")}])
    assert list(df.columns) == V.CLAIM_COLUMNS and df.loc[0, "why"] == "why" and df.loc[0, "verdict"] == "partly"
    with pytest.raises(ValueError, match="verdict"):
        V.claims_table([{"claim": "c", "verdict": "partly"}])
    with pytest.raises(ValueError, match="verdict must be one of"):
        V.Verdict("maybe", "")


def test_mean_ci_and_noise_floor_hand_cases():
    m, (lo, hi) = V.mean_ci([0, 1, 2, 3])
    assert m == 1.5 and lo == pytest.approx(1.5 - 1.959964 * 0.645497, rel=1e-5) and hi == pytest.approx(2.765, abs=1e-3)
    assert math.isnan(V.mean_ci([1.0])[1][0])
    assert V.noise_floor([[1, 3], [2, 2]]) == pytest.approx(2.0)
    assert V.noise_floor([[1, 3], [2, 2]], z=1) == pytest.approx(1.0)
    assert V.noise_floor([[2, 6]], z=1, relative=True) == pytest.approx(math.sqrt(0.5))   # [0.5, 1.5] / 1
    assert math.isnan(V.noise_floor([[1], [2]]))
    with pytest.raises(ValueError, match="level"):
        V.mean_ci([1, 2], level=95)


def test_multi_gpu_speedup_is_capped_and_prints_its_rule():
    v = V.multi_gpu_speedup(2.5, 8, measured="2 CPU processes ran 0.6x")
    assert v.verdict == "partly" and ">= 2" in v.rule and "8 GPUs" in v.rule and "0.6x" in v.rule
    assert V.multi_gpu_speedup(1.5, 8).verdict == "not reproduced"
    assert V.multi_gpu_speedup(float("nan"), 8).verdict == "not testable here"
