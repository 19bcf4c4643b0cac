"""Sparse kernels for TopK-style SAEs, each with a plain reference twin.

Public functions (stable signatures; ``saelib.saes`` calls only these):

* ``topk_encode(x, W_enc, b_enc, k) -> (values, indices)``
  values = ReLU(TopK_k(x @ W_enc.T + b_enc)), both ``[B, k]``; ``indices`` long.
* ``expert_topk_encode(x, W_enc, expert_idx, k, b_enc=None) -> (values, indices)``
  ``W_enc`` is ``[E, m, d]``; ``expert_idx`` ``[B, n_active]`` names the
  experts each row visits; the TopK is taken **globally** over the
  ``n_active * m`` pre-activations of the selected experts; ``indices`` are
  global latent ids ``e * m + j``; values are ReLU'd.
* ``sparse_decode(values, indices, W_dec) -> [B, d]``
  sum_j values[b, j] * W_dec[indices[b, j]], ``W_dec`` is ``[n_latents, d]``.

The ``*_reference`` functions are the obviously-correct dense versions that
the tests compare the fast paths to.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------
# reference implementations (dense, obviously correct)
# --------------------------------------------------------------------------
def topk_encode_reference(x, W_enc, b_enc, k):
    pre = x @ W_enc.T
    if b_enc is not None:
        pre = pre + b_enc
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    return F.relu(vals), idx


def expert_topk_encode_reference(x, W_enc, expert_idx, k, b_enc=None):
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


def sparse_decode_reference(values, indices, W_dec):
    z = torch.zeros(values.shape[0], W_dec.shape[0], dtype=values.dtype, device=values.device)
    z = z.scatter_add(1, indices, values)
    return z @ W_dec


# --------------------------------------------------------------------------
# public entry points (fast paths replace these; signatures are fixed)
# --------------------------------------------------------------------------
def topk_encode(x, W_enc, b_enc, k):
    return topk_encode_reference(x, W_enc, b_enc, k)


def expert_topk_encode(x, W_enc, expert_idx, k, b_enc=None):
    return expert_topk_encode_reference(x, W_enc, expert_idx, k, b_enc)


def sparse_decode(values, indices, W_dec):
    return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")
