"""Sparse kernels for TopK-style SAEs, each with a plain reference twin.

Public functions (stable signatures; ``saelib.saes`` calls only these):

* ``topk_encode(x, W_enc, b_enc, k, b_pre=None) -> (values, indices)``
  values = ReLU(TopK_k((x - b_pre) @ W_enc.T + b_enc)), both ``[B, k]``;
  ``indices`` long.
* ``expert_topk_encode(x, W_enc, expert_idx, k, b_enc=None, b_pre=None)``
  ``W_enc`` is ``[E, m, d]``; ``expert_idx`` ``[B, n_active]`` names the
  experts each row visits; the TopK is taken **globally** over the
  ``n_active * m`` pre-activations of the selected experts; ``indices`` are
  global latent ids ``e * m + j``; values are ReLU'd.
* ``sparse_decode(values, indices, W_dec) -> [B, d]``
  sum_j values[b, j] * W_dec[indices[b, j]], ``W_dec`` is ``[n_latents, d]``.
* ``batch_topk_encode(x, W_enc, b_enc, k, b_pre=None, threshold=None, guess=None)``
  ``-> (values, indices, cut)``: BatchTopK's batch-wide selection (training) or
  its threshold (inference), zero-padded to the widest row.
* ``feature_scale_mean(W, omega)``: the Scale SAE's feature-scaled encoders.
* ``timed_sections()`` / ``section(name)``: wall time per named part of a step
  (``saelib.bench`` prints it; a flag test when off).

The ``*_reference`` functions are the obviously-correct dense versions that
the tests compare the fast paths to.

How the fast paths save time (the idea of EleutherAI sparsify's
``fused_encoder.py``, carried to the decoder and to expert routing):

* **Encoder** (one autograd Function): the forward is the dense matmul
  ``x @ W_enc.T + (b_enc - W_enc b_pre)`` and a TopK; only ``values`` and
  ``indices`` are kept. The gradient of the pre-activations has ``k`` non-zeros
  per row, so the backward never forms a ``[B, n_latents]`` tensor:
  ``grad_W_enc[i] = sum_{(b,j): idx_bj = i} g_bj (x_b - b_pre)`` (a
  sparse-matrix product ``G.T @ x``, see ``_scatter_rows``, then a rank-one
  update for ``b_pre``), ``grad_b_enc`` (``index_add``), ``grad_b_pre =
  -W_enc^T grad_b_enc`` and, when ``x`` needs one, ``grad_x`` (``embedding_bag``).
  The two dense matmuls of the backward (2 * 2*B*d*n FLOPs) become
  O(B*k*d) work. On CPU the forward also runs ``CHUNK_ROWS`` rows at a time
  through one reused scratch buffer (no page faults on a fresh [B, n] matrix
  every step) and takes the TopK with an exact two-level group-max
  prefilter (``_group_topk``), ~1.4-1.8x faster than ``torch.topk`` there.
* **Decoder** (one autograd Function): ``x_hat = embedding_bag(indices, W_dec,
  values)``, O(k d) per row; backward ``grad_values[b,j] = <grad_out_b,
  W_dec[idx_bj]>`` and ``grad_W_dec = V.T @ grad_out`` restricted to the
  touched rows, again without a dense ``[B, n_latents]`` matrix. The
  latent-sorted sparsity structure is built once per step and shared by the
  decoder and encoder backward (``_transpose_structure``).
* **BatchTopK**: the same blockwise matmul; each block keeps only its entries
  above a cheap lower bound of the batch's cut (80% of the previous batch's cut,
  else 0), ``kthvalue`` on those gives the exact cut, and the survivors become a
  zero-padded ``[B, w]`` code with the encoder's sparse backward. No [B, n]
  matrix, one matmul (the plain way computes the pre-activations twice).
* **Experts** (Switch / Scale SAE): ``SAE`` hands the rows over sorted by their
  first expert, so for ``n_active = 1`` the rows are already grouped and each
  expert's encoder runs on one contiguous block (1/E of the dense encoder work);
  with ``n_active > 1`` the (row, slot) pairs are sorted by expert, each
  expert's encoder runs on its pairs, the results are gathered back to rows and
  one global TopK over the ``n_active * m`` candidates is taken. Rows grouped
  by expert also keep the decode and the sparse backward inside one expert's
  decoder rows at a time (cache-resident), ~2-3x faster than random rows. The
  backward is the sparse encoder backward above on the flat ``[E*m, d]``
  weight, so it works unchanged when ``W_enc`` is a differentiable function of
  parameters (Scale SAE feature scaling). One host sync per call (the experts'
  row counts); no Python loop except the one over experts.

Where the time goes: ``python -m saelib.bench`` prints it per section (router,
dispatch, encoder matmul, select, decode, decoder backward, encoder backward,
optimizer, other). At d=256, n=4096, k=32, B=8192 on one thread, the dense
TopK step is dominated by its encoder matmul and its TopK selection; the
decode, the sparse backward passes and the optimizer cost every TopK-style SAE
of that width the same (the experts' sorted rows make them somewhat cheaper),
and they, with ``torch.topk`` on short per-expert rows, bound what routing
saves in wall-clock time.
"""
from __future__ import annotations

import contextlib
import threading
import time
import warnings

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

with warnings.catch_warnings():   # torch warns once per process that CSR is "beta": spend it here
    warnings.simplefilter("ignore")
    torch.sparse_csr_tensor(torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([1.0]), (1, 1))


# --------------------------------------------------------------------------
# reference implementations (dense, obviously correct)
# --------------------------------------------------------------------------
def topk_encode_reference(x, W_enc, b_enc, k, b_pre=None):
    if b_pre is not None:
        x = x - b_pre
    pre = x @ W_enc.T
    if b_enc is not None:
        pre = pre + b_enc
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    return F.relu(vals), idx


def expert_topk_encode_reference(x, W_enc, expert_idx, k, b_enc=None, b_pre=None):
    if b_pre is not None:
        x = x - b_pre
    E, m, d = W_enc.shape
    B, n_active = expert_idx.shape
    W_sel = W_enc[expert_idx]                                  # [B, n_active, m, d]
    pre = torch.einsum("bd,bamd->bam", x, W_sel)               # [B, n_active, m]
    if b_enc is not None:
        pre = pre + b_enc.view(E, m)[expert_idx]
    pre = pre.reshape(B, n_active * m)
    vals, local = pre.topk(k, dim=-1, sorted=False)
    slot, j = local // m, local % m
    idx = expert_idx.gather(1, slot) * m + j
    return F.relu(vals), idx


def batch_topk_encode_reference(x, W_enc, b_enc, k, b_pre=None, threshold=None):
    """Dense BatchTopK: ``(z [B, n], cut)``; z keeps the ReLU'd entries ``>= cut`` (the
    (k*B)-th largest; all positives if fewer) or ``> threshold``."""
    if b_pre is not None:
        x = x - b_pre
    pre = F.relu(x @ W_enc.T + (0 if b_enc is None else b_enc))
    if threshold is not None:
        return pre * (pre > threshold), None
    flat = pre.flatten()
    kb = k * x.shape[0]
    cut = float(flat.detach().topk(kb).values.min()) if kb <= flat.numel() else 0.0
    keep = (pre >= cut) & (pre > 0) if cut > 0 else pre > 0
    return pre * keep, cut


def sparse_decode_reference(values, indices, W_dec):
    z = torch.zeros(values.shape[0], W_dec.shape[0], dtype=values.dtype, device=values.device)
    z = z.scatter_add(1, indices, values)
    return z @ W_dec


# --------------------------------------------------------------------------
# sparse building blocks (no [B, n_latents] tensor anywhere)
# --------------------------------------------------------------------------
_CSR_DTYPES = (torch.float32, torch.float64)
_cache = {}                 # one transposed sparsity structure, shared by decoder and encoder backward
_workspace = {}             # CPU scratch for the dense pre-activations, reused across calls
_workspace_lock = threading.Lock()
CHUNK_ROWS = 2048           # CPU: rows of pre-activations computed (and TopK'd) at a time,
CHUNK_ELEMENTS = 2**25      # at most this many entries (128 MiB float32); few chunks keep the
                            # number of parallel regions (thread barriers) per call small


# --------------------------------------------------------------------------
# where the time goes: named sections, timed only inside ``timed_sections()``
# --------------------------------------------------------------------------
SECTIONS = ("router", "dispatch", "encoder matmul", "select", "decode", "decoder backward",
            "encoder backward", "optimizer")
_timing = None              # {section: seconds} while timing is on, else None
_timing_cuda = False


class section:
    """``with section(name):`` adds the block's wall time to ``name`` when timing is on (a
    flag test otherwise). Sections never nest; on CUDA each edge synchronises."""
    __slots__ = ("name", "t0")

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        if _timing is not None:
            if _timing_cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        if _timing is not None:
            if _timing_cuda:
                torch.cuda.synchronize()
            _timing[self.name] = _timing.get(self.name, 0.0) + time.perf_counter() - self.t0


@contextlib.contextmanager
def timed_sections(device="cpu"):
    """Collect the time spent in each of :data:`SECTIONS` (seconds, summed over calls)
    into the yielded dict. Used by ``saelib.bench`` to split a training step."""
    global _timing, _timing_cuda
    if _timing is not None:
        raise RuntimeError("timed_sections() is already active")
    _timing, _timing_cuda = {}, torch.device(device).type == "cuda"
    try:
        yield _timing
    finally:
        _timing = None


def _transpose_structure(indices, n_rows):
    """``(crow, col, order)`` of the CSR matrix [n_rows, B] whose row ``i`` lists the batch
    rows ``b`` with ``i`` among ``indices[b]`` (``order`` sorts the flat entries by latent).

    A SAE step needs it twice with the same ``indices`` (decoder and encoder backward), so
    the last one is cached (keyed by storage, shape and version counter; the cache holds a
    reference, so the key cannot be reused by another tensor) and dropped on its second use.
    The sort is a stable sort of the narrowest integer type that holds the ids (int16 below
    32767 latents: 2x faster than int32, 4x faster than int64 on CPU); stable, it keeps each
    CSR row's columns ascending."""
    key = (indices.data_ptr(), tuple(indices.shape), indices._version, n_rows, indices.device)
    hit = _cache.pop(key, None)
    if hit is not None:
        return hit[1]
    B, k = indices.shape
    flat = indices.reshape(-1)
    keys = flat.short() if n_rows < 2**15 - 1 else flat.int() if n_rows < 2**31 else flat
    sorted_keys, order = torch.sort(keys, stable=True)
    # row pointers without a host sync (bincount syncs on CUDA to size its output)
    crow = torch.searchsorted(sorted_keys, torch.arange(n_rows + 1, device=flat.device, dtype=keys.dtype))
    value = (crow, order.div(k, rounding_mode="floor"), order)
    _cache.clear()
    _cache[key] = (indices, value)
    return value


def _scatter_rows(indices, coef, rhs, n_rows):
    """``out[i] = sum_{(b, j): indices[b, j] = i} coef[b, j] * rhs[b]``, shape ``[n_rows, d]``.

    The transpose of ``embedding_bag``: ``S.T @ rhs`` for the sparse ``S`` [B, n_rows] with
    ``coef`` at ``indices``. Built as a CSR matrix of ``S.T`` (entries sorted by row id) and
    one sparse x dense product (MKL on CPU, cuSPARSE on CUDA): O(B*k*d) work and no
    ``[B*k, d]`` temporary. That is ~9x faster on CPU than ``index_add_`` of the
    materialised ``coef[:, :, None] * rhs[:, None, :]`` (what sparsify does)."""
    B, k = indices.shape
    if rhs.dtype not in _CSR_DTYPES:        # no sparse kernels for half types: index_add, chunked
        out = rhs.new_zeros(n_rows, rhs.shape[1])
        for ib, cb, rb in zip(indices.split(1024), coef.split(1024), rhs.split(1024)):
            out.index_add_(0, ib.reshape(-1), (cb.to(rb.dtype)[:, :, None] * rb[:, None, :]).flatten(0, 1))
        return out
    crow, col, order = _transpose_structure(indices, n_rows)
    S_t = torch.sparse_csr_tensor(crow, col, coef.reshape(-1)[order].to(rhs.dtype), (n_rows, B),
                                  check_invariants=False)
    out = rhs.new_empty(n_rows, rhs.shape[1])
    # beta=0 writes every row (untouched rows get 0); ``S_t @ rhs`` would first zero-fill a
    # result and then copy the product into it: 3 passes over [n_rows, d] instead of 1
    # (~100 ms per call at n=24576, d=768 on one thread)
    return torch.addmm(out, S_t, rhs.contiguous(), beta=0, out=out)


def _gather_rows(indices, coef, W):
    """``out[b] = sum_j coef[b, j] * W[indices[b, j]]``, shape ``[B, d]``: ``embedding_bag``
    (on CPU as fast as a CSR product ``S @ W`` with one thread, twice as fast with two)."""
    return F.embedding_bag(indices, W, per_sample_weights=coef.to(W.dtype), mode="sum")


def _gather_rowdot(indices, W, rhs):
    """``out[b, j] = <W[indices[b, j]], rhs[b]>``, shape ``[B, k]``.

    This is the ``per_sample_weights`` gradient of ``embedding_bag``; ATen's kernel for it
    reads each gathered row once (5 ms for B=8192, k=32, d=256 on 2 cores, against ~90 ms
    for ``bmm(W[indices], rhs)``, which materialises ``[B, k, d]``)."""
    B, k = indices.shape
    flat = indices.reshape(-1)
    try:
        offsets = torch.arange(0, B * k, k, device=flat.device)
        offset2bag = torch.arange(B * k, device=flat.device).div_(k, rounding_mode="floor")
        out = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            rhs.contiguous(), W, flat, offsets, offset2bag, 0, -1)
        return out.view(B, k)
    except (AttributeError, RuntimeError):   # private op missing: chunked gather + bmm
        return torch.cat([torch.bmm(W[i], r[:, :, None]).squeeze(-1)
                          for i, r in zip(indices.split(256), rhs.split(256))])


def _fold_b_pre(W, b, b_pre):
    """The bias of ``(x - b_pre) W^T + b`` written as ``x W^T + (b - W b_pre)``: the
    encoder then never forms ``x - b_pre`` (a [B, d] temporary whose gradient would need
    a sparse product of its own)."""
    if b_pre is None:
        return b
    bb = torch.mv(W, b_pre.to(W.dtype)).neg_()
    return bb if b is None else bb.add_(b)


def _encoder_backward(needs, x, W, indices, g, b_pre=None):
    """Gradients of ``values = pre.gather(1, indices)``, ``pre = (x - b_pre) @ W.T + b``,
    given the gradient ``g`` [B, k] of the selected pre-activations (already ReLU-masked).
    ``needs`` = (x, W, b, b_pre). With ``x_c = x - b_pre``:
    ``grad_W[i] = sum_b g_bi x_c,b = (G^T x)[i] - gb_i b_pre`` (one sparse product, then a
    rank-one update in place), ``gb = grad_b = sum_b g_bi``, ``grad_b_pre = -W^T gb``."""
    g = g.to(W.dtype)
    n = W.shape[0]
    grad_x = _gather_rows(indices, g, W) if needs[0] else None
    gb = None
    if needs[2] or (b_pre is not None and (needs[1] or needs[3])):
        gb = g.new_zeros(n).index_add_(0, indices.reshape(-1), g.reshape(-1))
    grad_W = None
    if needs[1]:
        grad_W = _scatter_rows(indices, g, x, n)
        if b_pre is not None:
            grad_W.addr_(gb, b_pre.to(W.dtype), alpha=-1)
    grad_b_pre = torch.mv(W.T, gb).neg_().to(b_pre.dtype) if b_pre is not None and needs[3] else None
    return grad_x, grad_W, gb if needs[2] else None, grad_b_pre


def _group_topk(pre, k, s1, s2=1):
    """Exact TopK over the last dim of ``pre`` [R, n] through group maxima (values unsorted).

    Entry ``i`` is in group ``i mod G1`` (``G1 = n / s1``; a strided view, so the group
    maxima are one streaming ``amax``). If a top-k entry's group were not among the k
    groups with the largest maxima, those k maxima would be k entries larger than it; so
    the top k entries lie in the top-k groups, and TopK over their ``k * s1`` members is
    exact (ties included: the returned values are the top-k multiset, at k distinct
    positions). With ``s2 > 1`` the same argument picks the k best of ``G1 / s2``
    super-groups first."""
    R, n = pre.shape
    G1 = n // s1
    gm = pre.view(R, s1, G1).amax(1)                           # [R, G1] group maxima
    if s2 > 1:
        G2 = G1 // s2
        top = gm.view(R, s2, G2).amax(1).topk(k, dim=-1, sorted=False).indices
        cand = (top.unsqueeze(-1) + G2 * torch.arange(s2, device=pre.device)).view(R, k * s2)
        groups = cand.gather(1, gm.gather(1, cand).topk(k, dim=-1, sorted=False).indices)
    else:
        groups = gm.topk(k, dim=-1, sorted=False).indices
    cand = (groups.unsqueeze(-1) + G1 * torch.arange(s1, device=pre.device)).view(R, k * s1)
    vals, j = pre.gather(1, cand).topk(k, dim=-1, sorted=False)
    return vals, cand.gather(1, j)


def _topk(pre, k):
    """TopK_k along the last dim (values unsorted, ``indices`` long), exact.

    torch.topk on CPU costs ~7 ns per entry when n < 64 k (nth_element) and ~2-3 ns
    above; the group-max prefilter of ``_group_topk`` replaces most of that by one
    streaming pass. Measured on 1 thread at k=32 (time relative to torch.topk): n=512
    0.78, 1024-1536 0.45-0.63, 4096 0.55, 24576 0.41. CUDA and short rows: torch.topk."""
    n = pre.shape[-1]
    r = n // k
    if pre.device.type != "cpu" or r < 16:
        return pre.topk(k, dim=-1, sorted=False)
    for s1, s2 in ((8, 8),) * (r >= 512) + ((4, 4),) * (r >= 64) + ((4, 1),):
        if n % (s1 * s2) == 0 and n // (s1 * s2) >= 2 * k:
            return _group_topk(pre, k, s1, s2)
    return pre.topk(k, dim=-1, sorted=False)


def _for_dense_chunks(x, W, b, fn):
    """Call ``fn(start, pre)`` for consecutive row blocks of ``pre = x @ W.T + b``.

    On CPU the blocks are ``CHUNK_ROWS`` rows (at most ``CHUNK_ELEMENTS`` entries) computed
    into one reused scratch buffer: no [B, n] matrix is kept or page-faulted in, and the
    selection that follows reads the block from cache. ``pre`` is only valid inside ``fn``.
    On CUDA: one block, one matmul."""
    if x.device.type != "cpu":
        with section("encoder matmul"):
            pre = F.linear(x, W, b)
        fn(0, pre)
        return
    B, n = x.shape[0], W.shape[0]
    rows = max(1, min(B, CHUNK_ROWS, CHUNK_ELEMENTS // n))
    rows = -(-B // -(-B // rows))                             # equal chunks
    with _scratch(("dense", x.dtype), rows * n, x) as buf:
        Wt = W.T
        for s in range(0, B, rows):
            xs = x[s:s + rows]
            pre = buf[:xs.shape[0] * n].view(xs.shape[0], n)
            with section("encoder matmul"):
                if b is None:
                    torch.mm(xs, Wt, out=pre)
                else:
                    torch.addmm(b, xs, Wt, out=pre)
            fn(s, pre)


def _dense_topk(x, W, b, k):
    """TopK_k(x @ W.T + b), block by block (``_for_dense_chunks``); on CPU with the
    group-maxima prefilter of ``_topk``."""
    vals = x.new_empty(x.shape[0], k)
    idx = torch.empty(x.shape[0], k, dtype=torch.long, device=x.device)

    def select(s, pre):
        with section("select"):
            v, i = _topk(pre, k)
            vals[s:s + len(pre)] = v
            idx[s:s + len(pre)] = i

    _for_dense_chunks(x, W, b, select)
    return vals, idx


def _entries_above(x, W, b, lo, strict):
    """``(rows, cols, values)`` of the entries of ``x @ W.T + b`` that are ``> lo``
    (``strict``) or ``>= lo``, in row-major order, computed block by block."""
    parts = []

    def collect(s, pre):
        with section("select"):
            mask = pre > lo if strict else pre >= lo
            nz = mask.nonzero()
            parts.append((nz[:, 0] + s, nz[:, 1], pre[mask]))

    _for_dense_chunks(x, W, b, collect)
    return tuple(torch.cat(p) for p in zip(*parts))


def _batch_select(x, W, b, k, threshold, guess):
    """BatchTopK's selection (Bussmann et al. 2024): ``(vals, idx, cut)``, ``vals``/``idx``
    [B, w] padded with zeros (w = the most any row keeps). Training (``threshold`` None):
    the ``k * B`` largest ReLU'd pre-activations of the whole batch, i.e. every entry
    ``>= cut`` (the kB-th largest; ties at the cut are all kept), or every positive entry
    when there are fewer than ``k * B``. Inference: entries ``> threshold``. One matmul,
    done block by block; only the surviving entries are kept. ``guess`` (the previous
    batch's cut) is a filter: the kB-th largest is searched among entries ``>= 0.8 guess``
    when there are enough of them, else among all positive entries (exact either way)."""
    B, kb = x.shape[0], k * x.shape[0]
    if threshold is not None:
        r, c, v = _entries_above(x, W, b, float(threshold), strict=True)
        cut = None
    else:
        r, c, v = _entries_above(x, W, b, 0.8 * guess, strict=False) if guess else ((),) * 3
        if len(v) < kb:
            r, c, v = _entries_above(x, W, b, 0.0, strict=True)
        cut = 0.0
        if len(v) >= kb:
            with section("select"):
                cut = float(v.kthvalue(len(v) - kb + 1).values)   # > 0: v holds positives only
                keep = v >= cut
                r, c, v = r[keep], c[keep], v[keep]
    with section("select"):
        counts = torch.bincount(r, minlength=B)
        width = max(1, int(counts.max())) if B else 1
        pos = torch.arange(len(r), device=r.device) - (counts.cumsum(0) - counts)[r]
        vals = v.new_zeros(B, width).index_put_((r, pos), v)
        idx = torch.zeros(B, width, dtype=torch.long, device=x.device).index_put_((r, pos), c)
    return vals, idx, cut


@contextlib.contextmanager
def _scratch(key, numel, like):
    """A reused buffer of ``numel`` entries, held until the block ends (CPU; a fresh one on
    CUDA or when another thread holds the workspace). Reuse matters on CPU: a fresh
    8 MiB tensor costs ~2,000 page faults on first touch, measured here at up to 18 ms."""
    own = like.device.type == "cpu" and _workspace_lock.acquire(blocking=False)
    try:
        if not own:
            yield like.new_empty(numel)
            return
        buf = _workspace.get(key)
        if buf is None or buf.numel() < numel:
            buf = _workspace[key] = like.new_empty(numel)
        yield buf[:numel]
    finally:
        if own:
            _workspace_lock.release()


def _inverse(perm):
    """The inverse of a permutation (``out[perm[i]] = i``)."""
    return torch.empty_like(perm).scatter_(0, perm, torch.arange(len(perm), device=perm.device))


def release_workspace():
    """Free the CPU scratch buffer of the dense TopK encoder (<= ``CHUNK_ELEMENTS`` entries)."""
    with _workspace_lock:
        _workspace.clear()
    _cache.clear()


# --------------------------------------------------------------------------
# fused autograd Functions
# --------------------------------------------------------------------------
def _save_encoded(ctx, x, W, vals, idx, b_pre):
    """The end of both encoder forwards: ReLU, save what the sparse backward needs."""
    vals = vals.relu_()
    ctx.save_for_backward(x, W, vals, idx, b_pre)
    ctx.mark_non_differentiable(idx)
    return vals, idx


def _encoded_backward(ctx, grad_vals):
    """Both encoders' backward: ``(grad_x, grad_W in W's own shape, grad_b_enc, grad_b_pre)``."""
    x, W, vals, idx, b_pre = ctx.saved_tensors
    with section("encoder backward"):
        g = grad_vals * (vals > 0)
        gx, gW, gb, gp = _encoder_backward(ctx.needs_input_grad[:4], x, W.reshape(-1, W.shape[-1]), idx, g, b_pre)
    return gx, None if gW is None else gW.view(W.shape), gb, gp


class TopKEncode(torch.autograd.Function):
    """values, indices = ReLU(TopK_k(x @ W_enc.T + b_enc)); sparse backward."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_pre, k):
        with section("encoder matmul"):
            bias = _fold_b_pre(W_enc, b_enc, b_pre)
        vals, idx = _dense_topk(x, W_enc, bias, k)           # the only dense work
        return _save_encoded(ctx, x, W_enc, vals, idx, b_pre)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_vals, _grad_idx):
        return (*_encoded_backward(ctx, grad_vals), None)


class BatchTopKEncode(torch.autograd.Function):
    """BatchTopK's code as ``(values, indices)`` [B, w] (zero-padded) and the cut; sparse
    backward (the padding has value 0, so the ReLU mask stops its gradient)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_pre, k, threshold, guess):
        with section("encoder matmul"):
            bias = _fold_b_pre(W_enc, b_enc, b_pre)
        vals, idx, cut = _batch_select(x, W_enc, bias, k, threshold, guess)
        cut = torch.tensor(float("nan") if cut is None else cut)
        ctx.mark_non_differentiable(cut)
        return (*_save_encoded(ctx, x, W_enc, vals, idx, b_pre), cut)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_vals, _grad_idx, _grad_cut):
        return (*_encoded_backward(ctx, grad_vals), None, None, None)


class ExpertTopKEncode(torch.autograd.Function):
    """Global TopK over the ``n_active`` selected experts, each expert run on its rows only."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_pre, expert_idx, k, presorted=None):
        E, m, d = W_enc.shape
        B, A = expert_idx.shape
        with section("encoder matmul"):
            b_enc = _fold_b_pre(W_enc.reshape(E * m, d), b_enc, b_pre)
        with section("dispatch"):
            flat = expert_idx.reshape(-1).long()                   # (row, slot) pairs
            if presorted is None:                                  # a host read: callers that know say so
                presorted = A == 1 and bool((flat[1:] >= flat[:-1]).all())
            presorted = presorted and A == 1
            order = None if presorted else torch.argsort(flat, stable=True)   # pairs grouped by expert
            sizes = torch.bincount(flat, minlength=E).tolist()     # the host sync
            xs = x if presorted else x.index_select(0, order.div(A, rounding_mode="floor"))
        b = None if b_enc is None else b_enc.reshape(E, m)
        with _scratch(("expert", x.dtype, x.device), B * A * m, x) as buf:   # selected experts only
            pre = buf.view(B * A, m)
            with section("encoder matmul"):
                start = 0
                for e, c in enumerate(sizes):                      # E small matmuls, no masking
                    if c:
                        sl = slice(start, start + c)
                        if b is None:
                            torch.mm(xs[sl], W_enc[e].T, out=pre[sl])
                        else:
                            torch.addmm(b[e], xs[sl], W_enc[e].T, out=pre[sl])
                        start += c
            with section("select"):
                if presorted:                                      # rows already grouped by expert
                    vals, idx = _topk(pre, k)
                    idx += flat.unsqueeze(1) * m                   # local -> global latent id
                elif A == 1:                                       # TopK row by row, then unsort
                    v, j = _topk(pre, k)
                    j += flat[order].unsqueeze(1) * m
                    inverse = _inverse(order)                      # gathers: ~3x faster than index_copy_
                    vals, idx = v.index_select(0, inverse), j.index_select(0, inverse)
                else:                                              # one global TopK over the A*m
                    pre = pre.index_select(0, _inverse(order)).view(B, A * m)
                    vals, local = _topk(pre, k)
                    idx = expert_idx.long().gather(1, local.div(m, rounding_mode="floor")) * m + local % m
        return _save_encoded(ctx, x, W_enc, vals, idx, b_pre)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_vals, _grad_idx):
        return (*_encoded_backward(ctx, grad_vals), None, None, None)


class SparseDecode(torch.autograd.Function):
    """x_hat = sum_j values_j W_dec[idx_j] via embedding_bag; sparse backward."""

    @staticmethod
    def forward(ctx, values, indices, W_dec):
        ctx.save_for_backward(values, indices, W_dec)
        with section("decode"):
            return _gather_rows(indices, values, W_dec)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        values, indices, W_dec = ctx.saved_tensors
        needs = ctx.needs_input_grad
        with section("decoder backward"):
            grad_v = _gather_rowdot(indices, W_dec, grad_out).to(values.dtype) if needs[0] else None
            grad_W = _scatter_rows(indices, values, grad_out, W_dec.shape[0]) if needs[2] else None
        return grad_v, None, grad_W


class FeatureScaleMean(torch.autograd.Function):
    """Scale SAE feature scaling with the mean decomposition ([scale] eq. 2.5, method 0):
    ``W_hat_e = low_e + (1 + omega_e) (W_e - low_e)``, ``low_e = mean_j W_e,j``.

    Autograd through the plain formula makes ~8 passes over the [E, m, d] weights per step
    (the mean, the addcmul, and in the backward the broadcasts, products and sums of each
    of them). Here the backward is two passes: with ``G = dL/dW_hat`` and ``S_e = sum_j
    G_e,j``, ``dL/dW_e,j = (1 + omega_e) G_e,j - (omega_e / m) S_e`` and ``dL/domega_e =
    sum_j <G_e,j, W_e,j> - <S_e, low_e>``."""

    @staticmethod
    def forward(ctx, W, omega):
        low = W.mean(1, keepdim=True)                          # [E, 1, d]
        om = omega.view(-1, 1, 1)
        ctx.save_for_backward(W, omega, low)
        return torch.addcmul(-om * low, W, 1 + om)

    @staticmethod
    @once_differentiable
    def backward(ctx, G):
        W, omega, low = ctx.saved_tensors
        E, m, d = W.shape
        G = G.contiguous()
        S = G.sum(1, keepdim=True)                             # [E, 1, d]
        grad_W = grad_om = None
        if ctx.needs_input_grad[1]:
            grad_om = (torch.linalg.vecdot(G.view(E, m * d), W.reshape(E, m * d))
                       - torch.linalg.vecdot(S.view(E, d), low.view(E, d)))
        if ctx.needs_input_grad[0]:
            om = omega.view(-1, 1, 1)
            grad_W = torch.addcmul(S * (-om / m), G, 1 + om)
        return grad_W, grad_om


def feature_scale_mean(W, omega):
    """``W_hat`` [E, m, d] of the Scale SAE's mean decomposition, with a two-pass backward
    (see :class:`FeatureScaleMean`)."""
    return FeatureScaleMean.apply(W, omega)


# --------------------------------------------------------------------------
# public entry points (signatures are fixed)
# --------------------------------------------------------------------------
def _check_k(k, n, what):
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= n:
        raise ValueError(f"k must be an integer in [1, {n}] ({what}), got {k!r}")


def topk_encode(x, W_enc, b_enc, k, b_pre=None):
    """ReLU(TopK_k((x - b_pre) W_enc^T + b_enc)) (Gao et al. 2024, eq. 2) as ``(values,
    indices)`` [B, k]; fused dense forward, sparse backward (no [B, n_latents] gradient).
    ``b_enc`` and ``b_pre`` may be None."""
    _check_k(k, W_enc.shape[0], "n_latents")
    return TopKEncode.apply(x, W_enc, b_enc, b_pre, k)


def batch_topk_encode(x, W_enc, b_enc, k, b_pre=None, threshold=None, guess=None):
    """BatchTopK (Bussmann et al. 2024) on ``pre = (x - b_pre) W_enc^T + b_enc``: returns
    ``(values, indices, cut)``. Training (``threshold=None``): the ``k * B`` largest
    ReLU'd entries of the batch (all entries ``>= cut``, the kB-th largest; every positive
    entry and ``cut = 0.0`` when there are fewer); inference: entries ``> threshold``
    (``cut`` None). ``values``/``indices`` are [B, w], w the most entries any row keeps,
    zero-padded. ``guess`` (e.g. the previous cut) only speeds the search up."""
    _check_k(k, W_enc.shape[0], "n_latents")
    vals, idx, cut = BatchTopKEncode.apply(x, W_enc, b_enc, b_pre, k, threshold, guess)
    return vals, idx, None if threshold is not None else float(cut.detach())


def expert_topk_encode(x, W_enc, expert_idx, k, b_enc=None, b_pre=None, presorted: bool | None = None):
    """Switch SAE (Mudide et al., eq. 1-2; n_active=1) and Scale SAE (Xu et al., global
    TopK over the ``n_active`` selected experts) encoder. Rows are grouped by expert and
    each expert's ``[m, d]`` encoder runs on its own rows only; returns ReLU'd values and
    global latent ids ``e * m + j``, both [B, k]. ``W_enc`` [E, m, d] may be a non-leaf
    tensor (e.g. feature-scaled weights); its gradient comes back in its own shape. The
    pre-activations are ``(x - b_pre) W_e^T + b_enc[e]`` (``b_enc`` [E*m], both optional).
    ``presorted``: True when the caller knows the rows are already grouped by expert
    (``expert_idx`` [B, 1] non-decreasing, e.g. after the Switch forward's sort), False when
    they are not; None checks (a host read of the device). A wrong True gives wrong codes."""
    E, m, _ = W_enc.shape
    _check_k(k, expert_idx.shape[1] * m, "n_active * experts' width")
    return ExpertTopKEncode.apply(x, W_enc, b_enc, b_pre, expert_idx, k, presorted)


def sparse_decode(values, indices, W_dec):
    """x_hat = sum_j values[b, j] W_dec[indices[b, j]] in O(k d) per row, forward and
    backward (``embedding_bag`` and a sparse transpose product)."""
    return SparseDecode.apply(values.to(W_dec.dtype), indices, W_dec)
