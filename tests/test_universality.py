"""saelib.universality: shapes at fixed parameters, features at a target FVU, matching across models."""
import math

import numpy as np
import pytest
import torch

from saelib import universality as U


def test_shapes_keep_12_d2_L_and_the_notes_pair():
    s = U.shapes_at_fixed_params(32, 8, [8, 4, 2, 1])
    assert [x["n_layer"] for x in s] == [8, 4, 2, 1]
    assert [x["n_embd"] for x in s] == [32, 45, 64, 91]
    A, B = s[0], s[2]                                     # the note: B has 2x d_model and 1/4 of the layers
    assert B["n_embd"] == 2 * A["n_embd"] and B["n_layer"] * 4 == A["n_layer"]
    assert B["params"] == A["params"] and B["aspect"] == 8 * A["aspect"] and B["neurons"] * 2 == A["neurons"]
    assert all(abs(x["params"] / A["params"] - 1) < 0.02 for x in s)
    assert all(x["n_embd"] % x["n_head"] == 0 for x in s)
    with pytest.raises(ValueError, match="n_embd"):
        U.shapes_at_fixed_params(0, 8, [8])


def test_non_embedding_params_of_gpt2_is_about_12_d2_L():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    n = U.non_embedding_params(m)
    d, L = 32, 2
    biases_and_norms = L * (2 * d + 3 * d + d + 2 * d + 4 * d + d) + 2 * d   # per block: ln_1, attn, ln_2, mlp; final LN
    assert n == 12 * d * d * L + biases_and_norms


def test_depth_pairs():
    assert U.depth_pairs(8, 2) == [(3, 0), (7, 1)]
    assert U.depth_pairs(4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert U.depth_pairs(3, 2) == [(2, 1)]


def test_features_at_fvu_interpolates_in_log_log():
    n = np.array([100, 200, 400, 800])
    fvu = 0.5 * (n / 100.0) ** -0.5                       # a power law: the exact answer is known
    r = U.features_at_fvu(n, fvu, 0.3)
    assert r["status"] == "interpolated" and r["F"] == pytest.approx(100 * (0.3 / 0.5) ** -2, rel=1e-9)
    assert U.features_at_fvu(n, fvu, 0.1) == {"F": 800.0, "status": "lower bound"}      # never reached
    assert U.features_at_fvu(n, fvu, 0.6) == {"F": 100.0, "status": "upper bound"}      # reached at once
    assert U.features_at_fvu(n[::-1], fvu[::-1], 0.3)["F"] == pytest.approx(r["F"])      # order does not matter
    bumpy = [0.5, 0.55, 0.2, 0.1]                          # FVU not monotone: the first crossing counts
    assert U.features_at_fvu(n, bumpy, 0.3)["F"] == pytest.approx(200 * 2 ** (math.log(0.3 / 0.55) / math.log(0.2 / 0.55)))
    with pytest.raises(ValueError, match="target"):
        U.features_at_fvu(n, fvu, 1.5)


def test_common_target():
    import pandas as pd

    f = pd.DataFrame({"model": "A", "layer": [0, 0, 1, 1], "fvu": [0.4, 0.1, 0.3, 0.05]})
    assert U.common_target(f) == pytest.approx(math.sqrt(0.1 * 0.3))   # both layers cross it
    f2 = pd.DataFrame({"model": "A", "layer": [0, 0, 1, 1], "fvu": [0.4, 0.3, 0.2, 0.05]})
    assert U.common_target(f2) == pytest.approx(0.3)                    # ranges do not overlap


def test_max_correlation_finds_planted_partners():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2000, 6, generator=g) * (torch.rand(2000, 6, generator=g) < 0.2)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    b = torch.cat([2 * a[:, perm] + 0.01 * torch.randn(2000, 6, generator=g), torch.zeros(2000, 1)], 1)
    c, i = U.max_correlation(a, b, chunk=4)
    assert torch.all(c > 0.99)
    assert torch.equal(perm[i], torch.arange(6))          # b[:, i[j]] is a[:, perm[i[j]]] = a[:, j]
    cb, _ = U.max_correlation(b, a)
    assert math.isnan(float(cb[-1]))                     # a constant feature has no correlation
    m = U.match_summary(a, b, threshold=0.9)
    assert m["frac_a"] == 1.0 and m["frac_b"] == 1.0 and m["n_b"] == 6
    lo, hi = m["frac_a_ci"]
    assert lo < 1.0 <= hi + 1e-12
    noise = torch.rand(2000, 6, generator=g)
    assert U.match_summary(a, noise, threshold=0.5)["frac_a"] == 0.0


def test_wilson_interval_hand_case():
    lo, hi = U.wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)


def test_concat_and_pooled_fvu():
    x1, x2 = torch.randn(500, 4) * 10, torch.randn(500, 8)
    x, s = U.concat_layers([x1, x2])
    assert x.shape == (500, 12)
    assert float((x[:, :4] ** 2).sum(1).mean()) == pytest.approx(4, rel=1e-5)
    assert float((x[:, 4:] ** 2).sum(1).mean()) == pytest.approx(8, rel=1e-5)
    y, s2 = U.concat_layers([x1, x2], scales=s)
    assert torch.equal(x, y) and s2 == s
    assert U.pooled_fvu([0.1, 0.3], [1.0, 3.0]) == pytest.approx(0.25)
    assert U.total_variance(torch.tensor([[0.0, 1.0], [2.0, 1.0]])) == pytest.approx(1.0)


def test_cylinder_neurons_at_fixed_params():
    d, L, neurons = U.cylinder(12 * 32 ** 2 * 8, np.array([4.0, 32.0]))
    np.testing.assert_allclose(d, [32, 64]) and np.testing.assert_allclose(L, [8, 2])
    np.testing.assert_allclose(neurons, [256, 128])      # 8x the aspect ratio, half the neurons


def test_features_per_layer_and_bootstrap():
    import pandas as pd

    n = np.array([100, 200, 400])
    f = pd.DataFrame({"model": "A", "layer": [0] * 3 + [1] * 3, "n_latents": list(n) * 2, "alive": list(n) * 2,
                      "fvu": list(0.5 * (n / 100.0) ** -0.5) + list(0.2 * (n / 100.0) ** -0.5)})
    t = U.features_per_layer(f, 0.3)
    assert list(t.layer) == [0, 1] and list(t.chosen_latents) == [400, 100]
    assert t.F.iloc[0] == pytest.approx(100 * (0.3 / 0.5) ** -2) and t.status.iloc[1] == "upper bound"
    s, (lo, hi) = U.bootstrap_ci(np.arange(101.0), n_boot=200)
    assert s == 50 and lo < 50 < hi
