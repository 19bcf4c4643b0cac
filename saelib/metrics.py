"""Metrics for sparse autoencoders, each citing the equation it implements.

Papers (full text in ``../shared/papers``):

* [switch]  Mudide et al., *Efficient dictionary learning with Switch SAEs*
* [scale]   Xu et al., *Beyond redundancy: ... Multi-Expert SAE* (Scale SAE)
* [laws]    *Scaling laws ... sparse activation ... interpretability*

Sections, top to bottom:

1. reconstruction: :func:`reconstruct` (handles input normalisation),
   :func:`mse` (scale eq. A.1), :func:`sse`, :func:`fvu`, :func:`l0`,
   :func:`latent_counts`, :func:`dead_fraction`, :func:`evaluate_sae`
2. faithfulness: :func:`loss_recovered` (scale eq. A.2) with CE and KL of the
   spliced model; :func:`site_mean` (the mean-ablation baseline)
3. decoder geometry: :func:`max_cosine`, :func:`nearest_neighbour_cosine`,
   :func:`duplicate_fraction` (switch fig. 4a/b), :func:`mmcs`
4. experts: :func:`group_max_cosine`, :func:`expert_similarity_matrix`
   (switch fig. 4c), :func:`random_block_similarity` (its TopK baseline, with
   :func:`random_blocks`, :func:`offdiagonal_mean`),
   :func:`expert_redundancy` (scale fig. 6a), :func:`expert_activation_counts`
   and :func:`expert_count_cdf` (scale fig. 6b)
5. activation overlap: :func:`sparse_codes`,
   :func:`neuronal_activation_similarity` (scale eq. A.3),
   :func:`overlap_distribution` (scale appendix D, the k_ij histogram)
6. superposition: :func:`activation_sparsity` (laws eq. 6),
   :func:`activation_matrix`, :func:`superposition_score` (laws eq. 5),
   :func:`participation_ratio`

Conventions: scalar metrics come back as Python floats, per-item results as
CPU tensors. An ``sae`` argument is any object following the zoo interface
(``sae(x) -> out`` with ``out.x_hat`` and either ``out.values``/``out.indices``
or dense ``out.latents``; ``sae.decoder_directions()``; ``sae.expert_of_latent()``).
Wherever a decoder matrix ``W`` is expected, an SAE may be passed instead and
its ``decoder_directions()`` are used. Cosines are signed (max, not max of abs).
"""
from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from .utils import check_choice, check_positive_int, progress, resolve_device

CHUNK_ELEMS = 2**24  # entries of a similarity block held at once (64 MB in float32)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def _directions(W) -> torch.Tensor:
    """A decoder matrix ``[n, d]`` from a tensor or an SAE (``decoder_directions()``)."""
    if hasattr(W, "decoder_directions"):
        W = W.decoder_directions()
    W = torch.as_tensor(W)
    if W.ndim != 2:
        raise ValueError(f"W must be a 2-D tensor [n_latents, d] or an SAE, got shape {tuple(W.shape)}")
    return W.detach().float()


def _unit(W: torch.Tensor) -> torch.Tensor:
    return F.normalize(W, dim=-1)


def _groups_of(W, groups) -> torch.Tensor:
    """Expert id of every latent: ``groups`` given, else ``W.expert_of_latent()``."""
    if groups is None:
        if not hasattr(W, "expert_of_latent"):
            raise ValueError("groups is required when W is a tensor (pass sae, or groups=LongTensor [n_latents])")
        groups = W.expert_of_latent()
    return torch.as_tensor(groups).long().cpu()


def _module_device_dtype(obj, default_device):
    params = list(obj.parameters()) if hasattr(obj, "parameters") else []
    if params:
        return params[0].device, params[0].dtype
    return default_device, torch.float32


@contextlib.contextmanager
def _eval_mode(obj, device):
    """Move ``obj`` (a model or SAE module; stand-ins without ``.to`` are left as
    they are) to ``device`` and put it in eval mode; restore its mode afterwards."""
    was_training = getattr(obj, "training", None)
    if hasattr(obj, "to"):
        obj.to(device)
    if hasattr(obj, "eval"):
        obj.eval()
    try:
        yield obj
    finally:
        if was_training is not None and hasattr(obj, "train"):
            obj.train(was_training)


def _input_scale(sae):
    """The constant the SAE expects inputs to be multiplied by, if it exposes one.

    Looked up, in order, as ``sae.input_scale`` and ``sae.config["input_scale"]``;
    ``None`` means no normalisation. An SAE that normalises inside its own
    ``forward`` exposes neither and is called as is."""
    scale = getattr(sae, "input_scale", None)
    if scale is None:
        cfg = getattr(sae, "config", None)
        if isinstance(cfg, dict):
            scale = cfg.get("input_scale")
    if callable(scale):
        scale = scale()
    if scale is None:
        return None
    scale = float(scale)
    return None if scale == 1.0 else scale


def reconstruct(sae, x: torch.Tensor):
    """``(x_hat, out)``: the SAE reconstruction of ``x`` in the units of ``x``.

    Handles an optional input normalisation *outside* the SAE: if the SAE exposes
    ``normalize_input(x)`` / ``denormalize_output(x_hat)`` they are used; else
    if it exposes an ``input_scale`` (attribute or ``config`` entry) the input
    is multiplied by it and the output divided by it; otherwise ``sae(x)`` is
    called directly. The zoo's SAEs (:mod:`saelib.saes`) apply their
    ``config["norm_scaling_factor"]`` inside ``forward`` (raw activations in,
    raw reconstruction out), expose neither, and are called directly. ``x`` is
    cast to the SAE's parameter dtype and ``x_hat`` cast back to ``x``'s."""
    _, dtype = _module_device_dtype(sae, x.device)
    xin = x.to(dtype)
    if callable(getattr(sae, "normalize_input", None)) and callable(getattr(sae, "denormalize_output", None)):
        out = sae(sae.normalize_input(xin))
        return sae.denormalize_output(out.x_hat).to(x.dtype), out
    scale = _input_scale(sae)
    out = sae(xin * scale if scale else xin)
    x_hat = out.x_hat / scale if scale else out.x_hat
    return x_hat.to(x.dtype), out


def _sparse_of(out):
    """``(values, indices)`` of a forward output; dense ``latents`` are turned into
    padded ``[B, max_active]`` pairs (padding has value 0)."""
    if getattr(out, "indices", None) is not None:
        return out.values.detach(), out.indices.detach()
    lat = getattr(out, "latents", None)
    if lat is None:
        raise ValueError("the SAE output has neither .indices/.values nor .latents; cannot read its sparse code")
    lat = lat.detach()
    width = max(1, int((lat != 0).sum(-1).max()))
    idx = lat.abs().topk(width, dim=-1).indices
    return lat.gather(1, idx), idx


def _rows(data, batch_size, max_rows=None):
    """Iterate float batches from a tensor ``[n, d]`` or an activation store (one epoch, in order)."""
    if isinstance(data, torch.Tensor) or isinstance(data, np.ndarray):
        data = torch.as_tensor(data)
        n = len(data) if max_rows is None else min(len(data), max_rows)
        for i in range(0, n, batch_size):
            yield data[i:min(i + batch_size, n)]
        return
    if not hasattr(data, "batches"):
        raise ValueError(f"data must be a tensor [n, d] or an ActivationStore, got {type(data).__name__}")
    seen = 0
    for batch in data.batches(batch_size, shuffle=False, drop_last=False):
        if max_rows is not None and seen >= max_rows:
            break
        if max_rows is not None:
            batch = batch[: max_rows - seen]
        seen += len(batch)
        yield batch


# ---------------------------------------------------------------------------
# 1. reconstruction
# ---------------------------------------------------------------------------
def mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Reconstruction MSE per dimension, [scale] eq. A.1:
    ``L_MSE = (1/D) sum_i (x_i - x_hat_i)^2``, averaged over the rows of ``x``."""
    return float(((x.detach().double() - x_hat.detach().double()) ** 2).mean())


def sse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Squared error summed over dimensions and averaged over tokens,
    ``(1/T) sum_x ||x - x_hat||_2^2`` ([switch] L_recon, sec. 3.3; "note that
    L_recon is proportional to d"). Equals ``D * mse(x, x_hat)``."""
    return float(((x.detach().double() - x_hat.detach().double()) ** 2).sum(-1).mean())


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained,
    ``sum_x ||x - x_hat||^2 / sum_x ||x - mean(x)||^2`` (mean over the rows given).
    0 is a perfect reconstruction, 1 is as good as predicting the mean."""
    from .train import fvu_ratio

    x, x_hat = x.detach().double(), x_hat.detach().double()
    n = max(1, x.shape[0])
    return fvu_ratio(float(((x - x_hat) ** 2).sum()) / n, float(((x - x.mean(0)) ** 2).sum()) / n,
                     float((x ** 2).sum()) / n)


def l0(acts: torch.Tensor) -> float:
    """Mean number of nonzero entries per row (the L0 "sparsity" of the papers'
    x-axes). ``acts`` is a dense latent matrix ``[B, n_latents]`` or the TopK
    values ``[B, k]``; both give the same number."""
    return float((acts != 0).sum(-1).double().mean())


def latent_counts(values: torch.Tensor, indices: torch.Tensor, n_latents: int) -> torch.Tensor:
    """How many rows each latent is active in (value != 0): LongTensor ``[n_latents]``."""
    active = values != 0
    return torch.bincount(indices[active].flatten().cpu(), minlength=n_latents)


def dead_fraction(counts: torch.Tensor, threshold: int = 0) -> float:
    """Fraction of latents whose activation count over a token set is ``<= threshold``
    (``threshold=0``: never active = dead)."""
    counts = torch.as_tensor(counts)
    return float((counts <= threshold).double().mean())


@torch.no_grad()
def evaluate_sae(sae, data, batch_size: int = 4096, max_rows: int | None = None,
                 device="auto", return_counts: bool = False) -> dict:
    """Reconstruction summary of ``sae`` on ``data`` (tensor ``[n, d]`` or an
    ActivationStore), batched, with float64 accumulators:

    * ``mse``: [scale] eq. A.1 (mean over rows and dimensions),
    * ``sse``: per-token squared error summed over dimensions ([switch] L_recon),
    * ``fvu``: ``sum ||x - x_hat||^2 / sum ||x - mean||^2`` over all rows,
    * ``l0``: mean active latents per row,
    * ``dead_fraction``: fraction of latents never active on these rows,
    * ``n_rows``; and ``counts`` (LongTensor ``[n_latents]``) if ``return_counts``.

    Inputs go through :func:`reconstruct`, so an SAE's input normalisation is
    applied and undone. Note the dead fraction depends on how many rows you pass.
    """
    check_positive_int("batch_size", batch_size)
    dev = resolve_device(device)
    n_lat = int(getattr(sae, "n_latents", 0) or 0)
    n, s_err, s_l0, s_x, s_x2, counts = 0, 0.0, 0.0, 0.0, 0.0, torch.zeros(n_lat, dtype=torch.long)
    with _eval_mode(sae, dev):
        for x in progress(_rows(data, batch_size, max_rows), desc="evaluate_sae", leave=False):
            x = x.to(dev).float()
            x_hat, out = reconstruct(sae, x)
            vals, idx = _sparse_of(out)
            xd = x.double()
            s_err += float(((xd - x_hat.double()) ** 2).sum())
            s_x, s_x2 = s_x + xd.sum(0), s_x2 + (xd ** 2).sum(0)
            s_l0 += float((vals != 0).sum())
            c = latent_counts(vals, idx, n_lat)
            if len(c) > len(counts):
                counts = F.pad(counts, (0, len(c) - len(counts)))
            counts += c
            n += len(x)
    if n == 0:
        raise ValueError("data is empty")
    d = s_x.numel()
    total_var = float((s_x2 - s_x ** 2 / n).sum())
    res = dict(mse=s_err / (n * d), sse=s_err / n, fvu=s_err / total_var if total_var > 0 else float("nan"),
               l0=s_l0 / n, dead_fraction=dead_fraction(counts), n_rows=n)
    if return_counts:
        res["counts"] = counts
    return res


# ---------------------------------------------------------------------------
# 2. faithfulness: loss recovered
# ---------------------------------------------------------------------------
def _as_tokens(tokens) -> torch.Tensor:
    if not isinstance(tokens, (torch.Tensor, np.ndarray)):  # a tokenized datasets split
        from .data import token_array
        tokens = token_array(tokens)
    tokens = torch.as_tensor(tokens).long()
    if tokens.ndim != 2 or tokens.shape[1] < 3:
        raise ValueError(f"tokens must be a LongTensor [n_seq, n_ctx] with n_ctx >= 3, got shape {tuple(tokens.shape)}")
    return tokens


def _splice_mask(model, ids: torch.Tensor, skip_bos: bool) -> torch.Tensor:
    """Bool ``[B, n_ctx]``: positions whose activation is replaced. Position 0 never;
    with ``skip_bos`` also no position holding the model's BOS token (as
    ``activations.collect(skip_bos=True)`` leaves them out of SAE training data)."""
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 0] = False
    bos = getattr(getattr(model, "config", None), "bos_token_id", None)
    if skip_bos and bos is not None:
        mask &= ids != bos
    return mask


@torch.no_grad()
def site_mean(model, tokens, site: str, batch_size: int = 8, device="auto", skip_bos: bool = True) -> torch.Tensor:
    """Mean activation ``[d]`` of ``site`` over the positions of ``tokens`` that
    :func:`loss_recovered` splices (not position 0, nor BOS tokens when
    ``skip_bos``): the baseline of mean ablation."""
    from . import activations

    tokens, dev = _as_tokens(tokens), resolve_device(device)
    total, n, mask = 0.0, 0, None

    def record(a):
        nonlocal total, n
        total = total + a[mask].double().sum(0)
        n += int(mask.sum())

    with _eval_mode(model, dev):
        for i in range(0, len(tokens), batch_size):
            ids = tokens[i:i + batch_size].to(dev)
            mask = _splice_mask(model, ids, skip_bos)
            with activations.splice(model, site, record):  # record returns None: no change
                model(ids)
    if n == 0:
        raise ValueError("tokens have no position to average over (all are position 0 or BOS)")
    return (total / n).float()


@torch.no_grad()
def loss_recovered(model, tokens, site: str, sae, ablation: str = "zero", batch_size: int = 8,
                   mean_activation: torch.Tensor | None = None, device="auto", skip_bos: bool = True) -> dict:
    """Fraction of the cross-entropy loss recovered by splicing the SAE, [scale] eq. A.2:

        loss_recovered = (L_ablated - L_sae) / (L_ablated - L_orig)

    with ``L_orig`` the model's CE, ``L_sae`` the CE with the ``site`` activation
    replaced by the SAE reconstruction and ``L_ablated`` the CE with it replaced by
    zeros (``ablation="zero"``, the papers' ``L_zero``: 1 = perfect, 0 = as bad as
    zero ablation) or by a mean activation (``ablation="mean"``: a stricter baseline;
    ``mean_activation`` ``[d]``, default: :func:`site_mean` over these ``tokens``).

    Returns a dict: ``ce_orig``, ``ce_sae``, ``ce_ablated`` (mean CE in nats),
    ``loss_recovered``, ``kl_sae``, ``kl_ablated`` (mean per-position
    ``KL(p_orig || p_spliced)`` of the next-token distributions, nats),
    ``ablation`` and ``n_tokens`` (number of predictions in the CE mean).

    BOS handling: ``tokens`` is ``[n_seq, n_ctx]`` (or a tokenized split) with a BOS
    at position 0, as :func:`saelib.data.tokenize` packs it. Position 0 keeps its
    original activation in every splice (its activation is an outlier attention
    sink, and ``activations.collect`` leaves it out of SAE training data); with
    ``skip_bos`` (default, same as ``collect``) so does every other position
    holding ``model.config.bos_token_id``. Because the model is causal, the
    prediction made at position 0 is then identical in all three runs and is
    left out: the CE averages the predictions made at positions ``1 .. n_ctx-2``
    (targets ``tokens[:, 2:]``), the KL positions ``1 .. n_ctx-1``.

    ``model`` and ``sae`` (if modules) are moved to ``device`` and run in eval
    mode; their train/eval modes are restored afterwards. The SAE's input
    normalisation is handled by :func:`reconstruct`. Memory: three
    ``[batch_size, n_ctx, vocab]`` float32 tensors at a time; lower ``batch_size``
    for a 50k vocabulary.
    """
    from . import activations

    check_choice("ablation", ablation, ("zero", "mean"))
    check_positive_int("batch_size", batch_size)
    tokens, dev = _as_tokens(tokens), resolve_device(device)
    if ablation == "mean":
        mean = site_mean(model, tokens, site, batch_size, dev, skip_bos) if mean_activation is None \
            else mean_activation
        mean = torch.as_tensor(mean).to(dev)
    mask = None  # splice positions of the current batch

    def sae_fn(a):
        a = a.clone()
        a[mask] = reconstruct(sae, a[mask])[0].to(a.dtype)
        return a

    def ablate_fn(a):
        a = a.clone()
        a[mask] = 0.0 if ablation == "zero" else mean.to(a.dtype)
        return a

    def logprobs(ids):  # next-token log-probs at positions 1 .. n_ctx-1
        return F.log_softmax(model(ids).logits[:, 1:].float(), -1)

    sums = dict(ce_orig=0.0, ce_sae=0.0, ce_ablated=0.0, kl_sae=0.0, kl_ablated=0.0)
    n_ce = n_kl = 0
    with _eval_mode(model, dev), _eval_mode(sae, dev):
        for i in progress(range(0, len(tokens), batch_size), desc="loss_recovered", leave=False):
            ids = tokens[i:i + batch_size].to(dev)
            mask, tgt = _splice_mask(model, ids, skip_bos), ids[:, 2:, None]
            lp0 = logprobs(ids)
            p0 = lp0.exp()
            sums["ce_orig"] += float(-lp0[:, :-1].gather(-1, tgt).sum(dtype=torch.float64))
            for key, fn in (("sae", sae_fn), ("ablated", ablate_fn)):
                with activations.splice(model, site, fn):
                    lp = logprobs(ids)
                sums[f"ce_{key}"] += float(-lp[:, :-1].gather(-1, tgt).sum(dtype=torch.float64))
                sums[f"kl_{key}"] += float((p0 * (lp0 - lp)).sum(dtype=torch.float64))
                del lp
            n_ce += tgt.numel()
            n_kl += lp0.shape[0] * lp0.shape[1]
    res = {k: v / (n_ce if k.startswith("ce") else n_kl) for k, v in sums.items()}
    gap = res["ce_ablated"] - res["ce_orig"]
    res["loss_recovered"] = (res["ce_ablated"] - res["ce_sae"]) / gap if gap != 0 else float("nan")
    res.update(ablation=ablation, n_tokens=n_ce)
    return res


# ---------------------------------------------------------------------------
# 3. decoder geometry
# ---------------------------------------------------------------------------
@torch.no_grad()
def max_cosine(a, b, exclude_self: bool = False, chunk_elems: int = CHUNK_ELEMS):
    """For every row of ``a``, the largest cosine similarity to a row of ``b`` and
    its index: ``(values [n_a], indices [n_a])``. With ``exclude_self`` (``a`` and
    ``b`` the same dictionary) row ``i`` is not compared with row ``i``.
    Computed in row chunks of ``a`` so that at most ``chunk_elems`` similarities
    are held at once (24576 x 24576 runs in ~64 MB blocks)."""
    a, b = _unit(_directions(a)), _unit(_directions(b))
    if exclude_self and a.shape[0] != b.shape[0]:
        raise ValueError("exclude_self=True needs a and b to be the same dictionary (same number of rows)")
    if b.shape[0] - int(exclude_self) < 1:
        raise ValueError("b has no rows to compare with")
    step = max(1, chunk_elems // b.shape[0])
    vals, idxs = [], []
    for i in range(0, a.shape[0], step):
        sims = a[i:i + step] @ b.T
        if exclude_self:
            r = torch.arange(sims.shape[0], device=sims.device)
            sims[r, r + i] = -math.inf
        v, j = sims.max(1)
        vals.append(v.cpu()), idxs.append(j.cpu())
    return torch.cat(vals), torch.cat(idxs)


def nearest_neighbour_cosine(W, chunk_elems: int = CHUNK_ELEMS) -> torch.Tensor:
    """Per-feature nearest-neighbour cosine within one dictionary, self excluded:
    ``nn_i = max_{j != i} cos(W_i, W_j)``, tensor ``[n]``. Its mean is
    [switch] fig. 4b ("cosine similarity of the nearest neighbor averaged across
    all features")."""
    return max_cosine(W, W, exclude_self=True, chunk_elems=chunk_elems)[0]


def duplicate_fraction(W, threshold: float = 0.9, chunk_elems: int = CHUNK_ELEMS) -> float:
    """Fraction of decoder vectors whose nearest neighbour (self excluded) has
    cosine ``> threshold``: [switch] fig. 4a and the "feature redundancy" /
    "feature similarity" of [scale] sec. 3.3.1 and 3.4 (threshold 0.9)."""
    return float((nearest_neighbour_cosine(W, chunk_elems) > threshold).double().mean())


def mmcs(a, b, chunk_elems: int = CHUNK_ELEMS) -> float:
    """Mean max cosine similarity: ``(1/n_a) sum_i max_j cos(a_i, b_j)``, the mean
    over rows of ``a`` of the best match among rows of ``b`` (not symmetric).
    ``a``/``b`` are ``[n, d]`` tensors or SAEs. Chunked (see :func:`max_cosine`)."""
    return float(max_cosine(a, b, chunk_elems=chunk_elems)[0].double().mean())


# ---------------------------------------------------------------------------
# 4. experts: specialization, redundancy, utilisation
# ---------------------------------------------------------------------------
@torch.no_grad()
def group_max_cosine(W, groups=None, chunk_elems: int = CHUNK_ELEMS) -> torch.Tensor:
    """``G[f, B] = max_{g in B, g != f} cos(W_f, W_g)``: each feature's best cosine to
    the features of each group (expert), ``[n_latents, n_groups]``, NaN where group
    ``B`` has no feature other than ``f``. ``groups`` (LongTensor ``[n_latents]``,
    values ``0..n_groups-1``) defaults to ``W.expert_of_latent()``. Chunked."""
    W, groups = _unit(_directions(W)), _groups_of(W, groups)
    if groups.shape != (W.shape[0],) or groups.min() < 0:
        raise ValueError(f"groups must be a non-negative LongTensor of shape [{W.shape[0]}]")
    order = torch.argsort(groups, stable=True)
    sizes = torch.bincount(groups).tolist()
    Ws = W[order.to(W.device)]
    step = max(1, chunk_elems // W.shape[0])
    out = torch.full((W.shape[0], len(sizes)), math.nan)
    nonempty = [g for g, s in enumerate(sizes) if s > 0]
    for i in range(0, W.shape[0], step):
        sims = Ws[i:i + step] @ Ws.T
        r = torch.arange(sims.shape[0], device=sims.device)
        sims[r, r + i] = -math.inf
        blocks = [blk.amax(1) for blk in sims.split([sizes[g] for g in nonempty], 1)]
        out[i:i + step, nonempty] = torch.stack(blocks, 1).cpu()
    out[torch.isinf(out)] = math.nan
    res = torch.empty_like(out)
    res[order] = out
    return res


def _group_mean(G: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """``M[A, B] = nanmean_{f in A} G[f, B]``."""
    E = G.shape[1]
    ok = ~torch.isnan(G)
    s = torch.zeros(E, E, dtype=torch.float64).index_add_(0, groups, torch.where(ok, G, 0).double())
    c = torch.zeros(E, E, dtype=torch.float64).index_add_(0, groups, ok.double())
    return (s / c).float()


def expert_similarity_matrix(W, groups=None, chunk_elems: int = CHUNK_ELEMS) -> torch.Tensor:
    """Expert specialization matrix, [switch] sec. 4.3.1 / fig. 4c: "averaging the
    cosine similarity of each feature in expert A with its nearest neighbor in
    expert B":

        M[A, B] = (1/|A|) sum_{f in A} max_{g in B, g != f} cos(d_f, d_g)

    ``[n_experts, n_experts]``, not symmetric. The diagonal (``g != f`` excludes the
    feature itself) is the within-expert nearest-neighbour cosine. ``W`` is an SAE
    (groups from ``expert_of_latent()``) or a decoder ``[n, d]`` with ``groups``.
    Compare the off-diagonal with :func:`random_block_similarity` of a dense SAE
    of the same size (the paper's baseline, about 0.2 for GPT-2 small)."""
    groups = _groups_of(W, groups)
    return _group_mean(group_max_cosine(W, groups, chunk_elems), groups)


def random_blocks(n_latents: int, n_blocks: int, seed: int = 0) -> torch.Tensor:
    """A random partition of ``n_latents`` features into ``n_blocks`` blocks of
    equal size (+-1): LongTensor ``[n_latents]`` of block ids."""
    check_positive_int("n_blocks", n_blocks)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n_latents, generator=gen) % n_blocks


def random_block_similarity(W, n_blocks: int, seed: int = 0, chunk_elems: int = CHUNK_ELEMS) -> torch.Tensor:
    """The "random blocks of the same size in a TopK SAE of the same size" baseline of
    [switch] fig. 4c: split the features of a dense dictionary ``W`` (a TopK SAE
    with as many latents as the switch SAE) into ``n_blocks`` random blocks and
    return :func:`expert_similarity_matrix` of that partition. Summarise with
    :func:`offdiagonal_mean`."""
    W = _directions(W)
    return expert_similarity_matrix(W, random_blocks(W.shape[0], n_blocks, seed), chunk_elems)


def offdiagonal_mean(M: torch.Tensor) -> float:
    """Mean of the off-diagonal entries of a square matrix (NaN ignored)."""
    M = torch.as_tensor(M).double()
    off = M[~torch.eye(M.shape[0], dtype=torch.bool)]
    return float(off[~torch.isnan(off)].mean())


def expert_redundancy(W, groups=None, threshold: float = 0.9, seed: int = 0,
                      chunk_elems: int = CHUNK_ELEMS) -> dict:
    """Intra- vs inter-expert feature similarity, [scale] sec. 3.3.1 / fig. 6a.

    The paper measures redundancy as "the proportion of features with a maximum
    cosine similarity to any other feature exceeding 0.9", reported within experts
    and between "randomly sampled experts of the same size". Precisely, for each
    feature ``f`` of expert ``e(f)``:

    * ``intra(f) = max_{g in e(f), g != f} cos(d_f, d_g)``
    * ``inter(f) = max_{g not in e(f)} cos(d_f, d_g)`` (all other experts)
    * ``pair(f)  = max_{g in r(e(f))} cos(d_f, d_g)`` where ``r`` maps every expert to
      one other expert drawn uniformly at random (``seed``): the paper's
      "randomly sampled experts of the same size".

    Returned: ``intra_mean``, ``inter_mean``, ``pair_mean`` (averages over features)
    and ``intra_frac``, ``inter_frac``, ``pair_frac`` (fractions ``> threshold``),
    plus ``overall_frac`` = :func:`duplicate_fraction` of the whole dictionary
    (``max(intra, inter) > threshold``). Features of single-feature experts have no
    intra value and are left out of the intra averages. Needs >= 2 experts.
    """
    groups = _groups_of(W, groups)
    G = group_max_cosine(W, groups, chunk_elems).double()
    n, E = G.shape
    if E < 2:
        raise ValueError("expert_redundancy needs at least 2 experts (groups)")
    rows = torch.arange(n)
    intra = G[rows, groups]
    other = G.clone()
    other[rows, groups] = math.nan
    inter = torch.where(torch.isnan(other), -math.inf, other).amax(1)
    gen = torch.Generator().manual_seed(seed)
    partner = (torch.arange(E) + torch.randint(1, E, (E,), generator=gen)) % E  # != itself
    pair = G[rows, partner[groups]]
    allmax = torch.fmax(intra, inter)

    def stats(v):
        v = v[~torch.isnan(v) & ~torch.isinf(v)]
        return float(v.mean()), float((v > threshold).double().mean())

    (im, if_), (em, ef), (pm, pf) = stats(intra), stats(inter), stats(pair)
    return dict(intra_mean=im, intra_frac=if_, inter_mean=em, inter_frac=ef, pair_mean=pm, pair_frac=pf,
                overall_frac=float((allmax > threshold).double().mean()), threshold=threshold)


@torch.no_grad()
def expert_activation_counts(sae, x, by: str = "router", batch_size: int = 4096, device="auto") -> torch.Tensor:
    """How many rows of ``x`` activate each expert, LongTensor ``[n_experts]``
    ([scale] fig. 6b counts expert activations on a set of tokens).

    ``by="router"``: expert ``e`` is activated by row ``x`` when the router selects
    it (``e in out.expert_idx``: the argmax for switch, the ``n_active`` chosen for
    scale). ``by="latents"``: when at least one of its latents survives the
    (global) TopK with a nonzero value - for scale SAEs a selected expert can end
    up contributing nothing. ``x``: tensor ``[n, d]`` or activation store."""
    check_choice("by", by, ("router", "latents"))
    dev = resolve_device(device)
    E = int(getattr(sae, "n_experts", 1))
    owner = sae.expert_of_latent().to(dev) if by == "latents" else None
    counts = torch.zeros(E, dtype=torch.long)
    with _eval_mode(sae, dev):
        for xb in _rows(x, batch_size):
            _, out = reconstruct(sae, xb.to(dev).float())
            if by == "router":
                idx = getattr(out, "expert_idx", None)
                if idx is None:  # dense SAE: its single expert sees every row
                    counts[0] += len(xb)
                    continue
                hit = torch.zeros(len(xb), E, dtype=torch.bool, device=idx.device)
                hit.scatter_(1, idx.reshape(len(xb), -1).long(), True)
            else:
                vals, ind = _sparse_of(out)
                hit = torch.zeros(len(xb), E, dtype=torch.long, device=ind.device).scatter_add_(
                    1, owner[ind], (vals != 0).long()) > 0
            counts += hit.sum(0).cpu()
    return counts


def expert_count_cdf(counts: torch.Tensor) -> torch.Tensor:
    """Cumulative share of activations covered by the ``i`` most used experts
    ([scale] fig. 6b, "experts sorted by descending activation frequency"):
    ``cdf[i] = sum_{j <= i} c_(j) / sum_j c_j`` with ``c_(0) >= c_(1) >= ...``.
    A steep curve = a few experts take most tokens; the diagonal = uniform use."""
    c = torch.as_tensor(counts).double().sort(descending=True).values
    return c.cumsum(0) / c.sum()


# ---------------------------------------------------------------------------
# 5. activation overlap between tokens
# ---------------------------------------------------------------------------
@torch.no_grad()
def sparse_codes(sae, x, batch_size: int = 4096, device="auto"):
    """``(values, indices)`` of the SAE code of every row of ``x``, on the CPU,
    ``[n, width]`` (``width = k`` for TopK-style SAEs; padded with value 0 for
    dense-output SAEs). A latent is *active* where its value is nonzero."""
    dev = resolve_device(device)
    vs, js = [], []
    with _eval_mode(sae, dev):
        for xb in _rows(x, batch_size):
            _, out = reconstruct(sae, xb.to(dev).float())
            v, j = _sparse_of(out)
            vs.append(v.float().cpu()), js.append(j.long().cpu())
    w = max(v.shape[1] for v in vs)
    return (torch.cat([F.pad(v, (0, w - v.shape[1])) for v in vs]),
            torch.cat([F.pad(j, (0, w - j.shape[1])) for j in js]))


def _active(indices, values):
    indices = torch.as_tensor(indices).long().cpu()
    active = torch.ones_like(indices, dtype=torch.bool) if values is None else torch.as_tensor(values).cpu() != 0
    if indices.ndim != 2 or active.shape != indices.shape:
        raise ValueError("indices (and values) must be [n_tokens, width] tensors of the same shape")
    return indices, active


def neuronal_activation_similarity(indices, values=None, k_total: float | None = None) -> float:
    """Average neuronal activation similarity, [scale] eq. A.3:

        Similarity = 1/(N(N-1)) sum_{i != j} k_ij / K_total,   k_ij = |S_i ∩ S_j|

    over the ``N`` tokens (rows of ``indices``; ``S_i`` = latents with nonzero
    ``values`` in row ``i``; all entries when ``values`` is None). ``K_total``
    defaults to the mean ``|S_i|`` (= ``k`` for a TopK SAE whose k values are all
    positive). Computed exactly without forming pairs:
    ``sum_{i != j} k_ij = sum_l c_l^2 - sum_i |S_i|`` with ``c_l`` the number of
    tokens in which latent ``l`` is active.
    """
    indices, active = _active(indices, values)
    N = indices.shape[0]
    if N < 2:
        raise ValueError("need at least 2 tokens")
    c = torch.bincount(indices[active]).double()
    sizes = active.sum(1).double()
    k_total = float(sizes.mean()) if k_total is None else float(k_total)
    return float(((c ** 2).sum() - sizes.sum()) / (N * (N - 1) * k_total))


@torch.no_grad()
def overlap_distribution(indices, values=None, n_pairs: int | None = None, seed: int = 0,
                         chunk_elems: int = CHUNK_ELEMS) -> torch.Tensor:
    """Histogram of the overlap ``k_ij = |S_i ∩ S_j|`` over token pairs ``i != j``
    ([scale] appendix D, fig. 11): LongTensor ``h`` with ``h[m]`` = number of
    ordered pairs with ``k_ij = m`` (normalise with ``h / h.sum()``).

    ``n_pairs=None``: all ``N(N-1)`` ordered pairs, exactly (sparse matmul in row
    chunks; fine up to N ~ 2e4). ``n_pairs=P``: ``P`` ordered pairs drawn uniformly
    with ``i != j`` (``seed``), a Monte-Carlo estimate for large N.
    ``sum_m m h[m] / (h.sum() K_total)`` equals
    :func:`neuronal_activation_similarity` (exactly for ``n_pairs=None``)."""
    indices, active = _active(indices, values)
    N, w = indices.shape
    if N < 2:
        raise ValueError("need at least 2 tokens")
    if n_pairs is not None:
        check_positive_int("n_pairs", n_pairs)
        gen = torch.Generator().manual_seed(seed)
        i = torch.randint(0, N, (n_pairs,), generator=gen)
        j = (i + torch.randint(1, N, (n_pairs,), generator=gen)) % N
        hist = torch.zeros(w + 1, dtype=torch.long)
        step = max(1, chunk_elems // max(1, w * w))
        for s in range(0, n_pairs, step):
            a, b = i[s:s + step], j[s:s + step]
            eq = (indices[a][:, :, None] == indices[b][:, None, :]) & active[a][:, :, None] & active[b][:, None, :]
            hist += torch.bincount(eq.sum((1, 2)), minlength=w + 1)
        return hist
    L = int(indices[active].max()) + 1 if active.any() else 1
    idx = torch.where(active, indices, 0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        Z = torch.zeros(N, L).scatter_add_(1, idx, active.float()).to_sparse_csr()
    hist = torch.zeros(w + 1, dtype=torch.long)
    step = max(1, chunk_elems // max(N, L))
    for s in range(0, N, step):
        e = min(s + step, N)
        Zc = torch.zeros(e - s, L).scatter_add_(1, idx[s:e], active[s:e].float())
        K = torch.sparse.mm(Z, Zc.T).round().long()  # [N, c]: k_{i, s+t}
        K[torch.arange(s, e), torch.arange(e - s)] = -1  # drop i == j
        K = K[K >= 0]
        hist += torch.bincount(K, minlength=w + 1)[: w + 1]
    return hist


# ---------------------------------------------------------------------------
# 6. activation sparsity and superposition score
# ---------------------------------------------------------------------------
def activation_sparsity(acts: torch.Tensor, eps: float = 0.0) -> float:
    """[laws] eq. 6: ``Sparsity = (number of zero activations) / (total activations)``,
    over every entry of ``acts``; an entry counts as zero when ``|a| <= eps``.
    (The paper's SAE sparsities of 0.46-0.50 mean about half the latents fire.)"""
    acts = torch.as_tensor(acts)
    return float((acts.abs() <= eps).double().mean())


ACTIVATION_MATRIX_KINDS = ("correlation", "covariance", "precomputed")


def activation_matrix(acts: torch.Tensor, kind: str = "correlation") -> torch.Tensor:
    """The matrix ``C`` of [laws] eq. 5, ``[d, d]`` float64, from activations ``[N, d]``:

    * ``"correlation"`` (the paper's choice): ``C_ab = Cov_ab / (sigma_a sigma_b)``,
      Pearson correlation over the ``N`` rows; dimensions with zero variance have no
      correlation and are dropped (so ``d`` becomes the number of varying dims);
    * ``"covariance"``: ``C = (X - mean)^T (X - mean) / (N - 1)``;
    * ``"precomputed"``: ``acts`` already is ``C`` (square, symmetric PSD).
    """
    check_choice("kind", kind, ACTIVATION_MATRIX_KINDS)
    X = torch.as_tensor(acts).double()
    if kind == "precomputed":
        if X.ndim != 2 or X.shape[0] != X.shape[1]:
            raise ValueError(f"kind='precomputed' needs a square matrix, got shape {tuple(X.shape)}")
        return X
    if X.ndim != 2 or X.shape[0] < 2:
        raise ValueError(f"acts must be [N >= 2, d], got shape {tuple(X.shape)}")
    Xc = X - X.mean(0)
    C = Xc.T @ Xc / (X.shape[0] - 1)
    if kind == "correlation":
        sd = C.diagonal().sqrt()
        keep = sd > 1e-12 * max(1.0, float(sd.max()))
        C = C[keep][:, keep] / (sd[keep][:, None] * sd[keep][None, :])
    return C


def superposition_score(acts: torch.Tensor, kind: str = "correlation", normalized: bool = False) -> float:
    """Superposition score of [laws] eq. 5, ``S = tr(C) / ||C||_F``, with ``C`` from
    :func:`activation_matrix` (``kind``: correlation as in the paper, covariance,
    or a precomputed matrix).

    Bound ``1 <= S <= sqrt(d)``. Proof: ``C`` is symmetric PSD with eigenvalues
    ``lambda_i >= 0``, so ``tr C = sum lambda`` and ``||C||_F = sqrt(sum lambda^2)``;
    ``(sum lambda)^2 >= sum lambda^2`` (cross terms are >= 0) gives ``S >= 1``, and
    Cauchy-Schwarz ``(sum lambda)^2 <= rank(C) sum lambda^2 <= d sum lambda^2``
    gives ``S <= sqrt(d)``. ``S = 1`` iff ``C`` has rank 1; ``S = sqrt(d)`` iff
    ``C`` is proportional to the identity (for a correlation matrix: uncorrelated
    dims). ``S^2`` is the participation ratio (:func:`participation_ratio`), an
    effective number of dimensions; a *higher* S means activations spread over
    more directions - the paper reads that as "more superposition".

    The paper reports S in 0.136-0.230, which is impossible under this definition
    (S >= 1 always); its numbers may have been normalised in an unstated way.
    ``normalized=True`` returns ``S / sqrt(d)``, a scale-free variant in
    ``[1/sqrt(d), 1]``. NaN for a zero matrix."""
    C = activation_matrix(acts, kind)
    fro = float(torch.linalg.matrix_norm(C))
    if fro == 0:
        return float("nan")
    s = float(C.trace()) / fro
    return s / math.sqrt(C.shape[0]) if normalized else s


def participation_ratio(acts: torch.Tensor, kind: str = "correlation") -> float:
    """Participation ratio ``PR = (tr C)^2 / tr(C^2) = (sum lambda)^2 / sum lambda^2``
    in ``[1, rank C]``, the effective dimensionality of the activations; equals
    ``superposition_score(acts, kind)**2`` since ``tr(C^2) = ||C||_F^2`` for a
    symmetric ``C``."""
    C = activation_matrix(acts, kind)
    t2 = float((C * C).sum())  # tr(C^2) = ||C||_F^2 for symmetric C
    return float(C.trace()) ** 2 / t2 if t2 > 0 else float("nan")
