"""The load-balancing term on the raw-activation scale (the papers' convention) vs the normalised one."""
import pytest
import torch

from saelib import saes


@pytest.mark.parametrize("kind, extra", [("switch", {}), ("scale", {"n_active": 2})])
def test_balance_term_scales_like_the_reconstruction_error(kind, extra):
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(0)) * 3
    parts = {}
    for scale in ("raw", "normalized"):
        sae = saes.build(kind, d_in=16, n_latents=64, k=4, n_experts=4, balance_scale=scale, seed=1, **extra)
        sae.config["norm_scaling_factor"] = 0.5            # inputs scaled by s = 0.5 during training
        out = sae(x)
        parts[scale] = sae.loss(x, out)[1]
    assert parts["raw"]["recon"] == pytest.approx(parts["normalized"]["recon"])
    # raw: alpha d L_aux is weighed against ||x - x_hat||^2 of the raw activations, so it is multiplied by s^2
    assert parts["raw"]["lb"] == pytest.approx(0.25 * parts["normalized"]["lb"], rel=1e-6)
    lb = sae.config["alpha"] * 16 * 4 * float((sae.expert_load(out) * out.loss_terms["router_probs"].mean(0)).sum().detach())
    assert parts["normalized"]["lb"] == pytest.approx(lb, rel=1e-5)


def test_balance_scale_is_validated_and_default_is_the_papers():
    assert saes.build("switch", d_in=8, n_latents=32, k=2, n_experts=4).config["balance_scale"] == "raw"
    assert "balance_scale" not in saes.build("topk", d_in=8, n_latents=32, k=2).config
    with pytest.raises(ValueError, match="balance_scale"):
        saes.build("switch", d_in=8, n_latents=32, k=2, n_experts=4, balance_scale="paper")
