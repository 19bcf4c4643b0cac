"""The training recipe: planted-dictionary recovery by every architecture, determinism,
checkpoint/resume, NaN handling, normalisation, AuxK, the schedule and the history."""
import math

import pytest
import torch
import torch.nn.functional as F

from saelib import saes, train

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------
# planted dictionary with clustered co-occurrence
# ---------------------------------------------------------------------------
PD, PF, PCLUSTERS, PON = 64, 128, 16, 3     # d, true features, clusters of 8, features on per cluster


def planted(n=16384, seed=0):
    """Tokens draw one cluster (or, with probability 1/2, two) of the 16 clusters of 8
    features, switch on 3 random features of each drawn cluster with magnitudes
    U(0.5, 2), and sum them: x = codes @ D (mean L0 4.5)."""
    g = torch.Generator().manual_seed(seed)
    D = F.normalize(torch.randn(PF, PD, generator=g), dim=-1)
    per = PF // PCLUSTERS
    two = torch.rand(n, generator=g) < 0.5
    clusters = torch.randint(PCLUSTERS, (n, 2), generator=g)
    feats = clusters[..., None] * per + torch.rand(n, 2, per, generator=g).argsort(-1)[..., :PON]
    mags = (torch.rand(n, 2, PON, generator=g) * 1.5 + 0.5) * torch.stack([torch.ones(n), two.float()], 1)[..., None]
    codes = torch.zeros(n, PF).scatter_add_(1, feats.reshape(n, -1), mags.reshape(n, -1))
    return codes @ D, D, codes


def mmcs(a, b):
    """Mean over rows of a of the max cosine to the rows of b."""
    try:
        from saelib.metrics import mmcs as lib_mmcs
        return lib_mmcs(a, b)
    except (ImportError, AttributeError):
        return float((F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T).max(1).values.mean())


@pytest.fixture(scope="module")
def planted_data():
    return planted()


# thresholds: what a correct implementation reaches on this data in 600 steps (seeds 0-3:
# topk/batchtopk 0.999, scale 0.99, switch 0.96, relu 0.975, gated 0.983), minus a margin
RECOVERY = {
    "topk": (dict(k=6), 0.98),
    "batchtopk": (dict(k=6), 0.98),
    "switch": (dict(k=6, n_experts=4), 0.92),   # balancing term on the raw scale (the paper's): 0.928 here
    "scale": (dict(k=6, n_experts=4, n_active=2), 0.97),
    "relu": (dict(), 0.95),
    "gated": (dict(), 0.95),
}


@pytest.mark.parametrize("kind", list(RECOVERY))
def test_planted_dictionary_is_recovered(kind, planted_data):
    x, D, codes = planted_data
    kw, threshold = RECOVERY[kind]
    sae = saes.build(kind, d_in=PD, n_latents=256, **kw)
    hist = train.fit(sae, x, steps=600, batch_size=512, lr=3e-3, normalize="unit", progress=False)
    score = mmcs(D, sae.decoder_directions())
    out = sae(x[:4096])
    print(f"{kind}: mmcs={score:.3f} l0={out.l0:.2f} fvu={hist.fvu.iloc[-1]:.3f}")
    assert score >= threshold, f"{kind}: mmcs {score:.3f} < {threshold}"
    assert hist.fvu.iloc[-1] < hist.fvu.iloc[0]
    true_l0 = float((codes > 0).sum(1).float().mean())
    if kind in ("topk", "batchtopk", "switch", "scale"):
        assert out.l0 == pytest.approx(6, rel=0.1)       # batchtopk: the inference threshold keeps ~k
    else:
        assert true_l0 <= out.l0 < 2.5 * true_l0           # the default l1_coef gives a sensible L0
    if kind in ("switch", "scale"):
        load = torch.tensor(hist.expert_load.iloc[-1])
        assert load.sum() == pytest.approx(1.0) and load.min() > 0.05   # balanced routing


def test_scale_beats_switch_on_clustered_data(planted_data):
    """[scale]'s claim in miniature: with tokens drawing two clusters, two active experts
    and a global TopK reconstruct better than one expert."""
    x, D, _ = planted_data
    fvu = {}
    for kind, kw in (("switch", dict(n_experts=4)), ("scale", dict(n_experts=4, n_active=2))):
        sae = saes.build(kind, d_in=PD, n_latents=256, k=6, **kw)
        fvu[kind] = train.fit(sae, x, steps=300, batch_size=512, lr=3e-3, normalize="unit", progress=False).fvu.iloc[-1]
    assert fvu["scale"] < fvu["switch"]


# ---------------------------------------------------------------------------
# recipe details
# ---------------------------------------------------------------------------
def small(kind="topk", **kw):
    base = dict(topk=dict(k=4), batchtopk=dict(k=4), switch=dict(k=4, n_experts=4),
                scale=dict(k=4, n_experts=4, n_active=2), relu={}, gated={})[kind]
    return saes.build(kind, d_in=16, n_latents=64, **{**base, **kw})


def randomize_biases(sae, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.b_enc.add_(0.3 * torch.randn(sae.b_enc.shape, generator=g))
        sae.b_pre.add_(0.3 * torch.randn(sae.b_pre.shape, generator=g))
    return sae


def gauss(n=2048, d=16, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) + 3.0) * scale


class Store:
    """A minimal activation store: .batches(batch_size, shuffle, seed, device) + .sample(n, seed)."""

    def __init__(self, x, bad_batch=None):
        self.x, self.d, self.bad_batch, self.served = x, x.shape[1], bad_batch, 0

    def __len__(self):
        return len(self.x)

    def sample(self, n, seed=0):
        return self.x[torch.randperm(len(self.x), generator=torch.Generator().manual_seed(seed))[:n]]

    def batches(self, batch_size, shuffle=True, seed=0, device="cpu", drop_last=True):
        perm = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(seed))
        for i in range(0, len(self.x) - batch_size + 1, batch_size):
            b = self.x[perm[i:i + batch_size]].clone()
            if self.served == self.bad_batch:
                b[0, 0] = float("inf")
            self.served += 1
            yield b.to(device)


def test_geometric_median():
    pts = torch.tensor([[0., 0.], [1., 0.], [0., 1.], [10., 10.], [0.2, 0.3]])
    m = train.geometric_median(pts)
    cost = lambda c: (pts - c).norm(dim=-1).sum()
    steps = torch.tensor([[1e-3, 0], [-1e-3, 0], [0, 1e-3], [0, -1e-3], [7e-4, 7e-4], [-7e-4, 7e-4]])
    assert all(cost(m) <= cost(m + dlt) + 1e-6 for dlt in steps)   # a minimum of the summed distance
    assert m.norm() < 1.0 < pts.mean(0).norm()                    # not dragged to the outlier like the mean
    assert torch.allclose(train.geometric_median(torch.tensor([[0.], [1.], [5.]])), torch.tensor([1.]), atol=1e-4)


def test_lr_schedule():
    assert train.lr_at(0, 100, 1.0) == 1.0
    assert train.lr_at(79, 100, 1.0) == 1.0
    assert train.lr_at(80, 100, 1.0) == 1.0
    assert train.lr_at(90, 100, 1.0) == pytest.approx(0.5)
    assert train.lr_at(99, 100, 1.0) == pytest.approx(1 / 20)


def test_fit_initialises_and_keeps_recipe_invariants():
    x = gauss()
    sae = small("switch")
    hist = train.fit(sae, x, steps=20, batch_size=128, log_every=5, progress=False)
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(64), atol=1e-5)
    assert not sae.training
    assert hist.lr.iloc[0] == pytest.approx(2e-4 / math.sqrt(64 / 2**14))   # the 1/sqrt(M) default
    assert hist.attrs["dead_window"] == max(128, 20 * 128 // 5)
    assert list(hist.step) == [5, 10, 15, 20] and list(hist.tokens) == [640, 1280, 1920, 2560]
    for col in ("loss", "recon", "lb", "mse", "fvu", "l0", "dead_frac", "lr", "expert_load", "wall_time"):
        assert col in hist.columns, col
    assert hist.loss.iloc[0] == pytest.approx(hist.recon.iloc[0] + hist.lb.iloc[0], rel=1e-6)
    # the biases started at the geometric median of a sample
    fresh = small("switch")
    train.fit(fresh, x, steps=1, batch_size=128, lr=1e-12, progress=False)
    med = train.geometric_median(train._sample(x, train.SAMPLE_ROWS, 0) * fresh.norm_scaling_factor)
    assert fresh.norm_scaling_factor != 1.0          # normalize="unit" is the default: b_pre in its units
    assert torch.allclose(fresh.b_pre, med, atol=1e-4) and torch.allclose(fresh.b_router, med, atol=1e-4)


def test_parallel_gradient_removed():
    sae = small("topk")
    x = gauss(256)
    out = sae(x)
    sae.loss(x, out)[0].backward()
    sae.remove_parallel_grad_()
    assert (sae.W_dec.grad * sae.W_dec).sum(-1).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["scale", "gated"])
def test_fit_is_deterministic(kind):
    x = gauss()
    runs = []
    for seed in (0, 0, 1):
        sae = small(kind, feature_scaling=True) if kind == "scale" else small(kind)
        runs.append((sae, train.fit(sae, x, steps=15, batch_size=128, seed=seed, progress=False)))
    (a, ha), (b, hb), (c, _) = runs
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert ha.drop(columns="wall_time").equals(hb.drop(columns="wall_time"))
    assert not torch.equal(a.W_dec, c.W_dec)


def test_normalize_unit_is_scale_invariant():
    x = gauss()
    fits = []
    for s in (1.0, 1000.0):
        sae = small("topk")
        h = train.fit(sae, x * s, steps=30, batch_size=128, normalize="unit", progress=False)
        fits.append((sae, h))
    (a, ha), (b, hb) = fits
    xs = a.norm_scaling_factor * x[:512]
    assert float(xs.pow(2).sum(1).mean()) == pytest.approx(16, rel=0.1)          # E||x s||^2 = d_in
    assert b.norm_scaling_factor == pytest.approx(a.norm_scaling_factor / 1000, rel=1e-5)
    assert ha.fvu.iloc[-1] == pytest.approx(hb.fvu.iloc[-1], rel=1e-3)
    assert torch.allclose(b(x[:64] * 1000).x_hat / 1000, a(x[:64]).x_hat, rtol=1e-3, atol=1e-3)


def test_aux_k_loss_formula_and_reach():
    """AuxK (Gao et al. app. B.1): the k_aux largest (ReLU'd) pre-activations among dead
    latents reconstruct the residual; only dead latents (and b_pre) get its gradient."""
    sae = randomize_biases(small("topk"))
    x = gauss(64)
    out = sae(x)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True                                                  # 22 dead latents
    k_aux = 8
    loss = sae.auxk_loss(x, out, dead, k_aux)
    pre = F.relu((x - sae.b_pre) @ sae.W_enc.T + sae.b_enc).masked_fill(~dead, -1.0)
    v, i = pre.topk(k_aux, dim=-1)
    e_hat = torch.einsum("bk,bkd->bd", v.clamp_min(0), sae.W_dec[i])
    want = (e_hat - (x - out.x_hat).detach()).pow(2).sum(-1).mean()       # scale min(22/8, 1) = 1
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    loss.backward()
    assert sae.W_dec.grad[~dead].abs().sum() == 0 and sae.W_enc.grad[~dead].abs().sum() == 0
    assert sae.W_dec.grad[dead].abs().sum() > 0
    assert sae.auxk_loss(x, sae(x), torch.zeros(64, dtype=torch.bool), k_aux).item() == 0
    few = torch.zeros(64, dtype=torch.bool)
    few[:2] = True                                                    # 2 dead < k_aux: scaled by 2/8
    v2, i2 = F.relu((x - sae.b_pre) @ sae.W_enc[:2].T + sae.b_enc[:2]), torch.arange(2)
    want2 = 2 / 8 * (v2 @ sae.W_dec[:2] - (x - out.x_hat).detach()).pow(2).sum(-1).mean()
    assert sae.auxk_loss(x, out, few, k_aux).item() == pytest.approx(want2.item(), rel=1e-5)


def test_aux_k_on_experts_uses_dead_latents_of_routed_experts():
    sae = small("scale", n_experts=4, n_active=2)
    x = gauss(64)
    out = sae(x)
    dead = torch.ones(64, dtype=torch.bool)
    dead[::2] = False
    sae.auxk_loss(x, out, dead, 8).backward()
    owner = sae.expert_of_latent()
    touched = sae.W_dec.grad.abs().sum(-1) > 0
    assert not touched[~dead].any() and touched.any()
    assert set(owner[touched].tolist()) <= set(out.expert_idx.flatten().tolist())


def test_fit_with_aux_k_logs_it():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 8, generator=g) @ torch.randn(8, 16, generator=g)
    sae = saes.build("topk", d_in=16, n_latents=128, k=2)
    h = train.fit(sae, x, steps=60, batch_size=256, lr=1e-2, aux_k=True, dead_window=1024, progress=False)
    assert h.attrs["k_aux"] == 8
    assert (h.dead_frac > 0).any() and (h.auxk[h.dead_frac.shift(1) > 0] > 0).all()   # dead at the step start
    assert h.loss.iloc[-1] == pytest.approx(h.recon.iloc[-1] + h.auxk.iloc[-1], rel=1e-6)


def test_nan_stops_training_naming_the_step():
    x = gauss()
    with pytest.raises(FloatingPointError, match="step 3"):
        train.fit(small("topk"), Store(x, bad_batch=3), steps=10, batch_size=128, progress=False)
    bad = gauss()
    bad[:] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):   # refused before the first step
        train.fit(small("relu"), bad, steps=5, batch_size=128, progress=False)


def test_nonfinite_gradient_is_named_and_never_checkpointed(tmp_path, monkeypatch):
    """The step reads nothing back to the host, so a non-finite value is found at the next
    log row or checkpoint: the error still names the first bad step, and no checkpoint holds
    weights updated after it."""
    norm = train.clip_grad_norm_
    calls = []

    def bad_from_step_5(params, max_norm=1.0):
        calls.append(1)
        if len(calls) > 5:
            params[0].grad.fill_(float("nan"))
        return norm(params, max_norm)

    monkeypatch.setattr(train, "clip_grad_norm_", bad_from_step_5)
    ckpt = tmp_path / "run.pt"
    with pytest.raises(FloatingPointError, match="non-finite gradient at step 5"):
        train.fit(small("topk"), gauss(), steps=40, batch_size=128, log_every=20, checkpoint_path=ckpt,
                  checkpoint_every=4, progress=False)
    assert torch.load(ckpt, weights_only=False)["step"] == 4     # the checkpoint at step 8 was refused


def test_step_log_reads_the_device_once_per_row():
    log = train.StepLog("cpu")
    for step, (loss, load) in enumerate([(1.0, [0.25, 0.75]), (3.0, [0.75, 0.25])]):
        log.add(step, torch.tensor(loss), torch.tensor(0.5), {"loss": torch.tensor(loss, dtype=torch.float32),
                                                             "expert_load": torch.tensor(load)})
    assert log.means({"dead_frac": torch.tensor(0.5)}) == {"loss": 2.0, "expert_load": [0.5, 0.5], "dead_frac": 0.5}
    log.add(2, torch.tensor(float("inf")), torch.tensor(float("nan")), {"loss": torch.tensor(1.0)})
    log.add(3, torch.tensor(1.0), torch.tensor(float("nan")), {"loss": torch.tensor(1.0)})
    with pytest.raises(FloatingPointError, match="loss is not finite .* at step 2"):
        log.check()


def test_prefetch_keeps_order_and_raises_the_producers_error():
    from saelib import utils

    assert list(utils.prefetch(iter(range(50)), depth=3)) == list(range(50))

    def broken():
        yield 1
        raise KeyError("the producer failed")

    it = utils.prefetch(broken())
    assert next(it) == 1
    with pytest.raises(KeyError, match="producer failed"):
        next(it)
    with pytest.raises(ValueError, match="depth"):
        next(utils.prefetch(iter([1]), depth=0))


@pytest.mark.parametrize("kind,store", [("scale", False), ("batchtopk", True)])
def test_checkpoint_resume_matches_uninterrupted_run(kind, store, tmp_path, monkeypatch, interrupt_training_at):
    x = gauss()
    data = (lambda: Store(x)) if store else (lambda: x)
    kw = dict(steps=30, batch_size=128, seed=3, log_every=4, aux_k=True, dead_window=512, progress=False)
    ref = small(kind)
    h_ref = train.fit(ref, data(), **kw)

    ckpt = tmp_path / "run.pt"
    real_step = interrupt_training_at(17)
    with pytest.raises(KeyboardInterrupt):
        train.fit(small(kind), data(), checkpoint_path=ckpt, checkpoint_every=5, **kw)
    assert ckpt.exists()
    monkeypatch.setattr(train, "_train_step", real_step)
    resumed = small(kind, seed=99)          # weights come from the checkpoint
    h = train.fit(resumed, data(), checkpoint_path=ckpt, checkpoint_every=5, **kw)
    assert all(torch.equal(p, q) for p, q in zip(ref.state_dict().values(), resumed.state_dict().values()))
    assert h.drop(columns="wall_time").equals(h_ref.drop(columns="wall_time"))
    # a finished checkpoint is a cache: the same call returns its history without training
    again = small(kind, seed=5)
    h2 = train.fit(again, data(), checkpoint_path=ckpt, checkpoint_every=5, **kw)
    assert torch.equal(again.W_dec, ref.W_dec) and h2.drop(columns="wall_time").equals(h_ref.drop(columns="wall_time"))
    # other settings never overwrite it
    with pytest.raises(ValueError, match="checkpoint_path=.*other settings"):
        train.fit(small(kind), data(), checkpoint_path=ckpt, **{**kw, "steps": 40})


@pytest.mark.parametrize("kwargs,match", [
    (dict(data=torch.randn(100, 15)), r"data must be a tensor \[n, d_in=16\]"),
    (dict(data=[1, 2, 3]), r"data must be a tensor \[n, d_in\] or an activation store"),
    (dict(normalize="l2"), r"normalize='l2'"),
    (dict(steps=0), r"steps must be a positive integer"),
    (dict(batch_size=4096), r"batch_size=4096 exceeds"),
    (dict(lr=-1.0), r"lr must be"),
    (dict(checkpoint_every=5), r"checkpoint_every needs checkpoint_path"),
    (dict(aux_k=0), r"aux_k must be a positive integer"),
    (dict(device="tpu-9"), r"device="),
])
def test_fit_bad_arguments_raise(kwargs, match):
    kw = dict(data=gauss(), steps=2, batch_size=64, progress=False)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        train.fit(small("topk"), **kw)
