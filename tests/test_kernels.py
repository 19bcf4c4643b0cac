"""Each fast kernel equals its dense reference twin: forward outputs and every gradient
(x, W_enc, b_enc, W_dec, values), in float64, on the edge cases the SAEs hit (empty
experts, one-row batches, ties, n_active in {1, 2, 4}, a non-leaf W_enc).

Every kernel test takes the ``device`` fixture: it runs on the CPU and, when a CUDA
device is present, again on CUDA (kernel and reference both on that device; the inputs
are drawn on the CPU and moved, so both devices see the same numbers). Without CUDA the
``cuda`` variants are skipped with the reason below."""
import pytest
import torch
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from saelib import kernels as K

F64 = torch.float64
NO_CUDA = "no CUDA device: the CUDA variant of this test runs only on a machine with a GPU"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA))]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def _leaf(*shape, seed, scale=1.0, dtype=F64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=dtype) * scale).to(device).requires_grad_()


def _sorted(values, indices):
    """Canonical order (by index) so unsorted TopK outputs compare."""
    order = indices.argsort(-1)
    return values.gather(-1, order), indices.gather(-1, order)


def _run(encode, decode, leaves, loss_seed=0):
    """Encode + decode + a generic loss; returns forward outputs and all leaf grads."""
    vals, idx = encode()
    x_hat = decode(vals, idx)
    w = torch.randn(x_hat.shape, generator=torch.Generator().manual_seed(loss_seed), dtype=x_hat.dtype).to(x_hat.device)
    ((x_hat * w).sum() + (x_hat ** 2).sum() + vals.sum()).backward()
    grads = [None if t.grad is None else t.grad.clone() for t in leaves]
    assert vals.device == idx.device == x_hat.device == leaves[0].device     # nothing falls back to the host
    assert all(g is None or g.device == t.device for g, t in zip(grads, leaves))
    for t in leaves:
        t.grad = None
    return (*_sorted(vals.detach(), idx), x_hat.detach()), grads


def _assert_same(fast, ref):
    (fv, fi, fx), fg = fast
    (rv, ri, rx), rg = ref
    assert torch.equal(fi, ri)
    assert_close(fv, rv)
    assert_close(fx, rx)
    for a, b in zip(fg, rg):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(a, b)


# ---------------------------------------------------------------------------
# dense TopK encoder + sparse decoder
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("fold", [False, True])   # b_pre subtracted outside, or passed to the kernel
@pytest.mark.parametrize("B,d,n,k,bias", [(37, 12, 96, 7, True), (1, 8, 40, 5, False), (64, 16, 64, 64, True)])
def test_topk_encode_and_sparse_decode_match_reference(B, d, n, k, bias, fold, device):
    x0, b_pre = _leaf(B, d, seed=1, device=device), _leaf(d, seed=2, device=device)
    W_enc, W_dec = _leaf(n, d, seed=3, device=device), _leaf(n, d, seed=4, device=device)
    b_enc = _leaf(n, seed=5, scale=0.1, device=device) if bias else None
    leaves = [t for t in (x0, b_pre, W_enc, b_enc, W_dec) if t is not None]

    def go(enc, dec):
        if fold:
            return _run(lambda: enc(x0, W_enc, b_enc, k, b_pre=b_pre), lambda v, i: dec(v, i, W_dec), leaves)
        return _run(lambda: enc(x0 - b_pre, W_enc, b_enc, k), lambda v, i: dec(v, i, W_dec), leaves)

    _assert_same(go(K.topk_encode, K.sparse_decode),
                 go(K.topk_encode_reference, K.sparse_decode_reference))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("R,n,k,s1,s2", [(37, 2048, 8, 4, 4), (5, 16384, 16, 8, 8), (9, 512, 16, 4, 1),
                                         (6, 96, 3, 2, 2), (4, 100, 3, None, None)])
def test_group_topk_is_an_exact_topk(R, n, k, s1, s2, ties, device):
    """The group-max TopK (one or two levels, and the policy ``_topk`` that picks one)
    returns the TopK multiset at k distinct positions, with and without ties."""
    pre = torch.randn(R, n, generator=torch.Generator().manual_seed(n + k), dtype=F64).to(device)
    if ties:
        pre = (pre * 2).round()                      # few distinct values: many ties
        pre[0] = 0
    ref = pre.topk(k, dim=-1).values.sort(-1).values
    runs = [K._topk(pre, k)] + ([K._group_topk(pre, k, s1, s2)] if s1 else [])
    for vals, idx in runs:
        assert all(len(set(row.tolist())) == k for row in idx)
        assert torch.equal(pre.gather(1, idx), vals)
        assert torch.equal(vals.sort(-1).values, ref)


def test_topk_encode_in_chunks_matches_reference(monkeypatch, device):
    """CPU path: several row chunks through the scratch buffer, group TopK (n >= 64 k);
    on CUDA the same shape in one block with torch.topk."""
    monkeypatch.setattr(K, "CHUNK_ROWS", 16)
    B, d, n, k = 50, 12, 1024, 8
    x0, W_enc, W_dec, b_enc = (_leaf(*s, seed=i, device=device) for s, i in (((B, d), 40), ((n, d), 41),
                                                                            ((n, d), 42), ((n,), 43)))
    leaves = [x0, W_enc, b_enc, W_dec]

    def go(enc, dec):
        return _run(lambda: enc(x0 * 1.0, W_enc, b_enc, k), lambda v, i: dec(v, i, W_dec), leaves)

    _assert_same(go(K.topk_encode, K.sparse_decode), go(K.topk_encode_reference, K.sparse_decode_reference))
    K.release_workspace()


def test_sparse_decode_gradients_of_values_and_weights(device):
    g = torch.Generator().manual_seed(0)
    values, W_dec = _leaf(9, 4, seed=6, device=device), _leaf(30, 5, seed=7, device=device)
    indices = torch.stack([torch.randperm(30, generator=g)[:4] for _ in range(9)]).to(device)
    assert torch.autograd.gradcheck(lambda v, W: K.sparse_decode(v, indices, W), (values, W_dec))
    # a latent used by several rows accumulates all of their contributions
    indices[:, 0] = 3
    out = K.sparse_decode(values, indices, W_dec)
    ref = K.sparse_decode_reference(values, indices, W_dec)
    gf = torch.autograd.grad(out.sum(), (values, W_dec))
    gr = torch.autograd.grad(ref.sum(), (values, W_dec))
    assert_close(out, ref)
    assert_close(gf, gr)


def test_topk_encode_gradcheck(device):
    x, W, b = _leaf(6, 5, seed=8, device=device), _leaf(20, 5, seed=9, device=device), _leaf(20, seed=10, device=device)
    assert torch.autograd.gradcheck(lambda x, W, b: K.topk_encode(x, W, b, 4)[0], (x, W, b))
    p = _leaf(5, seed=26, device=device)
    assert torch.autograd.gradcheck(lambda x, W, b, p: K.topk_encode(x, W, b, 4, b_pre=p)[0], (x, W, b, p))


# ---------------------------------------------------------------------------
# expert dispatch (switch / scale)
# ---------------------------------------------------------------------------
def _expert_idx(B, E, n_active, seed, allowed=None, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    pool = torch.arange(E) if allowed is None else torch.tensor(allowed)
    return torch.stack([pool[torch.randperm(len(pool), generator=g)[:n_active]] for _ in range(B)]).to(device)


@pytest.mark.parametrize("n_active", [1, 2, 4])
@pytest.mark.parametrize("B,E,m,d,k,bias,allowed", [
    (41, 8, 12, 10, 6, True, None),            # generic
    (23, 8, 12, 10, 6, False, [0, 2, 5, 6]),   # experts 1, 3, 4, 7 get no row
    (1, 4, 16, 8, 5, True, None),              # one-row batch
    (19, 4, 3, 6, 5, True, None),              # k > m: the TopK must span experts
    (33, 4, 128, 8, 4, True, None),            # m >= 16 k: the group-max TopK path
])
@pytest.mark.parametrize("fold,presort", [(False, False), (True, False), (True, True)])
def test_expert_topk_encode_matches_reference(n_active, B, E, m, d, k, bias, allowed, fold, presort, device):
    """``fold``: b_pre passed to the kernel (its gradient folded into the sparse backward);
    ``presort``: rows already grouped by (first) expert, the order ``SAE`` feeds them in."""
    if allowed is not None and n_active > len(allowed) or n_active * m < k:
        pytest.skip("shape not valid for this n_active")
    x0, b_pre = _leaf(B, d, seed=11, device=device), _leaf(d, seed=12, device=device)
    W_enc, W_dec = _leaf(E * m, d, seed=13, device=device), _leaf(E * m, d, seed=14, device=device)
    b_enc = _leaf(E * m, seed=15, scale=0.1, device=device) if bias else None
    eidx = _expert_idx(B, E, n_active, seed=16, allowed=allowed, device=device)
    if presort:
        eidx = eidx[eidx[:, 0].argsort(stable=True)]
    leaves = [t for t in (x0, b_pre, W_enc, b_enc, W_dec) if t is not None]

    def go(enc, dec):
        if fold:
            return _run(lambda: enc(x0, W_enc.view(E, m, d), eidx, k, b_enc, b_pre=b_pre),
                        lambda v, i: dec(v, i, W_dec), leaves)
        return _run(lambda: enc(x0 - b_pre, W_enc.view(E, m, d), eidx, k, b_enc),
                    lambda v, i: dec(v, i, W_dec), leaves)

    fast = go(K.expert_topk_encode, K.sparse_decode)
    _assert_same(fast, go(K.expert_topk_encode_reference, K.sparse_decode_reference))
    (_, idx, _), grads = fast
    assert set((idx // m).unique().tolist()) <= set(eidx.unique().tolist())
    if allowed is not None:   # unused experts get exactly zero gradient
        unused = [e for e in range(E) if e not in allowed]
        assert grads[2].view(E, m, d)[unused].abs().max() == 0


@pytest.mark.parametrize("n_active", [1, 2])
def test_expert_topk_encode_non_leaf_W_enc(n_active, device):
    """Scale SAE feature scaling: W_hat = low + (1 + omega) (W - low) is a function of
    parameters; the gradient must flow through the kernel into W and omega."""
    B, E, m, d, k = 29, 4, 8, 6, 5
    x, W, W_dec = (_leaf(*s, seed=i, device=device) for s, i in (((B, d), 17), ((E, m, d), 18), ((E * m, d), 19)))
    omega = _leaf(E, seed=20, scale=0.5, device=device)
    eidx = _expert_idx(B, E, n_active, seed=21, device=device)

    def go(enc, dec):
        def encode():
            low = W.mean(1, keepdim=True)
            W_hat = low + (1 + omega).view(E, 1, 1) * (W - low)
            assert not W_hat.is_leaf and W_hat.requires_grad
            return enc(x, W_hat, eidx, k)
        return _run(encode, lambda v, i: dec(v, i, W_dec), [x, W, omega, W_dec])

    _assert_same(go(K.expert_topk_encode, K.sparse_decode),
                 go(K.expert_topk_encode_reference, K.sparse_decode_reference))


def test_expert_topk_encode_gradcheck(device):
    x, W, b = _leaf(7, 4, seed=22, device=device), _leaf(3, 5, 4, seed=23, device=device), _leaf(15, seed=24, device=device)
    eidx = _expert_idx(7, 3, 2, seed=25, device=device)
    assert torch.autograd.gradcheck(lambda x, W, b: K.expert_topk_encode(x, W, eidx, 4, b)[0], (x, W, b))
    p = _leaf(4, seed=27, device=device)
    assert torch.autograd.gradcheck(lambda x, W, b, p: K.expert_topk_encode(x, W, eidx, 4, b, b_pre=p)[0],
                                    (x, W, b, p))


# ---------------------------------------------------------------------------
# ties, dtypes, errors, and "no [B, n_latents] tensor"
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("n_active", [0, 1, 2, 4])   # 0: the dense topk_encode
def test_ties_give_k_distinct_valid_latents(n_active, device):
    B, E, m, d, k = 16, 4, 8, 5, 6
    W = torch.randn(E * m, d, dtype=F64).round()          # duplicated rows -> tied pre-activations
    W[1::2] = W[0::2]
    x = torch.randn(B, d, dtype=F64).round()
    x[:4] = 0                                            # rows where every pre-activation is 0
    W, x = W.to(device), x.to(device)
    if n_active == 0:
        vals, idx = K.topk_encode(x, W, None, k)
        ref_vals, _ = K.topk_encode_reference(x, W, None, k)
        allowed = torch.ones(B, E * m, dtype=torch.bool, device=device)
    else:
        eidx = _expert_idx(B, E, n_active, seed=26, device=device)
        vals, idx = K.expert_topk_encode(x, W.view(E, m, d), eidx, k)
        ref_vals, _ = K.expert_topk_encode_reference(x, W.view(E, m, d), eidx, k)
        allowed = torch.zeros(B, E, dtype=torch.bool, device=device).scatter(1, eidx, True).repeat_interleave(m, 1)
    assert idx.shape == (B, k) and vals.shape == (B, k)
    assert all(len(set(row.tolist())) == k for row in idx)            # k distinct latents
    assert allowed.gather(1, idx).all()                                # in the selected experts
    assert_close(vals, (x @ W.T).gather(1, idx).relu())                # values are those latents'
    assert_close(vals.sort(-1).values, ref_vals.sort(-1).values)       # the same multiset as TopK


def test_float32_matches_reference_at_a_realistic_shape(device):
    B, E, m, d, k = 256, 16, 64, 64, 32
    f32 = dict(dtype=torch.float32, device=device)
    x, W_dec = _leaf(B, d, seed=27, **f32), _leaf(E * m, d, seed=29, **f32)
    W = _leaf(E, m, d, seed=28, scale=d ** -0.5, **f32)
    eidx = _expert_idx(B, E, 2, seed=30, device=device)
    leaves = [x, W, W_dec]
    fast = _run(lambda: K.expert_topk_encode(x, W, eidx, k), lambda v, i: K.sparse_decode(v, i, W_dec), leaves)
    ref = _run(lambda: K.expert_topk_encode_reference(x, W, eidx, k),
               lambda v, i: K.sparse_decode_reference(v, i, W_dec), leaves)
    (fv, _, fx), fg = fast
    (rv, _, rx), rg = ref
    assert_close(fv.sort(-1).values, rv.sort(-1).values, rtol=1e-5, atol=1e-5)
    assert_close(fx, rx, rtol=1e-4, atol=1e-4)
    for a, b in zip(fg, rg):
        assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


@pytest.mark.parametrize("n", [50, 5000])        # 5000: most rows untouched, must come back 0
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_scatter_rows_all_dtypes(dtype, n, device):
    """The CSR product (float32/64; cuSPARSE on CUDA) and the index_add fallback (half types)."""
    g = torch.Generator().manual_seed(31)
    idx = torch.randint(0, n, (300, 7), generator=g)
    coef, rhs = torch.randn(300, 7, generator=g), torch.randn(300, 3, generator=g)
    contrib = (coef[:, :, None] * rhs[:, None]).flatten(0, 1).double()
    ref = torch.zeros(n, 3, dtype=F64).index_add_(0, idx.flatten(), contrib).to(device)
    torch.full((n * 3,), float("nan"), dtype=dtype, device=device)   # leave NaNs in freed memory the kernel may get
    out = K._scatter_rows(idx.to(device), coef.to(device, dtype), rhs.to(device, dtype), n)
    assert out.dtype == dtype and out.device == ref.device
    tol = 0.05 if dtype == torch.bfloat16 else 1e-5
    assert_close(out.double(), ref, rtol=tol, atol=tol)


def test_bad_k_raises():
    x, W = torch.randn(3, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match="k"):
        K.topk_encode(x, W, None, 11)
    with pytest.raises(ValueError, match="k"):
        K.expert_topk_encode(x, W.view(2, 5, 4), torch.zeros(3, 1, dtype=torch.long), 6)


class _Sizes(TorchDispatchMode):
    """Records the element count of every tensor an ATen op returns."""

    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:   # CSR: only nnz stored
                self.numels.append(t.numel())
        return out


def test_no_dense_batch_by_latents_tensor(device):
    """The expert path never forms [B, n_latents] (forward or backward); the dense TopK
    path forms it only in the forward matmul, never in its backward or in the decoder."""
    B, E, m, d, k = 96, 16, 32, 8, 4
    n = E * m
    x, W, W_dec = (_leaf(*s, seed=i, device=device) for s, i in (((B, d), 32), ((E, m, d), 33), ((n, d), 34)))
    b = _leaf(n, seed=35, device=device)
    eidx = _expert_idx(B, E, 2, seed=36, device=device)
    with _Sizes() as rec:
        vals, idx = K.expert_topk_encode(x, W, eidx, k, b)
        K.sparse_decode(vals, idx, W_dec).pow(2).sum().backward()
    assert max(rec.numels) < B * n // 2
    vals, idx = K.topk_encode(x, W.view(n, d), b, k)
    with _Sizes() as rec:
        K.sparse_decode(vals, idx, W_dec).pow(2).sum().backward()
    assert max(rec.numels) < B * n // 2


# ---------------------------------------------------------------------------
# the benchmark harness (tiny shape: it must run, and its ratios must be consistent)
# ---------------------------------------------------------------------------
def test_bench_runs_and_reports_consistent_ratios():
    from saelib import bench

    rows = ["naive", "official_switch16", "topk", "switch16", "scale16x2"]
    df = bench.run("quick", rows=rows, d=16, n_latents=128, k=4, batch=64, steps=1, rounds=1, warmup=1,
                   memory=False, progress=False)
    assert list(df["row"]) == rows
    assert (df["s_per_step"] > 0).all() and (df["tokens_per_s"] > 0).all()
    t, f = df.set_index("row")["s_per_step"], df.set_index("row")["flops_per_token"]
    assert_close(df.set_index("row")["speedup_vs_topk"]["switch16"], t["topk"] / t["switch16"])
    assert f["naive"] == 2 * (2 * 128 * 16) and f["official_switch16"] > f["topk"] > f["switch16"]
    targets = bench.check_targets(df)
    assert set(targets["row"]) == {"topk", "switch16", "scale16x2"}     # sparsify is not in rows
    # the per-section split covers the saelib rows only and adds up to the measured step
    bd = bench.breakdown(df)
    assert list(bd.index) == ["topk", "switch16", "scale16x2"]
    sections = bd[list(K.SECTIONS)]
    assert (sections >= 0).all().all() and (sections.sum(axis=1) <= bd["step"] * 1.0001).all()
    assert (bd.loc["topk", ["router", "dispatch"]] == 0).all()               # dense: no routing
    assert (bd.loc[["switch16", "scale16x2"], ["router", "dispatch", "select", "encoder backward"]] > 0).all().all()
    assert_close(bd["bound_vs_topk"]["switch16"],
                 bd["step"]["topk"] / (bd.loc["switch16", list(bench.SHARED)].sum() + bd["encoder matmul"]["switch16"]))
    with pytest.raises(ValueError, match="rows"):
        bench.run("quick", rows=["nope"])
    with pytest.raises(ValueError, match="shape"):
        bench.run("huge")


def test_timed_sections_record_only_inside_the_block(device):
    x, W, W_dec = (_leaf(*s, seed=i, device=device) for s, i in (((8, 4), 30), ((16, 4), 31), ((16, 4), 32)))

    def step():
        v, i = K.topk_encode(x, W, None, 3)
        K.sparse_decode(v, i, W_dec).sum().backward()

    with K.timed_sections(device) as t:
        step()
        with pytest.raises(RuntimeError, match="already active"):
            with K.timed_sections():
                pass
    assert {"encoder matmul", "select", "decode", "decoder backward", "encoder backward"} <= set(t)
    assert all(v > 0 for v in t.values()) and set(t) <= set(K.SECTIONS)
    before = dict(t)
    step()                                           # timing off again: nothing added
    assert t == before and K._timing is None


def test_tune_malloc_is_idempotent():
    from saelib import utils

    first = utils.tune_malloc()
    assert isinstance(first, bool) and utils.tune_malloc() == first


def test_feature_scale_mean_matches_the_formula(device):
    W, omega = _leaf(3, 5, 4, seed=40, device=device), _leaf(3, seed=41, scale=0.5, device=device)
    assert torch.autograd.gradcheck(K.feature_scale_mean, (W, omega))
    low = W.mean(1, keepdim=True)
    plain = low + (1 + omega.view(-1, 1, 1)) * (W - low)
    assert_close(K.feature_scale_mean(W, omega), plain)
    G = torch.randn(3, 5, 4, dtype=F64).to(device)
    assert_close(torch.autograd.grad(K.feature_scale_mean(W, omega), [W, omega], G),
                 torch.autograd.grad(plain, [W, omega], G))


@pytest.mark.parametrize("mode", ["train", "train_guess_high", "train_guess_low", "few_positive", "inference"])
def test_batch_topk_encode_matches_reference(mode, monkeypatch, device):
    """Values, the cut and every gradient equal the dense BatchTopK, also when the rows are
    done in several blocks, when the guess filter is too tight (falls back to all
    positives) and when the batch has fewer than k*B positive entries."""
    monkeypatch.setattr(K, "CHUNK_ROWS", 7)
    B, d, n, k = 23, 6, 40, 3
    x, b_pre = _leaf(B, d, seed=50, device=device), _leaf(d, seed=51, device=device)
    W_enc, W_dec = _leaf(n, d, seed=52, device=device), _leaf(n, d, seed=53, device=device)
    b_enc = _leaf(n, seed=54, scale=0.1, device=device)
    if mode == "few_positive":
        with torch.no_grad():
            b_enc -= 7.0
    threshold = 0.7 if mode == "inference" else None
    z_ref, cut_ref = K.batch_topk_encode_reference(x, W_enc, b_enc, k, b_pre=b_pre, threshold=threshold)
    guess = {"train_guess_high": 10 * (cut_ref or 1), "train_guess_low": 0.5 * (cut_ref or 1)}.get(mode)
    vals, idx, cut = K.batch_topk_encode(x, W_enc, b_enc, k, b_pre=b_pre, threshold=threshold, guess=guess)
    assert vals.device == idx.device == x.device
    z = torch.zeros(B, n, dtype=F64, device=device).scatter_add(1, idx, vals)
    assert_close(z, z_ref)
    if mode == "inference":
        assert cut is None
    else:
        assert cut == pytest.approx(cut_ref)
        assert (cut == 0) == (mode == "few_positive")
        assert int((z > 0).sum()) >= (k * B if mode != "few_positive" else 0)
    assert vals.shape[1] == int((z_ref > 0).sum(1).max())      # width = the widest row
    leaves = [x, b_pre, W_enc, b_enc, W_dec]
    w = torch.randn(B, d, dtype=F64, generator=torch.Generator().manual_seed(55)).to(device)
    g_fast = torch.autograd.grad(((K.sparse_decode(vals, idx, W_dec) * w).sum() + vals.sum()), leaves)
    g_ref = torch.autograd.grad(((z_ref @ W_dec) * w).sum() + z_ref.sum(), leaves)
    for a, b in zip(g_fast, g_ref):
        assert_close(a, b)


def test_bench_peak_memory_sees_the_dense_code():
    """The CPU peak-memory probe runs in a fresh process, so the naive row's dense
    [batch, n_latents] tensors (16 MiB each here; a step long enough for the 0.5 ms RSS
    sampling) show up whatever this process's allocator holds."""
    from saelib import bench, utils

    utils.tune_malloc()
    df = bench.run("quick", rows=["naive"], n_latents=2048, batch=2048, steps=1, rounds=1, warmup=1,
                   progress=False)
    assert df["peak_mem_mb"].iloc[0] >= 16
