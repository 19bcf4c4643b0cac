"""The SAE zoo: shapes, sparsity, routing, the scale == switch identity, hand-built
global TopK, persistence (own format and SAELens's), FLOPs and the promised errors."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from saelib import saes

pytestmark = pytest.mark.usefixtures("one_thread")


D, N, K = 16, 64, 4
KW = {
    "relu": dict(),
    "gated": dict(),
    "topk": dict(k=K),
    "batchtopk": dict(k=K),
    "switch": dict(k=K, n_experts=4),
    "scale": dict(k=K, n_experts=4, n_active=2),
}


def make(kind, **kw):
    return saes.build(kind, d_in=D, n_latents=N, **{**KW[kind], **kw})


def data(n=64, seed=0):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def randomize(sae, seed=1):
    """Non-trivial biases/gains so that every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name not in ("W_enc", "W_dec", "W_router"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return sae


@pytest.mark.parametrize("kind", saes.KINDS)
def test_forward_shapes_and_unit_decoder(kind):
    sae = make(kind)
    x = data()
    out = sae(x)
    assert out.x_hat.shape == x.shape
    assert isinstance(out.l0, float) and 0 < out.l0 <= N
    dirs = sae.decoder_directions()
    assert dirs.shape == (N, D)
    assert torch.allclose(dirs.norm(dim=-1), torch.ones(N), atol=1e-5)
    assert sae.expert_of_latent().shape == (N,)
    assert sae.kind == kind and sae.config["kind"] == kind
    # x_hat = decoder applied to the reported code, + b_pre
    z = sae.encode(x)
    assert z.shape == (len(x), N)
    assert torch.allclose(z @ sae.W_dec + sae.b_pre, out.x_hat, atol=1e-4)
    # l0 counts the non-zeros of that code
    assert out.l0 == pytest.approx(float((z > 0).sum(-1).float().mean()))
    # loss is finite and its parts sum to the total
    total, parts = sae.loss(x, out)
    assert math.isfinite(total.item()) and sum(parts.values()) == pytest.approx(total.item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["topk", "switch", "scale"])
def test_exactly_k_nonzeros_per_row(kind):
    sae = make(kind)
    out = sae(data(256))
    assert out.values.shape == (256, K) and out.indices.shape == (256, K)
    assert ((out.values > 0).sum(-1) == K).all()
    assert out.l0 == K
    assert (out.indices.sort(-1).values.diff(dim=-1) != 0).all()      # k distinct latents per row


def test_switch_one_expert_per_row():
    sae = make("switch")
    x = data(256)
    out = sae(x)
    assert out.expert_idx.shape == (256, 1)
    assert torch.equal(out.expert_idx[:, 0], out.router_probs.argmax(-1))
    owner = sae.expert_of_latent()[out.indices]
    assert (owner == out.expert_idx).all()
    assert torch.allclose(out.router_probs.sum(-1), torch.ones(256))


def test_scale_latents_come_from_selected_experts():
    sae = make("scale", n_experts=8, n_active=3)
    out = sae(data(256))
    owner = sae.expert_of_latent()[out.indices]                       # [B, k]
    assert (owner[:, :, None] == out.expert_idx[:, None, :]).any(-1).all()
    assert torch.equal(out.expert_idx.sort(-1).values, out.router_probs.topk(3, -1).indices.sort(-1).values)


def test_scale_global_topk_hand_built():
    """3 experts of 2 latents, 2 active, k=2: the two largest pre-activations of the
    selected experts win even when both belong to one expert, and the unselected
    expert's larger pre-activations are ignored ([scale] eq. 2.3); each value is then
    weighted by its expert's router probability (eq. 2.4)."""
    sae = saes.build("scale", d_in=3, n_latents=6, k=2, n_experts=3, n_active=2, feature_scaling=False)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[3., 0, 0], [1, 0, 0],      # expert 0
                                      [10, 0, 0], [9, 0, 0],      # expert 1 (not selected)
                                      [5, 0, 0], [4, 0, 0]]))     # expert 2
        sae.W_dec.copy_(torch.tensor([[1., 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]]))
        sae.W_router.copy_(torch.tensor([[2., 0, 0], [-5, 0, 0], [1, 0, 0]]))
        sae.b_pre.zero_(), sae.b_router.zero_()
    x = torch.tensor([[1., 0, 0]])
    out = sae(x)
    p = torch.softmax(torch.tensor([2., -5, 1]), 0)
    assert sorted(out.expert_idx[0].tolist()) == [0, 2]
    order = out.indices[0].argsort()
    assert out.indices[0][order].tolist() == [4, 5]                  # not one per expert: {0, 4}
    assert torch.allclose(out.values[0][order], torch.tensor([5., 4.]) * p[2])
    assert torch.allclose(out.x_hat[0], torch.tensor([0., 5., 4.]) * p[2])
    # the official code's option: softmax over the selected probabilities
    sae.config["renormalize_router"] = True
    w = torch.softmax(torch.stack([p[0], p[2]]), 0)[1]
    assert torch.allclose(sae(x).x_hat[0], torch.tensor([0., 5., 4.]) * w)
    # the official code's TopK order: select on p_i * ReLU(f_ij), so expert 0's 3 * p0 beats 4 * p2
    sae.config["renormalize_router"] = False
    sae.config["weight_before_topk"] = True
    out = sae(x)
    order = out.indices[0].argsort()
    assert out.indices[0][order].tolist() == [0, 4]
    assert torch.allclose(out.values[0][order], torch.stack([3 * p[0], 5 * p[2]]))
    assert torch.allclose(out.x_hat[0], torch.stack([3 * p[0], 5 * p[2], torch.tensor(0.)]))
    out.x_hat.sum().backward()                                        # differentiable in every weight
    assert sae.W_enc.grad is not None and sae.W_router.grad is not None


def test_weight_before_topk_is_scale_only_and_boolean():
    with pytest.raises(ValueError, match="weight_before_topk=True is only allowed for kind='scale'"):
        saes.build("switch", d_in=4, n_latents=8, k=2, n_experts=2, weight_before_topk=True)
    with pytest.raises(ValueError, match="weight_before_topk must be True or False"):
        saes.build("scale", d_in=4, n_latents=8, k=2, n_experts=2, weight_before_topk="yes")
    sae = saes.build("scale", d_in=4, n_latents=8, k=2, n_experts=2, weight_before_topk=True)
    assert sae.config["weight_before_topk"] is True
    assert "weight_before_topk" not in saes.build("scale", d_in=4, n_latents=8, k=2, n_experts=2).config


def test_scale_with_one_expert_and_no_scaling_equals_switch():
    sw = randomize(make("switch", n_experts=4))
    sc = make("scale", n_experts=4, n_active=1, feature_scaling=False)
    sc.load_state_dict(sw.state_dict())
    x = data(128)
    a, b = sw(x), sc(x)
    assert torch.equal(a.x_hat, b.x_hat)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.expert_idx, b.expert_idx)
    la, pa = sw.loss(x, a)
    lb, pb = sc.loss(x, b)
    assert torch.equal(la, lb) and pa == pb
    # feature scaling with omega = 0 is the identity for every decomposition
    for dec in saes.DECOMPOSITIONS:
        fs = make("scale", n_experts=4, n_active=1, feature_scaling=True, decomposition=dec)
        fs.load_state_dict({**sw.state_dict(), **{k: v for k, v in fs.state_dict().items()
                                                 if k in ("omega", "lp_transform")}})
        assert torch.allclose(fs(x).x_hat, a.x_hat, atol=1e-5), dec


@pytest.mark.parametrize("kind,extra", [("switch", {}), ("scale", {"n_active": 2}), ("scale", {"n_active": 3})])
def test_moe_forward_equals_the_plain_formula_in_row_order(kind, extra):
    """The MoE forward runs in expert-sorted row order internally; what it returns (x_hat,
    values, indices, in the caller's row order) and the loss gradients equal the paper's
    formula computed row by row with the dense reference kernels."""
    from saelib import kernels

    sae = randomize(make(kind, **extra))
    sae.config["alpha"] = 0.0                                   # loss = reconstruction only
    x = data(96, seed=3)
    out = sae(x)
    loss = sae.loss(x, out)[0]
    grads = torch.autograd.grad(loss, [sae.W_enc, sae.W_dec, sae.b_pre, sae.W_router])
    p = torch.softmax((x - sae.b_router) @ sae.W_router.T, dim=-1)
    eidx = p.topk(sae.n_active, dim=-1).indices
    z, idx = kernels.expert_topk_encode_reference(x - sae.b_pre, sae.expert_encoder(), eidx, K)
    v = z * p.gather(1, idx // sae.m)
    x_hat = kernels.sparse_decode_reference(v, idx, sae.W_dec) + sae.b_pre
    ref = (x - x_hat).pow(2).sum(-1).mean()
    ref_grads = torch.autograd.grad(ref, [sae.W_enc, sae.W_dec, sae.b_pre, sae.W_router])
    assert torch.equal(out.expert_idx.sort(-1).values, eidx.sort(-1).values)
    o1, o2 = out.indices.argsort(-1), idx.argsort(-1)
    assert torch.equal(out.indices.gather(1, o1), idx.gather(1, o2))
    assert torch.allclose(out.values.gather(1, o1), v.gather(1, o2), atol=1e-5)
    assert torch.allclose(out.x_hat, x_hat, atol=1e-5)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_feature_scaling_formula():
    sae = make("scale", n_experts=4, n_active=2, feature_scaling=True, decomposition="mean")
    with torch.no_grad():
        sae.omega.copy_(torch.tensor([0.5, -0.2, 0.0, 2.0]))
    W = sae.W_enc.view(4, N // 4, D)
    low = W.mean(1, keepdim=True)
    want = low + (1 + sae.omega.view(4, 1, 1)) * (W - low)
    assert torch.allclose(sae.expert_encoder(), want)
    ident = make("scale", n_experts=4, feature_scaling=True, decomposition="identity")
    with torch.no_grad():
        ident.omega.fill_(1.0)
    I = torch.eye(N // 4, D)
    assert torch.allclose(ident.expert_encoder(), I + 2 * (ident.W_enc.view(4, N // 4, D) - I))


@pytest.mark.parametrize("kind,extra", [("switch", {}), ("scale", {"feature_scaling": True}),
                                        ("scale", {"decomposition": "learned"})])
def test_gradients_reach_router_and_omega(kind, extra):
    sae = make(kind, **extra)
    if extra.get("decomposition") == "learned":   # d W_hat / d W_low = -omega: 0 at the initial omega
        with torch.no_grad():
            sae.omega.fill_(0.3)
    x = data(128)
    out = sae(x)
    total, parts = sae.loss(x, out)
    assert parts["lb"] > 0
    total.backward()
    assert sae.W_router.grad.abs().sum() > 0 and sae.b_router.grad.abs().sum() > 0
    if sae.config["feature_scaling"]:
        assert sae.omega.grad.abs().sum() > 0
    if extra.get("decomposition") == "learned":
        assert sae.lp_transform.grad.abs().sum() > 0
    # the router also learns through the reconstruction alone (p_i* weights E_i*)
    sae.zero_grad()
    out = sae(x)
    (out.x_hat - x).pow(2).sum().backward()
    assert sae.W_router.grad.abs().sum() > 0


def test_recon_loss_and_decoder_grad_hook_match_plain_formulas():
    """The fused reconstruction loss and the in-place parallel-gradient removal equal their
    plain torch formulas (values and gradients), with a scaling factor and non-zero biases."""
    sae = randomize(make("switch", alpha=0.0))    # total loss = recon
    sae.config["norm_scaling_factor"] = 0.7
    x = data(128)
    out = sae(x)
    recon, plain = sae.loss(x, out)[0], ((x - out.x_hat) * 0.7).pow(2).sum(-1).mean()
    assert recon.item() == pytest.approx(plain.item(), rel=1e-5)
    g1 = torch.autograd.grad(recon, sae.W_enc, retain_graph=True)[0]
    g2 = torch.autograd.grad(plain, sae.W_enc)[0]
    assert torch.allclose(g1, g2, atol=1e-6)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(N, 1) + 0.5)    # rows off unit norm
    sae.W_dec.grad = torch.randn(N, D)
    D_ = F.normalize(sae.W_dec.detach(), dim=-1)
    want = sae.W_dec.grad - (sae.W_dec.grad * D_).sum(-1, keepdim=True) * D_
    sae.remove_parallel_grad_()
    assert torch.allclose(sae.W_dec.grad, want, atol=1e-5)


def test_load_balancing_loss_formula():
    sae = make("scale", n_experts=4, n_active=2, alpha=3.0)
    x = data(100)
    out = sae(x)
    f = torch.bincount(out.expert_idx.flatten(), minlength=4).float() / (100 * 2)
    P = out.router_probs.mean(0)
    _, parts = sae.loss(x, out)
    assert float(sae.expert_load(out).sum()) == pytest.approx(1.0)
    assert parts["lb"] == pytest.approx(3.0 * D * 4 * (f * P).sum().item(), rel=1e-5)


def test_batchtopk_train_vs_inference():
    sae = make("batchtopk")
    x = data(64)
    pre = F.relu((x - sae.b_pre) @ sae.W_enc.T + sae.b_enc)
    top = pre.flatten().topk(K * 64)
    want = torch.zeros(64 * N).scatter(0, top.indices, top.values).view(64, N)
    sae.train()
    out = sae(x)
    assert int((out.values > 0).sum()) == K * 64                    # k * B over the whole batch
    assert out.l0 == pytest.approx(K)
    assert torch.allclose(sae.encode(x), want)                      # encode() ran in train mode too
    assert sae.threshold == pytest.approx(top.values.min().item())
    assert float(sae.threshold_count) == 2
    sae.eval()
    assert torch.allclose(sae.encode(x), pre * (pre > sae.threshold))
    out = sae(x)
    assert torch.allclose(out.x_hat, (pre * (pre > sae.threshold)) @ sae.W_dec + sae.b_pre, atol=1e-5)


def test_gated_loss_parts():
    sae = randomize(make("gated", l1_coef=0.5))
    x = data()
    out = sae(x)
    pre = (x - sae.b_pre) @ sae.W_enc.T
    gate = F.relu(pre + sae.b_gate)
    z = (pre + sae.b_gate > 0) * F.relu(pre * sae.r_mag.exp() + sae.b_mag)
    clear = (pre + sae.b_gate).abs() > 1e-5          # rounding may flip a gate sitting on its edge
    assert clear.float().mean() > 0.99
    assert torch.allclose(out.latents[clear], z[clear], atol=1e-6)
    _, parts = sae.loss(x, out)
    assert parts["l1"] == pytest.approx(0.5 * gate.sum(-1).mean().item(), rel=1e-4)
    aux = (x - gate @ sae.W_dec - sae.b_pre).pow(2).sum(-1).mean()
    assert parts["aux_recon"] == pytest.approx(aux.item(), rel=1e-4)
    # the auxiliary term does not train the decoder
    sae.zero_grad()
    sae.loss(x, out)[0].backward()
    g_full = sae.W_dec.grad.clone()
    sae.zero_grad()
    out = sae(x)
    ((x - out.x_hat).pow(2).sum(-1).mean()).backward()
    assert torch.allclose(g_full, sae.W_dec.grad, atol=1e-5)


def test_flops_per_token():
    d, n, k = 256, 4096, 32
    dense = saes.build("topk", d_in=d, n_latents=n, k=k)
    assert dense.flops_per_token() == 2 * n * d + 2 * k * d
    assert saes.build("relu", d_in=d, n_latents=n).flops_per_token() == 4 * n * d
    sw = saes.build("switch", d_in=d, n_latents=n, k=k, n_experts=16)
    assert sw.flops_per_token(breakdown=True) == {"router": 2 * 16 * d, "encoder": 2 * (n // 16) * d, "decoder": 2 * k * d}
    sc = saes.build("scale", d_in=d, n_latents=n, k=k, n_experts=16, n_active=2)
    assert sc.flops_per_token() == 2 * 16 * d + 2 * 2 * (n // 16) * d + 2 * k * d
    assert sw.flops_per_token() < sc.flops_per_token() < dense.flops_per_token()


def prepared(kind, scale):
    """A randomized SAE with a non-trivial scaling factor (and a BatchTopK threshold), in eval mode."""
    sae = randomize(make(kind))
    sae.config["norm_scaling_factor"] = scale
    if kind == "batchtopk":
        sae.train(), sae(data(32))
    return sae.eval()


@pytest.mark.parametrize("kind", saes.KINDS)
def test_save_load_round_trip(kind, tmp_path):
    sae = prepared(kind, 0.37)
    x = data()
    sae.save(tmp_path / "sae")
    assert json.loads((tmp_path / "sae" / "config.json").read_text())["kind"] == kind
    back = saes.load(tmp_path / "sae")
    assert back.config == sae.config
    assert torch.equal(back(x).x_hat, sae.eval()(x).x_hat)


@pytest.mark.parametrize("kind", saes.DENSE_KINDS)
def test_saelens_export_and_reload(kind, tmp_path):
    from safetensors.torch import load_file

    sae = prepared(kind, 2.5)
    x = data()
    want = sae(x).x_hat
    path = sae.save_saelens(tmp_path / "lens")
    cfg = json.loads((path / "cfg.json").read_text())
    w = load_file(str(path / "sae_weights.safetensors"))
    assert cfg["d_in"] == D and cfg["d_sae"] == N and cfg["normalize_activations"] == "none"
    assert cfg["architecture"] == {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "gated": "gated"}[kind]
    assert w["W_enc"].shape == (D, N) and w["W_dec"].shape == (N, D) and w["b_dec"].shape == (D,)
    # SAELens's forward on raw activations, written out from its source
    pre = (x - w["b_dec"]) @ w["W_enc"]
    if kind == "relu":
        z = F.relu(pre + w["b_enc"])
    elif kind == "topk":
        h = pre + w["b_enc"]
        top = h.topk(cfg["k"], dim=-1)
        z = torch.zeros_like(h).scatter(-1, top.indices, F.relu(top.values))
    elif kind == "batchtopk":
        h = pre + w["b_enc"]
        z = F.relu(h) * (h > w["threshold"])
    else:
        z = (pre + w["b_gate"] > 0) * F.relu(pre * w["r_mag"].exp() + w["b_mag"])
    assert torch.allclose(z @ w["W_dec"] + w["b_dec"], want, atol=1e-4)
    back = saes.load_saelens(path)
    assert back.kind == kind
    assert back.norm_scaling_factor == pytest.approx(2.5)
    assert torch.allclose(back(x).x_hat, want, atol=1e-4)


def test_saelens_loader_folds_unequal_norms_and_bias(tmp_path):
    sae = randomize(make("relu"))
    x = data()
    want = sae(x).x_hat
    path = sae.save_saelens(tmp_path / "lens")
    from safetensors.torch import load_file, save_file

    w = load_file(str(path / "sae_weights.safetensors"))
    g = torch.rand(N) + 0.5                      # rescale latents: same function, unequal norms
    w["W_enc"], w["b_enc"], w["W_dec"] = w["W_enc"] / g, w["b_enc"] / g, w["W_dec"] * g[:, None]
    w["b_enc"] = w["b_enc"] - w["b_dec"] @ w["W_enc"]   # apply_b_dec_to_input = False
    save_file(w, str(path / "sae_weights.safetensors"))
    cfg = json.loads((path / "cfg.json").read_text())
    cfg["apply_b_dec_to_input"] = False
    (path / "cfg.json").write_text(json.dumps(cfg))
    back = saes.load_saelens(path)
    assert torch.allclose(back.decoder_directions().norm(dim=-1), torch.ones(N), atol=1e-5)
    assert torch.allclose(back(x).x_hat, want, atol=1e-4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="dense"), r"kind='dense'.*batchtopk.*gated.*relu.*scale.*switch.*topk"),
    (dict(kind="topk", k=65), r"k=65 exceeds"),
    (dict(kind="topk"), r"k is required"),
    (dict(kind="topk", k=0), r"k must be a positive integer"),
    (dict(kind="scale", k=40, n_experts=4, n_active=2), r"k=40 exceeds.*n_active \* n_latents / n_experts"),
    (dict(kind="switch", k=20, n_experts=4), r"k=20 exceeds"),
    (dict(kind="switch", k=4, n_experts=5), r"n_latents=64 is not divisible by n_experts=5"),
    (dict(kind="switch", k=4, n_experts=4, n_active=2), r"n_active=2 is only allowed for kind='scale'"),
    (dict(kind="scale", k=4, n_experts=4, n_active=5), r"n_active=5 exceeds n_experts=4"),
    (dict(kind="scale", k=4, n_experts=4, decomposition="fft"), r"decomposition='fft'.*identity.*learned.*mean"),
    (dict(kind="scale", k=4, n_experts=4, feature_scaling=False, decomposition="learned"), r"needs feature_scaling"),
    (dict(kind="topk", k=4, n_experts=4), r"n_experts=4 is only allowed"),
    (dict(kind="topk", k=4, l1_coef=1.0), r"l1_coef is only used"),
    (dict(kind="relu", k=4), r"k is not used"),
    (dict(kind="relu", l1_coef=-1.0), r"l1_coef must be"),
    (dict(kind="switch", k=4, n_experts=4, feature_scaling=True), r"feature_scaling=True is only allowed"),
    (dict(kind="topk", k=4, d_in=0), r"d_in must be a positive integer"),
    (dict(kind="topk", k=4, n_latents=10.5), r"n_latents must be a positive integer"),
    (dict(kind="switch", k=4, n_experts=4, alpha=-1), r"alpha must be"),
])
def test_bad_parameters_raise(kwargs, match):
    kw = dict(d_in=D, n_latents=N)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        saes.build(kw.pop("kind"), **kw)


def test_bad_inputs_raise(tmp_path):
    sae = make("topk")
    with pytest.raises(ValueError, match="d_in=16"):
        sae(torch.randn(3, D + 1))
    with pytest.raises(ValueError, match="export works for"):
        make("switch").save_saelens(tmp_path / "x")
    with pytest.raises(ValueError, match="path="):
        saes.load(tmp_path / "missing")
