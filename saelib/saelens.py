"""SAELens's on-disk format (``cfg.json`` + ``sae_weights.safetensors``), both ways.

``saes.to_saelens`` / ``saes.load_saelens`` call these. SAELens (Bloom et al.,
github.com/jbloomAus/SAELens) has written several config layouts; :func:`upgrade_config`
reads all of them the way SAELens's own loader does (``handle_pre_6_0_config`` in
``sae_lens/loading/pretrained_sae_loaders.py``, applied when the file has no
``sae_lens_version`` >= 6.0, in ``cfg`` or ``cfg["metadata"]``):

* keys renamed: ``hook_point`` -> ``hook_name``, ``hook_point_head_index`` ->
  ``hook_head_index``, ``activation_fn_str`` -> ``activation_fn``;
* defaults: ``architecture="standard"``, ``activation_fn="relu"``,
  ``apply_b_dec_to_input=True``;
* ``activation_fn="topk"`` with ``activation_fn_kwargs={"k": k}`` is a TopK SAE
  (``architecture="topk"``, ``k``), whatever ``architecture`` says;
* a boolean ``normalize_activations``: False -> "none", True -> "expected_average_only_in";
  null -> "none".

SAELens's inference semantics, reproduced exactly (x = input, all per latent i):
``pre = W_enc^T (x - b_dec [if apply_b_dec_to_input]) + b_enc``;
standard ``z = ReLU(pre)``; topk ``z = TopK_k(pre)`` (with ``rescale_acts_by_decoder_norm``:
on ``pre * ||W_dec_i||``, decoded with ``z_i / ||W_dec_i||``); jumprelu
``z = ReLU(pre) * 1[pre > threshold_i]``; gated as in Rajamanoharan et al.;
``x_hat = z W_dec + b_dec``; a file's per-latent ``scaling_factor`` multiplies z before
decoding (pre-6.0 fine-tuning).

Mapping onto saelib: decoder rows are made unit-norm (the SPEC). When all rows share one
norm ``c`` (an exported input normalisation) it becomes ``norm_scaling_factor = 1/c``.
Otherwise, for relu/gated (and TopK with ``rescale_acts_by_decoder_norm``) the norms are
folded into the encoder, which is exact (ReLU and the gate are positively homogeneous);
for topk and jumprelu (-> batchtopk), whose selection depends on the unscaled
pre-activations, they are kept as a per-latent decoder scale ``sae.dec_scale`` applied to
the code after selection, so the reconstruction equals the file's. Training needs unit
rows: ``SAE.normalize_decoder_`` (called by ``train.fit``) folds the scale into the
encoder first, with a warning where that changes TopK's selection.

Refused with a ValueError naming the key: architectures other than standard, topk,
gated, jumprelu; ``activation_fn`` other than relu/topk; a TopK without ``k``;
``normalize_activations`` "constant_norm_rescale", "layer_norm" and "covariance_whitening"
(a per-row or learned input transform saelib does not have); a JumpReLU with
per-latent thresholds of more than one value (saelib's batchtopk has one threshold).
``"expected_average_only_in"`` is accepted with a warning: the dataset-wide factor is not
in the file, and SAELens applies the SAE to the inputs as given too.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from .utils import atomic_path

SAELENS_WEIGHTS, SAELENS_CFG = "sae_weights.safetensors", "cfg.json"
ARCH_TO_SAELENS = {"relu": "standard", "gated": "gated", "topk": "topk", "batchtopk": "jumprelu"}
SAELENS_TO_KIND = {"standard": "relu", "topk": "topk", "gated": "gated", "jumprelu": "batchtopk"}
PRE_6_RENAMES = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
                 "activation_fn_str": "activation_fn"}
_UNSUPPORTED_NORM = ("constant_norm_rescale", "layer_norm", "covariance_whitening")


def _version_tuple(text) -> tuple:
    import re

    nums = re.findall(r"\d+", str(text))[:3]
    return tuple(int(n) for n in nums) if nums else (0,)


def upgrade_config(cfg: dict) -> dict:
    """A SAELens ``cfg.json`` of any version in the 6.x layout (see the module doc); the input is not changed."""
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    new = dict(cfg)
    if not version or _version_tuple(version) < (6,):
        new = {PRE_6_RENAMES.get(k, k): v for k, v in cfg.items()}
        new.setdefault("apply_b_dec_to_input", True)
        new.setdefault("activation_fn", "relu")
        new.setdefault("architecture", "standard")
        kw = new.get("activation_fn_kwargs") or {}
        if new.get("activation_fn") == "topk" and kw.get("k") is not None:
            new["architecture"], new["k"] = "topk", kw["k"]
        if isinstance(new.get("normalize_activations"), bool):
            new["normalize_activations"] = "expected_average_only_in" if new["normalize_activations"] else "none"
    if new.get("normalize_activations") is None:
        new["normalize_activations"] = "none"
    new.setdefault("apply_b_dec_to_input", True)
    return new


def to_saelens(sae, path) -> Path:
    """Export a dense SAE in SAELens's format: ``cfg.json`` + ``sae_weights.safetensors``
    with ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc``, ``b_dec`` (gated:
    ``b_gate``, ``b_mag``, ``r_mag`` instead of ``b_enc``; batchtopk is written as
    ``jumprelu`` with a constant ``threshold``, as SAELens saves BatchTopK SAEs).
    The input normalisation is folded into the weights (``W_enc * s``, ``W_dec / s``,
    ``b_dec / s``) so the file takes raw activations (``normalize_activations="none"``);
    a per-latent decoder scale goes into ``W_dec``'s row norms (TopK with
    ``rescale_acts_by_decoder_norm=False``). Written atomically."""
    from safetensors.torch import save_file

    from .saes import DENSE_KINDS

    if sae.kind not in DENSE_KINDS:
        raise ValueError(f"kind={sae.kind!r} has no SAELens equivalent; export works for {list(DENSE_KINDS)}")
    s = sae.norm_scaling_factor
    W_dec = sae.W_dec * sae.dec_scale[:, None] if "dec_scale" in sae._buffers else sae.W_dec
    sd = {"W_enc": (sae.W_enc * s).T, "W_dec": W_dec / s, "b_dec": sae.b_pre / s}
    if sae.kind == "gated":
        sd.update(b_gate=sae.b_gate, b_mag=sae.b_mag, r_mag=sae.r_mag)
    else:
        sd["b_enc"] = sae.b_enc
    if sae.kind == "batchtopk":
        sd["threshold"] = torch.full_like(sae.b_enc, sae.threshold)
    cfg = {"architecture": ARCH_TO_SAELENS[sae.kind], "d_in": sae.d_in, "d_sae": sae.n_latents,
           "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none",
           "meta": {"saelib_config": sae.config}}
    if sae.kind == "topk":
        cfg.update(k=sae.k, rescale_acts_by_decoder_norm=False)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.mkdir()
        save_file({k: v.detach().float().cpu().contiguous() for k, v in sd.items()}, str(tmp / SAELENS_WEIGHTS))
        (tmp / SAELENS_CFG).write_text(json.dumps(cfg, indent=2))
    return path


def _refuse(key, value, allowed):
    raise ValueError(f"{SAELENS_CFG}: {key}={value!r} cannot be represented by saelib; {allowed}")


@torch.no_grad()
def load_saelens(path, device="cpu", k: int | None = None):
    """Load an SAE saved by SAELens (any version) or by :func:`to_saelens` as a saelib SAE
    whose ``sae(x).x_hat`` equals the file's reconstruction (to float32 rounding).

    architectures standard, topk, gated, jumprelu (one shared threshold) -> relu, topk,
    gated, batchtopk. ``k``: only for a TopK file that does not state it. Raises a
    ValueError naming the key for what saelib cannot represent (module doc)."""
    from safetensors.torch import load_file

    from .saes import build

    path = Path(path)
    if not (path / SAELENS_CFG).exists():
        raise ValueError(f"path={str(path)!r} holds no {SAELENS_CFG}; not an SAELens SAE")
    if not (path / SAELENS_WEIGHTS).exists():
        raise ValueError(f"path={str(path)!r} holds no {SAELENS_WEIGHTS}")
    raw = json.loads((path / SAELENS_CFG).read_text())
    cfg = upgrade_config(raw)
    arch = cfg["architecture"]
    kind = SAELENS_TO_KIND.get(arch)
    if kind is None:
        _refuse("architecture", arch, f"choose one of {sorted(SAELENS_TO_KIND)}")
    act = cfg.get("activation_fn", "relu")
    if arch == "standard" and act == "topk" and k is not None:    # a pre-6.0 TopK file that lost its k
        arch, kind = "topk", "topk"
    if arch == "standard" and act not in ("relu", None):
        _refuse("activation_fn", act, "a 'standard' SAE must use 'relu' ('topk' needs activation_fn_kwargs.k "
                "in the file, or pass k=)")
    norm_mode = cfg["normalize_activations"]
    if norm_mode in _UNSUPPORTED_NORM or norm_mode not in ("none", "expected_average_only_in"):
        _refuse("normalize_activations", norm_mode, "fold the normalisation into the weights first "
                "(only 'none' and 'expected_average_only_in' load)")
    if norm_mode == "expected_average_only_in":
        warnings.warn(f"{path / SAELENS_CFG}: normalize_activations='expected_average_only_in' means the SAE was "
                      "trained on inputs scaled by a dataset-wide factor that the file does not hold; like SAELens, "
                      "the loaded SAE takes inputs as given: scale them yourself", stacklevel=2)
    sd = {key: val.float() for key, val in load_file(str(path / SAELENS_WEIGHTS)).items()}
    if "log_threshold" in sd:                        # older JumpReLU checkpoints
        sd["threshold"] = sd.pop("log_threshold").exp()
    missing = [w for w in ("W_enc", "W_dec", "b_dec") if w not in sd]
    if missing:
        raise ValueError(f"{path / SAELENS_WEIGHTS} lacks {missing}")
    W_enc, W_dec, b_dec = sd["W_enc"].T.contiguous(), sd["W_dec"].clone(), sd["b_dec"]
    n, d = W_dec.shape
    if W_enc.shape != (n, d) or b_dec.shape != (d,):
        raise ValueError(f"{path / SAELENS_WEIGHTS}: W_enc {tuple(sd['W_enc'].shape)}, W_dec {tuple(W_dec.shape)}, "
                         f"b_dec {tuple(b_dec.shape)} do not fit [d_in, d_sae] / [d_sae, d_in] / [d_in]")
    for key, want in (("d_in", d), ("d_sae", n)):
        if cfg.get(key) is not None and int(cfg[key]) != want:
            raise ValueError(f"{SAELENS_CFG}: {key}={cfg[key]} but the weights have {want}")
    if kind in ("topk", "batchtopk"):
        k = k if k is not None else cfg.get("k") or (cfg.get("meta") or {}).get("saelib_config", {}).get("k")
        if k is None:
            raise ValueError(f"k is needed for architecture={arch!r} and is not in {SAELENS_CFG}; pass k=")
    if kind == "batchtopk":
        thr = sd["threshold"]
        if not torch.allclose(thr, thr.mean().expand_as(thr), rtol=1e-5, atol=1e-8):
            _refuse("threshold", f"{int(thr.unique().numel())} distinct per-latent values",
                    "a JumpReLU SAE with per-latent thresholds has no saelib kind (batchtopk has one threshold)")

    # pre-6.0 fine-tuning scale: multiplies the code before decoding = scales the decoder rows
    if "scaling_factor" in sd:
        W_dec = W_dec * sd.pop("scaling_factor")[:, None]
    b_name = "b_gate" if kind == "gated" else "b_enc"
    if not cfg.get("apply_b_dec_to_input", True):   # pre = W x + b  ==  W (x - b_dec) + (b + W b_dec)
        shift = W_enc @ b_dec
        sd[b_name] = sd[b_name] + shift
        if kind == "gated":
            sd["b_mag"] = sd["b_mag"] + sd["r_mag"].exp() * shift
    rescaled_topk = kind == "topk" and bool(cfg.get("rescale_acts_by_decoder_norm", False))

    meta = (cfg.get("meta") or {}).get("saelib_config", {})
    norms = W_dec.norm(dim=-1)
    equal = bool(norms.min() > 0) and torch.allclose(norms, norms.mean().expand_as(norms), rtol=1e-4)
    fold = not equal and (kind in ("relu", "gated") or rescaled_topk)
    keep_scale = not equal and not fold
    sae = build(kind, d_in=d, n_latents=n, k=int(k) if kind in ("topk", "batchtopk") else None,
                l1_coef=meta.get("l1_coef") if kind in ("relu", "gated") else None)
    if keep_scale:
        sae.config["decoder_scale"] = True
        sae.register_buffer("dec_scale", torch.ones(n))
    thr = float(sd["threshold"].mean()) if kind == "batchtopk" else None
    if equal:   # x_hat = (W_unit^T z + s b_dec) / s with s = 1/c; pre uses (s x - s b_dec)
        s = 1.0 / float(norms.mean())
        s = s if abs(s - 1.0) > 1e-6 else 1.0
        sae.config["norm_scaling_factor"] = s
        sae.W_enc.copy_(W_enc / s)
        sae.W_dec.copy_(W_dec * s)
        sae.b_pre.copy_(b_dec * s)
    else:
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        unit = W_dec / safe[:, None]
        unit[norms == 0] = torch.nn.functional.normalize(torch.ones(d), dim=0)   # a dead latent: scale 0
        sae.W_dec.copy_(unit)
        sae.b_pre.copy_(b_dec)
        if fold:   # exact: z_i d_i = (n_i z_i) (d_i / n_i), and n_i z_i is what the scaled encoder gives
            sae.W_enc.copy_(W_enc * norms[:, None])
            sd = {key: (val * norms if key in ("b_enc", "b_gate", "b_mag") else val) for key, val in sd.items()}
        else:
            sae.W_enc.copy_(W_enc)
            sae.dec_scale.copy_(norms)
    if kind == "batchtopk":
        sae.threshold_sum.fill_(thr)
        sae.threshold_count.fill_(1.0)
    for name in ("b_enc", "b_gate", "b_mag", "r_mag"):
        if hasattr(sae, name):
            if name not in sd:
                raise ValueError(f"{path / SAELENS_WEIGHTS} lacks {name!r}, needed by architecture={arch!r}")
            getattr(sae, name).copy_(sd[name])
    return sae.to(device).eval()
