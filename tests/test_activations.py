"""saelib.activations: sites, capture/splice hooks, the on-disk store."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from saelib import activations as A

N_LAYER, D, T, V, BOS = 3, 16, 12, 50, 0


@pytest.fixture(scope="module")
def model(tiny_gpt2):
    return tiny_gpt2(N_LAYER, D, T, V, BOS)


@pytest.fixture(scope="module")
def tokens(tiny_gpt2):
    return tiny_gpt2.tokens(20, T, V, BOS)


def grab(model, site, x):
    with A.capture(model, site) as acts:
        model(input_ids=x)
    assert len(acts) == 1
    return acts[0]


def lm_loss(model, x):
    logits = model(input_ids=x).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1)).item()


@torch.no_grad()
def test_every_site_matches_hidden_states_and_block_algebra(model, tokens):
    x = tokens[:4]
    hs = model(input_ids=x, output_hidden_states=True).hidden_states
    assert len(hs) == N_LAYER + 1
    for i in range(N_LAYER):
        s = {k: grab(model, f"blocks.{i}.{k}", x) for k in A.SITES}
        assert all(v.shape == (4, T, D) for v in s.values())
        torch.testing.assert_close(s["resid_pre"], hs[i], rtol=0, atol=0)
        if i < N_LAYER - 1:  # HF applies ln_f to the last hidden state
            torch.testing.assert_close(s["resid_post"], hs[i + 1], rtol=0, atol=0)
        else:
            torch.testing.assert_close(model.transformer.ln_f(s["resid_post"]), hs[-1])
        blk = model.transformer.h[i]
        torch.testing.assert_close(s["ln1"], blk.ln_1(s["resid_pre"]))
        torch.testing.assert_close(s["ln2"], blk.ln_2(s["resid_pre"] + s["attn_out"]))
        torch.testing.assert_close(s["resid_post"], s["resid_pre"] + s["attn_out"] + s["mlp_out"])
    torch.testing.assert_close(grab(model, "transformer.h.1.mlp", x), grab(model, "blocks.1.mlp_out", x))
    torch.testing.assert_close(A.run_to_site(model, x, "blocks.-1.resid_pre"), hs[N_LAYER - 1])


@pytest.mark.parametrize("site", ["blocks.3.resid_post", "blocks.0.resid", "resid_post", "transformer.h.9", ""])
def test_bad_site_names_parameter_and_forms(model, site):
    with pytest.raises(ValueError, match=r"site=.*resid_pre.*resid_post"):
        A.resolve_site(model, site)


@torch.no_grad()
def test_splice_identity_zero_and_cleanup(model, tokens):
    n_hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())  # noqa: E731
    before, base = n_hooks(), lm_loss(model, tokens)
    for site in ("blocks.1.resid_pre", "blocks.1.attn_out", "blocks.2.resid_post"):
        with A.splice(model, site, lambda a: a.clone()):
            assert abs(lm_loss(model, tokens) - base) < 1e-6
        with A.splice(model, site, torch.zeros_like):
            assert abs(lm_loss(model, tokens) - base) > 1e-3
        assert abs(lm_loss(model, tokens) - base) == 0  # hook removed on exit
    with pytest.raises(RuntimeError, match="boom"):
        with A.splice(model, "blocks.0.mlp_out", torch.zeros_like):
            raise RuntimeError("boom")
    assert n_hooks() == before  # transformers' own hooks stay, ours are gone
    assert lm_loss(model, tokens) == base


def test_collect_skips_bos_records_positions_and_caches(model, tokens, tmp_cache, monkeypatch):
    site = "blocks.1.resid_post"
    store = A.collect(model, tokens, site, n_tokens=100, dtype="float16", batch_size=3)
    assert len(store) == 100 and store.d == D and store.dtype == "float16"
    assert (store.pos > 0).all() and (store.tokens != BOS).all()
    ref = grab(model, site, tokens).detach()
    want = ref[torch.from_numpy(np.asarray(store.seq, np.int64)), torch.from_numpy(np.asarray(store.pos, np.int64))]
    assert torch.allclose(store.tensor(), want, atol=1e-2, rtol=1e-2)
    assert np.array_equal(store.tokens, tokens.numpy()[store.seq, store.pos])
    # rows are in (sequence, position) order: 11 per sequence, 10 for sequence 3 (a mid-sequence BOS)
    assert np.bincount(store.seq)[:9].tolist() == [11, 11, 11, 10, 11, 11, 11, 11, 11]
    with monkeypatch.context() as mp:
        mp.setattr(A, "run_to_site", lambda *a: pytest.fail("recomputed a cached store"))
        again = A.collect(model, tokens, site, n_tokens=100, dtype="float16", batch_size=3)
    assert again.path == store.path and str(store.path).startswith(str(tmp_cache))
    with pytest.raises(ValueError, match=r"only 22 activation rows .*n_tokens=100.*allow_repeat=True"):
        A.collect(model, tokens[:2], site, n_tokens=100)
    with pytest.warns(UserWarning, match="only"):
        small = A.collect(model, tokens[:2], site, n_tokens=100, allow_repeat=True)
    assert str(small.path).startswith(str(tmp_cache))
    assert len(small) == 22 and small.dtype == "float32"
    with pytest.raises(ValueError, match="dtype"):
        A.collect(model, tokens, site, n_tokens=10, dtype="int8")


@pytest.mark.parametrize("ram", [2**30, 16 * 8 * 64])  # everything in RAM / buffers of 2 chunks of 32 rows
def test_batches_deterministic_and_cover_every_row(model, tokens, tmp_cache, ram):
    store = A.collect(model, tokens, "blocks.0.mlp_out", n_tokens=200, batch_size=8)
    store.ram_limit_bytes = ram
    full = store.tensor() if ram > 2**20 else torch.from_numpy(np.array(store.acts))
    b1 = list(store.batches(32, seed=1))
    assert len(b1) == 200 // 32 and all(b.shape == (32, D) and b.dtype == torch.float32 for b in b1)
    assert all(torch.equal(a, b) for a, b in zip(b1, store.batches(32, seed=1)))
    assert not torch.equal(b1[0], next(iter(store.batches(32, seed=2))))
    rows = torch.cat(list(store.batches(32, seed=1, drop_last=False)))
    assert len(rows) == 200
    key = lambda t: t[torch.argsort(t[:, 0])]  # noqa: E731 - order rows for a set comparison
    assert torch.equal(key(rows), key(full))
    ordered = torch.cat(list(store.batches(50, shuffle=False)))
    assert torch.equal(ordered, full)
    next(store.batches(50, shuffle=False)).zero_()  # batches are fresh tensors, not views of a cache
    assert torch.equal(next(store.batches(50, shuffle=False)), full[:50])
    two = list(store.batches(32, seed=1, epochs=2))
    assert len(two) == 2 * 6 and all(torch.equal(a, b) for a, b in zip(two, b1))
    inf = store.batches(64, epochs=None)
    assert len([next(inf) for _ in range(10)]) == 10


def test_sample_tensor_limit_and_site_helper(model, tokens, tmp_cache):
    store = A.collect(model, tokens, "blocks.2.ln2", n_tokens=150)
    s, idx = store.sample(40, seed=5, return_index=True)
    assert s.shape == (40, D) and len(set(idx.tolist())) == 40
    assert torch.equal(s, store.tensor()[idx]) and torch.equal(s, store.sample(40, seed=5))
    store.ram_limit_bytes = 1000
    with pytest.raises(ValueError, match="ram_limit_bytes"):
        store.tensor()
    assert A.activation_site({"site": "blocks.2.resid_post"}) == "blocks.2.resid_post"
    assert A.activation_site({"site": "mlp_out", "layer": 1}) == "blocks.1.mlp_out"
    with pytest.raises(ValueError, match="site"):
        A.activation_site({"layer": 1})


def _all_batches(store, device):
    """Every kind of batch: shuffled (all in RAM and chunked), ordered, a short last batch; float16 and float32."""
    out = []
    for ram in (2**30, 16 * 8 * 64):
        store.ram_limit_bytes = ram
        for kw in ({"seed": 1}, {"seed": 1, "drop_last": False}, {"shuffle": False, "drop_last": False}):
            out += list(store.batches(32, device=device, epochs=2, **kw))
    return out


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_batches_cuda_branch_serves_the_cpu_rows(model, tokens, tmp_cache, monkeypatch, dtype):
    """On CUDA, batches() gathers into page-locked memory (:func:`A._pinned_to`); run that branch on the
    CPU (pinning and the device faked) and check it serves exactly the CPU batches."""
    store = A.collect(model, tokens, "blocks.0.mlp_out", n_tokens=200, batch_size=8, dtype=dtype)
    ref = _all_batches(store, "cpu")
    real_pinned, real_empty, seen = A._pinned_to, torch.empty, []

    def pinned_on_cpu(buf, idx, dev):
        assert dev.type == "cuda"
        seen.append(len(idx))
        return real_pinned(buf, idx, torch.device("cpu"))

    monkeypatch.setattr(A, "resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(A, "_pinned_to", pinned_on_cpu)
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **kw: real_empty(*a, **kw))
    got = _all_batches(store, "cuda")
    assert len(seen) == len(got) == len(ref) and 200 - 6 * 32 in seen     # the short last batch too
    assert all(g.dtype == torch.float32 and torch.equal(g, r) for g, r in zip(got, ref))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_batches_on_cuda_equal_cpu_batches(model, tokens, tmp_cache, dtype):
    store = A.collect(model, tokens, "blocks.0.mlp_out", n_tokens=200, batch_size=8, dtype=dtype)
    ref = _all_batches(store, "cpu")
    got = _all_batches(store, "cuda")
    assert len(got) == len(ref) and all(g.is_cuda and g.dtype == torch.float32 for g in got)
    assert all(torch.equal(g.cpu(), r) for g, r in zip(got, ref))
