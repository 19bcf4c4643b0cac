"""saelib.scaling: power-law fits, equal-loss compute, the training-FLOPs convention."""
import numpy as np
import pandas as pd
import pytest

from saelib import scaling as S

X = np.geomspace(1e12, 1e16, 6)


def test_exact_power_law_is_recovered():
    f = S.fit_power_law(X, 3.0 * X ** -0.12, n_boot=200)
    assert f["b"] == pytest.approx(-0.12, abs=1e-6) and f["a"] == pytest.approx(3.0, rel=1e-6)
    assert f["r2"] == pytest.approx(1.0) and f["n"] == 6 and "c" not in f
    assert f["b_ci"][0] == pytest.approx(-0.12, abs=1e-6) and f["b_ci"][1] == pytest.approx(-0.12, abs=1e-6)
    assert S.predict(f, 1e14) == pytest.approx(3.0 * 1e14 ** -0.12, rel=1e-9)
    np.testing.assert_allclose(S.predict(f, X), 3.0 * X ** -0.12, rtol=1e-9)


def test_exact_power_law_with_offset_is_recovered():
    x = np.geomspace(1, 1e4, 7)
    f = S.fit_power_law(x, 2.0 * x ** -0.5 + 0.1, offset=True, n_boot=100)
    assert f["b"] == pytest.approx(-0.5, abs=1e-6) and f["c"] == pytest.approx(0.1, abs=1e-6)
    assert f["a"] == pytest.approx(2.0, rel=1e-6) and f["c_ci"][0] <= 0.1 + 1e-6 <= f["c_ci"][1] + 2e-6


def test_noisy_data_interval_contains_the_truth():
    rng = np.random.default_rng(0)
    y = 5.0 * X ** -0.2 * np.exp(rng.normal(0, 0.05, X.size))
    f = S.fit_power_law(X, y, seed=0)
    lo, hi = f["b_ci"]
    assert lo < -0.2 < hi and hi - lo < 0.1
    assert f["n_boot_ok"] > 900
    assert f["b_se"] > 0
    assert f == S.fit_power_law(X, y, seed=0)              # deterministic for a seed


def test_compute_at_equal_loss():
    topk = S.fit_power_law(X, 3.0 * X ** -0.12, n_boot=0)
    switch = S.fit_power_law(X, 3.0 * (10 * X) ** -0.12, n_boot=0)   # the same curve with 10x less compute
    y = S.predict(topk, 1e14)
    out = S.compute_at_equal_loss(topk, switch, y)
    assert out["x_a"] == pytest.approx(1e14, rel=1e-9) and out["ratio"] == pytest.approx(10.0, rel=1e-9)
    assert out["extrapolated_a"] is False and out["extrapolated_b"] is False
    far = S.compute_at_equal_loss(topk, switch, 1e-3)
    assert far["extrapolated_a"] and far["extrapolated_b"]
    arr = S.compute_at_equal_loss(topk, switch, np.array([y, y]))
    np.testing.assert_allclose(arr["ratio"], [10, 10])
    off = S.fit_power_law(np.geomspace(1, 1e4, 7), 2.0 * np.geomspace(1, 1e4, 7) ** -0.5 + 0.1, offset=True, n_boot=0)
    with pytest.raises(ValueError, match="irreducible"):
        S.compute_at_equal_loss(off, off, 0.05)


@pytest.mark.parametrize("x, y, match", [
    ([1, 2], [1, 2], "at least 3"),
    ([1, 2, 3], [1, 0, 2], "positive"),
    ([1, -2, 3], [1, 1, 2], "positive"),
    ([1, 2, np.nan], [1, 1, 2], "positive"),
    ([1, 2, 3], [1, 2], "same length"),
    ([2, 2, 2], [1, 2, 3], "distinct"),
])
def test_bad_input_errors(x, y, match):
    with pytest.raises(ValueError, match=match):
        S.fit_power_law(x, y)


def test_offset_needs_four_points_and_ci_is_checked():
    with pytest.raises(ValueError, match="at least 4"):
        S.fit_power_law([1, 2, 3], [3, 2, 1.5], offset=True)
    with pytest.raises(ValueError, match="ci"):
        S.fit_power_law(X, X ** -0.1, ci=95)
    with pytest.raises(ValueError, match="n_boot"):
        S.fit_power_law(X, X ** -0.1, n_boot=-1)


def test_training_flops_convention():
    assert S.training_flops(100, 1000) == 3e5
    assert S.training_flops(100, 1000, backward_factor=1) == 1e5
    np.testing.assert_allclose(S.training_flops(np.array([1, 2]), 10), [30, 60])
    for bad in [dict(flops_per_token=0, n_tokens=1), dict(flops_per_token=1, n_tokens=-5)]:
        with pytest.raises(ValueError, match=next(iter(k for k, v in bad.items() if v <= 0))):
            S.training_flops(**bad)
    with pytest.raises(ValueError, match="backward_factor"):
        S.training_flops(1, 1, backward_factor=0.5)


def test_fit_groups():
    df = pd.DataFrame({"arch": ["topk"] * 5 + ["switch"] * 5 + ["tiny"] * 2,
                       "flops": list(X[:5]) * 2 + [1e12, 1e13],
                       "mse": list(3 * X[:5] ** -0.1) + list(2 * X[:5] ** -0.2) + [1, 0.5]})
    with pytest.warns(UserWarning, match="tiny"):
        out = S.fit_groups(df, "flops", "mse", "arch", n_boot=50)
    assert list(out.arch) == ["switch", "topk"]
    np.testing.assert_allclose(out.b, [-0.2, -0.1], atol=1e-9)
    with pytest.raises(ValueError, match="column"):
        S.fit_groups(df, "flop", "mse", "arch")
