"""Switch-transformer subject models: a GPT-2 whose MLPs are Switch FFN layers.

[laws] = Saoud et al., "Scaling Laws, Sparse Activation, and Mechanistic
Interpretability in Transformer Architectures"; [fedus] = Fedus, Zoph & Shazeer
2022, "Switch Transformers" (JMLR 23).

* :class:`SwitchFFN` replaces ``GPT2Block.mlp``: a router ``G(x) = softmax(W_g x + b_g)``
  ([laws] eq. 7, bias included), the top-1 expert per token, the expert's GPT-2 MLP
  output scaled by the chosen probability ([fedus] eq. 2), the load-balancing loss
  ``alpha * N * sum_i f_i P_i`` ([fedus] eq. 4-6) and an optional capacity factor
  (tokens over an expert's capacity get a zero FFN output, so the block's residual
  passes them through unchanged, [fedus] sec. 2.2). Tokens are dispatched by sorting
  them by expert (one matrix product per expert, only the routed expert computed);
  :meth:`SwitchFFN.forward_reference` is the plain per-token loop the tests compare it to.
* :func:`switchify` swaps Switch layers into a ``transformers.GPT2LMHeadModel`` (every
  block, or every ``moe_every``-th), records the settings in ``model.config`` so that
  ``save_pretrained`` + :func:`load_pretrained` round-trip; sites, ``generate`` and
  splicing work unchanged (``blocks.i.mlp_out`` is the Switch layer's output).
* :func:`param_counts` / :func:`param_formula`: ``N_total`` and ``N_active`` ([laws] eq. 2:
  a token uses one expert per layer); :func:`cost_eq3` ([laws] eq. 3) next to
  :func:`measured_flops_per_token`.
* :func:`routing_stats`: per-layer, per-expert load, router entropy and gate scores on any tokens.
* :func:`adaptive_batch_size`: [laws] Algorithm 2, as written.

Capacity applies in training mode only (``model.train()``): evaluation and generation
route every token (Fedus et al. use a separate, larger eval capacity), so a KV-cached
``generate`` equals the full forward pass.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .utils import check_positive_int

MOE_DEFAULTS = {"n_experts": 1, "moe_every": 1, "router_aux_coef": 0.01, "capacity_factor": None}


def _check_moe(n_experts, moe_every, router_aux_coef, capacity_factor):
    check_positive_int("n_experts", n_experts)
    check_positive_int("moe_every", moe_every)
    if not (isinstance(router_aux_coef, (int, float)) and not isinstance(router_aux_coef, bool)
            and math.isfinite(router_aux_coef) and router_aux_coef >= 0):
        raise ValueError(f"router_aux_coef must be a finite number >= 0 (Fedus et al.: 0.01), got {router_aux_coef!r}")
    if capacity_factor is not None and not (isinstance(capacity_factor, (int, float))
                                            and not isinstance(capacity_factor, bool)
                                            and math.isfinite(capacity_factor) and capacity_factor > 0):
        raise ValueError(f"capacity_factor must be null (no cap) or a number > 0, got {capacity_factor!r}")


def load_balancing_loss(probs: torch.Tensor, expert: torch.Tensor, alpha: float = 0.01) -> torch.Tensor:
    """[fedus] eq. 4-6: ``alpha * N * sum_i f_i * P_i``.

    probs: [T, N] router probabilities; expert: [T] long, the chosen expert (argmax).
    ``f_i`` = fraction of the T tokens dispatched to expert i (counted before any
    capacity drop; not differentiable), ``P_i`` = mean router probability of expert i.
    Equals ``alpha`` under uniform routing (f_i = P_i = 1/N). Returns a 0-d tensor."""
    T, N = probs.shape
    f = torch.bincount(expert, minlength=N).to(probs.dtype) / T
    P = probs.mean(0)
    return alpha * N * (f * P).sum()


def expert_capacity(n_tokens: int, n_experts: int, capacity_factor: float | None) -> int | None:
    """[fedus] eq. 3: ``ceil(capacity_factor * tokens / experts)`` tokens per expert
    (None: no cap). Rounded up so that ``capacity_factor=1`` with perfect balance drops nothing."""
    if capacity_factor is None:
        return None
    return max(1, math.ceil(capacity_factor * n_tokens / n_experts))


class SwitchFFN(nn.Module):
    """A Switch FFN layer with ``n_experts`` GPT-2 MLPs (``d -> n_inner -> d``).

    Parameters: router ``W_g`` [N, d], ``b_g`` [N] (``self.router``); experts
    ``w_fc`` [N, d, n_inner], ``b_fc`` [N, n_inner], ``w_proj`` [N, n_inner, d],
    ``b_proj`` [N, d]. ``forward(h)``: h [..., d] -> [..., d]; after each call
    ``self.aux_loss`` holds the load-balancing loss (0-d tensor, in the graph),
    ``self.dropped`` the number of tokens over capacity, and, while
    ``self.keep_routing`` is set, ``self.routing`` = dict(expert [T], gate [T], probs [T, N])."""

    def __init__(self, n_embd: int, n_inner: int, n_experts: int, activation: str = "gelu_new",
                 resid_pdrop: float = 0.0, router_aux_coef: float = 0.01, capacity_factor: float | None = None,
                 init_std: float = 0.02, proj_std: float | None = None):
        super().__init__()
        from transformers.activations import ACT2FN

        check_positive_int("n_embd", n_embd)
        check_positive_int("n_inner", n_inner)
        _check_moe(n_experts, 1, router_aux_coef, capacity_factor)
        self.n_embd, self.n_inner, self.n_experts = n_embd, n_inner, n_experts
        self.router_aux_coef, self.capacity_factor = float(router_aux_coef), capacity_factor
        self.router = nn.Linear(n_embd, n_experts)
        self.w_fc = nn.Parameter(torch.empty(n_experts, n_embd, n_inner))
        self.b_fc = nn.Parameter(torch.zeros(n_experts, n_inner))
        self.w_proj = nn.Parameter(torch.empty(n_experts, n_inner, n_embd))
        self.b_proj = nn.Parameter(torch.zeros(n_experts, n_embd))
        self.act = ACT2FN[activation]
        self.dropout = nn.Dropout(resid_pdrop)
        with torch.no_grad():  # GPT-2's scheme: N(0, 0.02), c_proj scaled by 1/sqrt(2 n_layer); router like a matrix
            self.router.weight.normal_(0.0, init_std)
            self.router.bias.zero_()
            self.w_fc.normal_(0.0, init_std)
            self.w_proj.normal_(0.0, init_std if proj_std is None else proj_std)
        self.aux_loss = torch.zeros(())
        self.dropped = 0
        self.keep_routing = False
        self.routing = None

    def extra_repr(self):
        return (f"n_embd={self.n_embd}, n_inner={self.n_inner}, n_experts={self.n_experts}, "
                f"router_aux_coef={self.router_aux_coef}, capacity_factor={self.capacity_factor}")

    def route(self, x: torch.Tensor):
        """x [T, d] -> (probs [T, N] float32, expert [T] long, gate [T] float32): eq. 7, top-1."""
        logits = F.linear(x.float(), self.router.weight.float(), self.router.bias.float())  # router in fp32
        probs = logits.softmax(-1)
        gate, expert = probs.max(-1)
        return probs, expert, gate

    def _expert(self, e: int, x: torch.Tensor, w=None) -> torch.Tensor:
        w_fc, b_fc, w_proj, b_proj = w if w is not None else (self.w_fc, self.b_fc, self.w_proj, self.b_proj)
        return self.act(x @ w_fc[e] + b_fc[e]) @ w_proj[e] + b_proj[e]

    def _finish(self, probs, expert, gate, dropped):
        self.aux_loss = load_balancing_loss(probs, expert, self.router_aux_coef)
        self.dropped = dropped
        if self.keep_routing:
            self.routing = {"expert": expert.detach(), "gate": gate.detach(), "probs": probs.detach()}

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        probs, expert, gate = self.route(x)
        T, N = x.shape[0], self.n_experts
        order = torch.argsort(expert, stable=True)       # tokens grouped by expert, in token order within a group
        counts = torch.bincount(expert, minlength=N)
        cap = expert_capacity(T, N, self.capacity_factor) if self.training else None
        if cap is not None:
            starts = torch.cumsum(counts, 0) - counts
            rank = torch.arange(T, device=x.device) - starts[expert[order]]
            keep_sorted = rank < cap
            kept_counts = counts.clamp(max=cap)
        else:
            keep_sorted, kept_counts = None, counts
        xs = x[order] if keep_sorted is None else x[order[keep_sorted]]
        outs = []
        s = 0
        w = tuple(t.unbind(0) for t in (self.w_fc, self.b_fc, self.w_proj, self.b_proj))  # one grad buffer each
        for e, n in enumerate(kept_counts.tolist()):
            if n:
                outs.append(self._expert(e, xs[s:s + n], w))
            s += n
        y = torch.cat(outs) if outs else xs.new_zeros(0, shape[-1])
        idx = order if keep_sorted is None else order[keep_sorted]
        y = y * gate[idx].to(y.dtype)[:, None]
        out = torch.zeros(T, shape[-1], dtype=y.dtype, device=x.device).index_copy(0, idx, y)
        self._finish(probs, expert, gate, T - idx.numel())
        return self.dropout(out.to(hidden_states.dtype) if out.dtype != hidden_states.dtype else out).reshape(shape)

    def forward_reference(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The same layer as a plain loop over tokens (the twin the tests compare
        :meth:`forward` to): token t goes to ``argmax G(x_t)`` unless that expert
        already took ``capacity`` earlier tokens, and its output is ``G(x_t)_e * FFN_e(x_t)``."""
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        probs, expert, gate = self.route(x)
        T = x.shape[0]
        cap = expert_capacity(T, self.n_experts, self.capacity_factor) if self.training else None
        used = [0] * self.n_experts
        rows = []
        for t in range(T):
            e = int(expert[t])
            if cap is not None and used[e] >= cap:
                rows.append(torch.zeros(shape[-1], dtype=x.dtype, device=x.device))
                continue
            used[e] += 1
            rows.append(gate[t].to(x.dtype) * self._expert(e, x[t:t + 1])[0])
        self._finish(probs, expert, gate, T - sum(used))
        return self.dropout(torch.stack(rows)).reshape(shape)


# ----------------------------------------------------------------------------- the model
def _blocks(model):
    return model.transformer.h


def moe_layer_indices(n_layer: int, moe_every: int = 1) -> list[int]:
    """Blocks that get a Switch layer: every ``moe_every``-th, counted from the first
    one that completes a group (``moe_every=1``: all; ``2``: blocks 1, 3, ..., i.e.
    "every other FFN layer" as in [fedus] sec. 2)."""
    check_positive_int("n_layer", n_layer)
    check_positive_int("moe_every", moe_every)
    return [i for i in range(n_layer) if (i + 1) % moe_every == 0]


def switchify(model, n_experts: int, moe_every: int = 1, router_aux_coef: float = 0.01,
              capacity_factor: float | None = None):
    """Replace the MLP of GPT-2 blocks by :class:`SwitchFFN` layers, in place; returns ``model``.

    ``model``: a ``transformers.GPT2LMHeadModel``. Each expert is initialised like
    GPT-2's MLP (new random weights drawn from torch's global generator, so seed it
    first). ``n_experts=1`` leaves the model dense. The settings are written to
    ``model.config`` (``n_experts``, ``moe_every``, ``router_aux_coef``,
    ``capacity_factor``) so that :func:`load_pretrained` rebuilds the same model."""
    _check_moe(n_experts, moe_every, router_aux_coef, capacity_factor)
    cfg = model.config
    if n_experts == 1:
        return model
    n_inner = cfg.n_inner if cfg.n_inner is not None else 4 * cfg.n_embd
    p = next(model.parameters())
    for i in moe_layer_indices(cfg.n_layer, moe_every):
        layer = SwitchFFN(cfg.n_embd, n_inner, n_experts, cfg.activation_function, cfg.resid_pdrop,
                          router_aux_coef, capacity_factor, cfg.initializer_range,
                          cfg.initializer_range / math.sqrt(2 * cfg.n_layer))
        _blocks(model)[i].mlp = layer.to(device=p.device, dtype=p.dtype)
    cfg.n_experts, cfg.moe_every = int(n_experts), int(moe_every)
    cfg.router_aux_coef, cfg.capacity_factor = float(router_aux_coef), capacity_factor
    return model


def moe_layers(model) -> dict[int, SwitchFFN]:
    """``{block index: SwitchFFN}`` of a model (empty for a dense one)."""
    try:
        blocks = _blocks(model)
    except AttributeError:
        return {}
    return {i: b.mlp for i, b in enumerate(blocks) if isinstance(b.mlp, SwitchFFN)}


def aux_loss(model) -> torch.Tensor | float:
    """Sum of the load-balancing losses of the last forward pass over every Switch
    layer (0.0 for a dense model); add it to the LM loss before ``backward``."""
    layers = moe_layers(model)
    return sum(m.aux_loss for m in layers.values()) if layers else 0.0


def is_switch(name_or_path) -> bool:
    """True when ``name_or_path`` is a saved model directory whose config has ``n_experts > 1``."""
    import json

    p = Path(str(name_or_path)) / "config.json"
    if not p.is_file():
        return False
    return int(json.loads(p.read_text()).get("n_experts", 1) or 1) > 1


def load_pretrained(path):
    """Rebuild a Switch GPT-2 saved with ``save_pretrained`` (config + safetensors), in eval mode on CPU."""
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    path = Path(path)
    cfg = GPT2Config.from_pretrained(str(path))
    model = GPT2LMHeadModel(cfg)
    switchify(model, cfg.n_experts, getattr(cfg, "moe_every", 1), getattr(cfg, "router_aux_coef", 0.01),
              getattr(cfg, "capacity_factor", None))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"path={str(path)!r} has no *.safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to wte, not saved
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the Switch config (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    model.tie_weights()
    model.loss_type = "ForCausalLM"
    return model.eval()


# ----------------------------------------------------------------------------- parameters and cost
def param_formula(vocab_size: int, n_positions: int, n_embd: int, n_layer: int, n_inner: int | None = None,
                  n_experts: int = 1, moe_every: int = 1, tied: bool = True) -> dict:
    """Analytic parameter counts of a (Switch) GPT-2 with biases and LayerNorms.

    Per block: attention ``4 d^2 + 4 d`` (c_attn ``d x 3d`` + bias, c_proj ``d x d`` + bias),
    two LayerNorms ``4 d``, one FFN ``2 d f + f + d`` (``f = n_inner``, default ``4 d``);
    a Switch block has ``n_experts`` FFNs and a router ``N d + N``. Plus ``V d`` token and
    ``n_ctx d`` position embeddings, the final LayerNorm ``2 d`` and, untied, an LM head ``V d``.

    Returns ``total`` (N_total), ``active`` ([laws] eq. 2: one expert per token, router
    included), ``embedding`` (token + position + untied head), ``non_embedding_total``,
    ``non_embedding_active``, ``expert`` (one expert's parameters)."""
    for name, v in (("vocab_size", vocab_size), ("n_positions", n_positions), ("n_embd", n_embd),
                    ("n_layer", n_layer), ("n_experts", n_experts), ("moe_every", moe_every)):
        check_positive_int(name, v)
    d, f = n_embd, n_inner or 4 * n_embd
    ffn = 2 * d * f + f + d
    n_moe = len(moe_layer_indices(n_layer, moe_every)) if n_experts > 1 else 0
    base = n_layer * (4 * d * d + 4 * d + 4 * d) + 2 * d            # attention + norms + final norm
    emb = vocab_size * d + n_positions * d + (0 if tied else vocab_size * d)
    dense_ffn = (n_layer - n_moe) * ffn
    router = n_moe * (n_experts * d + n_experts)
    total = base + dense_ffn + n_moe * n_experts * ffn + router
    active = base + dense_ffn + n_moe * ffn + router
    return {"total": emb + total, "active": emb + active, "embedding": emb, "non_embedding_total": total,
            "non_embedding_active": active, "expert": ffn}


def param_counts(model) -> dict:
    """Measured counts of a model (unique tensors): the keys of :func:`param_formula`,
    from the modules: experts of a Switch layer count once in ``active``."""
    seen, total, emb, inactive = set(), 0, 0, 0
    expert = 0
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if name.endswith(("wte.weight", "wpe.weight")) or name == "lm_head.weight":
            emb += p.numel()
    for m in moe_layers(model).values():
        one = sum(t[0].numel() for t in (m.w_fc, m.b_fc, m.w_proj, m.b_proj))
        expert = one
        inactive += (m.n_experts - 1) * one
    if not moe_layers(model):
        blk = _blocks(model)[0].mlp if hasattr(model, "transformer") else None
        expert = sum(p.numel() for p in blk.parameters()) if blk is not None else 0
    return {"total": total, "active": total - inactive, "embedding": emb, "non_embedding_total": total - emb,
            "non_embedding_active": total - inactive - emb, "expert": expert}


def cost_eq3(model_size, n_experts, experts_per_token: int = 1):
    """[laws] eq. 3: ``C ~ E_k * M / E`` (``M`` model size, ``E`` experts, ``E_k`` active
    experts per token). Works on scalars and arrays. Note that it divides *all* of M by
    E, attention and embeddings included, whereas only the expert FFNs are sparse."""
    M, E = np.asarray(model_size, dtype=float), np.asarray(n_experts, dtype=float)
    if np.any(E < 1) or np.any(M <= 0):
        raise ValueError(f"model_size must be > 0 and n_experts >= 1, got {model_size!r}, {n_experts!r}")
    out = experts_per_token * M / E
    return float(out) if out.ndim == 0 else out


@torch.no_grad()
def measured_flops_per_token(model, input_ids: torch.Tensor) -> float:
    """Forward FLOPs per token counted by ``torch.utils.flop_counter.FlopCounterMode``
    (matrix products and attention; 2 FLOPs per multiply-add) on ``input_ids``
    [batch, seq]: with sort dispatch only the routed expert is counted."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    with FlopCounterMode(display=False) as fc:
        model(input_ids=input_ids)
    model.train(was)
    return fc.get_total_flops() / input_ids.numel()


# ----------------------------------------------------------------------------- routing statistics
@dataclass
class RoutingStats:
    """Routing of a Switch model over some tokens, per Switch layer (block index).

    counts[i]: [N] tokens per expert; mean_prob[i]: [N] mean router probability
    (``P_i``); gates[i]: [T] the chosen expert's probability per token; entropy[i]: [T]
    router entropy per token (nats); experts[i]: [T] the chosen expert."""
    counts: dict
    mean_prob: dict
    gates: dict
    entropy: dict
    experts: dict

    def load(self, layer: int) -> np.ndarray:
        c = self.counts[layer].astype(float)
        return c / c.sum()

    def summary(self):
        """One row per layer: n_experts, tokens, load_entropy (H(load)/log N, 1 = even),
        load_cv (std/mean of the load), max_load (x the even share), router_entropy
        (mean per-token entropy / log N), mean_gate, aux (``N sum f_i P_i``, 1 = even)."""
        import pandas as pd

        rows = []
        for i in self.counts:
            load, N = self.load(i), len(self.counts[i])
            rows.append({"layer": i, "n_experts": N, "tokens": int(self.counts[i].sum()),
                         "load_entropy": load_entropy(load), "load_cv": load_cv(load),
                         "max_load": float(load.max() * N),
                         "router_entropy": float(self.entropy[i].mean() / math.log(N)),
                         "mean_gate": float(self.gates[i].mean()),
                         "aux": float(N * (load * self.mean_prob[i]).sum())})
        return pd.DataFrame(rows)


def load_entropy(load) -> float:
    """Normalised entropy of an expert-load vector, ``H(load) / log N`` in [0, 1]; 1 = perfectly even."""
    p = np.asarray(load, dtype=float)
    p = p / p.sum()
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum() / math.log(len(p))) if len(p) > 1 else 1.0


def load_cv(load) -> float:
    """Coefficient of variation of an expert-load vector (std / mean, population std); 0 = perfectly even."""
    p = np.asarray(load, dtype=float)
    return float(p.std() / p.mean())


@torch.no_grad()
def routing_stats(model, tokens, batch_size: int = 16, max_rows: int | None = None) -> RoutingStats:
    """Run ``model`` (eval mode, no capacity) over ``tokens`` ([n_seq, n_ctx] ids, or a
    tokenized split) and collect every Switch layer's routing. ValueError for a dense model."""
    from .activations import _token_rows

    check_positive_int("batch_size", batch_size)
    layers = moe_layers(model)
    if not layers:
        raise ValueError("model has no Switch layers (n_experts=1): no routing to measure")
    rows = _token_rows(tokens)
    if max_rows is not None:
        rows = rows[:max_rows]
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    acc = {i: {"experts": [], "gates": [], "entropy": [], "psum": 0.0} for i in layers}
    try:
        for m in layers.values():
            m.keep_routing = True
        for s in range(0, len(rows), batch_size):
            model(input_ids=rows[s:s + batch_size].to(dev))
            for i, m in layers.items():
                r = m.routing
                p = r["probs"]
                acc[i]["experts"].append(r["expert"].cpu())
                acc[i]["gates"].append(r["gate"].cpu())
                acc[i]["entropy"].append(-(p * p.clamp_min(1e-30).log()).sum(-1).cpu())
                acc[i]["psum"] = acc[i]["psum"] + p.sum(0).double().cpu()
    finally:
        for m in layers.values():
            m.keep_routing, m.routing = False, None
        model.train(was)
    out = {k: {} for k in ("counts", "mean_prob", "gates", "entropy", "experts")}
    for i, a in acc.items():
        e = torch.cat(a["experts"])
        out["experts"][i] = e.numpy()
        out["counts"][i] = torch.bincount(e, minlength=layers[i].n_experts).numpy()
        out["mean_prob"][i] = (a["psum"] / len(e)).numpy()
        out["gates"][i] = torch.cat(a["gates"]).numpy()
        out["entropy"][i] = torch.cat(a["entropy"]).numpy()
    return RoutingStats(**out)


# ----------------------------------------------------------------------------- [laws] Algorithm 2
def adaptive_batch_size(train_eval, B0: int, tau: float, B_min: int = 1, decay_factor: float = 0.75) -> dict:
    """[laws] Algorithm 2 (adaptive batch size for Switch models), as written::

        B = B0, performance = 0
        while performance < tau and B > B_min:
            p = train_eval(B)            # train for one epoch with batch size B, validation performance
            if p > performance: performance = p, B* = B
            B = B * decay_factor

    ``train_eval(B) -> p``: the caller trains the model for one epoch at batch size ``B``
    and returns a validation performance where higher is better and ``p > 0`` (the paper
    starts ``performance`` at 0; e.g. ``p = 1 / validation perplexity``). The paper does
    not say whether each iteration restarts from the initial model; the caller decides
    (the chapter restarts, so that ``B*`` is a property of ``B``, not of extra epochs).
    ``B * decay_factor`` is rounded down to an integer. Stopping rule: ``p`` reached
    ``tau``, or ``B <= B_min``.

    Returns ``{"B_star", "performance", "trace": [{B, p, seconds}], "seconds"}`` (total
    wall time of the ``train_eval`` calls: the search's cost)."""
    check_positive_int("B0", B0)
    check_positive_int("B_min", B_min)
    if not (isinstance(decay_factor, (int, float)) and 0 < decay_factor < 1):
        raise ValueError(f"decay_factor must be in (0, 1) (B shrinks each round), got {decay_factor!r}")
    if not (isinstance(tau, (int, float)) and math.isfinite(tau)):
        raise ValueError(f"tau must be a finite number, got {tau!r}")
    B, performance, B_star, trace = int(B0), 0.0, None, []
    while performance < tau and B > B_min:
        t0 = time.perf_counter()
        p = float(train_eval(B))
        trace.append({"B": B, "p": p, "seconds": time.perf_counter() - t0})
        if p > performance:
            performance, B_star = p, B
        B = int(B * decay_factor)
    return {"B_star": B_star, "performance": performance, "trace": trace,
            "seconds": float(sum(t["seconds"] for t in trace))}

