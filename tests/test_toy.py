"""saelib.toy: toy models of superposition (Elhage et al. 2022) on their known cases."""
import math

import numpy as np
import pytest
import torch

from saelib import toy


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_forward_is_the_relu_output_model():
    g = torch.Generator().manual_seed(0)
    W, b, x = torch.randn(3, 2, 5, generator=g), torch.randn(3, 5, generator=g), torch.rand(3, 4, 5, generator=g)
    ref = torch.stack([torch.relu(x[i] @ W[i].T @ W[i] + b[i]) for i in range(3)])
    torch.testing.assert_close(toy.forward(W, b, x), ref)


def test_sample_features_density_and_range():
    x = toy.sample_features(torch.tensor([1.0, 0.1]), 4000, 50, torch.Generator().manual_seed(0))
    assert x.shape == (2, 4000, 50) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert (x[0] > 0).float().mean() == pytest.approx(1.0, abs=1e-3)
    assert (x[1] > 0).float().mean() == pytest.approx(0.1, abs=0.005)
    assert x[1][x[1] > 0].mean() == pytest.approx(0.5, abs=0.01)     # U[0, 1] when on


def test_dense_features_give_m_dedicated_dimensions():
    """Dense features with decaying importance: the m most important features get a
    dimension each (D_i = 1), the rest are dropped (Elhage et al. fig. 2, left)."""
    W, b = toy.train_toy(20, 5, 1.0, importance=0.9 ** torch.arange(20.0), steps=2000, batch_size=256, lr=1e-2, seed=0)
    assert W.shape == (5, 20) and b.shape == (20,)
    rep = toy.represented_features(W)
    assert int(rep.sum()) == 5
    assert rep[:5].all()                                              # the five most important ones
    D = toy.feature_dimensionality(W)
    assert D[rep].min() > 0.95 and D[~rep].max() < 0.05


def test_two_sparse_features_in_one_dimension_form_an_antipodal_pair():
    """2 features, 1 dimension, sparse: both represented as W_1 = -W_2, D_i = 1/2
    (Elhage et al. sec. 4). Several restarts: some stall with one feature dropped; the
    best by loss is the antipodal pair."""
    W, b = toy.train_toy(2, 1, 0.01, steps=3000, batch_size=256, lr=1e-3, seed=0, n_instances=8)
    assert W.shape == (8, 1, 2)
    best = int(toy.toy_loss(W, b, 0.01).argmin())
    Wb = W[best]
    assert bool(toy.represented_features(Wb).all())
    assert float(Wb[0, 0] * Wb[0, 1]) < 0 and abs(float(Wb[0, 0] + Wb[0, 1])) < 0.15
    torch.testing.assert_close(toy.feature_dimensionality(Wb), torch.tensor([0.5, 0.5]), atol=0.02, rtol=0)


def test_sparse_features_are_packed_beyond_m():
    p = torch.tensor([1.0, 0.02])
    W, b = toy.train_toy(20, 5, p, steps=2000, batch_size=256, lr=1e-2, seed=0)
    assert W.shape == (2, 5, 20)
    n_rep = toy.represented_features(W).sum(-1)
    assert int(n_rep[0]) <= 6 and int(n_rep[1]) > 5
    assert float(1 / toy.dimensions_per_feature(W[1])) > 1.5 * float(1 / toy.dimensions_per_feature(W[0]))


def test_dimensionality_hand_cases():
    W = torch.tensor([[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]])   # antipodal pair, a dedicated feature, a dropped one
    torch.testing.assert_close(toy.feature_dimensionality(W), torch.tensor([0.5, 0.5, 1.0, 0.0]))
    assert toy.represented_features(W).tolist() == [True, True, True, False]
    assert float(toy.dimensions_per_feature(W)) == pytest.approx(2 / 6)
    # three unit vectors at 120 degrees in 2 dimensions: D = 1 / (1 + 2 * 1/4) = 2/3 each
    a = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3])
    torch.testing.assert_close(toy.feature_dimensionality(torch.stack([a.cos(), a.sin()])), torch.full((3,), 2 / 3))


def test_compressed_sensing_degree_positive_form_and_fit():
    # p = 1 - S = 0.01: -1 / (0.01 ln 0.01) = 21.715
    assert toy.compressed_sensing_degree(0.99) == pytest.approx(1 / (0.01 * math.log(100)), rel=1e-12)
    assert toy.compressed_sensing_degree(0.99, C=2.0) == pytest.approx(21.7147 / 2, rel=1e-4)
    S = np.linspace(0.05, 0.99, 30)
    assert np.all(toy.compressed_sensing_degree(S) >= math.e - 1e-9)          # minimum e at 1 - S = 1/e
    assert toy.compressed_sensing_degree(1 - 1 / math.e) == pytest.approx(math.e)
    S = np.array([0.7, 0.9, 0.99, 0.999])
    f = toy.fit_cs_constant(S, toy.compressed_sensing_degree(S, C=2.5) * np.exp([0.1, -0.1, 0.1, -0.1]))
    assert f["C"] == pytest.approx(2.5, rel=1e-9) and f["log_rmse"] == pytest.approx(0.1) and f["n"] == 4


def test_toy_loss_matches_training_objective_order():
    W = torch.zeros(2, 1, 2)
    W[0, 0] = torch.tensor([1.0, -1.0])
    b = torch.zeros(2, 2)
    loss = toy.toy_loss(W, b, 0.01, n_samples=200000)
    assert loss.shape == (2,) and float(loss[0]) < float(loss[1])    # the pair beats representing nothing
    assert float(loss[1]) == pytest.approx(0.01 / 3, rel=0.05)       # E[x^2] = p / 3 when nothing is kept


@pytest.mark.parametrize("kwargs, match", [
    (dict(feature_probability=0.0), "feature_probability"),
    (dict(feature_probability=1.5), "feature_probability"),
    (dict(feature_probability=[[0.1]]), "feature_probability"),
    (dict(feature_probability=0.1, importance=torch.ones(3)), "importance"),
    (dict(feature_probability=0.1, importance=-torch.ones(4)), "importance"),
    (dict(feature_probability=0.1, steps=0), "steps"),
    (dict(feature_probability=[0.1, 0.2], n_instances=2), "n_instances"),
])
def test_bad_input_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        toy.train_toy(4, 2, **kwargs)


def test_bad_measure_input_raises():
    with pytest.raises(ValueError, match="S"):
        toy.compressed_sensing_degree(1.0)
    with pytest.raises(ValueError, match="C"):
        toy.compressed_sensing_degree(0.5, C=0)
    with pytest.raises(ValueError, match="W"):
        toy.feature_dimensionality(torch.ones(3))
    with pytest.raises(ValueError, match="threshold"):
        toy.represented_features(torch.ones(2, 2), threshold=-1)
