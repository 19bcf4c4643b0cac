"""Data- and expert-parallel training (saelib.distributed) on 2 gloo processes gives the SAE
and history of one process on the same global batch; checkpoints move between 1 and 2
ranks; the command line (python -m saelib.train) and its errors; the cost model.

The 2-process work runs in ONE launch shared by the module (spawning costs seconds)."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from saelib import distributed as D
from saelib import saes, train, train_cli

pytestmark = pytest.mark.usefixtures("one_thread")

D_IN, N_LAT, K, B, STEPS, STOP, EVERY = 16, 64, 4, 64, 16, 11, 8
KW = dict(steps=STEPS, batch_size=B, seed=0, log_every=2, progress=False, device="cpu")
SPECS = {"topk": {}, "batchtopk": {}, "switch": {"n_experts": 4}, "scale": {"n_experts": 4, "n_active": 2},
         "relu": {}, "gated": {},
         "scale-learned": {"n_experts": 4, "n_active": 2, "decomposition": "learned", "renormalize_router": True}}
JOBS = [(name, False) for name in SPECS] + [("switch", True), ("scale", True), ("scale-learned", True)]
AUXK = dict(aux_k=8, dead_window=2 * B)        # latents die within the run, so AuxK acts
CKPT_JOBS = [("batchtopk", False), ("scale", True)]


def spec(name):
    kind = name.split("-")[0]
    return dict(kind=kind, d_in=D_IN, n_latents=N_LAT, seed=0, **SPECS[name],
                **({"k": K} if kind in saes.TOPK_KINDS else {}))


def make_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(512, D_IN, generator=g) * 3 + 0.5      # not unit scale: normalize matters


class _Interrupt(Exception):
    pass


def _interrupted(module, name, stop):
    """Replace ``module.name`` (a step function whose last argument is the step) by one
    that raises at step ``stop``; returns the original."""
    orig = getattr(module, name)

    def step_fn(*args):
        if args[-1] == stop:
            raise _Interrupt
        return orig(*args)

    setattr(module, name, step_fn)
    return orig


def two_rank_work(data, ckpt_dir, cli_argv):
    """Runs in each of the 2 ranks: every equivalence job, resumes of 1-rank checkpoints,
    2-rank runs interrupted after their checkpoint at step EVERY, and the CLI."""
    out = {}
    for kind, ep in JOBS:
        out[(kind, ep)] = D.fit_worker(spec(kind), data, KW, ep)
    out["auxk"] = D.fit_worker(spec("topk"), data, dict(KW, **AUXK))
    for kind, ep in CKPT_JOBS:
        kw = dict(KW, checkpoint_every=EVERY)
        out[("resume", kind, ep)] = D.fit_worker(spec(kind), data, dict(kw, checkpoint_path=f"{ckpt_dir}/one_{kind}.pt"), ep)
        # the same call again: the checkpoint is finished, the SAE comes back as saved
        out[("finished", kind, ep)] = D.fit_worker(spec(kind), data, dict(kw, checkpoint_path=f"{ckpt_dir}/one_{kind}.pt"), ep)
        orig = _interrupted(D, "_step", STOP)
        try:
            D.fit_worker(spec(kind), data, dict(kw, checkpoint_path=f"{ckpt_dir}/two_{kind}.pt"), ep)
        except _Interrupt:
            pass
        finally:
            D._step = orig
    out["cli"] = train_cli.main(cli_argv)
    return out


def cli_argv(data_path, out):
    return ["--data", str(data_path), "--kind", "scale", "--n-latents", str(N_LAT), "--k", str(K),
            "--n-experts", "4", "--steps", str(STEPS), "--batch-size", str(B), "--log-every", "2",
            "--device", "cpu", "--out", str(out), "--expert-parallel"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One-process references, 1-rank interrupted checkpoints, then the 2-rank launch."""
    tmp = tmp_path_factory.mktemp("dist")
    data = make_data()
    np.save(tmp / "acts.npy", data.numpy())
    torch.set_num_threads(1)
    ref = {}
    for kind in SPECS:
        sae = saes.build(**spec(kind))
        ref[kind] = (train.fit(sae, data, **KW), {k: v.clone() for k, v in sae.state_dict().items()})
    sae = saes.build(**spec("topk"))
    ref["auxk"] = (train.fit(sae, data, **KW, **AUXK), {k: v.clone() for k, v in sae.state_dict().items()})
    for kind, _ in CKPT_JOBS:   # a 1-rank run stopped after its checkpoint at step EVERY
        orig = _interrupted(train, "_train_step", STOP)
        try:
            train.fit(saes.build(**spec(kind)), data, checkpoint_path=tmp / f"one_{kind}.pt", checkpoint_every=EVERY, **KW)
        except _Interrupt:
            pass
        finally:
            train._train_step = orig
        assert torch.load(tmp / f"one_{kind}.pt", weights_only=False)["step"] == EVERY
    two = D.launch(two_rank_work, 2, data, str(tmp), cli_argv(tmp / "acts.npy", tmp / "cli2"), timeout=900)
    return dict(ref=ref, two=two, data=data, tmp=tmp)


def assert_same_history(h1, h2):
    assert list(h1.columns) == list(h2.columns)
    for col in h1.columns:
        if col == "wall_time":
            continue
        a = np.array(h1[col].tolist(), dtype=float)
        b = np.array(h2[col].tolist(), dtype=float)
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-5, equal_nan=True, err_msg=col)


def assert_same_weights(sd1, sd2):
    assert sd1.keys() == sd2.keys()
    for key in sd1:
        torch.testing.assert_close(sd2[key].float(), sd1[key].float(), rtol=1e-4, atol=2e-5, msg=key)


@pytest.mark.parametrize("kind,ep", JOBS, ids=[f"{k}-{'expert' if ep else 'data'}" for k, ep in JOBS])
def test_two_ranks_equal_one_process(runs, kind, ep):
    h1, sd1 = runs["ref"][kind]
    (h_a, sd_a), (h_b, sd_b) = (r[(kind, ep)] for r in runs["two"])
    assert_same_history(h1, h_a)
    assert_same_weights(sd1, sd_a)
    for key in sd_a:                                   # the ranks end identical (bit for bit)
        assert torch.equal(sd_a[key], sd_b[key]), key
    assert h_a.attrs["world_size"] == 2
    traffic = h_a.attrs["traffic_per_step"]
    assert (traffic["all_to_all"] > 0) == ep           # only expert parallelism moves rows
    assert traffic["all_reduce"] > 0


def test_two_ranks_equal_one_process_with_auxk(runs):
    h1, sd1 = runs["ref"]["auxk"]
    assert h1["auxk"].max() > 0
    h2, sd2 = runs["two"][0]["auxk"]
    assert_same_history(h1, h2)
    assert_same_weights(sd1, sd2)


def test_expert_parallel_traffic_matches_the_cost_model(runs):
    """The counted all-to-all bytes of the 2-rank switch run agree with cost_model's formula
    (uniform routing assumed there, so within 25%)."""
    measured = runs["two"][0][("switch", True)][0].attrs["traffic_per_step"]["all_to_all"]
    model = D.cost_model(2, d_in=D_IN, n_latents=N_LAT, k=K, n_experts=4, batch_size=B).set_index("mode")
    predicted = model.loc["expert parallel", "all_to_all_bytes"]
    assert 0.75 * predicted < measured < 1.25 * predicted
    reduced = runs["two"][0][("switch", True)][0].attrs["traffic_per_step"]["all_reduce"]
    assert reduced == pytest.approx(model.loc["expert parallel", "all_reduce_bytes"])   # no randomness in it


@pytest.mark.parametrize("kind,ep", CKPT_JOBS)
def test_checkpoint_one_rank_resumes_on_two(runs, kind, ep):
    h1, sd1 = runs["ref"][kind]
    h2, sd2 = runs["two"][0][("resume", kind, ep)]
    assert_same_history(h1, h2)
    assert_same_weights(sd1, sd2)
    h3, sd3 = runs["two"][1][("finished", kind, ep)]
    assert_same_history(h1, h3)
    assert_same_weights(sd1, sd3)


@pytest.mark.parametrize("kind,ep", CKPT_JOBS)
def test_checkpoint_two_ranks_resume_on_one(runs, kind, ep):
    path = runs["tmp"] / f"two_{kind}.pt"
    assert torch.load(path, weights_only=False)["step"] == EVERY     # written by the 2-rank run
    sae = saes.build(**spec(kind))
    h = train.fit(sae, runs["data"], checkpoint_path=path, checkpoint_every=EVERY, **KW)
    h1, sd1 = runs["ref"][kind]
    assert_same_history(h1, h)
    assert_same_weights(sd1, sae.state_dict())


def test_cli_one_and_two_ranks_agree(runs):
    tmp = runs["tmp"]
    assert train_cli.main(cli_argv(tmp / "acts.npy", tmp / "cli1")[:-1]) == 0      # one process, no EP flag
    assert runs["two"][0]["cli"] == 0
    h1 = pd.read_json(tmp / "cli1" / "history.jsonl", lines=True)
    h2 = pd.read_json(tmp / "cli2" / "history.jsonl", lines=True)
    assert_same_history(h1, h2)
    a, b = saes.load(tmp / "cli1" / "sae"), saes.load(tmp / "cli2" / "sae")
    assert_same_weights(a.state_dict(), b.state_dict())
    assert a.config == b.config
    run = json.loads((tmp / "cli2" / "run.json").read_text())
    assert run["world_size"] == 2 and run["bytes_per_step"]["all_to_all"] > 0


# ---------------------------------------------------------------------------
# in-process checks (no second process)
# ---------------------------------------------------------------------------
def test_shard_stream_splits_batch_stream():
    data = make_data()
    ref = train.batch_stream(data, B, 3, start=5)
    shards = [D.shard_stream(data, B, 3, r, 4, start=5) for r in range(4)]
    for _ in range(12):      # crosses an epoch boundary (8 batches per epoch)
        assert torch.equal(torch.cat([next(s) for s in shards]), next(ref))


def test_expert_shards():
    """Rank 1 of 2 owns experts 2 and 3 (rows 32..63, omega[2:4]), shares the replicated
    parameters, and the full SAE's expert tensors are freed while it trains."""
    sae = saes.build(**spec("scale"))
    full = {k: v.clone() for k, v in sae.state_dict().items()}
    run = D._Run(sae, 1, 2, expert_parallel=True)
    loc = run.loc
    assert torch.equal(loc.W_enc, full["W_enc"][32:]) and torch.equal(loc.W_dec, full["W_dec"][32:])
    assert torch.equal(loc.omega, full["omega"][2:])
    assert loc.b_pre is sae.b_pre and loc.W_router is sae.W_router
    names = [n for n, _ in saes.build(**spec("scale")).named_parameters()]
    own = {"W_enc": loc.W_enc, "W_dec": loc.W_dec, "omega": loc.omega}
    assert all(p is (own[n] if n in own else getattr(sae, n)) for n, p in zip(names, run.params))
    assert sae.W_enc.numel() == 0 and sae.W_dec.numel() == 0 and sae.omega.numel() == 0
    assert sum(p.numel() for p in run.params) == N_LAT * D_IN + 2 + D_IN * (2 + 4)


def test_bad_parallel_settings_raise_before_work():
    sw = saes.build("switch", d_in=8, n_latents=32, k=2, n_experts=4)
    with pytest.raises(ValueError, match="n_experts=4 is not divisible by the world size 3"):
        D.shard_experts(sw, 0, 3)
    with pytest.raises(ValueError, match="expert_parallel needs kind"):
        D.fit(saes.build("topk", d_in=8, n_latents=32, k=2), torch.randn(64, 8), expert_parallel=True)
    with pytest.raises(ValueError, match="aux_k is not implemented"):
        D.fit(sw, torch.randn(64, 8), expert_parallel=True, aux_k=True)


def _cli_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        train_cli.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_cli_errors(tmp_path, capsys, monkeypatch):
    acts = tmp_path / "acts.npy"
    np.save(acts, np.random.default_rng(0).standard_normal((128, 8)).astype("float32"))
    base = ["--data", str(acts), "--out", str(tmp_path / "o"), "--n-latents", "32", "--steps", "2", "--batch-size", "32"]
    assert "invalid choice: 'foo'" in _cli_error(base + ["--kind", "foo"], capsys)
    assert "positive integer" in _cli_error(base + ["--kind", "topk", "--k", "0"], capsys)
    assert "k is not used by kind='relu'" in _cli_error(base + ["--kind", "relu", "--k", "4"], capsys)
    err = _cli_error(["--data", str(tmp_path / "missing.npy")] + base[2:] + ["--kind", "topk", "--k", "2"], capsys)
    assert "no such file" in err
    assert "--expert-parallel needs --kind" in _cli_error(base + ["--kind", "topk", "--k", "2", "--expert-parallel"], capsys)
    monkeypatch.setenv("WORLD_SIZE", "3")       # as under torchrun --nproc-per-node 3, checked before any work
    err = _cli_error(base + ["--batch-size", "33", "--kind", "switch", "--k", "2", "--n-experts", "4",
                             "--expert-parallel"], capsys)
    assert "--n-experts 4 is not divisible by the 3 ranks" in err
    assert "--batch-size 32 is not divisible by the 3 ranks" in _cli_error(base + ["--kind", "topk", "--k", "2"], capsys)
    (tmp_path / "bad.yaml").write_text("kind: topk\nk: many\n")
    assert "k: expected a positive integer, got 'many'" in _cli_error(base + ["--config", str(tmp_path / "bad.yaml")], capsys)
    assert not (tmp_path / "o").exists()


def test_cli_config_file_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    save_file({"acts": make_data(), "other": torch.zeros(3)}, str(tmp_path / "acts.safetensors"))
    with pytest.raises(ValueError, match="choose one with --data-key"):
        train_cli.open_data(tmp_path / "acts.safetensors")
    assert train_cli.open_data(tmp_path / "acts.safetensors", "acts").shape == (512, D_IN)
    (tmp_path / "run.yaml").write_text("kind: topk\nn_latents: 32\nk: 3\nsteps: 4\nbatch_size: 64\nseed: 2\n")
    argv = ["--config", str(tmp_path / "run.yaml"), "--data", str(tmp_path / "acts.safetensors"),
            "--data-key", "acts", "--out", str(tmp_path / "o"), "--steps", "6", "--device", "cpu"]
    assert train_cli.main(argv) == 0
    sae = saes.load(tmp_path / "o" / "sae")
    assert (sae.kind, sae.n_latents, sae.k, sae.config["seed"]) == ("topk", 32, 3, 2)
    hist = pd.read_json(tmp_path / "o" / "history.jsonl", lines=True)
    assert hist["step"].iloc[-1] == 6                      # the flag wins over the file
    with pytest.raises(SystemExit):                         # finished SAE in --out: refused without --overwrite
        train_cli.main(argv)
    assert train_cli.main(argv + ["--overwrite"]) == 0


def test_cli_scale_options_reach_saes_build(tmp_path, capsys):
    acts = tmp_path / "acts.npy"
    np.save(acts, np.random.default_rng(0).standard_normal((256, 8)).astype("float32"))
    argv = ["--data", str(acts), "--kind", "scale", "--n-latents", "32", "--k", "4", "--n-experts", "4",
            "--n-active", "2", "--steps", "3", "--batch-size", "64", "--device", "cpu", "--weight-before-topk",
            "--renormalize-router", "--feature-scaling", "true", "--decomposition", "learned",
            "--balance-scale", "normalized", "--out", str(tmp_path / "o")]
    assert train_cli.main(argv) == 0
    cfg = saes.load(tmp_path / "o" / "sae").config
    assert cfg["weight_before_topk"] and cfg["renormalize_router"] and cfg["decomposition"] == "learned"
    assert cfg["balance_scale"] == "normalized" and cfg["feature_scaling"]
    err = _cli_error(argv[:-2] + ["--feature-scaling", "maybe", "--out", str(tmp_path / "p")], capsys)
    assert "--feature-scaling" in err and "expected true or false" in err
    err = _cli_error(["--data", str(acts), "--kind", "topk", "--n-latents", "32", "--k", "4", "--weight-before-topk",
                      "--out", str(tmp_path / "q")], capsys)
    assert "weight_before_topk=True is only allowed for kind='scale'" in err


def test_cost_model():
    df = D.cost_model(8, d_in=768, n_latents=24576, k=32, n_experts=16, batch_size=4096).set_index("mode")
    assert df.loc["expert parallel", "compute_s"] == pytest.approx(df.loc["1 device", "compute_s"] / 8)
    assert df.loc["data parallel", "compute_s"] == pytest.approx(df.loc["1 device", "compute_s"] / 8)
    # expert parallel: (N-1)/N^2 * B pairs leave each device, (3d + 4k) float32 + (k+1) int64 each
    a2a = 7 / 64 * 4096 * ((3 * 768 + 4 * 32) * 4 + 33 * 8) + 8 * 7
    assert df.loc["expert parallel", "all_to_all_bytes"] == pytest.approx(a2a)
    small = 8 * (6 + 2 * 768) + 24576 + 8 * 16
    assert df.loc["data parallel", "all_reduce_bytes"] == pytest.approx(4 * (2 * 24576 * 768 + 16 * 768 + 2 * 768) + small)
    assert df.loc["data parallel", "wire_bytes"] == pytest.approx(2 * 7 / 8 * df.loc["data parallel", "all_reduce_bytes"])
    b0 = D.pays_from_batch(8, 768, 24576, 32, 16)
    assert b0 == D.cost_model(8).attrs["pays_from_batch"]
    assert 0 < b0 < math.inf
    faster = D.cost_model(8, batch_size=int(2 * b0) + 1).set_index("mode")
    slower = D.cost_model(8, batch_size=max(1, int(b0 / 2))).set_index("mode")
    assert faster.loc["expert parallel", "speedup"] > 1 > slower.loc["expert parallel", "speedup"]
    assert D.pays_from_batch(8, 768, 24576, 32, 16, bandwidth_bytes_per_s=1e6) == math.inf
    below = D.cost_model(8).attrs["ep_beats_dp_below_batch"]
    assert 0 < below < math.inf
    at = D.cost_model(8, batch_size=int(below * 0.9)).set_index("mode")["step_s"]
    assert at["expert parallel"] < at["data parallel"]
    with pytest.raises(ValueError, match="n_experts=16 is not divisible by n_gpus=3"):
        D.cost_model(3)


def test_expert_parallel_refuses_the_official_topk_order():
    from saelib import distributed, saes
    cfg = saes.build("scale", d_in=4, n_latents=8, k=2, n_experts=2, weight_before_topk=True).config
    with pytest.raises(ValueError, match="weight_before_topk"):
        distributed.check_expert_parallel(cfg, 2)
    distributed.check_expert_parallel(saes.build("scale", d_in=4, n_latents=8, k=2, n_experts=2).config, 2)


def test_paper_shape_and_modelled_speedup():
    from saelib import parallel_cost

    shape, batch = parallel_cost.paper_shape()
    assert (shape["d_in"], shape["n_latents"], shape["n_experts"], batch) == (768, 24576, 16, 8192)
    fast, slow = parallel_cost.modelled_speedup(8), parallel_cost.modelled_speedup(8, bandwidth_bytes_per_s=1e9)
    assert fast > slow > 0                       # a slower link models a smaller speed-up
    assert parallel_cost.modelled_speedup(1) == 1.0
