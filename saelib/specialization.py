"""Chapter 02 helpers: held-out domains, token classes, the learned scale, case studies.

[scale] = Xu et al., "Beyond Redundancy: Diverse and Specialized Multi-Expert Sparse
Autoencoder" (full text in ``../shared/papers/scale-sae-multi-expert.txt``). The
chapter re-runs its sections 3.1-3.4 and appendices A-D; the generic metrics (A.3
similarity, overlap histograms, expert counts, duplicate fraction, intra/inter-expert
redundancy) are in :mod:`saelib.metrics`; this module holds what only the chapter needs:

* **Domains** (:func:`split_by_domain`, :func:`collect_capped`, :func:`training_data`):
  the tokenized ``DatasetDict`` carries the minipile domain of every packed row (column
  ``domain``), so the SAEs can train on two domains and be evaluated on the third, in the
  role [scale] sec. 3.1 gives to HLE-Biomedical.
* **Token classes** (:func:`word_ends`, :func:`domain_word_counts`,
  :func:`past_tense_class`, :func:`class_rows`, :func:`class_acts`, :func:`class_store`):
  [scale] sec. 3.3 uses 1,500 past-tense verbs (fig. 6b) and 13,500 verb tokens (fig. 7)
  from OpenWebText. We build the class of regular ``-ed`` forms attested in *every* domain
  of our corpus, locate the token that ends each occurrence (a word is often several BPE
  tokens) and return the activation rows there.
* **The learned scale** omega of eq. 2.5 (:func:`omega_trace`, :func:`omega_final`,
  :func:`fit_omega_law`), training instability (:func:`instability`), the CDF summary
  of fig. 6b (:func:`top_share`), the bimodality of app. D (:func:`overlap_stats`).
* **The case study** of app. B / table 1 (:func:`route`, :func:`case_features`,
  :func:`feature_label`).
"""
from __future__ import annotations

import math
import re
import warnings
from collections import Counter

import numpy as np
import pandas as pd
import torch

from .utils import check_choice, check_positive_int

WORD_RE = re.compile(r"[A-Za-z]+")


# ---------------------------------------------------------------------------
# domains
# ---------------------------------------------------------------------------
def split_by_domain(tokenized_split, holdout: str):
    """``(train_tokens, holdout_tokens)``: the packed rows of a tokenized split
    (columns ``input_ids``, ``domain``; :func:`saelib.data.tokenize`) whose domain is
    not / is ``holdout``, as int64 tensors ``[n_seq, n_ctx]``. Raises ValueError when
    ``holdout`` is not one of the split's domains or leaves nothing on either side."""
    from .data import column, token_array

    dom = np.asarray(column(tokenized_split, "domain"))
    names = sorted(set(dom.tolist()))
    if holdout not in names:
        raise ValueError(f"holdout={holdout!r} is not a domain of this split; choose one of {names}")
    if len(names) < 2:
        raise ValueError(f"holdout={holdout!r} leaves no domain to train on (domains: {names})")
    ids = torch.from_numpy(token_array(tokenized_split))
    held = torch.from_numpy(dom == holdout)
    return ids[~held], ids[held]


def kept_positions(tokens: torch.Tensor, bos: int | None) -> int:
    """How many activation rows :func:`saelib.activations.collect` (``skip_bos=True``)
    can take from ``tokens`` [n_seq, n_ctx]: every position but the first and BOS."""
    keep = torch.ones_like(tokens, dtype=torch.bool)
    keep[:, 0] = False
    if bos is not None:
        keep &= tokens != bos
    return int(keep.sum())


def collect_capped(model, tokens: torch.Tensor, site: str, n_tokens: int, **kw):
    """:func:`saelib.activations.collect` of ``min(n_tokens, available)`` rows (a small
    domain's validation split may hold fewer than asked; no warning then)."""
    from .activations import collect

    check_positive_int("n_tokens", n_tokens)
    n = min(n_tokens, kept_positions(tokens, getattr(model.config, "bos_token_id", None)))
    if n < 1:
        raise ValueError("tokens hold no position to collect (every row is BOS only)")
    return collect(model, tokens, site, n, **kw)


def training_data(cfg: dict, model, tokens: torch.Tensor, site: str | None = None, *, longest_run: int | None = None,
                  **kw):
    """The SAE training activations over ``tokens`` (the training domains' rows) as the
    profile's ``activations.mode`` says:

    * ``"store"`` (quick / full): :func:`collect_capped` of ``activations.n_tokens`` rows,
      an on-disk store, exactly as chapter 02 always collected it (same store, same key,
      so the SAE cache entries keyed by it stay valid);
    * ``"stream"`` (paper: 820M tokens, a 1.26 TB store): :func:`saelib.activations.source`,
      an :class:`saelib.stream.ActivationStream` that runs ``model`` while the SAEs train and
      writes nothing to disk. It follows the profile like chapter 01's source:
      ``activations.buffer_tokens``, and ``activations.allow_repeat`` (false: tokens short of
      ``n_tokens`` raise a ValueError before any model runs, rather than the silent cap of
      the store, which repeats rows in training).

    ``longest_run``: the rows the longest training run reads (chapter 02's budget run:
    ``budget.factor x steps x batch_size``). A stream holds ``max(activations.n_tokens,
    longest_run)`` rows, so that run reads every row at most once (as chapter 01 sizes its
    source); the store ignores it (quick / full keep their store, key and numbers; their
    budget run repeats the capped rows, as it always did).

    ``site``: default the profile's; ``kw`` (e.g. ``dtype``, ``device``) goes to the
    collector / the stream."""
    from .activations import MODES, activation_site, source

    acts = cfg.get("activations") or {}
    mode = acts.get("mode", "store")
    check_choice("activations.mode", mode, MODES)
    site = site or activation_site(cfg)
    if longest_run is not None:
        check_positive_int("longest_run", longest_run)
    if mode == "store":
        return collect_capped(model, tokens, site, int(acts["n_tokens"]), **kw)
    return source(cfg, model, tokens, max(int(acts["n_tokens"]), longest_run or 0), site=site, **kw)


def class_store(data, model, tokens: torch.Tensor, site: str, n_tokens: int, **kw):
    """The store whose rows :func:`class_rows` locates in the training domains' ``tokens``:
    ``data`` itself when it is a store (it records ``seq`` / ``pos`` / ``tokens`` of every row:
    quick / full, the same rows as ever), else (a stream records none; paper profile)
    :func:`collect_capped` of ``n_tokens`` rows of the same ``tokens`` (``kw``: ``dtype``,
    ``device``), i.e. the stream's first ``n_tokens`` rows in a small store."""
    if all(hasattr(data, a) for a in ("seq", "pos", "tokens")):
        return data
    return collect_capped(model, tokens, site, n_tokens, **kw)


# ---------------------------------------------------------------------------
# token classes
# ---------------------------------------------------------------------------
def _pieces(tokenizer):
    """Per token id: its text (byte-level BPE markers decoded), whether it is all
    letters, and whether it starts a new word (leading space)."""
    V = len(tokenizer)
    text = [tokenizer.decode([i]) for i in range(V)]
    starts = np.array([t[:1].isspace() for t in text])
    body = [t.lstrip() for t in text]
    alpha = np.array([bool(b) and b.isascii() and b.isalpha() for b in body])
    return body, alpha, starts


def word_ends(tokens, tokenizer) -> pd.DataFrame:
    """Every alphabetic word in ``tokens`` ([n_seq, n_ctx] ids): one row per
    occurrence with ``seq``, ``pos`` (the position of the word's **last** token, where
    a causal model has read the whole word) and ``word`` (lower case). A word is a
    maximal run of all-letter tokens in which every token after the first has no
    leading space; any other token ends it."""
    T = np.asarray(tokens.numpy() if torch.is_tensor(tokens) else tokens, dtype=np.int64)
    if T.ndim != 2:
        raise ValueError(f"tokens must be [n_seq, n_ctx], got shape {T.shape}")
    body, alpha, starts = _pieces(tokenizer)
    A, S = alpha[T], starts[T] | ~np.pad(alpha[T], ((0, 0), (1, 0)))[:, :-1]   # starts a word
    nxt_cont = np.pad(A & ~S, ((0, 0), (0, 1)))[:, 1:]                          # next token continues it
    end = A & ~nxt_cont
    seqs, poss = np.nonzero(end)
    words = []
    for s, p in zip(seqs, poss):
        q = p
        while q > 0 and A[s, q] and not S[s, q]:
            q -= 1
        words.append("".join(body[t] for t in T[s, q:p + 1]).lower())
    return pd.DataFrame({"seq": seqs.astype(np.int64), "pos": poss.astype(np.int64), "word": words})


def domain_word_counts(texts, domains) -> pd.DataFrame:
    """Lower-case word counts per domain from raw texts (``texts``, ``domains``: equal-
    length sequences, e.g. the ``text`` and ``domain`` columns of a corpus split):
    DataFrame indexed by word, one column per domain (0 where absent)."""
    if len(texts) != len(domains):
        raise ValueError(f"texts and domains must have the same length, got {len(texts)} and {len(domains)}")
    counts: dict[str, Counter] = {}
    for t, d in zip(texts, domains):
        counts.setdefault(d, Counter()).update(w.lower() for w in WORD_RE.findall(t))
    return pd.DataFrame(counts).fillna(0).astype(np.int64).sort_index()


def past_tense_class(counts: pd.DataFrame, min_count: int = 2, min_len: int = 5) -> pd.DataFrame:
    """The class of regular past-tense / past-participle forms that exists in every
    domain ([scale] sec. 3.3.1 uses 1,500 past-tense verbs): words of ``counts``
    (:func:`domain_word_counts`) that

    * end in ``-ed`` but not ``-eed`` (``need``, ``speed``), are at least ``min_len`` letters,
    * have their base form in the corpus: the word minus ``d`` (``used`` -> ``use``) or
      minus ``ed`` (``called`` -> ``call``), at least 3 letters (this drops ``hundred``,
      ``sacred``, ``bed``),
    * occur at least ``min_count`` times in **each** domain.

    Returns a DataFrame indexed by word with the per-domain counts, ``base`` and
    ``total``, most frequent first. A heuristic, not a tagger: adjectives in ``-ed``
    whose stem is a word (``tired``) are members, irregular verbs (``ran``) are not."""
    check_positive_int("min_count", min_count)
    vocab = set(counts.index)
    rows = []
    for w in counts.index:
        if not (w.endswith("ed") and not w.endswith("eed") and len(w) >= min_len):
            continue
        base = next((b for b in (w[:-1], w[:-2]) if len(b) >= 3 and b in vocab), None)
        if base is None or (counts.loc[w] < min_count).any():
            continue
        rows.append({"word": w, **counts.loc[w].to_dict(), "base": base, "total": int(counts.loc[w].sum())})
    cols = ["word", *counts.columns, "base", "total"]
    df = pd.DataFrame(rows, columns=cols).set_index("word")
    return df.sort_values(["total"], ascending=False, kind="stable")


def class_rows(store, tokens, tokenizer, members) -> np.ndarray:
    """Rows of ``store`` (an :class:`~saelib.activations.ActivationStore` collected from
    ``tokens``) whose token ends an occurrence of one of ``members`` (words, lower
    case), sorted. Raises ValueError if ``tokens`` is not the store's token matrix."""
    T = tokens.numpy() if torch.is_tensor(tokens) else np.asarray(tokens)
    seq, pos = np.asarray(store.seq, dtype=np.int64), np.asarray(store.pos, dtype=np.int64)
    if seq.size and (seq.max() >= T.shape[0] or not np.array_equal(T[seq, pos], np.asarray(store.tokens))):
        raise ValueError("tokens do not match the store's recorded token ids: pass the matrix it was collected from")
    we = word_ends(T[: int(seq.max()) + 1] if seq.size else T[:0], tokenizer)
    we = we[we.word.isin(set(members))]
    n_ctx = T.shape[1]
    return np.nonzero(np.isin(seq * n_ctx + pos, we.seq.to_numpy() * n_ctx + we.pos.to_numpy()))[0]


def class_acts(store, tokens, tokenizer, members) -> torch.Tensor:
    """The activations (float32 [n, d]) of the store's :func:`class_rows`: the same numbers as
    ``store.tensor()[class_rows(...)]``, reading only those rows (a store larger than its
    ``ram_limit_bytes``, e.g. the paper profile's 1M-row evaluation stores, is fine)."""
    rows = class_rows(store, tokens, tokenizer, members)
    return torch.from_numpy(np.asarray(store.acts[rows], dtype=np.float32))


# ---------------------------------------------------------------------------
# the learned scale omega (eq. 2.5, fig. 2)
# ---------------------------------------------------------------------------
def omega_trace(history: pd.DataFrame) -> pd.DataFrame:
    """omega over training from a :func:`saelib.train.fit` history (column ``omega``:
    one list per logged step, one value per expert): DataFrame ``step, mean, min,
    max``. Raises ValueError when the run had no feature scaling."""
    if "omega" not in history or history["omega"].isna().all():
        raise ValueError("history has no 'omega' column: the SAE was trained without feature scaling")
    om = np.array([np.asarray(v, dtype=float) for v in history["omega"]])
    return pd.DataFrame({"step": history["step"].to_numpy(), "mean": om.mean(1), "min": om.min(1), "max": om.max(1)})


def omega_final(sae) -> float:
    """Mean over experts of the trained omega (the official code, like ``saelib``, keeps
    one omega per expert; the paper's fig. 2 reports one number per model)."""
    if not hasattr(sae, "omega"):
        raise ValueError("the SAE has no omega (feature_scaling=False or not a scale SAE)")
    return float(sae.omega.detach().double().mean())


def fit_omega_law(e, omega, n_boot: int = 1000, seed: int = 0) -> dict:
    """omega against the number of active experts ``e`` (fig. 2, "a predictable scaling
    law"): Spearman's rank correlation ``rho`` (with its p-value) and a power law
    ``omega = a e^b`` fitted in log-log space (:func:`saelib.scaling.fit_power_law`:
    ``a``, ``b``, ``b_ci``, ``r2``); the fit needs >= 3 points with omega > 0, else its
    entries are NaN."""
    from scipy.stats import spearmanr

    from .scaling import fit_power_law

    e, om = np.asarray(e, dtype=float), np.asarray(omega, dtype=float)
    if e.shape != om.shape or e.size < 2:
        raise ValueError("e and omega must be equal-length sequences of at least 2 values")
    rho, p = spearmanr(e, om)
    out = {"rho": float(rho), "rho_p": float(p), "a": math.nan, "b": math.nan, "b_ci": (math.nan, math.nan),
           "r2": math.nan, "n_fit": int((om > 0).sum())}
    if out["n_fit"] >= 3 and len(set(e[om > 0])) >= 2:
        f = fit_power_law(e[om > 0], om[om > 0], n_boot=n_boot, seed=seed)
        out.update(a=f["a"], b=f["b"], b_ci=tuple(f["b_ci"]), r2=f["r2"])
    return out


def instability(history: pd.DataFrame, column: str = "mse", last: float = 0.5) -> float:
    """Training instability ([scale] sec. 3.2.1, "training instability" of e = 1):
    the standard deviation of the step-to-step change of ``log(column)`` over the last
    ``last`` fraction of the logged steps (a smooth curve -> ~0, a jumpy one -> large)."""
    if not 0 < last <= 1:
        raise ValueError(f"last must be in (0, 1], got {last!r}")
    y = np.log(history[column].to_numpy(float))
    y = y[int(len(y) * (1 - last)):]
    if y.size < 3:
        raise ValueError(f"need at least 3 logged steps in the last {last:.0%} of the history, got {y.size}")
    return float(np.diff(y).std())


def top_share(counts, frac: float = 0.1) -> float:
    """Share of expert activations taken by the most used ``frac`` of the experts
    (at least one): one point of :func:`saelib.metrics.expert_count_cdf` (fig. 6b; a
    steep CDF = a large share)."""
    from .metrics import expert_count_cdf

    if not 0 < frac <= 1:
        raise ValueError(f"frac must be in (0, 1], got {frac!r}")
    cdf = expert_count_cdf(counts)
    return float(cdf[max(1, int(round(frac * len(cdf)))) - 1])


def overlap_stats(hist) -> dict:
    """Shape of an overlap histogram ``h[m]`` = pairs with ``k_ij = m``
    (:func:`saelib.metrics.overlap_distribution`, app. D): ``zero_share`` (h[0]/sum),
    ``primary_at_zero`` (h[0] is the largest bin), ``second_mode`` (the largest bin
    with m >= 1 that is a local maximum, h[m] > h[m-1]; NaN if none), ``bimodal``
    (primary mode at 0 and a second mode exists), ``mean_nonzero`` (mean overlap of the
    pairs that share at least one latent; NaN if none)."""
    h = np.asarray(hist, dtype=float)
    if h.ndim != 1 or h.size < 2 or h.sum() <= 0:
        raise ValueError("hist must be a 1-D histogram with at least 2 bins and some pairs")
    peaks = [m for m in range(1, h.size) if h[m] > h[m - 1] and (m + 1 == h.size or h[m] >= h[m + 1])]
    second = max(peaks, key=lambda m: h[m]) if peaks else math.nan
    nz = h[1:].sum()
    return {"zero_share": float(h[0] / h.sum()), "primary_at_zero": bool(h[0] >= h.max()),
            "second_mode": float(second), "bimodal": bool(h[0] >= h.max() and peaks),
            "mean_nonzero": float((np.arange(1, h.size) * h[1:]).sum() / nz) if nz > 0 else math.nan}


def reduction(base, new) -> float:
    """Relative reduction ``(base - new) / base`` (positive = ``new`` is lower), the
    paper's "reduces X by N%"; NaN when ``base`` is 0."""
    base, new = float(base), float(new)
    return (base - new) / base if base != 0 else math.nan


# ---------------------------------------------------------------------------
# the case study (app. B, fig. 9, table 1)
# ---------------------------------------------------------------------------
@torch.no_grad()
def route(sae, x: torch.Tensor) -> pd.DataFrame:
    """The experts a switch/scale SAE's router picks for one activation ``x`` [d_in]
    (fig. 9a): ``expert``, ``probability`` (the full softmax, eq. 2.3's p_i),
    ``rank``, most probable first."""
    if getattr(sae, "n_experts", 1) < 2:
        raise ValueError("route needs a switch or scale SAE (n_experts >= 2)")
    out = sae(x.reshape(1, -1).float())
    idx = out.expert_idx[0].tolist()
    p = out.router_probs[0]
    return pd.DataFrame({"expert": idx, "probability": [float(p[i]) for i in idx], "rank": range(1, len(idx) + 1)})


@torch.no_grad()
def case_features(sae, x: torch.Tensor) -> pd.DataFrame:
    """The latents an SAE activates for one activation ``x`` [d_in] (fig. 9b, table 1):
    ``expert``, ``feature`` (global latent id), ``local`` (id inside its expert),
    ``activation`` (the coefficient the decoder multiplies, router weight included),
    strongest first."""
    out = sae(x.reshape(1, -1).float())
    v, j = out.values[0], out.indices[0]
    keep = v != 0
    v, j = v[keep], j[keep]
    order = torch.argsort(-v, stable=True)
    v, j = v[order], j[order]
    m = sae.m
    return pd.DataFrame({"expert": (j // m).tolist(), "feature": j.tolist(), "local": (j % m).tolist(),
                         "activation": v.tolist()})


def feature_label(acts, ctx, tokenizer, feature: int, n: int = 5) -> str:
    """A short label computed from the tokens of a feature's ``n`` strongest activations
    (the paper labels table 1 by hand from the top five tokens): the distinct tokens by
    frequency, e.g. ``"ed ×4, ing"``; ``"mixed: a, b, c"`` when all ``n`` differ
    (the paper's "Polysemantic Feature"); ``"(silent)"`` when it never fires."""
    r, v = acts.of(int(feature))
    if r.size == 0:
        return "(silent)"
    top = r[np.lexsort((r, -v))][:n]
    toks = [tokenizer.decode([int(t)]).strip() or repr(tokenizer.decode([int(t)])) for t in ctx.token_ids[top]]
    c = Counter(toks).most_common()
    if len(c) == len(toks) and len(toks) >= 3:
        return "mixed: " + ", ".join(t for t, _ in c[:3])
    return ", ".join(f"{t} ×{k}" if k > 1 else t for t, k in c[:3])


def claim_numbers(values: dict, fmt: str = ".3g") -> str:
    """``{"k=4": 0.1, ...}`` -> ``"k=4: 0.1, ..."``: the numbers behind a verdict."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ", ".join(f"{k}: {format(float(v), fmt)}" for k, v in values.items())


def evaluate_domains(runs, evals: dict, model=None, site: str | None = None, **kw) -> pd.DataFrame:
    """:func:`saelib.sweep.evaluate_runs` on several evaluation sets at once: ``evals``
    maps a domain label to ``(x, tokens)`` (activations, and the token rows for loss
    recovered or None). Long format: one row per run and label, column ``domain``; an
    ``omega`` column (mean over experts, NaN without feature scaling) and ``instability``
    (:func:`instability` of the training history) are added."""
    from .sweep import evaluate_runs

    if not evals:
        raise ValueError("evals must name at least one evaluation set")
    frames = []
    for label, (x, tokens) in evals.items():
        m = model if tokens is not None else None
        df = evaluate_runs(runs, x, m, tokens, site if m is not None else None, **kw)
        df.insert(1, "domain", label)
        df["omega"] = [omega_final(r.sae) if hasattr(r.sae, "omega") else math.nan for r in runs]
        df["instability"] = [instability(r.history) for r in runs]
        df["n_active"] = [r.sae.n_active for r in runs]
        df["feature_scaling"] = [bool(r.sae.config.get("feature_scaling")) for r in runs]
        df["run"] = range(len(runs))
        frames.append(df)
    return pd.concat(frames, ignore_index=True)
