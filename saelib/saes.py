"""The SAE zoo: ``relu``, ``gated``, ``topk``, ``batchtopk``, ``switch``, ``scale``.

One module, one ``SAE`` class; the kind picks the encoder. Papers (full text in
``../shared/papers``): [switch] Mudide et al., Switch SAEs; [scale] Xu et al.,
Scale SAE; plus Gao et al. 2024 (TopK, AuxK), Bussmann et al. 2024 (BatchTopK),
Rajamanoharan et al. 2024 (Gated).

Weights (SPEC layout): ``W_enc`` / ``W_dec`` ``[n_latents, d_in]`` (rows of
``W_dec`` = unit-norm dictionary directions), ``b_pre`` ``[d_in]``; ``b_enc``
``[n_latents]`` (relu, topk, batchtopk); ``b_gate``, ``b_mag``, ``r_mag``
(gated); ``W_router`` ``[n_experts, d_in]``, ``b_router`` ``[d_in]`` and, for
scale with feature scaling, ``omega`` ``[n_experts]`` (+ ``lp_transform``
``[d_in, d_in]`` for the learned decomposition); ``dec_scale`` ``[n_latents]`` (a buffer, only
for an SAE loaded from a file whose decoder rows have unequal norms, see
:mod:`saelib.saelens`: the code is multiplied by it after selection; training folds it
into the encoder). Expert ``e`` owns latents
``e*m .. (e+1)*m - 1`` with ``m = n_latents / n_experts``; its encoder is
``W_enc.view(E, m, d)[e]``.

Forward passes (``xc = x * s - b_pre``; ``s`` = ``config["norm_scaling_factor"]``,
1 unless ``train.fit(normalize="unit")`` set it; the SAE applies it itself, so
``sae(x)`` takes and returns raw activations):

* relu:      ``z = ReLU(W_enc xc + b_enc)``, loss ``||x - x_hat||^2 + l1_coef * ||z||_1`` (unit-norm
  decoder rows, so this equals Anthropic's ``sum_i z_i ||d_i||``)
* gated:     ``pi_gate = W_enc xc + b_gate``, ``pi_mag = exp(r_mag) * (W_enc xc) + b_mag``,
  ``z = 1[pi_gate > 0] * ReLU(pi_mag)``; loss adds ``l1_coef * ||ReLU(pi_gate)||_1`` and
  the auxiliary reconstruction ``||x - (W_dec^T ReLU(pi_gate) + b_pre)||^2`` through a
  frozen (detached) decoder (Rajamanoharan et al. eq. 8-10).
* topk:      ``z = ReLU(TopK_k(W_enc xc + b_enc))`` (Gao et al. eq. 2 with an encoder bias).
* batchtopk: training: ReLU, then the ``k * B`` largest entries of the whole batch;
  inference: ``z = ReLU(pre) * 1[pre > theta]`` with ``theta`` the mean over training
  batches of the smallest kept activation (``train.fit`` restarts the mean when the
  learning-rate decay starts, so theta averages the last 20% of steps).
* switch:    [switch] eq. 3-4: ``p = softmax(W_router (x s - b_router))``, ``i* = argmax p``,
  ``x_hat = p_i* W_dec,i*^T ReLU(TopK_k(W_enc,i* xc)) + b_pre`` (experts have no bias).
* scale:     [scale] eq. 2.3-2.5: the ``n_active`` most probable experts, ONE global TopK
  over their ``n_active * m`` pre-activations, ``x_hat = sum_{i in T} p_i E_i(xc) + b_pre``
  with ``p`` the full softmax (``renormalize_router=True``: the official code's softmax
  over the selected probabilities instead; ``weight_before_topk=True``: the official code's
  order, TopK over the router-weighted ``p_i ReLU(f_ij)`` instead of eq. 2.3's raw
  ``f_ij``). Feature scaling (eq. 2.5) encodes with
  ``W_hat_i = W_low,i + (1 + omega_i)(W_i - W_low,i)``; ``W_low,i`` = mean of expert i's
  rows ("mean", the paper's method 0), the rectangular identity ``eye(m, d)``
  ("identity", appendix C method 1; ``I`` is only square when ``m == d``) or
  ``lp_transform @ mean_i`` with ``lp_transform`` learned and initialised to the
  identity ("learned", method 2, as in the official code).

Switch/scale loss: ``L_recon + alpha * d * L_aux`` with ``L_aux = N sum_i f_i P_i``
([switch] sec. 3.3, alpha = 3). With several active experts ``f_i`` is the fraction of
(row, slot) assignments that go to expert ``i`` (``sum_i f_i = 1``; the official Scale
code uses the mean selected probability instead), ``P_i`` the mean router probability.

``out.values`` are the coefficients the decoder multiplies (for switch/scale the TopK
values times the router weight of their expert), so for every kind
``x_hat = (sparse_decode(values, indices, W_dec) + b_pre) / s``; ``out.l0`` counts
non-zeros after the sparsifying activation (the official Switch/Scale code logs
pre-TopK counts; we do not).
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import kernels
from .utils import atomic_path, check_choice, check_positive_int

KINDS = ("relu", "gated", "topk", "batchtopk", "switch", "scale")
DENSE_KINDS = ("relu", "gated", "topk", "batchtopk")   # exportable to SAELens
TOPK_KINDS = ("topk", "batchtopk", "switch", "scale")
MOE_KINDS = ("switch", "scale")
DECOMPOSITIONS = ("mean", "identity", "learned")
BALANCE_SCALES = ("raw", "normalized")   # what the load-balancing term is weighed against (build docstring)
# L1 coefficients for inputs scaled to E||x||^2 = d_in, which train.fit does by default
# (normalize="unit"), so build + fit with no options work on activations of any scale. Chosen on
# the planted-dictionary data of tests/test_train.py (planted L0 4.5): relu reaches L0 ~7-8,
# gated L0 ~5-6, both with mmcs > 0.97. With normalize=None they assume that scale themselves.
DEFAULT_L1 = {"relu": 2.0, "gated": 3.0}
WEIGHTS_FILE, CONFIG_FILE = "sae.safetensors", "config.json"
SAELENS_WEIGHTS, SAELENS_CFG = "sae_weights.safetensors", "cfg.json"   # (saelib.saelens)
_MASKED = -1e30  # bias that keeps a latent out of a TopK (AuxK on switch/scale)


@dataclass
class SAEOutput:
    """What ``sae(x)`` returns.

    ``x_hat`` [B, d_in] in the units of ``x``; ``l0`` mean non-zero latents per row
    (float, after the sparsifying activation); ``values``/``indices`` [B, w] the active
    coefficients and their latent ids (TopK kinds; ``w = k``, for batchtopk the widest
    row, the others padded with zero values); ``latents`` [B, n_latents] dense code (relu, gated); ``router_probs`` [B, n_experts] and ``expert_idx`` [B, n_active]
    (switch, scale); ``loss_terms``: tensors ``sae.loss`` needs (gate activations,
    the router's choice, ...). ``l0_tensor`` is ``l0`` as a 0-dim float64 tensor on the
    SAE's device (no host round trip: training reads it only at log rows)."""
    x_hat: torch.Tensor
    l0_tensor: torch.Tensor
    values: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    loss_terms: dict = field(default_factory=dict)
    router_probs: torch.Tensor | None = None
    expert_idx: torch.Tensor | None = None
    latents: torch.Tensor | None = None

    @property
    def l0(self) -> float:
        """Mean non-zero latents per row (reads ``l0_tensor`` from the device)."""
        return float(self.l0_tensor)


# ---------------------------------------------------------------------------
# construction and validation
# ---------------------------------------------------------------------------
def build(kind: str, *, d_in: int, n_latents: int, k: int | None = None, n_experts: int = 1,
          n_active: int | None = None, feature_scaling: bool | None = None, decomposition: str = "mean",
          l1_coef: float | None = None, alpha: float = 3.0, renormalize_router: bool = False,
          weight_before_topk: bool = False, balance_scale: str = "raw", seed: int = 0) -> "SAE":
    """Build an SAE of ``kind`` (one of :data:`KINDS`).

    ``n_latents`` is the whole dictionary (split evenly over ``n_experts`` for switch and
    scale). ``k``: latents kept per row (TopK kinds). ``n_active``: experts per row (1 for
    switch, default 2 for scale). ``feature_scaling`` (scale only, default True) and
    ``decomposition`` in :data:`DECOMPOSITIONS`. ``l1_coef`` (relu, gated; default
    :data:`DEFAULT_L1`, meant for inputs with E||x||^2 = d_in, which ``train.fit``'s default
    ``normalize="unit"`` provides). ``alpha``: load-balancing
    weight (switch, scale). ``balance_scale`` (switch, scale): ``"raw"`` (default, the
    papers' convention) weighs ``alpha * d * L_aux`` against the reconstruction error of the
    *raw* activations, also when training on inputs scaled by ``s = norm_scaling_factor``
    (the term is multiplied by ``s**2`` like the error); ``"normalized"`` weighs it against
    the error of the scaled inputs (the book's convention before chapter 01's review: at
    E||x||^2 = 9.2 d the balancing term then weighs 9.2x more than in the paper).
    ``renormalize_router`` and ``weight_before_topk`` (scale only, default False: the paper)
    are the official Scale code's router weights and TopK order (module docstring).
    ``seed`` fixes the initial weights. Bad input raises a ValueError naming the parameter."""
    check_choice("kind", kind, KINDS)
    check_positive_int("d_in", d_in)
    check_positive_int("n_latents", n_latents)
    check_positive_int("n_experts", n_experts)
    moe = kind in MOE_KINDS
    if not moe and n_experts != 1:
        raise ValueError(f"n_experts={n_experts} is only allowed for kind in {list(MOE_KINDS)}; kind={kind!r} has 1 expert")
    if n_latents % n_experts:
        raise ValueError(f"n_latents={n_latents} is not divisible by n_experts={n_experts}")
    m = n_latents // n_experts
    if n_active is None:
        n_active = 2 if kind == "scale" and n_experts >= 2 else 1
    check_positive_int("n_active", n_active)
    if kind != "scale" and n_active != 1:
        raise ValueError(f"n_active={n_active} is only allowed for kind='scale' (switch routes to exactly one expert)")
    if n_active > n_experts:
        raise ValueError(f"n_active={n_active} exceeds n_experts={n_experts}")
    if feature_scaling is None:
        feature_scaling = kind == "scale"
    if feature_scaling and kind != "scale":
        raise ValueError(f"feature_scaling=True is only allowed for kind='scale', got kind={kind!r}")
    check_choice("decomposition", decomposition, DECOMPOSITIONS)
    if decomposition != "mean" and not feature_scaling:
        raise ValueError(f"decomposition={decomposition!r} needs feature_scaling=True (kind='scale')")
    if kind in TOPK_KINDS:
        if k is None:
            raise ValueError(f"k is required for kind={kind!r}")
        check_positive_int("k", k)
        cap = n_active * m
        if k > cap:
            what = "n_latents" if not moe else f"n_active * n_latents / n_experts = {n_active} * {m}"
            raise ValueError(f"k={k} exceeds the latents a row can use ({what} = {cap})")
    elif k is not None:
        raise ValueError(f"k is not used by kind={kind!r} (its sparsity comes from l1_coef); leave k=None")
    if kind in ("relu", "gated"):
        l1_coef = DEFAULT_L1[kind] if l1_coef is None else l1_coef
        if not isinstance(l1_coef, (int, float)) or isinstance(l1_coef, bool) or not l1_coef >= 0 or math.isinf(l1_coef):
            raise ValueError(f"l1_coef must be a finite number >= 0, got {l1_coef!r}")
        l1_coef = float(l1_coef)
    elif l1_coef is not None:
        raise ValueError(f"l1_coef is only used by kind in ['gated', 'relu'], got kind={kind!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha >= 0 or math.isinf(alpha):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    check_choice("balance_scale", balance_scale, BALANCE_SCALES)
    for name, flag in (("renormalize_router", renormalize_router), ("weight_before_topk", weight_before_topk)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
        if flag and kind != "scale":
            raise ValueError(f"{name}=True is only allowed for kind='scale', got kind={kind!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    cfg = dict(kind=kind, d_in=int(d_in), n_latents=int(n_latents), k=None if k is None else int(k),
               n_experts=int(n_experts), n_active=int(n_active), feature_scaling=bool(feature_scaling),
               decomposition=decomposition, l1_coef=l1_coef, alpha=float(alpha) if moe else None,
               renormalize_router=bool(renormalize_router), seed=seed, norm_scaling_factor=1.0,
               **({"balance_scale": balance_scale} if moe else {}),
               **({"weight_before_topk": True} if weight_before_topk else {}))   # absent = the paper's order
    return SAE(cfg)


def _weighted_topk(x, W, expert_idx, w_sel, k, b_pre):
    """The official Scale code's encoder order (``weight_before_topk=True``): every selected
    expert's ``ReLU(W_i (x - b_pre))`` times its router weight, then one TopK over the
    ``n_active * m`` weighted values; eq. 2.3 of the paper selects on the raw ``f_ij``.

    x [B, d], W [E, m, d], expert_idx and w_sel [B, n_active] -> (values [B, k], already
    router-weighted; global latent ids [B, k]). Dense over all experts, as the official code
    runs every expert on every token: an option for comparison, not a fast path."""
    E, m, d = W.shape
    B, e = expert_idx.shape
    pre = (x - b_pre) @ W.reshape(E * m, d).T                            # [B, E*m]
    sel = pre.view(B, E, m).gather(1, expert_idx.unsqueeze(-1).expand(B, e, m))
    vals, local = (sel.relu() * w_sel.unsqueeze(-1)).reshape(B, e * m).topk(k, dim=-1, sorted=False)
    return vals, expert_idx.gather(1, torch.div(local, m, rounding_mode="floor")) * m + local % m


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.contiguous())


# ---------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------
class SAE(nn.Module):
    """A sparse autoencoder of any kind; build it with :func:`build`."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        c = self.config
        self.kind, self.d_in, self.n_latents, self.k = c["kind"], c["d_in"], c["n_latents"], c["k"]
        self.n_experts, self.n_active = c["n_experts"], c["n_active"]
        self.m = self.n_latents // self.n_experts
        d, n, E = self.d_in, self.n_latents, self.n_experts
        g = torch.Generator().manual_seed(c["seed"])
        W_dec = F.normalize(torch.randn(n, d, generator=g), dim=-1)
        self.W_dec = _param(W_dec)
        # [switch] app. A: encoder rows parallel to the decoder rows. Unit norm for TopK kinds
        # (pre-activations O(1) on unit-scale inputs); 0.1 for the L1 kinds, whose initial code
        # would otherwise be dense (Anthropic's April-2024 recipe uses the same 0.1 norm).
        self.W_enc = _param(W_dec.clone() * (0.1 if self.kind in ("relu", "gated") else 1.0))
        self.b_pre = _param(torch.zeros(d))
        if self.kind in ("relu", "topk", "batchtopk"):
            self.b_enc = _param(torch.zeros(n))
        if self.kind == "gated":
            self.b_gate, self.b_mag, self.r_mag = (_param(torch.zeros(n)) for _ in range(3))
        if self.kind == "batchtopk":
            self.register_buffer("threshold_sum", torch.zeros((), dtype=torch.float64))
            self.register_buffer("threshold_count", torch.zeros((), dtype=torch.float64))
        if self.kind in MOE_KINDS:
            self.W_router = _param(torch.randn(E, d, generator=g) / math.sqrt(d))
            self.b_router = _param(torch.zeros(d))
        if c["feature_scaling"]:
            self.omega = _param(torch.zeros(E))
            if c["decomposition"] == "learned":
                self.lp_transform = _param(torch.eye(d))
        if c.get("decoder_scale"):   # per-latent decoder row norms of a loaded file (saelib.saelens)
            self.register_buffer("dec_scale", torch.ones(n))

    # -- small helpers -----------------------------------------------------
    @property
    def norm_scaling_factor(self) -> float:
        return float(self.config.get("norm_scaling_factor", 1.0))

    def expert_of_latent(self) -> torch.Tensor:
        """Expert id of every latent, LongTensor [n_latents] (all 0 for dense kinds)."""
        return torch.arange(self.n_latents, device=self.W_dec.device) // self.m

    def decoder_directions(self) -> torch.Tensor:
        """The dictionary: unit-norm decoder rows, [n_latents, d_in] (detached)."""
        return F.normalize(self.W_dec.detach(), dim=-1)

    @property
    def threshold(self) -> float:
        """BatchTopK inference threshold (mean of the minimum kept activation over batches)."""
        if self.kind != "batchtopk":
            raise AttributeError(f"threshold exists only for kind='batchtopk', not {self.kind!r}")
        cnt = float(self.threshold_count)
        return float(self.threshold_sum) / cnt if cnt else 0.0

    @torch.no_grad()
    def reset_threshold_(self):
        if self.kind == "batchtopk":
            self.threshold_sum.zero_()
            self.threshold_count.zero_()

    def expert_encoder(self) -> torch.Tensor:
        """The experts' encoders [E, m, d] as used in the forward pass, i.e. with feature
        scaling ([scale] eq. 2.5) applied: ``W_low + (1 + omega_e) (W_e - W_low)``."""
        W = self.W_enc.view(self.n_experts, self.m, self.d_in)
        if not self.config["feature_scaling"]:
            return W
        dec = self.config["decomposition"]
        if dec == "mean":                              # the same formula, with a lean backward
            return kernels.feature_scale_mean(W, self.omega)
        if dec == "identity":
            low = torch.eye(self.m, self.d_in, device=W.device, dtype=W.dtype).unsqueeze(0)
        else:
            low = (W.mean(1) @ self.lp_transform.T).unsqueeze(1)
        om = self.omega.view(-1, 1, 1)                 # = (1 + omega) W - omega W_low, one pass
        return torch.addcmul(-om * low, W, 1 + om)

    # -- forward -----------------------------------------------------------
    def forward(self, x: torch.Tensor) -> SAEOutput:
        if x.shape[-1] != self.d_in:
            raise ValueError(f"x must have last dimension d_in={self.d_in}, got shape {tuple(x.shape)}")
        lead, s = x.shape[:-1], self.norm_scaling_factor
        xs = x.reshape(-1, self.d_in).to(self.W_dec.dtype)
        xs = xs * s if s != 1 else xs                  # no pass over the batch when s = 1
        out = getattr(self, f"_fwd_{self.kind if self.kind in DENSE_KINDS else 'moe'}")(xs)
        if "dec_scale" in self._buffers:
            self._scale_code(out)
        x_hat = out.x_hat.add_(self.b_pre)             # in place: a fresh decoder output, not saved
        x_hat = x_hat.div_(s) if s != 1 else x_hat     # for backward by the op that made it
        rows = out.loss_terms.get("rows")
        if rows is not None:        # MoE: computed in expert-sorted row order, put back in order
            out.loss_terms["x_hat_sorted"] = x_hat
            x_hat = x_hat.index_select(0, out.loss_terms["inverse"])
        out.x_hat = x_hat.reshape(*lead, self.d_in)
        return out

    def _scale_code(self, out: SAEOutput) -> None:
        """Decoder rows of unequal norm ``dec_scale`` (an SAE loaded from a file that has them,
        inference): the code is selected as the file's SAE selects it, then multiplied by the
        row norms, so ``values``/``latents`` stay the coefficients of the unit-norm rows and
        ``x_hat`` equals the file's ``z W_dec``."""
        if out.latents is not None:
            out.latents = out.latents * self.dec_scale
            out.x_hat = out.latents @ self.W_dec
        else:
            out.values = out.values * self.dec_scale[out.indices]
            out.x_hat = kernels.sparse_decode(out.values, out.indices, self.W_dec)

    def _enc_bias(self, W, b=None):
        """``b - W b_pre``: the encoders compute ``W (x s - b_pre) + b`` as ``W (x s) + (b - W b_pre)``,
        so no ``[B, d_in]`` input needs a gradient (b_pre's is a matrix-vector product)."""
        return torch.mv(W, self.b_pre).neg() if b is None else torch.addmv(b, W, self.b_pre, alpha=-1)

    def _fwd_relu(self, xs):
        z = torch.addmm(self._enc_bias(self.W_enc, self.b_enc), xs, self.W_enc.T).relu_()
        return SAEOutput(z @ self.W_dec, _l0(z), latents=z, loss_terms={"l1_acts": z})

    def _fwd_gated(self, xs):
        pre = torch.addmm(self._enc_bias(self.W_enc), xs, self.W_enc.T)   # (x s - b_pre) W^T; W_mag = exp(r_mag) W_gate shares it
        pi_gate = pre + self.b_gate
        gate = pi_gate > 0
        z = torch.where(gate, torch.addcmul(self.b_mag, pre, self.r_mag.exp()).relu_(), 0.0)
        return SAEOutput(z @ self.W_dec, _l0(z), latents=z, loss_terms={"l1_acts": pi_gate.relu_()})

    def _fwd_topk(self, xs):
        v, i = kernels.topk_encode(xs, self.W_enc, self.b_enc, self.k, b_pre=self.b_pre)
        return SAEOutput(kernels.sparse_decode(v, i, self.W_dec), _l0(v), values=v, indices=i)

    def _fwd_batchtopk(self, xs):
        # training: the k*B largest activations of the whole batch; inference: pre > theta.
        # One dense matmul (block by block), then only the surviving entries are kept; the
        # code comes back as [B, w] values/indices (w = the widest row, zero-padded)
        theta = None if self.training else self.threshold
        v, i, cut = kernels.batch_topk_encode(xs, self.W_enc, self.b_enc, self.k, b_pre=self.b_pre,
                                              threshold=theta, guess=getattr(self, "_kth_guess", None))
        if self.training and cut > 0:   # cut = the smallest activation kept in this batch
            self.threshold_sum += cut
            self.threshold_count += 1
            self._kth_guess = cut
        return SAEOutput(kernels.sparse_decode(v, i, self.W_dec), _l0(v), values=v, indices=i)

    def _route(self, xs):
        with kernels.section("router"):
            return self._route_(xs)

    def _route_(self, xs):
        # W_router (x s - b_router) as W_router (x s) - W_router b_router: no [B, d_in] temporary
        p = torch.softmax(torch.addmm(torch.mv(self.W_router, self.b_router).neg(), xs, self.W_router.T), dim=-1)
        if self.n_active == 1:                                  # argmax (cheaper than topk)
            top_p, expert_idx = p.max(dim=-1, keepdim=True)
        else:
            top_p, expert_idx = p.topk(self.n_active, dim=-1)
        if self.config["renormalize_router"]:                   # official Scale code
            weight = torch.zeros_like(p).scatter(1, expert_idx, torch.softmax(top_p, dim=-1))
        else:                                                   # [scale] eq. 2.4 / [switch] eq. 4
            weight = p
        return p, expert_idx, weight

    def _fwd_moe(self, xs):
        """Rows are processed grouped by their most probable expert (a stable sort): each
        expert's encoder then reads one contiguous block of rows, and the sparse decode and
        every sparse backward touch one expert's decoder rows (m x d, cache-resident) at a
        time instead of the whole dictionary. ``out.values``/``indices``/``x_hat`` are put
        back in row order; ``loss`` uses the sorted reconstruction (the mean over rows does
        not depend on their order)."""
        p, expert_idx, weight = self._route(xs)
        W = self.expert_encoder()
        with kernels.section("dispatch"):
            rows = torch.argsort(expert_idx[:, 0], stable=True)
            inverse = kernels._inverse(rows)
            xs_s = xs.index_select(0, rows)
            eidx_s = expert_idx.index_select(0, rows)
        if self.config.get("weight_before_topk"):               # official Scale code's order (v is weighted)
            w_sel = weight.index_select(0, rows).gather(1, eidx_s)
            v, idx = _weighted_topk(xs_s, W, eidx_s, w_sel, self.k, self.b_pre)
        else:                                                   # [scale] eq. 2.3-2.4
            z, idx = kernels.expert_topk_encode(xs_s, W, eidx_s, self.k, b_pre=self.b_pre,
                                                presorted=self.n_active == 1)   # sorted above
            if self.n_active == 1:                              # every latent of a row is its expert's
                v = z * weight.index_select(0, rows).gather(1, eidx_s)
            else:                                               # p_i(x) of each latent's expert
                v = z * weight.index_select(0, rows).gather(1, idx // self.m)
        x_hat = kernels.sparse_decode(v, idx, self.W_dec)
        terms = {"router_probs": p, "router_weight": weight, "rows": rows, "inverse": inverse, "x_sorted": xs_s}
        return SAEOutput(x_hat, _l0(v), values=v.index_select(0, inverse), indices=idx.index_select(0, inverse),
                         router_probs=p, expert_idx=expert_idx, loss_terms=terms)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense code [B, n_latents]: the coefficients the decoder multiplies."""
        out = self(x)
        if out.latents is not None:
            return out.latents
        z = torch.zeros(out.values.shape[0], self.n_latents, dtype=out.values.dtype, device=out.values.device)
        return z.scatter_add_(1, out.indices, out.values)

    # -- losses ------------------------------------------------------------
    def loss(self, x: torch.Tensor, out: SAEOutput, *, sync: bool = True):
        """``(total, parts)``: total differentiable loss and a dict of its summands as floats
        (``sync=False``: as detached 0-dim tensors on the SAE's device, so the training step
        makes no host round trip).

        ``recon`` = mean over rows of ``||x s - x_hat s||^2`` (in the normalised units the
        SAE trains in); ``l1`` (relu, gated); ``aux_recon`` (gated); ``lb`` =
        ``alpha * d * L_aux`` (switch, scale)."""
        s = self.norm_scaling_factor
        x = x.reshape(-1, self.d_in).to(self.W_dec.dtype)
        if "x_hat_sorted" in out.loss_terms:   # MoE: the rows in the order they were computed
            x_s = out.loss_terms["x_sorted"] if s == 1 else x.index_select(0, out.loss_terms["rows"])
            recon = _MeanSqErr.apply(out.loss_terms["x_hat_sorted"], x_s)
        else:
            recon = _MeanSqErr.apply(out.x_hat.reshape(-1, self.d_in), x)
        parts = {"recon": recon * (s * s) if s != 1 else recon}
        if self.kind in ("relu", "gated"):
            acts = out.loss_terms["l1_acts"]
            parts["l1"] = self.config["l1_coef"] * acts.sum(-1).mean()   # decoder rows have unit norm
        if self.kind == "gated":   # reconstruction from the gate path through a frozen decoder
            x_gate = out.loss_terms["l1_acts"] @ self.W_dec.detach() + self.b_pre.detach()
            parts["aux_recon"] = (x * s - x_gate).pow(2).sum(-1).mean()
        if self.kind in MOE_KINDS:
            f, P = self.expert_load(out), out.loss_terms["router_probs"].mean(0)
            lb = self.config["alpha"] * self.d_in * self.n_experts * (f * P).sum()
            raw = self.config.get("balance_scale", "normalized") == "raw"   # files from before the option: normalized
            parts["lb"] = lb * (s * s) if raw and s != 1 else lb
        total = sum(parts.values())
        if not sync:
            return total, {key: val.detach() for key, val in parts.items()}
        return total, {key: float(val.detach()) for key, val in parts.items()}

    def expert_load(self, out: SAEOutput) -> torch.Tensor:
        """f_i: the fraction of (row, slot) router assignments that went to expert i
        ([switch] sec. 3.3 for one slot; sums to 1)."""
        idx = out.expert_idx.flatten()     # a scatter, not bincount: its size needs no host round trip on CUDA
        counts = torch.zeros(self.n_experts, dtype=self.W_dec.dtype, device=idx.device)
        return counts.index_add_(0, idx, torch.ones_like(idx, dtype=counts.dtype)) / idx.numel()

    def auxk_loss(self, x: torch.Tensor, out: SAEOutput, dead: torch.Tensor, k_aux: int) -> torch.Tensor:
        """AuxK (Gao et al. app. B.1): the ``k_aux`` largest pre-activations among dead latents
        reconstruct the (detached) residual ``e = x - x_hat``; ``||e - e_hat||^2`` scaled by
        ``min(n_dead / k_aux, 1)``. On switch/scale only dead latents of the routed experts
        compete, weighted by their (detached) router weight."""
        n_dead = int(dead.sum())
        if n_dead == 0:
            return out.x_hat.new_zeros(())
        s = self.norm_scaling_factor
        xs = x.reshape(-1, self.d_in).to(self.W_dec.dtype) * s
        e = (xs - out.x_hat.reshape(-1, self.d_in) * s).detach()
        xc = xs - self.b_pre
        kk = min(k_aux, n_dead)
        if self.kind in MOE_KINDS:
            kk = min(kk, self.n_active * self.m)
            mask = torch.where(dead, 0.0, _MASKED).to(xc.dtype)
            z, idx = kernels.expert_topk_encode(xc, self.expert_encoder(), out.expert_idx, kk, b_enc=mask)
            v = z * out.loss_terms["router_weight"].detach().gather(1, idx // self.m)
        else:
            W, b = self._dense_pre_weights()
            dead_ids = dead.nonzero().squeeze(1)
            v, j = kernels.topk_encode(xc, W[dead_ids], b[dead_ids], kk)
            idx = dead_ids[j]
        e_hat = kernels.sparse_decode(v, idx, self.W_dec)
        return min(n_dead / k_aux, 1.0) * (e_hat - e).pow(2).sum(-1).mean()

    def _dense_pre_weights(self):
        if self.kind == "gated":   # the magnitude path
            return self.W_enc * self.r_mag.exp()[:, None], self.b_mag
        return self.W_enc, self.b_enc

    # -- training-recipe hooks ([switch] app. A) ----------------------------
    @torch.no_grad()
    def normalize_decoder_(self):
        """Decoder rows to unit norm (every training step). A loaded per-latent decoder scale
        is first folded into the encoder (:meth:`fold_decoder_scale_`)."""
        if "dec_scale" in self._buffers:
            self.fold_decoder_scale_()
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def fold_decoder_scale_(self):
        """Fold ``dec_scale`` (per-latent decoder norms kept for inference) into the encoder
        rows and biases and drop it, as training needs unit rows. Exact for relu/gated; for
        TopK kinds it changes which latents are kept (a warning says so)."""
        if "dec_scale" not in self._buffers:
            return
        sc = self._buffers.pop("dec_scale")
        if self.kind in TOPK_KINDS:
            warnings.warn("fold_decoder_scale_: folding unequal decoder norms into the encoder changes which "
                          "latents TopK keeps; the SAE no longer reproduces the file it was loaded from",
                          stacklevel=3)
        self.W_enc.mul_(sc[:, None])
        for name in ("b_enc", "b_gate", "b_mag"):
            if hasattr(self, name):
                getattr(self, name).mul_(sc)
        if self.kind == "batchtopk":   # one threshold cannot follow per-latent scales: keep their mean
            self.threshold_sum.mul_(float(sc.mean()))
        self.config["decoder_scale"] = False

    @torch.no_grad()
    def remove_parallel_grad_(self):
        """Remove from each decoder row's gradient its component along the row."""
        W, g = self.W_dec, self.W_dec.grad
        if g is not None:   # g -= <g, W> / |W|^2 W, in place (the row dots as a batched matmul)
            dot = torch.bmm(g.unsqueeze(1), W.unsqueeze(2)).view(-1)
            norm2 = torch.linalg.vector_norm(W, dim=-1).clamp_min_(1e-12).square_()
            g.addcmul_(W, dot.div_(norm2).neg_().unsqueeze(1))

    @torch.no_grad()
    def fired(self, out: SAEOutput) -> torch.Tensor:
        """Bool [n_latents]: latents with a non-zero activation somewhere in the batch."""
        if out.latents is not None:
            return (out.latents > 0).any(0)
        # a scatter-max of (value > 0) over the latent ids: fixed-size, no host round trip
        hit = torch.zeros(self.n_latents, dtype=torch.uint8, device=self.W_dec.device)
        pos = (out.values > 0).to(torch.uint8).flatten()
        return hit.scatter_reduce_(0, out.indices.flatten(), pos, reduce="amax").bool()

    # -- cost ----------------------------------------------------------------
    def flops_per_token(self, breakdown: bool = False):
        """Analytic forward FLOPs for one input row, as implemented: 2 FLOPs per
        multiply-add; only matrix products are counted (bias adds, ReLU, softmax, the TopK
        selection and the per-batch feature-scaling transform are not).

        router ``2 E d`` (switch/scale); encoder ``2 n d`` (dense) or ``2 n_active m d``
        (only the selected experts' rows); decoder ``2 n d`` for relu/gated (dense code),
        ``2 k d`` for the sparse decode of the TopK kinds (batchtopk: k on average)."""
        d, n, E = self.d_in, self.n_latents, self.n_experts
        parts = {"router": 2 * E * d if self.kind in MOE_KINDS else 0,
                 "encoder": 2 * self.n_active * self.m * d,
                 "decoder": 2 * (self.k if self.kind in TOPK_KINDS else n) * d}
        return parts if breakdown else sum(parts.values())

    # -- persistence ---------------------------------------------------------
    def save(self, path) -> Path:
        """Write ``path/`` = ``config.json`` + ``sae.safetensors`` (atomically)."""
        from safetensors.torch import save_file

        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.mkdir()
            save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(tmp / WEIGHTS_FILE))
            (tmp / CONFIG_FILE).write_text(json.dumps(self.config, indent=2, sort_keys=True))
        return path

    def save_saelens(self, path) -> Path:
        return to_saelens(self, path)

    def extra_repr(self) -> str:
        c = self.config
        keys = ["kind", "d_in", "n_latents", "k", "n_experts", "n_active", "feature_scaling", "l1_coef"]
        return ", ".join(f"{key}={c[key]}" for key in keys if c.get(key) is not None)


def _l0(acts: torch.Tensor) -> torch.Tensor:
    """Mean count of positive entries per row of ``acts`` [B, w], a 0-dim float64 tensor on
    ``acts``' device (0 for an empty batch); no host round trip."""
    if not acts.numel():
        return torch.zeros((), dtype=torch.float64, device=acts.device)
    return torch.count_nonzero(acts > 0).double() / acts.shape[0]


class _MeanSqErr(torch.autograd.Function):
    """``mean_b ||a_b - t_b||^2`` for ``a``, ``t`` [B, d]: one pass forward (the residual is
    kept, its square summed by a dot product) and one backward, instead of the ~8 passes
    over the batch of ``(a - t).pow(2).sum(-1).mean()`` and its autograd graph."""

    @staticmethod
    def forward(ctx, a, t):
        r = (a - t).reshape(-1)
        ctx.save_for_backward(r)
        ctx.shape = a.shape
        return torch.dot(r, r) / a.shape[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (r,) = ctx.saved_tensors
        ga = (r * (2 * g / ctx.shape[0])).view(ctx.shape)
        return (ga if ctx.needs_input_grad[0] else None), (-ga if ctx.needs_input_grad[1] else None)


def load(path, device="cpu") -> SAE:
    """Load an SAE written by :meth:`SAE.save`. When the folder carries a checksum manifest
    (a cache entry written through ``utils.atomic_path``), it is verified first:
    ``utils.CacheEntryError`` (a ValueError) names a damaged file."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CONFIG_FILE).exists():
        raise ValueError(f"path={str(path)!r} holds no {CONFIG_FILE}; not a saved SAE")
    from .utils import verify_entry

    verify_entry(path)                 # a damaged file of a checksummed entry raises, naming it
    cfg = json.loads((path / CONFIG_FILE).read_text())
    sae = SAE(cfg)
    sae.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
    return sae.to(device).eval()


# ---------------------------------------------------------------------------
# SAELens on-disk format (cfg.json + sae_weights.safetensors): saelib.saelens
# ---------------------------------------------------------------------------
def to_saelens(sae: SAE, path) -> Path:
    """Export a dense SAE in SAELens's format (see :func:`saelib.saelens.to_saelens`)."""
    from .saelens import to_saelens as _to

    return _to(sae, path)


def load_saelens(path, device="cpu", k: int | None = None) -> SAE:
    """Load an SAE written by SAELens (any version) or :func:`to_saelens`, reproducing the
    file's reconstruction (see :func:`saelib.saelens.load_saelens`)."""
    from .saelens import load_saelens as _load

    return _load(path, device=device, k=k)
