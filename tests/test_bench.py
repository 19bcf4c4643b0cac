"""``python -m saelib.bench --device ...``: the device flag is checked before any work, and
the CLI runs one training step per SAE kind (tiny shapes) on the CPU; the CUDA run is
skipped without a GPU. (The measurement itself is tested in tests/test_kernels.py.)"""
import pytest
import torch

from saelib import bench

NO_CUDA = "no CUDA device: the CUDA benchmark runs only on a machine with a GPU"
KIND_ROWS = ["topk", "batchtopk", "relu", "gated", "switch16", "scale16x2"]   # every saes.KINDS kind
RUN = bench.run            # the real one (some tests replace bench.run)
TINY = ["--d", "16", "--n-latents", "128", "--k", "4", "--batch", "64"]


@pytest.fixture
def no_run(monkeypatch):
    """bench.run replaced by a recorder: argument errors must stop main() before it."""
    calls = []
    monkeypatch.setattr(bench, "run", lambda *a, **kw: calls.append((a, kw)) or pytest.fail("bench.run was called"))
    return calls


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_a_gpu_is_a_clear_error_before_any_work(device, monkeypatch, capsys, no_run):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--device", device, "--quick"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"--device {device}: no CUDA device is available" in err
    assert not no_run
    with pytest.raises(ValueError, match="no CUDA device is available"):   # the library call says it too
        RUN("quick", device=device)


def test_a_cuda_index_beyond_the_gpus_is_an_error(monkeypatch, capsys, no_run):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(SystemExit):
        bench.main(["--device", "cuda:2", "--quick"])
    assert "--device cuda:2: there are only 2 CUDA device(s)" in capsys.readouterr().err
    assert bench.check_device("cuda:1") == torch.device("cuda:1")


@pytest.mark.parametrize("device,why", [("nope", "not a valid torch device"), ("mps", "runs on 'cpu', 'cuda")])
def test_unknown_devices_are_refused(device, why, capsys, no_run):
    with pytest.raises(SystemExit):
        bench.main(["--device", device])
    assert why in capsys.readouterr().err


def test_device_default_is_cpu_and_auto_follows_cuda(monkeypatch):
    seen = []
    monkeypatch.setattr(bench, "run", lambda shape, **kw: seen.append(kw["device"]) or _stop())
    for argv in ([], ["--device", "auto"]):
        with pytest.raises(_Stop):
            bench.main(["--quick", *argv])
    assert seen == ["cpu", "auto"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.check_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert bench.check_device("auto") == torch.device("cuda")


class _Stop(Exception):
    pass


def _stop():
    raise _Stop


def test_cli_times_one_step_per_kind_on_the_cpu(capsys):
    """The code path of ``--device cuda`` minus the device: every kind, tiny shapes."""
    bench.main(["--device", "cpu", "--quick", "--no-memory", "--threads", str(torch.get_num_threads()),
                "--rows", ",".join(KIND_ROWS), *TINY])
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("== quick"))
    assert "d=16 n_latents=128 k=4 batch=64 | cpu," in header and "TF32" not in header
    first_words = [line.split()[0] for line in out.split(header, 1)[1].splitlines() if line.strip()]
    assert set(KIND_ROWS) <= set(first_words), out
    assert "where the time goes" in out
    df = bench.run("quick", rows=KIND_ROWS, device="cpu", d=16, n_latents=128, k=4, batch=64, steps=1,
                   rounds=1, warmup=1, memory=False, progress=False)
    assert list(df["row"]) == KIND_ROWS and (df["s_per_step"] > 0).all()
    assert "s_per_step_sectioned" not in df and df.attrs["device"] == "cpu" and "gpu" not in df.attrs


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_run_times_every_kind(capsys):
    df = bench.run("quick", rows=KIND_ROWS, device="cuda", steps=2, rounds=2, warmup=1, progress=False)
    assert list(df["row"]) == KIND_ROWS and df.attrs["device"].startswith("cuda") and df.attrs["gpu"]
    assert (df["s_per_step"] > 0).all() and (df["s_per_step_sectioned"] > 0).all() and (df["peak_mem_mb"] >= 0).all()
    bd = bench.breakdown(df)
    assert list(bd.index) == ["topk", "batchtopk", "switch16", "scale16x2"]
    assert (bd["step"] * 1e-3 == df.set_index("row").loc[bd.index, "s_per_step_sectioned"]).all()
    bench.main(["--device", "cuda", "--quick", "--rows", "topk,switch16", "--no-memory"])
    assert "TF32 matmul" in capsys.readouterr().out
