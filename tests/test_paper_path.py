"""The paper path (issue 14): hub corpora as the hub serves them today (parquet, streaming),
a loaded subject model without training history, resumable SAE trainings in a sweep."""
import math
import random

import pytest

from saelib import data


# ----------------------------------------------------------------------------- corpus: parquet, streaming
def write_parquet(folder, n_docs=60, n_files=3, seed=0):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    words = "the king queen lord speak thou hath night crown sword def return import class".split()
    folder.mkdir(parents=True, exist_ok=True)
    per = n_docs // n_files
    for f in range(n_files):
        texts = [" ".join(rng.choice(words) for _ in range(40)) + f" doc {f * per + i}." for i in range(per)]
        pq.write_table(pa.table({"id": list(range(f * per, (f + 1) * per)), "text": texts}),
                       folder / f"train-{f:05d}.parquet")
    return f"hf:parquet:{folder}/*.parquet"


def test_parse_hf_specs():
    p = data.parse_hf("Skylion007/openwebtext@refs/convert/parquet")
    assert (p["path"], p["config"], p["revision"], p["domain"], p["remote"]) == (
        "Skylion007/openwebtext", None, "refs/convert/parquet", "openwebtext", True)
    p = data.parse_hf("Skylion007/openwebtext:plain_text@refs/convert/parquet")
    assert (p["config"], p["revision"], p["domain"]) == ("plain_text", "refs/convert/parquet", "openwebtext-plain_text")
    p = data.parse_hf("parquet:hf://datasets/Skylion007/openwebtext@refs%2Fconvert%2Fparquet/plain_text/partial-train/*.parquet")
    assert (p["path"], p["domain"], p["remote"]) == ("parquet", "openwebtext", True)
    p = data.parse_hf("parquet:/data/owt/*.parquet")
    assert (p["data_files"], p["domain"], p["remote"]) == ("/data/owt/*.parquet", "owt", False)
    with pytest.raises(ValueError, match="name the files"):
        data.parse_hf("parquet:")


def test_local_parquet_corpus_loads_and_streams(tmp_cache, tmp_path, monkeypatch):
    import datasets

    spec = write_parquet(tmp_path / "owt")
    full = data.load_corpus(spec, max_docs_per_domain=30, seed=0)             # local: loaded, not streamed
    assert sum(map(len, full.values())) == 30 and set(data.column(full["train"], "domain")) == {"owt"}
    assert all(t.startswith(("the", "king", "queen", "lord", "speak", "thou", "hath", "night", "crown", "sword",
                             "def", "return", "import", "class")) for t in data.column(full["train"], "text"))
    everything = data.load_corpus(spec, seed=0)
    assert sum(map(len, everything.values())) == 60

    streamed = data.load_corpus(spec, max_docs_per_domain=30, seed=0, streaming=True)
    texts = [t for s in streamed.values() for t in data.column(s, "text")]
    assert len(texts) == 30 == len(set(texts)) and set(data.column(streamed["train"], "domain")) == {"owt"}
    all_texts = {t for s in everything.values() for t in data.column(s, "text")}
    assert set(texts) <= all_texts
    # the streamed sample is cached: a second call does not touch the dataset again
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("streamed again instead of the cache"))
    again = data.load_corpus(spec, max_docs_per_domain=30, seed=0, streaming=True)
    assert data.corpus_hash(again) == data.corpus_hash(streamed)
    with pytest.raises(ValueError, match="max_docs_per_domain"):
        data.load_corpus(spec, streaming=True)


def test_stream_options_reach_load_dataset(tmp_cache, tmp_path, monkeypatch):
    """A hub name with a revision streams its parquet conversion (config -> data_dir)."""
    import datasets

    local = datasets.load_dataset("parquet", data_files=write_parquet(tmp_path / "x")[len("hf:parquet:"):],
                                  streaming=True)
    calls = []

    def fake(path, name=None, **kw):
        calls.append((path, name, kw))
        return local
    monkeypatch.setattr(datasets, "load_dataset", fake)
    dsd = data.load_corpus("hf:Skylion007/openwebtext:plain_text@refs/convert/parquet", max_docs_per_domain=12)
    assert calls == [("Skylion007/openwebtext", None, {"revision": "refs/convert/parquet", "data_dir": "plain_text",
                                                       "streaming": True})]
    assert sum(map(len, dsd.values())) == 12 and set(data.column(dsd["train"], "domain")) == {"openwebtext-plain_text"}


def test_script_dataset_names_the_parquet_alternative(tmp_cache, tmp_path):
    folder = tmp_path / "owtscript"
    folder.mkdir()
    (folder / "owtscript.py").write_text("import datasets\n")
    with pytest.raises(ValueError, match=r"script dataset.*refs/convert/parquet.*hf:parquet:"):
        data.load_corpus(f"hf:{folder}")


# ----------------------------------------------------------------------------- sweep: resumable SAE trainings
def _gauss(n=2048, d=16, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    D = torch.nn.functional.normalize(torch.randn(32, d, generator=g), dim=-1)
    codes = torch.rand(n, 32, generator=g) * (torch.rand(n, 32, generator=g) < 0.1)
    return codes @ D + 0.01 * torch.randn(n, d, generator=g)


def test_checkpoint_steps_policy():
    from saelib import sweep

    assert sweep.checkpoint_steps(100_000) == 5000 and sweep.checkpoint_steps(2000) == 100
    assert sweep.checkpoint_steps(400) is None and sweep.checkpoint_steps(400, None) is None
    assert sweep.checkpoint_steps(400, 0) is None and sweep.checkpoint_steps(400, 7) == 7
    with pytest.raises(ValueError, match="checkpoint_every"):
        sweep.checkpoint_steps(400, -1)


@pytest.mark.parametrize("kind,build", [("switch", dict(n_latents=64, k=4, n_experts=4)),
                                        ("batchtopk", dict(n_latents=64, k=4))])
def test_interrupted_train_sae_resumes_to_the_uninterrupted_result(kind, build, tmp_path, monkeypatch, one_thread,
                                                                    interrupt_training_at):
    import torch

    from saelib import sweep, train

    x = _gauss()
    kw = dict(steps=30, batch_size=128, seed=3, checkpoint_every=5, **build)
    monkeypatch.setenv("SAELIB_CACHE", str(tmp_path / "ref"))
    ref = sweep.train_sae(x, kind, **kw)                      # uninterrupted, in its own cache

    monkeypatch.setenv("SAELIB_CACHE", str(tmp_path / "run"))
    real_step = interrupt_training_at(17)
    with pytest.raises(KeyboardInterrupt):
        sweep.train_sae(x, kind, **kw)
    ckpts = list((tmp_path / "run" / "saes").glob("*.ckpt"))
    assert len(ckpts) == 1 and torch.load(ckpts[0], weights_only=False)["step"] == 15   # last multiple of 5
    entry = ckpts[0].with_name(ckpts[0].name[:-len(".ckpt")])
    assert not entry.exists()                                  # no half-written entry

    steps_run = []

    def counted(sae, opt, xb, lr, aux_k, coef, dead, step):
        steps_run.append(step)
        return real_step(sae, opt, xb, lr, aux_k, coef, dead, step)

    monkeypatch.setattr(train, "_train_step", counted)
    run = sweep.train_sae(x, kind, **kw)                       # the same call resumes
    assert steps_run == list(range(15, 30)) and run.info.get("resumed") is True
    assert run.path == entry and entry.exists() and not ckpts[0].exists()   # checkpoint removed
    for (k, a), (_, b) in zip(ref.sae.state_dict().items(), run.sae.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)
    cols = [c for c in ref.history.columns if c != "wall_time"]
    pd_equal = ref.history[cols].reset_index(drop=True).equals(run.history[cols].reset_index(drop=True))
    assert pd_equal
    assert math.isfinite(run.seconds) and run.seconds > 0
    again = sweep.train_sae(x, kind, **kw)                     # and is a plain cache hit afterwards
    assert again.cached and torch.equal(again.sae.W_dec, run.sae.W_dec)


# ----------------------------------------------------------------------------- device: TF32 on CUDA
@pytest.fixture
def tf32_restored():
    import torch

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_resolve_device_turns_tf32_on_for_cuda_only(tf32_restored, monkeypatch):
    import torch

    from saelib import utils

    assert utils.resolve_device("cpu").type == "cpu" and not torch.backends.cuda.matmul.allow_tf32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert utils.resolve_device("auto").type == "cpu" and not torch.backends.cuda.matmul.allow_tf32
    monkeypatch.setenv("SAELIB_TF32", "0")
    assert utils.resolve_device("cuda").type == "cuda" and not torch.backends.cuda.matmul.allow_tf32
    monkeypatch.delenv("SAELIB_TF32")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert utils.resolve_device("auto").type == "cuda"
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    with pytest.raises(ValueError, match="device="):
        utils.resolve_device("gpu0")
