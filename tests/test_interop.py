"""Issue 10: SAELens files of every layout load with the file's reconstruction, and saelib's
exports load in the real ``sae-lens`` package (pinned in requirements.txt) with ours."""
import json

import pytest
import torch
from safetensors.torch import save_file

from saelib import saelens as SL
from saelib import saes

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is a pinned requirement (requirements.txt)")

D, N, K = 16, 128, 4


def assert_same(a, b, rel=3e-5):
    """Equal to float32 rounding: max |a - b| <= rel * max |b| (the outputs reach ~100 here)."""
    a, b = a.detach(), b.detach()
    err, scale = float((a - b).abs().max()), float(b.abs().max())
    assert err <= rel * scale, f"max |diff| {err:.3g} > {rel} x max |ref| {scale:.3g}"


def data(n=512, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g) * scale + 1.0


def rand_saelens(arch, seed=0, **cfg):
    """A SAELens inference SAE of ``arch`` with random weights, unequal decoder norms, non-zero biases."""
    from sae_lens import SAE
    from sae_lens.registry import get_sae_class

    cls, cfg_cls = get_sae_class(arch)
    sae = cls(cfg_cls(d_in=D, d_sae=N, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.startswith("b") else 1.0))
        sae.W_dec.mul_(torch.rand(N, 1, generator=g) * 3 + 0.2)      # rows of unequal norm
        if arch == "jumprelu":
            sae.threshold.fill_(0.7)
    assert isinstance(sae, SAE)
    return sae


def recon_saelens(sae, x):
    with torch.no_grad():
        return sae.decode(sae.encode(x))


# ----------------------------------------------------------------------------- SAELens -> saelib
@pytest.mark.parametrize("arch, cfg, kind", [
    ("standard", {}, "relu"),
    ("gated", {}, "gated"),
    ("topk", {"k": K}, "topk"),
    ("topk", {"k": K, "rescale_acts_by_decoder_norm": True}, "topk"),
    ("jumprelu", {}, "batchtopk"),
])
@pytest.mark.parametrize("b_dec_in", [True, False])
def test_saelens_files_load_with_the_files_reconstruction(tmp_path, arch, cfg, kind, b_dec_in):
    sae = rand_saelens(arch, apply_b_dec_to_input=b_dec_in, **cfg)
    sae.save_model(tmp_path / "f")
    x = data()
    ours = saes.load_saelens(tmp_path / "f", k=K if arch == "jumprelu" else None)
    assert ours.kind == kind
    out = ours(x)
    ref = recon_saelens(sae, x)
    assert_same(out.x_hat, ref)
    assert out.l0 == pytest.approx(float((sae.encode(x) != 0).float().sum(1).mean()), abs=1e-6)
    assert torch.allclose(ours.W_dec.norm(dim=-1), torch.ones(N), atol=1e-5)   # unit rows, as the SPEC says


def write_pre6(path, cfg, weights):
    path.mkdir()
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path / "sae_weights.safetensors"))


def pre6_weights(seed=0, unequal=True):
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(N, D, generator=g)
    W_dec = W_dec * (torch.rand(N, 1, generator=g) * 3 + 0.2) if unequal else W_dec / W_dec.norm(dim=-1, keepdim=True)
    return {"W_enc": torch.randn(D, N, generator=g), "W_dec": W_dec, "b_enc": torch.randn(N, generator=g) * 0.3,
            "b_dec": torch.randn(D, generator=g) * 0.3}


PRE6_TOPK = {"architecture": "standard", "d_in": D, "d_sae": N, "dtype": "float32", "device": "cpu",
             "model_name": "gpt2", "hook_point": "blocks.8.hook_resid_pre", "hook_point_layer": 8,
             "hook_point_head_index": None, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K},
             "apply_b_dec_to_input": True, "finetuning_scaling_factor": False, "context_size": 128,
             "dataset_path": "Skylion007/openwebtext", "normalize_activations": False,
             "sae_lens_training_version": "3.13.0"}


def test_pre6_topk_file_is_a_topk_sae_as_saelens_reads_it(tmp_path):
    """SAELens < 6.0 saved TopK SAEs as architecture 'standard' + activation_fn_str 'topk'."""
    from sae_lens import SAE

    write_pre6(tmp_path / "f", PRE6_TOPK, pre6_weights())
    x = data()
    ref_sae = SAE.load_from_disk(tmp_path / "f")
    ours = saes.load_saelens(tmp_path / "f")
    assert ours.kind == "topk" and ours.k == K
    out = ours(x)
    assert out.l0 == pytest.approx(K)
    assert_same(out.x_hat, recon_saelens(ref_sae, x))


@pytest.mark.parametrize("layout", [
    {},                                                                   # the key set above
    {"normalize_activations": None},
    {"activation_fn_str": "relu", "activation_fn_kwargs": {}},            # a pre-6 standard SAE
    {"sae_lens_version": "5.4.0"},
    {"architecture": "topk", "activation_fn_str": None, "k": K, "sae_lens_version": "6.0.0"},   # 6.x layout
])
def test_every_config_layout_matches_saelens(tmp_path, layout):
    from sae_lens import SAE

    cfg = {key: val for key, val in {**PRE6_TOPK, **layout}.items() if val is not None or key == "normalize_activations"}
    if layout.get("sae_lens_version", "").startswith("6"):
        cfg = {"architecture": "topk", "d_in": D, "d_sae": N, "k": K, "dtype": "float32", "device": "cpu",
               "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
               "metadata": {"sae_lens_version": "6.0.0", "hook_name": "blocks.8.hook_resid_pre"}}
    write_pre6(tmp_path / "f", cfg, pre6_weights(seed=1))
    x = data()
    ref = recon_saelens(SAE.load_from_disk(tmp_path / "f"), x)
    assert_same(saes.load_saelens(tmp_path / "f")(x).x_hat, ref)


def test_upgrade_config_follows_saelens():
    from sae_lens.loading.pretrained_sae_loaders import handle_pre_6_0_config

    ours = SL.upgrade_config({**PRE6_TOPK, "normalize_activations": True})
    theirs = handle_pre_6_0_config({**PRE6_TOPK, "normalize_activations": True})
    for key in ("architecture", "k", "normalize_activations", "apply_b_dec_to_input"):
        assert ours[key] == theirs[key], key
    assert ours["hook_name"] == PRE6_TOPK["hook_point"] and "activation_fn_str" not in ours


def test_finetuning_scaling_factor_is_applied(tmp_path):
    w = pre6_weights(unequal=False)
    sf = torch.rand(N, generator=torch.Generator().manual_seed(3)) + 0.5
    cfg = {**PRE6_TOPK, "activation_fn_str": "relu", "activation_fn_kwargs": {}, "finetuning_scaling_factor": True}
    write_pre6(tmp_path / "f", cfg, {**w, "scaling_factor": sf})
    x = data()
    z = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    assert_same(saes.load_saelens(tmp_path / "f")(x).x_hat, (z * sf) @ w["W_dec"] + w["b_dec"])


@pytest.mark.parametrize("change, match", [
    ({"architecture": "matryoshka_batchtopk", "sae_lens_version": "6.2.0"}, "architecture='matryoshka_batchtopk'"),
    ({"architecture": "transcoder", "activation_fn_str": "relu"}, "architecture='transcoder'"),
    ({"activation_fn_str": "tanh-relu", "activation_fn_kwargs": {}}, "activation_fn='tanh-relu'"),
    ({"activation_fn_kwargs": {}}, r"'topk' needs activation_fn_kwargs.k in the file, or pass k="),
    ({"normalize_activations": "layer_norm"}, "normalize_activations='layer_norm'"),
    ({"normalize_activations": "constant_norm_rescale"}, "normalize_activations='constant_norm_rescale'"),
])
def test_what_saelib_cannot_represent_is_refused_by_name(tmp_path, change, match):
    write_pre6(tmp_path / "f", {**PRE6_TOPK, **change}, pre6_weights())
    with pytest.raises(ValueError, match=match):
        saes.load_saelens(tmp_path / "f")


def test_topk_file_without_k_loads_with_k_given(tmp_path):
    write_pre6(tmp_path / "f", {**PRE6_TOPK, "activation_fn_kwargs": {}}, pre6_weights())
    sae = saes.load_saelens(tmp_path / "f", k=K)
    assert sae.kind == "topk" and sae(data()).l0 == pytest.approx(K)


def test_jumprelu_with_per_latent_thresholds_is_refused(tmp_path):
    sae = rand_saelens("jumprelu")
    with torch.no_grad():
        sae.threshold.copy_(torch.linspace(0.1, 1.0, N))
    sae.save_model(tmp_path / "f")
    with pytest.raises(ValueError, match="per-latent"):
        saes.load_saelens(tmp_path / "f", k=K)


def test_expected_average_normalization_loads_with_a_warning(tmp_path):
    write_pre6(tmp_path / "f", {**PRE6_TOPK, "normalize_activations": True}, pre6_weights())
    with pytest.warns(UserWarning, match="expected_average_only_in"):
        saes.load_saelens(tmp_path / "f")


# ----------------------------------------------------------------------------- saelib -> SAELens
def trained(kind, scale=5.0):
    from saelib import train
    kw = {"k": K} if kind in ("topk", "batchtopk") else {}
    sae = saes.build(kind, d_in=D, n_latents=N, **kw)
    train.fit(sae, data(scale=scale), steps=30, batch_size=128, normalize="unit", progress=False)
    assert sae.norm_scaling_factor != 1.0
    return sae


@pytest.mark.parametrize("kind", saes.DENSE_KINDS)
def test_every_dense_kind_exported_loads_in_saelens_with_our_reconstruction(tmp_path, kind):
    from sae_lens import SAE

    sae = trained(kind)
    sae.save_saelens(tmp_path / "f")
    x = data(seed=5, scale=5.0)
    with torch.no_grad():
        ours = sae(x).x_hat
    assert_same(recon_saelens(SAE.load_from_disk(tmp_path / "f"), x), ours)
    back = saes.load_saelens(tmp_path / "f")          # and back: the same SAE
    assert back.kind == kind and back.norm_scaling_factor == pytest.approx(sae.norm_scaling_factor, rel=1e-4)
    assert_same(back(x).x_hat, ours)


def test_decoder_scale_survives_save_load_and_export(tmp_path):
    from sae_lens import SAE

    ref = rand_saelens("topk", k=K)
    ref.save_model(tmp_path / "f")
    sae = saes.load_saelens(tmp_path / "f")
    assert "dec_scale" in dict(sae.named_buffers())
    x = data()
    want = recon_saelens(ref, x)
    sae.save(tmp_path / "ours")
    assert_same(saes.load(tmp_path / "ours")(x).x_hat, want)
    sae.save_saelens(tmp_path / "again")
    assert_same(recon_saelens(SAE.load_from_disk(tmp_path / "again"), x), want)


def test_training_folds_the_decoder_scale_into_unit_rows(tmp_path):
    from saelib import train

    rand_saelens("standard").save_model(tmp_path / "r")
    rand_saelens("topk", k=K).save_model(tmp_path / "t")
    relu = saes.load_saelens(tmp_path / "r")
    assert "dec_scale" not in dict(relu.named_buffers())   # folded at load: exact for ReLU
    topk = saes.load_saelens(tmp_path / "t")
    with pytest.warns(UserWarning, match="changes which latents TopK keeps"):
        train.fit(topk, data(), steps=3, batch_size=128, progress=False)
    assert "dec_scale" not in dict(topk.named_buffers()) and not topk.config["decoder_scale"]
    assert torch.allclose(topk.W_dec.norm(dim=-1), torch.ones(N), atol=1e-5)
