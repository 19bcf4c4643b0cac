"""saelib.metrics: every metric against a hand-computed case."""
import math
from types import SimpleNamespace

import pytest
import torch

from saelib import metrics

R2 = 1 / math.sqrt(2)


# --------------------------------------------------------------------------- stand-ins
class StandInSAE:
    """Follows the zoo interface: ``sae(x) -> out`` with x_hat / values / indices."""

    def __init__(self, fn=lambda x: x, config=None, n_latents=4, k=2):
        self.fn, self.config, self.n_latents, self.k = fn, config or {}, n_latents, k
        self.inputs = []

    def __call__(self, x):
        self.inputs.append(x)
        vals, idx = x.abs()[:, : self.k] + 1, torch.arange(self.k).expand(len(x), self.k)
        return SimpleNamespace(x_hat=self.fn(x), values=vals, indices=idx)

    def decoder_directions(self):
        return torch.eye(self.n_latents, 2)


class RoutedSAE:
    """Fixed router choices and sparse codes, to count expert activations."""
    n_experts = 3

    def __init__(self, expert_idx, values, indices):
        self.e, self.v, self.i, self.pos = expert_idx, values, indices, 0

    def expert_of_latent(self):
        return torch.arange(6) // 2

    def __call__(self, x):
        s = slice(self.pos, self.pos + len(x))
        self.pos += len(x)
        return SimpleNamespace(x_hat=x, values=self.v[s], indices=self.i[s], expert_idx=self.e[s])


# --------------------------------------------------------------------------- reconstruction
X = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
XH = torch.tensor([[1.0, 0.0], [0.0, 4.0]])


def test_reconstruction_hand_case():
    # squared errors [[0, 4], [9, 0]]; mean x = [2, 3], centred sum of squares = 4
    assert metrics.mse(X, XH) == pytest.approx(13 / 4)   # eq. A.1, mean over rows and dims
    assert metrics.sse(X, XH) == pytest.approx(13 / 2)   # summed over dims, mean over tokens
    assert metrics.fvu(X, XH) == pytest.approx(13 / 4)
    assert metrics.fvu(X, X) == 0
    assert metrics.l0(torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0]])) == pytest.approx(1.5)


def test_latent_counts_and_dead_fraction():
    counts = metrics.latent_counts(torch.tensor([[1.0, 0.0], [2.0, 3.0]]), torch.tensor([[0, 1], [1, 2]]), 4)
    assert counts.tolist() == [1, 1, 1, 0]
    assert metrics.dead_fraction(counts) == 0.25
    assert metrics.dead_fraction(counts, threshold=1) == 1.0


def test_evaluate_sae_batched_equals_direct():
    torch.manual_seed(0)
    x = torch.randn(10, 2)
    sae = StandInSAE(fn=lambda x: 0.5 * x, n_latents=4, k=2)
    res = metrics.evaluate_sae(sae, x, batch_size=3, return_counts=True, device="cpu")
    assert res["mse"] == pytest.approx(metrics.mse(x, 0.5 * x))
    assert res["sse"] == pytest.approx(metrics.sse(x, 0.5 * x))
    assert res["fvu"] == pytest.approx(metrics.fvu(x, 0.5 * x))
    assert res["l0"] == pytest.approx(2.0) and res["n_rows"] == 10
    assert res["counts"].tolist() == [10, 10, 0, 0] and res["dead_fraction"] == 0.5


def test_reconstruct_applies_and_undoes_input_scale():
    x = torch.tensor([[1.0, -2.0]])
    sae = StandInSAE(fn=lambda z: z + 1.0, config={"input_scale": 4.0})
    x_hat, _ = metrics.reconstruct(sae, x)
    assert torch.equal(sae.inputs[0], 4 * x)           # the SAE sees the scaled input
    assert torch.allclose(x_hat, (4 * x + 1) / 4)     # and the output is mapped back
    sae.config = {}
    assert torch.allclose(metrics.reconstruct(sae, x)[0], x + 1)


# --------------------------------------------------------------------------- geometry
def test_nearest_neighbour_duplicates_and_mmcs():
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert torch.allclose(metrics.nearest_neighbour_cosine(W), torch.full((3,), R2))
    W = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])   # rows 0, 1: cosine 0.995
    assert metrics.duplicate_fraction(W, 0.9) == pytest.approx(2 / 3)
    a, b = torch.eye(2), torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert metrics.mmcs(a, b) == pytest.approx((1 + R2) / 2)  # row 0 -> 1, row 1 -> 1/sqrt2
    assert metrics.mmcs(b, a) == pytest.approx((1 + R2) / 2)


def test_max_cosine_chunking_matches_brute_force():
    torch.manual_seed(0)
    a, b = torch.randn(37, 5), torch.randn(23, 5)
    sims = torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T
    v, j = metrics.max_cosine(a, b, chunk_elems=50)             # 2 rows per chunk
    assert torch.allclose(v, sims.max(1).values, atol=1e-6) and torch.equal(j, sims.max(1).indices)
    self_sims = torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(a, dim=1).T
    self_sims.fill_diagonal_(-2)
    assert torch.allclose(metrics.nearest_neighbour_cosine(a, chunk_elems=100), self_sims.max(1).values, atol=1e-6)


# --------------------------------------------------------------------------- experts
# expert 0 = {e_x, e_y}, expert 1 = {(1,1), e_x}: the last feature duplicates the first
WE = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
GE = torch.tensor([0, 0, 1, 1])


def test_expert_similarity_matrix_hand_case():
    M = metrics.expert_similarity_matrix(WE, GE)
    # M[0,1]: e_x -> max(R2, 1) = 1, e_y -> max(R2, 0) = R2; M[1,0]: (1,1) -> R2, e_x -> 1
    want = torch.tensor([[0.0, (1 + R2) / 2], [(1 + R2) / 2, R2]])
    assert torch.allclose(M, want, atol=1e-6)
    perm = torch.tensor([3, 0, 2, 1])                           # order of latents does not matter
    assert torch.allclose(metrics.expert_similarity_matrix(WE[perm], GE[perm]), want, atol=1e-6)
    assert metrics.offdiagonal_mean(torch.tensor([[1.0, 2.0], [3.0, 4.0]])) == 2.5


def test_group_max_cosine_chunked_and_singleton_groups():
    torch.manual_seed(1)
    W, g = torch.randn(30, 4), torch.randint(0, 5, (30,))
    g[0] = 5                                                     # a one-feature group
    G = metrics.group_max_cosine(W, g, chunk_elems=64)
    U = torch.nn.functional.normalize(W, dim=1)
    S = U @ U.T
    S.fill_diagonal_(-math.inf)
    for f in range(30):
        for e in range(6):
            m = S[f, g == e].max() if (g == e).any() else -math.inf
            assert (math.isnan(G[f, e]) and m == -math.inf) or abs(float(G[f, e] - m)) < 1e-5
    assert math.isnan(metrics.expert_similarity_matrix(W, g)[5, 5])


def test_random_block_baseline():
    groups = metrics.random_blocks(10, 3, seed=0)
    assert sorted(torch.bincount(groups).tolist()) == [3, 3, 4]
    assert torch.equal(groups, metrics.random_blocks(10, 3, seed=0))
    W = torch.eye(6)                                             # orthogonal: every cosine is 0
    assert torch.allclose(metrics.random_block_similarity(W, 3), torch.zeros(3, 3))
    torch.manual_seed(0)
    W = torch.randn(12, 3)
    assert torch.equal(metrics.random_block_similarity(W, 4, seed=2),
                       metrics.expert_similarity_matrix(W, metrics.random_blocks(12, 4, seed=2)))


def test_expert_redundancy_hand_case():
    r = metrics.expert_redundancy(WE, GE, threshold=0.9)
    # intra = [0, 0, R2, R2], inter = [1, R2, R2, 1]; with 2 experts "pair" = inter
    assert r["intra_mean"] == pytest.approx(R2 / 2) and r["intra_frac"] == 0
    assert r["inter_mean"] == pytest.approx((1 + R2) / 2) and r["inter_frac"] == 0.5
    assert r["pair_mean"] == pytest.approx(r["inter_mean"]) and r["overall_frac"] == 0.5
    assert r["overall_frac"] == metrics.duplicate_fraction(WE, 0.9)


def test_expert_activation_counts_and_cdf():
    e = torch.tensor([[0, 1], [0, 2], [0, 1]])
    idx = torch.tensor([[0, 2], [1, 5], [0, 1]])
    vals = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])  # latent 2 (expert 1) is zero in row 0
    x = torch.zeros(3, 2)
    assert metrics.expert_activation_counts(RoutedSAE(e, vals, idx), x, batch_size=2).tolist() == [3, 2, 1]
    assert metrics.expert_activation_counts(RoutedSAE(e, vals, idx), x, by="latents").tolist() == [3, 0, 1]
    assert torch.allclose(metrics.expert_count_cdf(torch.tensor([1, 5, 4])),
                          torch.tensor([0.5, 0.9, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="by="):
        metrics.expert_activation_counts(RoutedSAE(e, vals, idx), x, by="gate")


# --------------------------------------------------------------------------- overlap k_ij
def test_neuronal_similarity_and_overlap_hand_case():
    idx = torch.tensor([[0, 1], [1, 2], [0, 1]])               # k01 = 1, k02 = 2, k12 = 1
    assert metrics.neuronal_activation_similarity(idx) == pytest.approx(2 * (1 + 2 + 1) / (3 * 2 * 2))
    assert metrics.overlap_distribution(idx).tolist() == [0, 4, 2]  # ordered pairs
    vals = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 1.0]])  # token 1 only has latent 2 active
    # k01 = 0, k02 = 2, k12 = 0; K_total = mean |S_i| = 5/3
    assert metrics.neuronal_activation_similarity(idx, vals) == pytest.approx(2 * 2 / (6 * 5 / 3))
    assert metrics.neuronal_activation_similarity(idx, vals, k_total=2) == pytest.approx(2 * 2 / (6 * 2))
    assert metrics.overlap_distribution(idx, vals).tolist() == [4, 0, 2]


def test_overlap_distribution_brute_force_and_sampling():
    torch.manual_seed(0)
    idx = torch.stack([torch.randperm(12)[:4] for _ in range(40)])
    vals = (torch.rand(40, 4) > 0.2).float()
    sets = [set(idx[i][vals[i] != 0].tolist()) for i in range(40)]
    want = torch.zeros(5, dtype=torch.long)
    for i in range(40):
        for j in range(40):
            if i != j:
                want[len(sets[i] & sets[j])] += 1
    h = metrics.overlap_distribution(idx, vals, chunk_elems=100)
    assert torch.equal(h, want)
    k_total = sum(map(len, sets)) / 40
    sim = metrics.neuronal_activation_similarity(idx, vals)
    assert float((torch.arange(5) * h).sum() / (h.sum() * k_total)) == pytest.approx(sim)
    hs = metrics.overlap_distribution(idx, vals, n_pairs=20000, seed=0)
    assert hs.sum() == 20000
    assert torch.allclose(hs / hs.sum(), want / want.sum(), atol=0.02)


# --------------------------------------------------------------------------- superposition
def test_activation_sparsity():
    a = torch.tensor([[0.0, 1.0], [0.0, 0.5]])
    assert metrics.activation_sparsity(a) == 0.5
    assert metrics.activation_sparsity(a, eps=0.6) == 0.75


def test_superposition_score_hand_cases():
    X = torch.tensor([[1.0, 2.0], [2.0, 6.0], [3.0, 4.0], [4.0, 8.0]])
    # corr = [[1, .8], [.8, 1]]; cov = [[5, 8], [8, 20]] / 3
    assert metrics.superposition_score(X) == pytest.approx(2 / math.sqrt(2 + 2 * 0.64))
    assert metrics.superposition_score(X, kind="covariance") == pytest.approx(25 / math.sqrt(553))
    C = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert metrics.superposition_score(C, kind="precomputed") == pytest.approx(3 / math.sqrt(5))
    assert metrics.participation_ratio(C, kind="precomputed") == pytest.approx(9 / 5)
    Xc = torch.cat([X, torch.ones(4, 1)], 1)                    # a constant dim is dropped
    assert metrics.superposition_score(Xc) == pytest.approx(metrics.superposition_score(X))
    with pytest.raises(ValueError, match="kind"):
        metrics.superposition_score(X, kind="gram")


@pytest.mark.parametrize("d", [1, 3, 16])
def test_superposition_bound_attained(d):
    assert metrics.superposition_score(torch.eye(d), kind="precomputed") == pytest.approx(math.sqrt(d))
    assert metrics.superposition_score(torch.eye(d), kind="precomputed", normalized=True) == pytest.approx(1.0)
    v = torch.randn(d, 1)
    assert metrics.superposition_score(v @ v.T, kind="precomputed") == pytest.approx(1.0)
    t = torch.randn(50, 1)
    for kind in ("correlation", "covariance"):                    # rank-1 activations x = t v
        assert metrics.superposition_score(t @ v.T, kind=kind) == pytest.approx(1.0)


def test_superposition_bound_holds_and_equals_sqrt_pr():
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        d = int(torch.randint(2, 12, (1,), generator=gen))
        X = torch.randn(30, d, generator=gen) @ torch.randn(d, d, generator=gen)
        for kind in ("correlation", "covariance"):
            s = metrics.superposition_score(X, kind=kind)
            assert 1 - 1e-9 <= s <= math.sqrt(d) + 1e-9
            assert s ** 2 == pytest.approx(metrics.participation_ratio(X, kind=kind))


# --------------------------------------------------------------------------- loss recovered
N_CTX = 16


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=N_CTX,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    tokens = torch.randint(1, 50, (6, N_CTX))
    tokens[:, 0] = 0                                             # BOS
    tokens[2, 7] = 0                                             # a document boundary inside a row
    return model, tokens


@torch.no_grad()
def _ce_positions_1_on(model, tokens):
    logits = model(tokens).logits[:, 1:-1]
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, 50), tokens[:, 2:].reshape(-1)))


@pytest.mark.parametrize("site", ["blocks.0.resid_post", "blocks.1.mlp_out"])
def test_loss_recovered_identity_and_zero(tiny_lm, site):
    model, tokens = tiny_lm
    ident = StandInSAE(fn=lambda x: x)
    r = metrics.loss_recovered(model, tokens, site, ident, batch_size=4, device="cpu")
    assert r["loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert r["kl_sae"] == pytest.approx(0.0, abs=1e-8) and r["kl_ablated"] > 0
    assert r["ce_orig"] == pytest.approx(_ce_positions_1_on(model, tokens), rel=1e-5)
    assert r["n_tokens"] == 6 * (N_CTX - 2)
    assert sum(len(x) for x in ident.inputs) == 6 * (N_CTX - 1) - 1   # BOS tokens are not spliced
    zero = StandInSAE(fn=torch.zeros_like)
    r0 = metrics.loss_recovered(model, tokens, site, zero, batch_size=4, device="cpu")
    assert r0["loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert r0["ce_sae"] == pytest.approx(r0["ce_ablated"]) and r0["kl_sae"] == pytest.approx(r0["kl_ablated"])
    assert r0["ce_orig"] == pytest.approx(r["ce_orig"]) and r0["ce_ablated"] == pytest.approx(r["ce_ablated"])


def test_loss_recovered_mean_ablation(tiny_lm):
    model, tokens = tiny_lm
    site = "blocks.0.resid_post"
    mean = metrics.site_mean(model, tokens, site, batch_size=4, device="cpu")
    assert mean.shape == (32,)
    const = StandInSAE(fn=lambda x: mean.expand_as(x))
    r = metrics.loss_recovered(model, tokens, site, const, ablation="mean", batch_size=4, device="cpu")
    assert r["loss_recovered"] == pytest.approx(0.0, abs=1e-6) and r["ablation"] == "mean"
    r2 = metrics.loss_recovered(model, tokens, site, const, ablation="mean", mean_activation=torch.zeros(32),
                                batch_size=6, device="cpu")
    rz = metrics.loss_recovered(model, tokens, site, const, ablation="zero", batch_size=6, device="cpu")
    assert r2["ce_ablated"] == pytest.approx(rz["ce_ablated"])   # mean 0 == zero ablation
    with pytest.raises(ValueError, match="ablation"):
        metrics.loss_recovered(model, tokens, site, const, ablation="resample")


# --------------------------------------------------------------------------- with the real zoo
@pytest.mark.parametrize("kind", ["relu", "topk", "batchtopk", "switch", "scale"])
def test_zoo_saes_through_the_metrics(kind):
    from saelib import saes

    torch.manual_seed(0)
    extra = dict(k=4) if kind != "relu" else {}
    if kind in ("switch", "scale"):
        extra.update(n_experts=4, n_active=1 if kind == "switch" else 2)
    sae = saes.build(kind, d_in=8, n_latents=32, **extra)
    x = torch.randn(50, 8)
    res = metrics.evaluate_sae(sae, x, batch_size=16, return_counts=True, device="cpu")
    assert sae.training                                          # mode restored
    out = sae.eval()(x)                                          # metrics evaluate in eval mode
    assert res["mse"] == pytest.approx(metrics.mse(x, out.x_hat.detach()), rel=1e-5)
    assert res["l0"] == pytest.approx(out.l0, rel=1e-5)
    assert res["counts"].shape == (32,) and 0 <= res["dead_fraction"] <= 1
    vals, idx = metrics.sparse_codes(sae, x, batch_size=16, device="cpu")
    assert vals.shape[0] == 50 and 0 <= metrics.neuronal_activation_similarity(idx, vals) <= 1
    if kind in ("switch", "scale"):
        M = metrics.expert_similarity_matrix(sae)
        assert M.shape == (4, 4) and float(M.max()) <= 1 + 1e-6
        counts = metrics.expert_activation_counts(sae, x, batch_size=16, device="cpu")
        assert int(counts.sum()) == 50 * sae.n_active
        assert metrics.expert_redundancy(sae)["overall_frac"] == metrics.duplicate_fraction(sae)


def test_loss_recovered_with_a_zoo_sae(tiny_lm):
    from saelib import saes

    model, tokens = tiny_lm
    sae = saes.build("topk", d_in=32, n_latents=64, k=8)
    r = metrics.loss_recovered(model, tokens, "blocks.0.resid_post", sae, batch_size=3, device="cpu")
    assert r["kl_sae"] >= 0 and r["kl_ablated"] >= 0 and math.isfinite(r["loss_recovered"])
    assert sae.training and not model.training                   # modes restored
    with pytest.raises(ValueError, match="tokens"):
        metrics.loss_recovered(model, tokens[:, :2], "blocks.0.resid_post", sae)


def test_evaluate_sae_reads_an_activation_store(tiny_lm, tmp_path):
    from saelib import activations, saes

    model, tokens = tiny_lm
    store = activations.collect(model, tokens, "blocks.1.resid_post", n_tokens=60, path=tmp_path / "store",
                                device="cpu")
    sae = saes.build("topk", d_in=32, n_latents=64, k=4)
    a = metrics.evaluate_sae(sae, store, batch_size=16, device="cpu")
    b = metrics.evaluate_sae(sae, store.tensor(), batch_size=60, device="cpu")
    assert a["n_rows"] == 60 and a["mse"] == pytest.approx(b["mse"]) and a["dead_fraction"] == b["dead_fraction"]
    assert metrics.evaluate_sae(sae, store, batch_size=16, max_rows=20, device="cpu")["n_rows"] == 20
