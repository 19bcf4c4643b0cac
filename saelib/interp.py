"""Automated interpretability without an LLM: a deterministic **detection proxy**.

[switch] sec. 4.4 / fig. 6 scores features with the *detection* method of Juang
et al. (2024, EleutherAI ``sae-auto-interp``, now ``delphi``): an explainer LLM
writes an explanation from a feature's top activating contexts; a scorer LLM, given
only the explanation, says for each of a batch of held-out contexts whether the
feature fires in it. Contexts come from each decile of the feature's activations
(10 per decile) and from text where it does not fire ("not", 100); accuracy per
decile and the true-negative rate on "not" are averaged over random features.

No LLM is reachable here, so this module keeps the protocol and replaces both
LLMs by transparent rules. **It is a proxy, not Juang et al.'s metric**: it
measures how well a feature's firing is predicted by a few short token patterns
learned from its top activations (the lexical part of what an LLM explainer
would also pick up); a feature that tracks meaning beyond a bigram scores lower
here than it might with an LLM. Report it as "detection proxy" wherever it appears.

Pipeline (each step is a function; :func:`detection_proxy` runs them all):

1. :class:`Contexts` maps each activation row to its token window (the store
   records ``tokens``, ``seq``, ``pos`` of every row; pass the token matrix the
   store was collected from). A *context* is the window of ``width`` token ids
   (default 32, as in Juang et al.) **ending at** the row's token.
2. :func:`feature_acts` runs the SAE over the rows in batches and keeps only the
   non-zero activations of the sampled features (sparse; never a dense
   ``[N, n_latents]`` matrix). A TopK latent depends on the other latents, so the
   full ``sae(x)`` is computed and the sampled features are gathered from its
   ``(values, indices)``; for switch/scale SAEs ``values`` include the router weight
   (the coefficients the decoder multiplies). :func:`feature_acts_from_latents`
   takes latents you already have (dense, or ``(values, indices)``).
3. Rows are split **by sequence** into an explanation slice and a held-out slice
   (:meth:`Contexts.split`), so no window is shared between the two.
4. Explanation (:func:`explain_features`): from the feature's ``n_top`` largest
   activations on the explanation slice, candidate patterns are the n-grams
   (``n <= max_n``, default 2: the token itself, and previous token + token) that
   end at the activating token. Greedy cover: repeatedly add the pattern with the
   largest *uncovered activation mass x precision*, where precision =
   P(feature fires | pattern ends here) on the whole explanation slice (smoothed
   with one pseudo-count toward the feature's firing rate, so a bigram seen once
   is not "certain"; a pattern must end at >= 2 top activations), until
   ``coverage`` (80%) of the top mass is covered or
   ``max_items`` (8) patterns are kept; patterns whose suffix is also kept are
   dropped as redundant. The result is an :class:`Explanation`.
5. Scoring (:func:`detection_records`): held-out contexts, ``n_per_decile`` from
   each decile of the feature's non-zero held-out activations (equal-count bins,
   decile "1" = weakest, "10" = strongest) and ``n_not`` from held-out rows where
   it is zero, shuffled and passed in **one** call to a :class:`Judge`; the label
   of a context is whether the feature fires **on its final token**.
6. :func:`summarize_detection`: per-feature accuracy per decile, averaged over
   features with a 95% interval (normal approximation over features by default,
   or a percentile bootstrap over features), as a tidy DataFrame.

Differences from Juang et al. to keep in mind when reading the numbers: their
contexts are 32-token windows labelled by whether the feature fires *anywhere*
in them, binned by the window's maximum activation; ours are labelled on the
final token (a precise, token-level question the rule judge can answer; an LLM
judge should be told to judge the marked final token), so a "not" window may
contain earlier tokens where the feature fires. Their explanation is free text
from a strong LLM; ours is a list of token patterns.

Plugging in an LLM judge (not run here): any object with the :class:`Judge` call
signature works, e.g.::

    class LLMJudge:
        def __init__(self, tokenizer, complete):  # complete(prompt: str) -> str, your LLM client
            self.tokenizer, self.complete = tokenizer, complete

        def __call__(self, explanation, contexts):
            texts = [render_context(w, self.tokenizer) for w in contexts]
            prompt = detection_prompt(explanation.text or explanation.describe(self.tokenizer), texts)
            return parse_answers(self.complete(prompt), len(texts))

    interp.detection_proxy(acts, ctx, judge=LLMJudge(tok, my_client), ...)

and an LLM *explainer* can replace step 4 by building ``Explanation(feature,
text=...)`` objects from :func:`top_contexts` and passing them to
:func:`detection_records`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np
import torch

from .utils import check_choice, check_positive_int, progress

DECILES = ("not",) + tuple(str(i) for i in range(1, 11))
WIDTH = 32          # context window in tokens (Juang et al.'s example_ctx_len)
MARK = ("«", "»")   # marks the activating (final) token when a context is rendered


# ---------------------------------------------------------------------------
# 1. rows -> token windows
# ---------------------------------------------------------------------------
@dataclass
class Contexts:
    """Token windows of activation rows.

    ``tokens`` [n_seq, n_ctx] token ids; ``seq``/``pos`` [N]: row ``i`` is the
    activation at ``tokens[seq[i], pos[i]]``. :meth:`from_store` reads ``seq``/``pos``
    from an :class:`~saelib.activations.ActivationStore`."""
    tokens: np.ndarray
    seq: np.ndarray
    pos: np.ndarray
    _keys: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        self.tokens = np.asarray(_numpy(self.tokens), dtype=np.int64)
        self.seq = np.asarray(_numpy(self.seq), dtype=np.int64).ravel()
        self.pos = np.asarray(_numpy(self.pos), dtype=np.int64).ravel()
        if self.tokens.ndim != 2:
            raise ValueError(f"tokens must be a 2-D array [n_seq, n_ctx] of token ids, got shape {self.tokens.shape}")
        if self.seq.shape != self.pos.shape:
            raise ValueError(f"seq and pos must have the same length, got {self.seq.size} and {self.pos.size}")
        if self.seq.size and (self.seq.min() < 0 or self.seq.max() >= self.tokens.shape[0]
                              or self.pos.min() < 0 or self.pos.max() >= self.tokens.shape[1]):
            raise ValueError(f"seq/pos point outside tokens of shape {self.tokens.shape}")
        if self.tokens.size and self.tokens.min() < 0:
            raise ValueError("tokens must be non-negative token ids")

    @classmethod
    def from_store(cls, store, tokens) -> "Contexts":
        """Contexts of every row of an activation store. ``tokens``: the token ids the
        store was collected from (tensor/array [n_seq, n_ctx] or a tokenized
        ``datasets`` split, as passed to :func:`saelib.activations.collect`)."""
        for attr in ("seq", "pos", "tokens"):
            if not hasattr(store, attr):
                raise ValueError(f"store has no .{attr}: it must record the token id, sequence and position of each "
                                 "row (saelib.activations.ActivationStore does)")
        if not isinstance(tokens, (np.ndarray, torch.Tensor)):
            from .data import token_array
            tokens = token_array(tokens)
        ctx = cls(tokens, np.asarray(store.seq), np.asarray(store.pos))
        if not np.array_equal(ctx.token_ids, np.asarray(store.tokens, dtype=np.int64)):
            raise ValueError("tokens do not match the store's recorded token ids: pass the same token matrix "
                             "(or tokenized split) that activations.collect was given")
        return ctx

    def __len__(self):
        return self.seq.size

    @property
    def vocab(self) -> int:
        return int(self.tokens.max()) + 1 if self.tokens.size else 1

    @property
    def token_ids(self) -> np.ndarray:
        """[N] the token of each row."""
        return self.tokens[self.seq, self.pos]

    def ngram_keys(self, n: int) -> np.ndarray:
        """[N] int64 code of the ``n`` tokens ending at each row (positions before the
        sequence start count as token "none"); equal codes = equal n-grams."""
        if n not in self._keys:
            base = self.vocab + 1
            if base ** n >= 2 ** 62:
                raise ValueError(f"n={n} is too long for a vocabulary of {self.vocab} tokens (int64 codes)")
            key = np.zeros(len(self), np.int64)
            for j in range(n):
                p = self.pos - j
                tok = np.where(p >= 0, self.tokens[self.seq, np.maximum(p, 0)] + 1, 0)
                key += tok * base ** j
            self._keys[n] = key
        return self._keys[n]

    def decode_key(self, key: int, n: int) -> tuple[int, ...]:
        base = self.vocab + 1
        toks = [(int(key) // base ** j) % base - 1 for j in range(n)]
        return tuple(t for t in reversed(toks) if t >= 0)

    def window(self, row: int, width: int = WIDTH) -> np.ndarray:
        """Token ids of the ``width`` tokens ending at row ``row``'s token (fewer at a
        sequence start); the last id is the row's token."""
        s, p = self.seq[row], self.pos[row]
        return self.tokens[s, max(0, p - width + 1): p + 1]

    def windows(self, rows, width: int = WIDTH) -> list[np.ndarray]:
        return [self.window(int(r), width) for r in np.asarray(rows).ravel()]

    def split(self, holdout_frac: float = 0.5, seed: int = 0, n_rows: int | None = None):
        """``(explain_rows, heldout_rows)``: boolean masks over the first ``n_rows``
        rows (default all), splitting whole **sequences** at random (``seed``) so that
        no window is shared by the two slices."""
        if not (isinstance(holdout_frac, float) and 0 < holdout_frac < 1):
            raise ValueError(f"holdout_frac must be a float in (0, 1), got {holdout_frac!r}")
        seq = self.seq[: len(self) if n_rows is None else n_rows]
        seqs = np.unique(seq)
        if seqs.size < 2:
            raise ValueError(f"need rows from at least 2 sequences to split by sequence, got {seqs.size}")
        perm = np.random.default_rng(seed).permutation(seqs)
        n_hold = min(seqs.size - 1, max(1, round(holdout_frac * seqs.size)))
        held = np.isin(seq, perm[:n_hold])
        return ~held, held


def _numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# ---------------------------------------------------------------------------
# 2. sparse activations of the sampled features
# ---------------------------------------------------------------------------
@dataclass
class FeatureActs:
    """Non-zero activations of a set of features over ``n_rows`` rows, sorted by
    (feature, row): ``row``, ``slot`` (index into ``features``), ``value``."""
    features: np.ndarray
    n_rows: int
    row: np.ndarray
    slot: np.ndarray
    value: np.ndarray

    def __post_init__(self):
        order = np.lexsort((self.row, self.slot))
        self.row, self.slot, self.value = self.row[order], self.slot[order], self.value[order]
        self._off = np.searchsorted(self.slot, np.arange(len(self.features) + 1))
        self._slot_of = {int(f): i for i, f in enumerate(self.features)}

    def of(self, feature: int):
        """``(rows, values)`` where ``feature`` (a latent id in ``features``) fires."""
        if int(feature) not in self._slot_of:
            raise ValueError(f"feature={feature} was not collected; collected: {self.features.tolist()[:20]}...")
        i = self._slot_of[int(feature)]
        a, b = self._off[i], self._off[i + 1]
        return self.row[a:b], self.value[a:b]

    def fire_counts(self) -> np.ndarray:
        return np.diff(self._off)

    def dense(self) -> np.ndarray:
        """[n_rows, n_features] (small inputs only: tests, toy examples)."""
        out = np.zeros((self.n_rows, len(self.features)), np.float32)
        out[self.row, self.slot] = self.value
        return out


def sample_features(n_latents: int, n: int, seed: int = 0) -> np.ndarray:
    """``n`` distinct latent ids drawn uniformly at random (sorted); [switch] fig. 6
    uses 1000 random features. Dead ones are skipped later (they cannot be scored)."""
    check_positive_int("n_latents", n_latents)
    check_positive_int("n", n)
    return np.sort(np.random.default_rng(seed).choice(n_latents, size=min(n, n_latents), replace=False))


def _check_features(features, n_latents):
    f = np.asarray(_numpy(features), dtype=np.int64).ravel()
    if f.size == 0 or f.min() < 0 or f.max() >= n_latents or np.unique(f).size != f.size:
        raise ValueError(f"features must be distinct latent ids in [0, {n_latents}), got {f.tolist()[:10]}...")
    return f


def _gather(values, indices, lut, offset):
    """Rows, slots and values of the sampled features' non-zeros in one batch."""
    if indices is not None:
        slot = lut[indices]
        r, c = torch.nonzero((slot >= 0) & (values > 0), as_tuple=True)
        return r + offset, slot[r, c], values[r, c]
    cols = torch.nonzero(lut >= 0).squeeze(1)
    sub = values[:, cols]
    r, c = torch.nonzero(sub > 0, as_tuple=True)
    return r + offset, lut[cols[c]], sub[r, c]


def _finish(features, n_rows, parts) -> FeatureActs:
    cat = (lambda i, dt: np.concatenate([_numpy(p[i]).astype(dt) for p in parts]) if parts else np.zeros(0, dt))
    return FeatureActs(np.asarray(features), int(n_rows), cat(0, np.int64), cat(1, np.int64), cat(2, np.float32))


def _batches(data, batch_size, max_rows):
    if isinstance(data, (torch.Tensor, np.ndarray)):
        data = torch.as_tensor(data)
        if data.ndim != 2:
            raise ValueError(f"data must be a tensor [n, d_in] or an ActivationStore, got shape {tuple(data.shape)}")
        n = len(data) if max_rows is None else min(len(data), max_rows)
        for i in range(0, n, batch_size):
            yield data[i:i + batch_size][: n - i]
        return
    if not hasattr(data, "batches"):
        raise ValueError(f"data must be a tensor [n, d_in] or an ActivationStore, got {type(data).__name__}")
    seen = 0
    for x in data.batches(batch_size, shuffle=False, drop_last=False):   # store order = row order
        if max_rows is not None and seen >= max_rows:
            return
        x = x if max_rows is None else x[: max_rows - seen]
        seen += len(x)
        yield x


@torch.no_grad()
def feature_acts(sae, data, features, batch_size: int = 4096, max_rows: int | None = None) -> FeatureActs:
    """Run ``sae`` over ``data`` (tensor [N, d_in] or activation store, in row order)
    in batches and keep the non-zero activations of ``features`` (latent ids).

    The full forward pass is computed per batch (a TopK latent's value depends on
    the other latents) and the sampled features are gathered from ``out.values`` /
    ``out.indices`` (or ``out.latents`` for dense kinds); memory stays
    O(batch + non-zeros of the sampled features)."""
    check_positive_int("batch_size", batch_size)
    n_latents = sae.n_latents
    feats = _check_features(features, n_latents)
    p = next(sae.parameters())
    lut = torch.full((n_latents,), -1, dtype=torch.long, device=p.device)
    lut[torch.as_tensor(feats, device=p.device)] = torch.arange(len(feats), device=p.device)
    was_training = sae.training
    sae.eval()
    parts, n = [], 0
    try:
        for x in progress(_batches(data, batch_size, max_rows), desc="feature activations", unit="batch"):
            out = sae(x.to(device=p.device, dtype=p.dtype))
            if out.indices is not None:
                parts.append(_gather(out.values.float(), out.indices, lut, n))
            elif out.latents is not None:
                parts.append(_gather(out.latents.float(), None, lut, n))
            else:
                raise ValueError("the SAE output has neither .values/.indices nor .latents")
            n += len(x)
    finally:
        sae.train(was_training)
    return _finish(feats, n, parts)


def feature_acts_from_latents(latents, features, n_latents: int | None = None) -> FeatureActs:
    """:class:`FeatureActs` from latents you already have: dense ``[N, n_latents]``
    (tensor or array) or a ``(values [N, k], indices [N, k])`` pair (TopK style;
    pass ``n_latents`` then, default ``indices.max() + 1``)."""
    if isinstance(latents, (tuple, list)):
        values, indices = (torch.as_tensor(_numpy(t)) for t in latents)
        if values.shape != indices.shape or values.ndim != 2:
            raise ValueError(f"(values, indices) must both be [N, k], got {tuple(values.shape)} "
                             f"and {tuple(indices.shape)}")
        n_latents = n_latents or int(indices.max()) + 1
        values, indices = values.float(), indices.long()
    else:
        values, indices = torch.as_tensor(_numpy(latents)).float(), None
        if values.ndim != 2:
            raise ValueError(f"latents must be [N, n_latents] or (values, indices), got shape {tuple(values.shape)}")
        n_latents = values.shape[1]
    feats = _check_features(features, n_latents)
    lut = torch.full((n_latents,), -1, dtype=torch.long)
    lut[torch.as_tensor(feats)] = torch.arange(len(feats))
    return _finish(feats, values.shape[0], [_gather(values, indices, lut, 0)])


# ---------------------------------------------------------------------------
# 4. explanations
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Explanation:
    """What a feature is said to detect.

    ``ngrams``: token-id patterns that end at the activating token (length 1: the
    token itself; length 2: previous token + token); ``mass``: share of the top
    activations' mass each pattern accounts for; ``precision``: smoothed
    P(fires | pattern) on the explanation slice; ``coverage``: share of the top mass
    covered by all patterns. ``text``: a free-text explanation (an LLM explainer's);
    empty for the proxy."""
    feature: int
    ngrams: tuple = ()
    mass: tuple = ()
    precision: tuple = ()
    coverage: float = 0.0
    text: str = ""

    @property
    def tokens(self) -> tuple[int, ...]:
        """The single-token patterns."""
        return tuple(g[0] for g in self.ngrams if len(g) == 1)

    def describe(self, tokenizer=None, max_items: int | None = None) -> str:
        """Readable form, e.g. ``«␣the» (62%) | of«␣the» (20%)``: the activating token
        in «», preceded by the context it needs."""
        if self.text:
            return self.text
        if not self.ngrams:
            return "(no pattern)"
        items = list(zip(self.ngrams, self.mass))[:max_items]
        return " | ".join(f"{_piece(g[:-1], tokenizer)}{MARK[0]}{_piece(g[-1:], tokenizer)}{MARK[1]} ({m:.0%})"
                          for g, m in items)


def _piece(ids, tokenizer):
    if not len(ids):
        return ""
    if tokenizer is None:
        return " ".join(str(int(i)) for i in ids)
    return tokenizer.decode([int(i) for i in ids]).replace("\n", "↵").replace(" ", "␣")


def _order_desc(rows, values):
    """Indices sorting by value descending, ties by row ascending (deterministic)."""
    return np.lexsort((rows, -values))


def explain_features(acts: FeatureActs, ctx: Contexts, rows=None, n_top: int | None = 100, coverage: float = 0.8,
                     max_items: int = 8, max_n: int = 2, min_support: int = 2, features=None) -> dict[int, Explanation]:
    """One :class:`Explanation` per feature that fires on the explanation slice
    ``rows`` (boolean mask or row indices; default all rows), built from its
    ``n_top`` largest activations there (``None``: all) by the greedy cover of the
    module docstring (step 4). A pattern must end at ``min_support`` of the top
    activations (2: no pattern memorises a single example; features with fewer top
    activations use 1). ``features``: a subset (default all collected). Deterministic."""
    if not (isinstance(coverage, float) and 0 < coverage <= 1):
        raise ValueError(f"coverage must be a float in (0, 1], got {coverage!r}")
    check_positive_int("max_items", max_items)
    if max_n not in (1, 2, 3):
        raise ValueError(f"max_n must be 1, 2 or 3 (n-grams ending at the token), got {max_n!r}")
    if n_top is not None:
        check_positive_int("n_top", n_top)
    check_positive_int("min_support", min_support)
    mask = _row_mask(rows, acts.n_rows, ctx)
    ns = range(1, max_n + 1)
    keys = {n: ctx.ngram_keys(n)[: acts.n_rows] for n in ns}
    table = {n: np.unique(keys[n][mask], return_counts=True) for n in ns}   # slice-wide counts
    n_slice = int(mask.sum())
    out = {}
    for f in (acts.features if features is None else features):
        r, v = acts.of(f)
        keep = mask[r]
        r, v = r[keep], v[keep]
        if r.size == 0:
            continue
        out[int(f)] = _explain_one(int(f), r, v, keys, table, n_slice, n_top, coverage, max_items, min_support, ctx)
    return out


def _explain_one(f, r, v, keys, table, n_slice, n_top, coverage, max_items, min_support, ctx):
    base = r.size / n_slice                       # the feature's firing rate on the slice
    top = _order_desc(r, v)[: n_top or r.size]
    tr, tv = r[top], v[top].astype(np.float64)
    total = tv.sum()
    cand_keys, cand_n, prec, member = [], [], [], []
    for n, key in keys.items():
        fire_u, fire_c = np.unique(key[r], return_counts=True)     # firing rows per pattern
        uk, inv = np.unique(key[tr], return_inverse=True)           # patterns among the top rows
        uni, cnt = table[n]
        count = cnt[np.searchsorted(uni, uk)]
        fired = fire_c[np.searchsorted(fire_u, uk)]
        member.append(inv + len(cand_keys))
        cand_keys += uk.tolist()
        cand_n += [n] * uk.size
        p = (fired + base) / (count + 1.0)                           # one pseudo-count at the base rate
        p[uk < (ctx.vocab + 1) ** (n - 1)] = 0.0                     # runs past the sequence start: not a pattern
        prec.append(p)
    prec = np.concatenate(prec)
    C = len(cand_keys)
    support = sum(np.bincount(m, minlength=C) for m in member)
    prec[support < min(min_support, tr.size)] = 0.0            # never chosen
    covered = np.zeros(tr.size, bool)
    chosen, gains = [], []
    while len(chosen) < max_items and tv[covered].sum() < coverage * total - 1e-12:
        free = ~covered
        marg = sum(np.bincount(m[free], weights=tv[free], minlength=C) for m in member)
        score = marg * prec
        score[chosen] = -1
        c = int(np.argmax(score))
        if score[c] <= 0:
            break
        chosen.append(c)
        gains.append(marg[c])
        covered |= np.any([m == c for m in member], axis=0)
    grams = [ctx.decode_key(cand_keys[c], cand_n[c]) for c in chosen]
    keep = [i for i, g in enumerate(grams)
            if not any(j != i and len(h) < len(g) and g[len(g) - len(h):] == h for j, h in enumerate(grams))]
    mass = np.asarray(gains)
    for i, g in enumerate(grams):                 # credit a dropped pattern's mass to its kept suffix
        if i not in keep:
            j = next(j for j in keep if len(grams[j]) < len(g) and g[len(g) - len(grams[j]):] == grams[j])
            mass[j] += mass[i]
    return Explanation(f, tuple(grams[i] for i in keep), tuple(float(mass[i] / total) for i in keep),
                       tuple(float(prec[chosen[i]]) for i in keep), float(tv[covered].sum() / total))


def _row_mask(rows, n_rows, ctx=None):
    if ctx is not None and len(ctx) < n_rows:
        raise ValueError(f"contexts cover {len(ctx)} rows but the activations have {n_rows}")
    if rows is None:
        return np.ones(n_rows, bool)
    rows = _numpy(rows)
    if rows.dtype == bool:
        if rows.size < n_rows:
            raise ValueError(f"rows mask has {rows.size} entries, need {n_rows}")
        return rows[:n_rows].copy()
    m = np.zeros(n_rows, bool)
    idx = rows.astype(np.int64).ravel()
    m[idx[idx < n_rows]] = True
    return m


# ---------------------------------------------------------------------------
# 5. judges and scoring
# ---------------------------------------------------------------------------
class Judge(Protocol):
    """Detection judge: for each context (token-id window whose **last** token is
    the one asked about) predict whether the explained feature fires there."""

    def __call__(self, explanation: Explanation, contexts: list[np.ndarray]) -> list[bool]: ...


@dataclass
class TokenMatchJudge:
    """The proxy's rule judge. ``scope="last"`` (default): predicts "fires" iff the
    window **ends with** one of the explanation's n-grams (the final token equals
    the pattern's last token and the tokens before it match the rest).
    ``scope="any"``: iff the pattern ends at *any* position of the window (what
    "fires somewhere in the context" would mean; more false positives under our
    final-token labels). Explanations with only ``text`` predict nothing fires."""
    scope: str = "last"

    def __post_init__(self):
        check_choice("scope", self.scope, ("last", "any"))

    def __call__(self, explanation: Explanation, contexts) -> list[bool]:
        grams = [tuple(int(t) for t in g) for g in explanation.ngrams]
        out = []
        for w in contexts:
            w = [int(t) for t in w]
            ends = [len(w)] if self.scope == "last" else range(1, len(w) + 1)
            out.append(any(len(g) <= e and tuple(w[e - len(g): e]) == g for e in ends for g in grams))
        return out


def detection_records(acts: FeatureActs, ctx: Contexts, explanations: dict, judge: Judge | None = None, rows=None,
                      n_per_decile: int = 10, n_not: int = 100, width: int = WIDTH, min_fires: int = 10,
                      seed: int = 0, sae_name: str = "sae"):
    """Per-feature, per-decile detection accuracy on the held-out ``rows``.

    For each explained feature with at least ``min_fires`` (>= 10) non-zero held-out
    activations: ``n_per_decile`` rows from each of the 10 equal-count bins of its
    sorted activations (all of a bin when smaller) and ``n_not`` rows where it is
    zero, as ``width``-token windows ending at the row, shuffled, one ``judge`` call
    (default :class:`TokenMatchJudge`). Returns a DataFrame with columns ``sae``,
    ``feature``, ``decile`` (``"not"``, ``"1"``..``"10"``), ``n``, ``correct``,
    ``accuracy``. Randomness comes from ``numpy.random.default_rng([seed, feature])``:
    the same seed gives the same contexts whatever other features are scored."""
    import pandas as pd

    check_positive_int("n_per_decile", n_per_decile)
    check_positive_int("n_not", n_not)
    check_positive_int("width", width)
    check_positive_int("min_fires", min_fires)
    if min_fires < 10:
        raise ValueError(f"min_fires must be >= 10 (one activation per decile), got {min_fires}")
    judge = TokenMatchJudge() if judge is None else judge
    if not callable(judge):
        raise ValueError("judge must be callable as judge(explanation, contexts) -> list[bool], "
                         f"got {type(judge).__name__}")
    mask = _row_mask(rows, acts.n_rows, ctx)
    held = np.flatnonzero(mask)
    recs = []
    for f in progress(sorted(explanations), desc="detection", unit="feature"):
        r, v = acts.of(f)
        keep = mask[r]
        r, v = r[keep], v[keep]
        if r.size < min_fires:
            continue
        rng = np.random.default_rng([seed, int(f)])
        bins = np.array_split(np.lexsort((r, v)), 10)                       # ascending: decile 1 = weakest
        picked, labels = [], []
        for d, b in enumerate(bins, start=1):
            take = b if b.size <= n_per_decile else np.sort(rng.choice(b, n_per_decile, replace=False))
            picked.append(r[take])
            labels += [str(d)] * take.size
        neg = _sample_not(held, r, n_not, rng)
        picked.append(neg)
        labels += ["not"] * neg.size
        picked = np.concatenate(picked)
        labels = np.asarray(labels)
        order = rng.permutation(picked.size)
        windows = ctx.windows(picked[order], width)
        pred = judge(explanations[f], windows)
        pred = np.asarray([bool(p) for p in pred])
        if pred.size != picked.size:
            raise ValueError(f"judge returned {pred.size} answers for {picked.size} contexts (feature {f})")
        truth = labels[order] != "not"
        ok = pred == truth
        for d in DECILES:
            sel = labels[order] == d
            if sel.any():
                recs.append({"sae": sae_name, "feature": int(f), "decile": d, "n": int(sel.sum()),
                             "correct": int(ok[sel].sum()), "accuracy": float(ok[sel].mean())})
    df = pd.DataFrame(recs, columns=["sae", "feature", "decile", "n", "correct", "accuracy"])
    df["decile"] = pd.Categorical(df["decile"], categories=list(DECILES), ordered=True)
    return df


def _sample_not(held, fire_rows, n, rng):
    """Up to ``n`` distinct held-out rows where the feature is zero."""
    n_free = held.size - fire_rows.size
    if n_free <= 0:
        return np.zeros(0, np.int64)
    n = min(n, n_free)
    fire_rows = np.sort(fire_rows)
    cand = held[np.sort(rng.choice(held.size, size=min(held.size, 2 * n + fire_rows.size // 4 + 16), replace=False))]
    pos = np.searchsorted(fire_rows, cand)
    free = cand[(pos >= fire_rows.size) | (fire_rows[np.minimum(pos, fire_rows.size - 1)] != cand)]
    if free.size < n:                                   # a very dense feature: exact set difference
        free = np.setdiff1d(held, fire_rows, assume_unique=True)
    return np.sort(rng.choice(free, size=n, replace=False))


# ---------------------------------------------------------------------------
# 6. summaries
# ---------------------------------------------------------------------------
def _interval(acc, ci, level, n_boot, rng):
    m = float(np.mean(acc))
    if acc.size < 2:
        return m, float("nan"), float("nan")
    if ci == "normal":
        from scipy.stats import norm

        half = norm.ppf(0.5 + level / 2) * acc.std(ddof=1) / math.sqrt(acc.size)
        return m, max(0.0, m - half), min(1.0, m + half)
    boots = acc[rng.integers(0, acc.size, (n_boot, acc.size))].mean(1)
    lo, hi = np.percentile(boots, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return m, float(lo), float(hi)


def summarize_detection(records, ci: str = "normal", level: float = 0.95, n_boot: int = 1000, seed: int = 0):
    """Tidy summary of :func:`detection_records`: one row per (``sae``, ``decile``)
    with ``mean`` accuracy over features, ``ci_lo``/``ci_hi`` (``ci="normal"``:
    mean +- z * sd / sqrt(n_features), clipped to [0, 1]; ``"bootstrap"``: percentile
    bootstrap over features) and ``n_features``. On "not" the accuracy is the true
    negative rate, on deciles the true positive rate."""
    import pandas as pd

    check_choice("ci", ci, ("normal", "bootstrap"))
    if not (isinstance(level, float) and 0 < level < 1):
        raise ValueError(f"level must be a float in (0, 1), got {level!r}")
    rows = []
    for (sae, dec), g in records.groupby(["sae", "decile"], observed=True, sort=True):
        m, lo, hi = _interval(g["accuracy"].to_numpy(float), ci, level, n_boot, np.random.default_rng(seed))
        rows.append({"sae": sae, "decile": dec, "mean": m, "ci_lo": lo, "ci_hi": hi, "n_features": int(len(g))})
    df = pd.DataFrame(rows, columns=["sae", "decile", "mean", "ci_lo", "ci_hi", "n_features"])
    df["decile"] = pd.Categorical(df["decile"].astype(str), categories=list(DECILES), ordered=True)
    return df.sort_values(["sae", "decile"], kind="stable").reset_index(drop=True)


def detection_score(records, ci: str = "normal", level: float = 0.95, n_boot: int = 1000, seed: int = 0):
    """Balanced accuracy per SAE, ``(TPR + TNR) / 2`` per feature (TPR = mean over its
    deciles, TNR = its "not" accuracy; the EleutherAI detection score), averaged over
    features: DataFrame ``sae, mean, ci_lo, ci_hi, n_features``. 0.5 = chance."""
    import pandas as pd

    check_choice("ci", ci, ("normal", "bootstrap"))
    rec = records.assign(pos=records["decile"].astype(str) != "not")
    per = rec.groupby(["sae", "feature", "pos"], observed=True)["accuracy"].mean().unstack("pos")
    if True not in per.columns or False not in per.columns:
        return pd.DataFrame(columns=["sae", "mean", "ci_lo", "ci_hi", "n_features"])
    per = per.dropna()
    bal = ((per[True] + per[False]) / 2).rename("balanced").reset_index()
    rows = []
    for sae, g in bal.groupby("sae", sort=True):
        m, lo, hi = _interval(g["balanced"].to_numpy(float), ci, level, n_boot, np.random.default_rng(seed))
        rows.append({"sae": sae, "mean": m, "ci_lo": lo, "ci_hi": hi, "n_features": int(len(g))})
    return pd.DataFrame(rows, columns=["sae", "mean", "ci_lo", "ci_hi", "n_features"])


def detection_proxy(acts: FeatureActs, ctx: Contexts, judge: Judge | None = None, sae_name: str = "sae",
                    holdout_frac: float = 0.5, seed: int = 0, n_top: int | None = 100, coverage: float = 0.8,
                    max_items: int = 8, max_n: int = 2, min_support: int = 2, n_per_decile: int = 10,
                    n_not: int = 100, width: int = WIDTH, min_fires: int = 10, ci: str = "normal",
                    return_details: bool = False):
    """The whole detection proxy: split rows by sequence (``holdout_frac`` held
    out), explain on the rest, score on the held-out rows, summarise. Returns the
    :func:`summarize_detection` DataFrame (``sae, decile, mean, ci_lo, ci_hi,
    n_features``), or with ``return_details=True`` a tuple ``(summary, records,
    explanations)``. Same inputs and ``seed`` -> same numbers."""
    explain_rows, held_rows = ctx.split(holdout_frac, seed=seed, n_rows=acts.n_rows)
    expl = explain_features(acts, ctx, rows=explain_rows, n_top=n_top, coverage=coverage, max_items=max_items,
                            max_n=max_n, min_support=min_support)
    rec = detection_records(acts, ctx, expl, judge=judge, rows=held_rows, n_per_decile=n_per_decile, n_not=n_not,
                            width=width, min_fires=min_fires, seed=seed, sae_name=sae_name)
    summary = summarize_detection(rec, ci=ci, seed=seed)
    return (summary, rec, expl) if return_details else summary


# ---------------------------------------------------------------------------
# LLM plumbing (documented interface; not run here) and rendering
# ---------------------------------------------------------------------------
def render_context(window, tokenizer=None, mark: tuple[str, str] = MARK) -> str:
    """Decode a window with its final (activating / asked-about) token marked,
    e.g. ``"to be or not to«␣be»"``; newlines shown as ``↵``. Without a tokenizer
    the ids are printed."""
    w = [int(t) for t in window]
    if not w:
        return ""
    if tokenizer is None:
        return " ".join(map(str, w[:-1])) + f" {mark[0]}{w[-1]}{mark[1]}"
    last = tokenizer.decode(w[-1:]).replace(" ", "␣")
    return (tokenizer.decode(w[:-1]) + mark[0] + last + mark[1]).replace("\n", "↵")


def detection_prompt(explanation: str, contexts: Sequence[str]) -> str:
    """A detection prompt for an LLM judge (cf. Juang et al.): the explanation and
    numbered contexts; the model answers one line per context, ``<i>: yes|no``."""
    body = "\n".join(f"{i + 1}. {c}" for i, c in enumerate(contexts))
    return ("A feature of a language model's sparse autoencoder is described by this explanation:\n"
            f"  {explanation}\n\n"
            f"For each of the {len(contexts)} text excerpts below, decide whether the feature fires on the "
            f"token marked {MARK[0]}like this{MARK[1]} at the end of the excerpt.\n\n{body}\n\n"
            "Answer with one line per excerpt, exactly '<number>: yes' or '<number>: no'.")


def parse_answers(text: str, n: int) -> list[bool]:
    """Parse ``'<i>: yes|no'`` lines from an LLM answer into ``n`` booleans (missing
    or unparsable items count as "no")."""
    out = [False] * n
    for i, ans in re.findall(r"(\d+)\s*[:.)-]\s*(yes|no)\b", text, flags=re.IGNORECASE):
        if 1 <= int(i) <= n:
            out[int(i) - 1] = ans.lower() == "yes"
    return out


def top_contexts(acts: FeatureActs, ctx: Contexts, tokenizer=None, features=None, n: int = 5, width: int = 16,
                 rows=None, explanations: dict | None = None, as_text: bool = False):
    """The ``n`` strongest activations of each feature (default: the first 8
    collected) as readable windows with the activating token marked «like this».

    Returns a DataFrame ``feature, rank, activation, context`` (+ ``explanation``
    when ``explanations`` are given), or with ``as_text=True`` one printable string."""
    import pandas as pd

    check_positive_int("n", n)
    check_positive_int("width", width)
    mask = _row_mask(rows, acts.n_rows, ctx)
    feats = acts.features[:8] if features is None else np.asarray(features).ravel()
    recs = []
    for f in feats:
        r, v = acts.of(int(f))
        keep = mask[r]
        r, v = r[keep], v[keep]
        for rank, i in enumerate(_order_desc(r, v)[:n], start=1):
            rec = {"feature": int(f), "rank": rank, "activation": float(v[i]),
                   "context": render_context(ctx.window(int(r[i]), width), tokenizer)}
            if explanations is not None:
                e = explanations.get(int(f))
                rec["explanation"] = e.describe(tokenizer) if e is not None else ""
            recs.append(rec)
    df = pd.DataFrame(recs, columns=["feature", "rank", "activation", "context"]
                      + (["explanation"] if explanations is not None else []))
    if not as_text:
        return df
    lines = []
    for f, g in df.groupby("feature", sort=False):
        head = f"feature {f}"
        if explanations is not None:
            head += f"  [proxy explanation: {g['explanation'].iloc[0]}]"
        lines.append(head)
        lines += [f"  {row.activation:8.3f}  {row.context}" for row in g.itertuples()]
    return "\n".join(lines)
