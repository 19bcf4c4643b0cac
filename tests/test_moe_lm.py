"""saelib.moe_lm: the Switch FFN layer, its GPT-2 wiring, counts, routing statistics and Algorithm 2."""
import math

import pytest
import torch

from saelib import activations, data, lm, moe_lm
from test_data import write_files

ARCH = dict(n_layer=2, n_embd=32, n_head=2, n_ctx=32, steps=40, batch_size=8, lr=1e-2, warmup=5, eval_every=20,
            eval_batches=2, n_inner=48)


def tiny_gpt2(n_experts=4, moe_every=1, capacity_factor=None, n_layer=3, seed=0, vocab=50):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=16, n_embd=16, n_layer=n_layer, n_head=2, n_inner=24,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    return moe_lm.switchify(model, n_experts, moe_every, 0.01, capacity_factor).eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("moe")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAELIB_CACHE", str(root / "cache"))
        dsd = data.load_corpus(write_files(root / "txt", n_docs=40))
        tok = data.train_tokenizer(dsd, vocab_size=300)
        td = data.tokenize(dsd, tok, n_ctx=32)
        dense = lm.train_lm(td, tok, **ARCH)
        switch = lm.train_lm(td, tok, **ARCH, n_experts=4)
        yield dict(td=td, tok=tok, dense=dense, switch=switch)


def test_routes_each_token_to_exactly_one_expert(one_thread):
    model = tiny_gpt2(n_experts=4)
    layers = moe_lm.moe_layers(model)
    assert sorted(layers) == [0, 1, 2]
    seen = {i: [] for i in layers}
    for i, m in layers.items():   # record the rows each expert computes
        orig = m._expert
        m._expert = (lambda i, orig: lambda e, x, *w: (seen[i].append((e, x.shape[0])), orig(e, x, *w))[1])(i, orig)
        m.keep_routing = True
    x = torch.randint(0, 50, (3, 16))
    model(input_ids=x)
    for i, m in layers.items():
        r = m.routing
        assert r["expert"].shape == (48,) and ((r["expert"] >= 0) & (r["expert"] < 4)).all()
        assert torch.equal(r["gate"], r["probs"].max(-1).values)
        experts = [e for e, _ in seen[i]]
        assert len(experts) == len(set(experts))                     # one matrix product per used expert
        assert sum(n for _, n in seen[i]) == 48                      # every token computed by exactly one expert
        counts = torch.bincount(r["expert"], minlength=4)
        assert dict(seen[i]) == {e: int(c) for e, c in enumerate(counts) if c}


def test_output_is_gate_times_chosen_expert():
    torch.manual_seed(1)
    m = moe_lm.SwitchFFN(8, 12, 3).eval()
    x = torch.randn(5, 8)
    probs, expert, gate = m.route(x)
    assert torch.allclose(probs, torch.softmax(x @ m.router.weight.T + m.router.bias, -1), atol=1e-6)  # eq. 7
    y = m(x)
    for t in range(5):
        e = int(expert[t])
        h = torch.nn.functional.gelu(x[t] @ m.w_fc[e] + m.b_fc[e], approximate="tanh")
        assert torch.allclose(y[t], gate[t] * (h @ m.w_proj[e] + m.b_proj[e]), atol=1e-5)


@pytest.mark.parametrize("capacity_factor", [None, 1.0, 0.5])
def test_dispatch_equals_per_token_loop(capacity_factor):
    torch.manual_seed(2)
    m = moe_lm.SwitchFFN(8, 12, 4, capacity_factor=capacity_factor).train()
    with torch.no_grad():
        m.router.bias.copy_(torch.tensor([1.5, 0.0, -0.5, 0.0]))   # unbalanced, so the cap binds
    x = torch.randn(2, 20, 8, requires_grad=True)
    y = m(x)
    y.sum().backward()
    g_fast = [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]
    drop_fast, aux_fast = m.dropped, m.aux_loss.item()
    x.grad = None
    m.zero_grad()
    y_ref = m.forward_reference(x)
    y_ref.sum().backward()
    g_ref = [x.grad] + [p.grad for p in m.parameters()]
    assert y.shape == x.shape and torch.allclose(y, y_ref, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_fast, g_ref))
    assert drop_fast == m.dropped and aux_fast == pytest.approx(m.aux_loss.item())
    if capacity_factor is None:
        assert drop_fast == 0
    if capacity_factor == 0.5:
        assert drop_fast > 0


def test_capacity_overflow_passes_through_residual():
    torch.manual_seed(3)
    m = moe_lm.SwitchFFN(8, 12, 4, capacity_factor=1.0).train()
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))   # every token prefers expert 0
    x = torch.randn(12, 8)
    y = m(x)
    cap = moe_lm.expert_capacity(12, 4, 1.0)
    assert cap == 3 and m.dropped == 12 - cap
    assert (y[:cap].abs().sum(1) > 0).all() and (y[cap:] == 0).all()   # first tokens kept, the rest pass through
    m.eval()
    assert (m(x).abs().sum(1) > 0).all() and m.dropped == 0             # no cap at evaluation
    model = tiny_gpt2(n_experts=2, capacity_factor=0.25, n_layer=1).train()
    blk = model.transformer.h[0]
    with torch.no_grad():
        blk.mlp.router.weight.zero_()
        blk.mlp.router.bias.copy_(torch.tensor([5.0, 0.0]))
    h = torch.randn(1, 16, 16)
    # capacity ceil(0.25 * 16 / 2) = 2: tokens 2.. leave the block as residual + attention, no FFN added
    got = blk(h)[0] if isinstance(blk(h), tuple) else blk(h)
    attn = blk.attn(blk.ln_1(h))[0]
    assert torch.allclose(got[0, 2:], (h + attn)[0, 2:], atol=1e-6)
    assert not torch.allclose(got[0, :2], (h + attn)[0, :2], atol=1e-4)


def test_aux_loss_hand_case():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.9, 0.1]])
    expert = probs.argmax(-1)                       # [0, 1, 0]: f = (2/3, 1/3), P = (2/3, 1/3)
    assert moe_lm.load_balancing_loss(probs, expert, 0.01).item() == pytest.approx(0.01 * 2 * (4 / 9 + 1 / 9))
    uniform = torch.full((8, 4), 0.25)
    assert moe_lm.load_balancing_loss(uniform, torch.arange(8) % 4, 0.01).item() == pytest.approx(0.01)
    m = moe_lm.SwitchFFN(4, 6, 2, router_aux_coef=0.5)
    x = torch.randn(7, 4)
    m(x)
    with torch.no_grad():
        probs, expert, _ = m.route(x)
    f = torch.bincount(expert, minlength=2).float() / 7
    assert m.aux_loss.detach().item() == pytest.approx(0.5 * 2 * float((f * probs.mean(0)).sum()), rel=1e-6)
    m.aux_loss.backward()
    assert m.router.weight.grad.abs().sum() > 0     # the loss trains the router (through P_i)


@pytest.mark.parametrize("n_experts,moe_every", [(1, 1), (4, 1), (3, 2), (8, 3)])
def test_parameter_counts_match_formula(n_experts, moe_every):
    model = tiny_gpt2(n_experts, moe_every, n_layer=3)
    got = moe_lm.param_counts(model)
    want = moe_lm.param_formula(50, 16, 16, 3, 24, n_experts, moe_every)
    assert got == want
    assert got["total"] == sum(p.numel() for p in model.parameters())
    n_moe = len(moe_lm.moe_layer_indices(3, moe_every)) if n_experts > 1 else 0
    assert got["total"] - got["active"] == n_moe * (n_experts - 1) * (2 * 16 * 24 + 24 + 16)   # eq. 2
    dense = moe_lm.param_formula(50, 16, 16, 3, 24)
    assert got["active"] - dense["active"] == n_moe * (n_experts * 16 + n_experts)            # routers only


def test_paper_table1_totals_follow_the_formula():
    # [laws] table I: Switch totals = standard totals + (E - 1) experts per layer (+ routers), every layer Switch
    for (d, L, f, E, std, sw) in [(128, 2, 256, 4, 13.12, 13.51), (256, 4, 512, 8, 27.76, 35.13),
                                  (384, 6, 1024, 16, 46.74, 117.68), (512, 8, 2048, 32, 76.47, 597.33)]:
        a = moe_lm.param_formula(50257, 512, d, L, f, E, tied=False)
        b = moe_lm.param_formula(50257, 512, d, L, f, 1, tied=False)
        assert (a["total"] - b["total"]) / 1e6 == pytest.approx(sw - std, abs=0.011)
        assert (a["active"] - b["active"]) / b["active"] < 0.003   # active ~ standard (eq. 2; routers only)


def test_cost_eq3_and_measured_flops():
    assert moe_lm.cost_eq3(100.0, 4) == 25.0 and moe_lm.cost_eq3(100.0, 4, 2) == 50.0
    with pytest.raises(ValueError, match="n_experts"):
        moe_lm.cost_eq3(100.0, 0)
    x = torch.randint(0, 50, (2, 16))
    f1 = moe_lm.measured_flops_per_token(tiny_gpt2(1), x)
    f8 = moe_lm.measured_flops_per_token(tiny_gpt2(8), x)
    # 8 experts, one computed per token: FLOPs grow only by the router (2 * d * N per token and layer)
    assert f8 - f1 == pytest.approx(3 * 2 * 16 * 8, rel=1e-6)


def test_bad_arguments():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=20, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="n_experts"):
        moe_lm.switchify(model, 0)
    with pytest.raises(ValueError, match="capacity_factor"):
        moe_lm.switchify(model, 2, capacity_factor=0)
    with pytest.raises(ValueError, match="router_aux_coef"):
        moe_lm.switchify(model, 2, router_aux_coef=-1)
    with pytest.raises(ValueError, match="decay_factor"):
        moe_lm.adaptive_batch_size(lambda b: 1.0, 16, 1.0, decay_factor=1.0)
    with pytest.raises(ValueError, match="no Switch layers"):
        moe_lm.routing_stats(model, torch.zeros(1, 8, dtype=torch.long))


def test_adaptive_batch_size_as_written():
    p = {16: 0.50, 12: 0.60, 9: 0.55, 6: 0.40, 4: 0.9}
    calls = []
    out = moe_lm.adaptive_batch_size(lambda B: (calls.append(B), p[B])[1], B0=16, tau=1.0, B_min=4, decay_factor=0.75)
    assert calls == [16, 12, 9, 6] and out["B_star"] == 12 and out["performance"] == 0.60   # stops at B <= B_min
    out = moe_lm.adaptive_batch_size(lambda B: p[B], B0=16, tau=0.58, B_min=1, decay_factor=0.75)
    assert [t["B"] for t in out["trace"]] == [16, 12] and out["B_star"] == 12                # tau reached


def test_routing_stats_and_balance_measures():
    model = tiny_gpt2(n_experts=4)
    x = torch.randint(0, 50, (6, 16))
    rs = moe_lm.routing_stats(model, x, batch_size=4)
    df = rs.summary()
    assert list(df.layer) == [0, 1, 2] and (df.tokens == 96).all()
    for i in rs.counts:
        assert rs.counts[i].sum() == 96 and rs.gates[i].shape == (96,) and rs.mean_prob[i].sum() == pytest.approx(1)
    assert moe_lm.load_entropy([1, 1, 1, 1]) == pytest.approx(1) and moe_lm.load_entropy([1, 0, 0, 0]) == 0
    assert moe_lm.load_cv([1, 1, 1, 1]) == 0 and moe_lm.load_cv([4, 0, 0, 0]) == pytest.approx(math.sqrt(3))
    assert all(m.routing is None and not m.keep_routing for m in moe_lm.moe_layers(model).values())


def test_switch_lm_trains_saves_and_loads(trained):
    model, hist = trained["switch"]
    assert len(moe_lm.moe_layers(model)) == 2 and hist["config"]["n_experts"] == 4
    tr = hist["train"]
    assert tr[-1]["loss"] < tr[0]["loss"] - 1.0
    dense_model, dense_hist = trained["dense"]
    assert "n_experts" not in dense_hist["config"] and not moe_lm.moe_layers(dense_model)  # dense key unchanged
    assert hist["path"] != dense_hist["path"]
    again = lm.load_model(hist["path"], device="cpu")
    assert moe_lm.moe_layers(again)[0].n_experts == 4
    x = torch.from_numpy(data.token_array(trained["td"]["validation"])[:4])
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, again(input_ids=x).logits)
    assert moe_lm.param_counts(again)["total"] == hist["n_params"]
    g = lm.generate(again, trained["tok"], ["alpha"], max_new_tokens=6)
    assert g == lm.generate(model, trained["tok"], ["alpha"], max_new_tokens=6) and g[0]
    model2, _ = lm.train_lm(trained["td"], trained["tok"], **ARCH, n_experts=4)   # cached: loads
    with torch.no_grad():
        assert torch.equal(model2(input_ids=x).logits, again(input_ids=x).logits)


def test_kv_cached_generation_matches_full_forward(trained):
    model = trained["switch"][0]
    x = torch.from_numpy(data.token_array(trained["td"]["validation"])[:1, :10])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=5, do_sample=False,
                             pad_token_id=0)
        full = model(input_ids=out[:, :-1]).logits[0, -5:].argmax(-1)
    assert torch.equal(full, out[0, -5:])


@pytest.mark.parametrize("kind", ["dense", "switch"])
def test_activation_sites_resolve_on_both_kinds(trained, kind):
    model = trained[kind][0]
    x = torch.from_numpy(data.token_array(trained["td"]["validation"])[:2])
    sites = [f"blocks.{i}.{s}" for i in range(2) for s in activations.SITES] + ["transformer.ln_f"]
    for site in sites:
        a = activations.run_to_site(model, x, site)
        assert a.shape == (2, 32, 32), site
    mod, where = activations.resolve_site(model, "blocks.1.mlp_out")
    assert isinstance(mod, moe_lm.SwitchFFN) == (kind == "switch") and where == "output"
    with activations.splice(model, "blocks.1.mlp_out", torch.zeros_like), torch.no_grad():
        ablated = model(input_ids=x).logits
    with torch.no_grad():
        assert not torch.equal(ablated, model(input_ids=x).logits)


# ----------------------------------------------------------------------------- saelib.laws (chapter 03 helpers)
def test_efficiency_formula_reproduces_paper_table1():
    from saelib import laws

    t = laws.paper_table1()
    got = laws.efficiency(t.total_M * 1e6, t.test_ppl)
    assert len(t) == 16 and abs(got - t.efficiency).max() < 0.0026
    assert (abs(got - t.efficiency) < 0.0005).sum() >= 12


def test_paper_sites_and_capture(one_thread):
    from saelib import laws

    sites = laws.paper_sites(2)
    assert list(sites) == ["embedding", "layer_0_attn", "layer_0_norm1", "layer_0_norm2", "layer_1_attn",
                           "layer_1_norm1", "layer_1_norm2", "final_norm"]
    assert [laws.layer_type(n) for n in sites] == ["embedding"] + ["attention", "norm", "norm"] * 2 + ["norm"]
    model = tiny_gpt2(n_experts=4, n_layer=2)
    x = torch.randint(0, 50, (5, 16))
    got = laws.capture_sites(model, x, list(sites.values()), n_tokens=40, batch_size=2)
    for site, a in got.items():
        ref = activations.run_to_site(model, x, site)[:, 1:].reshape(-1, 16)[:40]
        assert a.shape == (40, 16) and torch.allclose(a, ref, atol=1e-5), site


def test_superposition_readings_bounds():
    from saelib import laws

    torch.manual_seed(0)
    h = torch.relu(torch.randn(500, 12))
    x = torch.randn(500, 6) @ torch.randn(6, 6)
    r = laws.superposition_readings(h, x)
    assert set(r) == set(laws.READINGS)
    for src, n in (("latents", 12), ("activations", 6)):
        for kind in ("correlation", "covariance"):
            s = r[f"{src} {kind} S"]
            assert 1 <= s <= math.sqrt(n) + 1e-9
            assert r[f"{src} {kind} S/sqrt(n)"] == pytest.approx(s / math.sqrt(n))
            assert r[f"{src} {kind} 1/S"] == pytest.approx(1 / s)
            assert r[f"{src} {kind} PR/n"] == pytest.approx(s * s / n)
