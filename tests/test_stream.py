"""saelib.stream: activations computed on the fly (same rows as a store, mixed in a bounded buffer);
activations.source; the store's shuffle buffer; the profile keys activations.mode / buffer_tokens."""
import pickle
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch

from saelib import activations as A
from saelib import config, stream as S

N_LAYER, D, T, V, BOS = 2, 16, 12, 50, 0
SITE = "blocks.1.resid_post"


@pytest.fixture(scope="module")
def model(tiny_gpt2):
    return tiny_gpt2(N_LAYER, D, T, V, BOS)


@pytest.fixture(scope="module")
def tokens(tiny_gpt2):
    return tiny_gpt2.tokens(30, T, V, BOS)


def stream(model, tokens, n=200, **kw):
    kw = {"buffer_tokens": 64, "model_batch_size": 4, "device": "cpu", **kw}
    return S.ActivationStream(model, tokens, SITE, n, **kw)


def same_rows(a, b):
    """Whether ``a`` and ``b`` hold the same rows as multisets (rows sorted by a random projection;
    position-1 rows of equal tokens are equal, so a store holds duplicates)."""
    w = torch.randn(a.shape[1], generator=torch.Generator().manual_seed(0))
    return len(a) == len(b) and torch.allclose(a[torch.argsort(a @ w)], b[torch.argsort(b @ w)], atol=1e-5)


def match(rows, ref):
    """Index of each row of ``rows`` in ``ref`` (nearest row) and the largest distance."""
    dist = torch.cdist(rows, ref, compute_mode="donot_use_mm_for_euclid_dist")
    return dist.argmin(1), dist.min(1).values.max().item()


def test_stream_serves_the_rows_of_a_store_each_once_per_epoch(model, tokens, tmp_cache):
    store = A.collect(model, tokens, SITE, n_tokens=200, batch_size=3)
    st = stream(model, tokens)
    assert len(st) == 200 and st.d == D
    ordered = torch.cat(list(st.batches(32, shuffle=False, drop_last=False)))
    torch.testing.assert_close(ordered, store.tensor(), rtol=1e-5, atol=1e-5)   # same rows, same order
    mixed = torch.cat(list(st.batches(32, seed=3, drop_last=False)))
    assert same_rows(mixed, store.tensor()) and not torch.allclose(mixed, store.tensor())  # a permutation
    dropped = list(st.batches(32, seed=3))
    assert len(dropped) == 200 // 32 and all(b.shape == (32, D) and b.dtype == torch.float32 for b in dropped)


def test_a_datasets_split_streams_like_its_tensor(model, tokens, tmp_cache):
    import datasets

    ds = datasets.Dataset.from_dict({"input_ids": tokens.tolist()})
    a, b = stream(model, tokens), stream(model, ds)
    assert a.meta["key"] == b.meta["key"]                            # same tokens hash, whatever the container
    assert all(torch.equal(x, y) for x, y in zip(a.batches(16, seed=1), b.batches(16, seed=1)))
    c = stream(model, np.asarray(tokens))
    assert c.meta["key"] == a.meta["key"]


def test_same_seed_same_batches_and_epochs(model, tokens, tmp_cache):
    st = stream(model, tokens)
    a, b = list(st.batches(16, seed=7)), list(st.batches(16, seed=7))
    assert len(a) == 12 and all(torch.equal(x, y) for x, y in zip(a, b))
    c = list(st.batches(16, seed=8))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    two = list(st.batches(16, seed=7, epochs=2))
    assert len(two) == 24 and all(torch.equal(x, y) for x, y in zip(two[:12], a))
    assert not torch.equal(torch.cat(two[12:]), torch.cat(a))       # epoch 1 draws another order
    inf = st.batches(16, epochs=None)
    assert len([next(inf) for _ in range(30)]) == 30                # more than two epochs
    again = stream(model, tokens, model_batch_size=7)                # forward batch size changes nothing
    torch.testing.assert_close(torch.cat(list(again.batches(16, seed=7))), torch.cat(a), rtol=1e-5, atol=1e-5)


def test_buffer_bounds_memory_and_mixes(model, tokens, tmp_cache):
    st = stream(model, tokens, n=300, buffer_tokens=48)
    for _ in st.batches(8, seed=0):
        assert st.peak_buffer_rows <= 48
    assert st.peak_buffer_rows == 48                                 # it did fill up, and never beyond
    with pytest.raises(ValueError, match="buffer_tokens >= 64"):
        next(st.batches(32))
    with pytest.raises(ValueError, match="larger than the stream"):
        next(stream(model, tokens, n=20).batches(32, shuffle=False))
    # the first batch already mixes rows of several sequences (in order it would hold 2)
    store = A.collect(model, tokens, SITE, n_tokens=300, batch_size=8)
    idx, err = match(next(st.batches(8, seed=0)), store.tensor())
    assert err < 1e-4 and len(set(np.asarray(store.seq)[idx.numpy()].tolist())) >= 4


def test_sample_is_the_stores_sample(model, tokens, tmp_cache):
    store = A.collect(model, tokens, SITE, n_tokens=250, batch_size=5)
    st = stream(model, tokens, n=250)
    s, idx = st.sample(40, seed=5, return_index=True)
    want, want_idx = store.sample(40, seed=5, return_index=True)
    assert torch.equal(idx, want_idx) and s.shape == (40, D)
    torch.testing.assert_close(s, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(st.sample(40, seed=5), s) and not torch.equal(st.sample(40, seed=6), s)
    assert len(st.sample(10_000, seed=0)) == 250


def test_key_names_what_changes_the_batches(model, tokens, tmp_cache):
    key = stream(model, tokens).meta["key"]
    assert stream(model, tokens).meta["key"] == key
    others = [stream(model, tokens, n=201), stream(model, tokens, buffer_tokens=96),
              stream(model, tokens, dtype="float16"), stream(model, tokens[1:])]
    others.append(S.ActivationStream(model, tokens, "blocks.0.resid_post", 200, buffer_tokens=64))
    assert len({o.meta["key"] for o in others} | {key}) == 6
    store = A.collect(model, tokens, SITE, n_tokens=200)
    assert store.meta["key"] != key                                  # a store's batches differ: other SAE cache entry


def test_too_few_tokens_raise_before_any_work(model, tokens, tmp_cache, monkeypatch):
    with monkeypatch.context() as mp:
        mp.setattr(S, "run_to_site", lambda *a: pytest.fail("ran the model"))
        mp.setattr(A, "run_to_site", lambda *a: pytest.fail("ran the model"))
        with pytest.raises(ValueError, match=r"only 22 activation rows .*n_tokens=100.*allow_repeat"):
            stream(model, tokens[:2], n=100)
        with pytest.raises(ValueError, match=r"only 22 activation rows .*n_tokens=100.*allow_repeat"):
            A.collect(model, tokens[:2], SITE, n_tokens=100)
        with pytest.raises(ValueError, match="site="):
            S.ActivationStream(model, tokens, "blocks.9.resid_post", 10)
    with pytest.warns(UserWarning, match="only 22"):
        st = stream(model, tokens[:2], n=100, allow_repeat=True, buffer_tokens=16)
    assert len(st) == 22 and len(list(st.batches(4, seed=0, epochs=3))) == 3 * 5


def test_bfloat16_stream_and_store_dtypes(model, tokens, tmp_cache):
    ref = stream(model, tokens)
    bf = stream(model, tokens, dtype="bfloat16")
    a, b = next(ref.batches(16, seed=1)), next(bf.batches(16, seed=1))
    assert b.dtype == torch.float32 and not torch.equal(a, b)
    torch.testing.assert_close(b, a, rtol=2**-7, atol=1e-3)          # bfloat16: 8 mantissa bits
    with pytest.raises(ValueError, match="numpy .* has no bfloat16"):
        A.collect(model, tokens, SITE, n_tokens=50, dtype="bfloat16")
    f16 = A.collect(model, tokens, SITE, n_tokens=50, dtype="float16")
    f32 = A.collect(model, tokens, SITE, n_tokens=50)
    assert f16.dtype == "float16" and f16.acts.nbytes * 2 == f32.acts.nbytes
    assert (f16.tensor() - f32.tensor()).abs().max() <= 2**-11 * f32.tensor().abs().max()
    assert not torch.equal(f16.tensor(), f32.tensor())


def test_fit_train_sae_and_sweep_take_a_stream(model, tokens, tmp_cache, one_thread, monkeypatch):
    from saelib import saes, sweep, train

    st = stream(model, tokens, n=300)
    sae = saes.build("topk", d_in=D, n_latents=32, k=4)
    hist = train.fit(sae, st, steps=5, batch_size=16, log_every=1)
    assert len(hist) >= 1 and np.isfinite(hist["mse"]).all()
    run = sweep.train_sae(st, "topk", n_latents=32, k=4, steps=5, batch_size=16)
    assert not run.cached and sweep.train_sae(st, "topk", n_latents=32, k=4, steps=5, batch_size=16).cached
    runs = sweep.sweep(st, [{"kind": "topk", "n_latents": 32, "k": 4}, {"kind": "relu", "n_latents": 32}],
                       steps=5, batch_size=16, workers=1)
    assert [r.cached for r in runs] == [True, False]
    # what a worker process does: rebuild from portable(), here with this process's copy forgotten
    opener, state = st.portable()
    monkeypatch.setattr(S, "_LIVE", {})
    again = opener(pickle.loads(ForkingPickler.dumps(state)))
    assert again.meta["key"] == st.meta["key"] and again.model is not st.model
    assert all(torch.equal(x, y) for x, y in zip(again.batches(16, seed=2), st.batches(16, seed=2)))
    assert not (tmp_cache / "streams").exists() and not (tmp_cache / "activations").exists()


def test_a_run_longer_than_a_non_repeating_stream_is_refused_before_training(model, tokens, tmp_cache):
    from saelib import sweep

    st = stream(model, tokens, n=300)                  # allow_repeat=False (the paper profile's setting)
    assert st.allow_repeat is False
    with pytest.raises(ValueError, match="320 rows exceed the 300 rows"):
        sweep.train_sae(st, "topk", n_latents=32, k=4, steps=20, batch_size=16)
    with pytest.raises(ValueError, match="allow_repeat"):
        sweep.sweep(st, [{"kind": "topk", "n_latents": 32, "k": 4}], steps=20, batch_size=16, workers=1)
    assert not (tmp_cache / "saes").exists() or not any((tmp_cache / "saes").iterdir())
    sweep.train_sae(st, "topk", n_latents=32, k=4, steps=18, batch_size=16)    # 288 rows: fits


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_portable_copies_nothing_to_disk_and_rebuilds_the_same_stream(model, tokens, tmp_cache, tmp_path,
                                                                     monkeypatch):
    import datasets

    from saelib import lm

    st = stream(model, tokens, n=150)
    assert st.portable()[0](st.portable()[1]) is st                  # in this process: the live stream itself
    ds = datasets.Dataset.from_dict({"input_ids": tokens.numpy().astype(np.int32)})
    ds.save_to_disk(str(tmp_path / "ds"))
    ds = datasets.load_from_disk(str(tmp_path / "ds"))               # memory-mapped arrow files
    np.save(tmp_path / "tok.npy", tokens.numpy())
    mm = np.load(tmp_path / "tok.npy", mmap_mode="r")
    model.save_pretrained(str(tmp_path / "lm"))
    named = lm.load_model(tmp_path / "lm", "cpu")                    # name_or_path: the saved folder
    cases = {"tensor": (model, tokens), "dataset": (model, ds), "memmap": (model, mm),
             "view": (model, mm[2:]), "array": (model, np.asarray(tokens.numpy())), "name": (named, tokens)}
    before = _files(tmp_path)
    blobs = {}
    for label, (m, t) in cases.items():
        st = stream(m, t, n=150)
        opener, state = st.portable()
        blobs[label] = ForkingPickler.dumps(state)                  # what a worker receives
        kind = {"view": "tensor", "array": "tensor", "name": "tensor"}.get(label, label)
        assert state["tokens"][0] == kind, label
        assert state["model"][0] == ("name" if label == "name" else "module"), label
        if kind == "tensor":                  # only the rows the stream reads, in the smallest dtype (ids < 50)
            assert len(state["tokens"][1]) == st.n_seq < len(t) and state["tokens"][1].dtype == torch.uint8
        monkeypatch.setattr(S, "_LIVE", {})                          # as in a fresh worker process
        again = opener(pickle.loads(blobs[label]))
        assert again is not st and again.meta == st.meta and again.model is not st.model, label
        assert again.n == st.n and torch.equal(again._used, st._used), label
        assert all(torch.equal(x, y) for x, y in zip(again.batches(16, seed=1), st.batches(16, seed=1))), label
        torch.testing.assert_close(again.sample(20, seed=4), st.sample(20, seed=4))
    weights = 4 * sum(p.numel() for p in model.parameters())
    assert all(len(b) < weights for b in blobs.values())             # tensors went through shared memory
    assert len(blobs["name"]) < len(blobs["tensor"])                 # by name: not even the module
    assert _files(tmp_path) == before                                # nothing written, no streams folder
    assert not (tmp_cache / "streams").exists() and not (tmp_cache / "activations").exists()
    with torch.no_grad():                                            # weights changed after loading: not by name
        next(named.parameters()).add_(1.0)
    assert stream(named, tokens, n=150).portable()[1]["model"][0] == "module"
    assert [S._narrow_int(torch.tensor(v)) for v in ([0, 255], [0, 50256], [-1, 5], [0, 2**40])] == \
        [torch.uint8, torch.uint16, torch.int32, torch.int64]
    with pytest.raises(ValueError, match="not reopened from a folder"):
        S.ActivationStream(str(tmp_path))


def test_sweep_in_two_worker_processes_writes_no_stream_copy(model, tokens, tmp_path, monkeypatch):
    from saelib import sweep

    specs = [{"kind": "topk", "n_latents": 32, "k": 4}, {"kind": "relu", "n_latents": 32}]
    out = {}
    for workers in (1, 2):
        monkeypatch.setenv("SAELIB_CACHE", str(tmp_path / f"w{workers}"))
        st = stream(model, tokens, n=300)
        out[workers] = sweep.sweep(st, specs, steps=5, batch_size=16, workers=workers)
        assert not any(r.cached for r in out[workers])
        root = tmp_path / f"w{workers}"
        assert (root / "saes").is_dir() and not (root / "streams").exists() and not (root / "activations").exists()
    for a, b in zip(out[1], out[2]):
        assert a.path.name == b.path.name
        for (n, x), (_, y) in zip(a.sae.state_dict().items(), b.sae.state_dict().items()):
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_stay_on_the_device(model, tokens, tmp_cache):
    st = stream(model, tokens, device="cuda")
    b = next(st.batches(16, device="cuda"))
    assert b.is_cuda and st._forward(tokens[:1]).is_cuda
    model.cpu()


def test_store_small_buffer_mixes_many_sequences(model, tokens, tmp_cache):
    store = A.collect(model, tokens, SITE, n_tokens=300, batch_size=8)
    seq, full = np.asarray(store.seq), store.tensor()
    store.ram_limit_bytes = 64 * D * 8                               # a buffer of 64 rows: 4 chunks of 16
    assert store.ram_limit_bytes < len(store) * D * 8
    batches = list(store.batches(16, seed=0))
    for b in batches[:4]:                                            # 16 rows from 4 places: >= 4 sequences
        idx, err = match(b, full)
        assert err < 1e-6 and len(set(seq[idx.numpy()].tolist())) >= 4
    ordered = next(store.batches(16, shuffle=False))
    assert len(set(seq[match(ordered, full)[0].numpy()].tolist())) <= 3


def test_source_switches_on_the_profile(model, tokens, tmp_cache):
    cfg = config.load_profile("quick", {"site": SITE, "activations": {"n_tokens": 120, "buffer_tokens": 32}})
    got = A.source(cfg, model, tokens, device="cpu")
    assert isinstance(got, A.ActivationStore) and len(got) == 120 and got.ram_limit_bytes == 32 * D * 8
    cfg = config.load_profile("quick", {"site": SITE, "activations": {"n_tokens": 120, "mode": "stream",
                                                                      "buffer_tokens": 32}})
    got = A.source(cfg, model, tokens, device="cpu")
    assert isinstance(got, S.ActivationStream) and len(got) == 120 and got.buffer_tokens == 32
    with pytest.raises(ValueError, match="only"):
        A.source(cfg, model, tokens[:2], device="cpu")


@pytest.mark.parametrize("over, msg", [
    ({"mode": "disk"}, r"activations.mode='disk' is not allowed; choose one of \['store', 'stream'\]"),
    ({"dtype": "bfloat16"}, r"activations.dtype='bfloat16' is not allowed with activations.mode='store'"),
    ({"mode": "stream"}, r"activations.buffer_tokens=None .* not allowed with activations.mode='stream'"),
    ({"buffer_tokens": 0}, r"activations.buffer_tokens=0 is not allowed; expected a positive integer or null"),
    ({"buffer_tokens": "many"}, r"activations.buffer_tokens='many' is not allowed"),
    ({"allow_repeat": "yes"}, r"activations.allow_repeat='yes' is not allowed; expected true/false"),
])
def test_config_checks_the_new_keys(over, msg):
    with pytest.raises(ValueError, match=msg):
        config.load_profile("quick", {"activations": over})


def test_profiles_modes_and_paper_numbers():
    assert [config.load_profile(p)["activations"]["mode"] for p in ("quick", "full", "paper")] == \
        ["store", "store", "stream"]
    assert config.load_profile("quick", {"activations": {"mode": "stream", "buffer_tokens": 4096,
                                                         "dtype": "bfloat16"}})["activations"]["dtype"] == "bfloat16"
    paper = config.load_profile("paper")
    acts, d = paper["activations"], paper["lm"]["n_embd"]
    assert acts["buffer_tokens"] * d * 2 < 8 * 2**30 < acts["n_tokens"] * d * 2   # buffer fits a GPU, a store not
    tokens_per_doc = 1100                                              # OpenWebText, GPT-2 tokenizer (~1.1k per document)
    bud = paper["chapter01"]["budget"]
    need = acts["n_tokens"] * max(1, bud.get("factor", 1)) if isinstance(bud, dict) else acts["n_tokens"]
    assert paper["data"]["max_docs_per_domain"] * tokens_per_doc * 0.9 > need    # 90% train split, no repeats
    assert paper["data"]["corpus"].endswith("@refs/convert/parquet")
