"""saelib.sweep: cached training (hit = same weights, no retraining; different settings
= different entries), evaluation columns and values, the chapter's small helpers."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from saelib import metrics, saes, scaling, sweep, train


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def x():
    g = torch.Generator().manual_seed(0)
    D = torch.nn.functional.normalize(torch.randn(32, 16, generator=g), dim=-1)
    codes = torch.rand(2048, 32, generator=g) * (torch.rand(2048, 32, generator=g) < 0.1)
    return codes @ D + 0.01 * torch.randn(2048, 16, generator=g)


def test_cache_hit_returns_the_same_weights_without_retraining(x, tmp_cache, monkeypatch):
    a = sweep.train_sae(x, "topk", n_latents=64, k=4, steps=20, batch_size=128)
    assert not a.cached and a.seconds > 0 and len(a.history) > 0
    assert a.path.parent == tmp_cache / "saes"

    def boom(*args, **kw):
        raise AssertionError("train.fit was called on a cache hit")
    monkeypatch.setattr(train, "fit", boom)
    b = sweep.train_sae(x, "topk", n_latents=64, k=4, steps=20, batch_size=128, name="label only")
    assert b.cached and b.path == a.path and b.name == "label only"
    assert b.seconds == pytest.approx(a.seconds)                       # the recorded training time
    for (ka, va), (kb, vb) in zip(a.sae.state_dict().items(), b.sae.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert b.sae.config == a.sae.config
    pd.testing.assert_frame_equal(a.history, b.history, check_dtype=False)


def test_different_settings_are_different_entries(x, tmp_cache):
    base = dict(n_latents=64, k=4, steps=10, batch_size=128)
    paths = {sweep.train_sae(x, "topk", **base).path,
             sweep.train_sae(x, "topk", **{**base, "k": 8}).path,
             sweep.train_sae(x, "topk", **{**base, "steps": 12}).path,
             sweep.train_sae(x, "topk", **{**base, "seed": 1}).path,
             sweep.train_sae(x, "topk", **{**base, "lr": 1e-3}).path,
             sweep.train_sae(x, "switch", n_experts=2, **base).path,
             sweep.train_sae(x[:1024], "topk", **base).path}               # other data
    assert len(paths) == 7
    assert len(list((tmp_cache / "saes").iterdir())) == 7              # no leftover temporaries


def test_sweep_runs_specs_in_order_and_reuses_the_cache(x, tmp_cache):
    specs = [dict(kind="topk", n_latents=64, k=4, name="a"),
             dict(kind="switch", n_latents=64, k=4, n_experts=4, steps=8),
             dict(kind="relu", n_latents=64, l1_coef=1.0)]
    runs = sweep.sweep(x, specs, steps=10, batch_size=128, workers=1)
    assert [r.sae.kind for r in runs] == ["topk", "switch", "relu"]
    assert [r.config["steps"] for r in runs] == [10, 8, 10]
    assert runs[0].name == "a" and runs[1].name == "switch N=4 n=64 k=4"
    again = sweep.sweep(x, specs, steps=10, batch_size=128, workers=1)
    assert all(r.cached for r in again) and [r.path for r in again] == [r.path for r in runs]


def test_evaluate_runs_columns_and_values(x, tmp_cache):
    runs = sweep.sweep(x, [dict(kind="topk", n_latents=64, k=4), dict(kind="switch", n_latents=64, k=4, n_experts=4)],
                       steps=10, batch_size=128, workers=1)
    df = sweep.evaluate_runs(runs, x[:512])
    assert list(df.columns) == sweep.EVAL_COLUMNS and len(df) == 2
    ev = metrics.evaluate_sae(runs[0].sae, x[:512])
    row = df.iloc[0]
    assert row.mse == pytest.approx(ev["mse"]) and row.L0 == pytest.approx(ev["l0"]) and row.fvu == pytest.approx(ev["fvu"])
    assert row.flops_per_token == 2 * 64 * 16 + 2 * 4 * 16
    assert row.params == 64 * 16 * 2 + 64 + 16
    assert row.train_tokens == 1280 and row.train_flops == scaling.training_flops(row.flops_per_token, 1280)
    sw = df.iloc[1]
    assert (sw.n_experts, sw.expert_width, sw.k) == (4, 16, 4)
    assert sw.flops_per_token == 2 * 4 * 16 + 2 * 16 * 16 + 2 * 4 * 16          # router + one expert + decode
    assert sw.params == 64 * 16 * 2 + 16 + 4 * 16 + 16                          # + W_router, b_router
    assert df.seconds.gt(0).all() and df.loss_recovered.isna().all() and 0 <= sw.dead <= 1
    with pytest.raises(ValueError, match="together"):
        sweep.evaluate_runs(runs, x[:512], model=object())


def test_bad_kind_and_bad_build_kwargs_raise_before_training(x, tmp_cache):
    with pytest.raises(ValueError, match="kind"):
        sweep.train_sae(x, "moe", n_latents=64, k=4, steps=5, batch_size=64)
    with pytest.raises(ValueError, match="k=8 exceeds"):
        sweep.train_sae(x, "switch", n_latents=16, n_experts=4, k=8, steps=5, batch_size=64)
    with pytest.raises(ValueError, match="kind"):
        sweep.sweep(x, [dict(n_latents=64, k=4)], steps=5, batch_size=64)
    with pytest.raises(ValueError, match="workers"):
        sweep.sweep(x, [dict(kind="topk", n_latents=64, k=4)], steps=5, batch_size=64, workers=0)
    assert not (tmp_cache / "saes").exists() or not any((tmp_cache / "saes").iterdir())


def test_expert_counts():
    assert sweep.expert_counts(24576, [16, 32, 64, 128]) == [16, 32, 64, 128]
    assert sweep.expert_counts(2048, [16, 32, 64]) == [16, 32, 64]
    assert sweep.expert_counts(1024, [16, 32, 64]) == [8, 16, 32]
    assert sweep.expert_counts(256, [16, 32, 64], min_expert_width=32) == [2, 4, 8]
    with pytest.raises(ValueError, match="min_expert_width"):
        sweep.expert_counts(32, [2], min_expert_width=32)


def test_match_frontier_interpolates_in_log_space():
    frontier = pd.DataFrame({"L0": [1.0, 10.0, 100.0], "mse": [1.0, 0.1, 0.01]})
    pts = pd.DataFrame({"L0": [10 ** 0.5, 10.0, 1000.0]})
    out = sweep.match_frontier(pts, frontier)
    assert out[0] == pytest.approx(10 ** -0.5) and out[1] == pytest.approx(0.1) and math.isnan(out[2])


def test_lr_base_gives_the_law_and_the_same_entry_as_the_explicit_lr(x, tmp_cache):
    assert sweep.lr_law(2**14) == pytest.approx(2e-4) and sweep.lr_law(2**16, 1e-3) == pytest.approx(5e-4)
    a = sweep.train_sae(x, "topk", n_latents=64, k=4, steps=5, batch_size=64, lr_base=1e-3)
    b = sweep.train_sae(x, "topk", n_latents=64, k=4, steps=5, batch_size=64, lr=sweep.lr_law(64, 1e-3))
    assert b.cached and a.path == b.path and a.config["lr"] == pytest.approx(1e-3 * 16)
    assert a.history.attrs["lr"] == pytest.approx(a.config["lr"])
    with pytest.raises(ValueError, match="base"):
        sweep.lr_law(64, -1.0)


def test_tags_become_columns_and_compare_to_dense(x, tmp_cache):
    specs = ([dict(kind="topk", n_latents=64, k=k, tags={"setting": "dense"}) for k in (2, 4)]
             + [dict(kind="relu", n_latents=64, l1_coef=l, tags={"setting": "dense"}) for l in (0.5, 2.0)]
             + [dict(kind="switch", n_latents=64, n_experts=2, k=k, tags={"setting": "wm"}) for k in (2, 4)])
    df = sweep.evaluate_runs(sweep.sweep(x, specs, steps=10, batch_size=128, workers=1), x[:512])
    assert list(df.columns[-1:]) == ["setting"] and df.setting.tolist() == ["dense"] * 4 + ["wm"] * 2
    sw = df[df.kind == "switch"]
    out = sweep.compare_to_dense(sw, df, ys=("mse",))
    topk = df[df.kind == "topk"].set_index("k").mse
    np.testing.assert_allclose(out.mse_vs_topk, sw.mse.to_numpy() / topk.loc[sw.k].to_numpy())
    np.testing.assert_allclose(out.mse_vs_relu, sw.mse.to_numpy() / sweep.match_frontier(sw, df[df.kind == "relu"]))
    assert out.mse_vs_gated.isna().all()                              # no gated SAE in the frame


def test_knn_purity_and_partner_rank():
    rng = np.random.default_rng(0)
    blobs = np.concatenate([rng.normal(c, 0.1, (50, 2)) for c in (0, 10, 20)])
    labels = np.repeat([0, 1, 2], 50)
    assert sweep.knn_purity(blobs, labels, k=5) == pytest.approx(1.0)
    assert sweep.knn_purity(blobs, rng.permutation(labels), k=5) < 0.6
    pts = np.array([[0.0, 0], [0.01, 0], [5, 5], [9, 9], [9.5, 9.5]])
    np.testing.assert_array_equal(sweep.partner_rank(pts, [0, 0, 3], [1, 4, 4], n=1), [True, False, True])
    assert sweep.partner_rank(pts, [], [], n=1).size == 0


def test_code_key_ignores_comments_and_docstrings_but_not_code():
    a = 'def f(x):\n    """Doc."""\n    return x + 1  # add one\n'
    b = 'def f(x):\n    """Another doc,\n    longer."""\n\n    return x + 1\n'
    c = 'def f(x):\n    """Doc."""\n    return x + 2\n'
    assert sweep.code_key(a) == sweep.code_key(b) != sweep.code_key(c)


def _assert_same_run(a, b):
    for (ka, va), (kb, vb) in zip(a.sae.state_dict().items(), b.sae.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    pd.testing.assert_frame_equal(a.history.drop(columns="wall_time"), b.history.drop(columns="wall_time"),
                                  check_dtype=False)


def test_pool_of_two_gives_the_same_saes_as_alone(x, tmp_path, monkeypatch):
    specs = [dict(kind="topk", n_latents=64, k=4), dict(kind="switch", n_latents=64, k=4, n_experts=4),
             dict(kind="scale", n_latents=64, k=4, n_experts=4, n_active=2), dict(kind="batchtopk", n_latents=64, k=4)]
    out = {}
    for label, workers in (("alone", None), ("pool1", 1), ("pool2", 2)):
        monkeypatch.setenv("SAELIB_CACHE", str(tmp_path / label))
        if workers is None:                       # one SAE after another, no pool, one thread (the fixture)
            out[label] = [sweep.train_sae(x, s.pop("kind"), steps=12, batch_size=128, **s) for s in map(dict, specs)]
        else:
            out[label] = sweep.sweep(x, specs, steps=12, batch_size=128, workers=workers)
            assert not any(r.cached for r in out[label])
    for a, b, c in zip(out["alone"], out["pool1"], out["pool2"]):
        assert a.path.name == b.path.name == c.path.name
        _assert_same_run(a, b)
        _assert_same_run(a, c)


def test_a_failing_spec_is_named_and_finished_saes_stay_cached(x, tmp_cache, monkeypatch):
    from saelib import pool

    specs = [dict(kind="topk", n_latents=64, k=4, name="good"),
             dict(kind="topk", n_latents=64, k=4, lr=1e6, name="diverges")]     # NaN -> FloatingPointError
    with pytest.raises(pool.WorkerError, match="diverges"):
        sweep.sweep(x, specs, steps=30, batch_size=128, workers=2)
    good = sweep.train_sae(x, "topk", n_latents=64, k=4, steps=30, batch_size=128)
    assert good.cached
