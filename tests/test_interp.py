"""saelib.interp: the LLM-free detection proxy on planted features."""
import numpy as np
import pandas as pd
import pytest
import torch

from saelib import interp as I

V, N_SEQ, N_CTX, BOS = 40, 300, 33, 0
UNI = {0: 5, 1: 6, 2: 7, 3: 8}        # feature slot -> the token it fires on
BI = (4, 10, 9)                        # feature 4 fires on token 9 only after token 10
RANDOM = list(range(5, 25))            # features firing on random rows


@pytest.fixture(scope="module")
def planted():
    """Token ids [N_SEQ, N_CTX] (BOS first), rows = every non-BOS position, and dense
    latents of 25 features: 4 unigram, 1 bigram and 20 random ones."""
    rng = np.random.default_rng(0)
    toks = rng.integers(1, V, (N_SEQ, N_CTX))
    toks[:, 0] = BOS
    s, p = rng.integers(0, N_SEQ, 300), rng.integers(2, N_CTX, 300)
    toks[s, p - 1], toks[s, p] = BI[1], BI[2]          # make the bigram common
    seq, pos = np.nonzero(toks != BOS)
    tok = toks[seq, pos]
    prev = toks[seq, pos - 1]
    lat = np.zeros((seq.size, 25), np.float32)
    for j, t in UNI.items():
        lat[tok == t, j] = rng.uniform(0.5, 3.0, (tok == t).sum())
    hit = (tok == BI[2]) & (prev == BI[1])
    lat[hit, BI[0]] = rng.uniform(0.5, 3.0, hit.sum())
    for j in RANDOM:
        on = rng.random(seq.size) < 0.05
        lat[on, j] = rng.uniform(0.1, 2.0, on.sum())
    ctx = I.Contexts(toks, seq, pos)
    acts = I.feature_acts_from_latents(lat, np.arange(25))
    return ctx, acts, lat


def test_contexts_windows_and_ngrams(planted):
    ctx, _, _ = planted
    i = 100
    w = ctx.window(i, 8)
    assert w[-1] == ctx.token_ids[i] and len(w) == min(8, ctx.pos[i] + 1)
    np.testing.assert_array_equal(w, ctx.tokens[ctx.seq[i], max(0, ctx.pos[i] - 7): ctx.pos[i] + 1])
    k2 = ctx.ngram_keys(2)
    assert ctx.decode_key(k2[i], 2) == tuple(ctx.tokens[ctx.seq[i], ctx.pos[i] - 1: ctx.pos[i] + 1])
    tr, te = ctx.split(0.5, seed=0)
    assert not (tr & te).any() and (tr | te).all()
    assert not set(ctx.seq[tr]) & set(ctx.seq[te])          # split by whole sequences
    with pytest.raises(ValueError, match="holdout_frac"):
        ctx.split(1.5)
    with pytest.raises(ValueError, match="seq/pos"):
        I.Contexts(ctx.tokens, [0], [N_CTX])


def test_feature_acts_from_dense_and_sparse_latents(planted):
    _, acts, lat = planted
    np.testing.assert_array_equal(acts.dense(), lat)
    rows, vals = acts.of(2)
    np.testing.assert_array_equal(rows, np.flatnonzero(lat[:, 2]))
    # the same code as TopK-style (values, indices) pairs, for a subset of features
    k = int((lat > 0).sum(1).max())
    t = torch.from_numpy(lat).topk(k, dim=1)
    sub = I.feature_acts_from_latents((t.values, t.indices), [4, 2, 7], n_latents=25)
    np.testing.assert_array_equal(sub.dense(), lat[:, [4, 2, 7]])
    with pytest.raises(ValueError, match="features"):
        I.feature_acts_from_latents(lat, [3, 3])


def test_planted_features_are_explained_and_detected(planted):
    ctx, acts, _ = planted
    summary, rec, expl = I.detection_proxy(acts, ctx, return_details=True, seed=0)
    for j, t in UNI.items():
        assert expl[j].ngrams[0] == (t,) and t in expl[j].tokens
        assert expl[j].coverage == pytest.approx(1.0)
    assert expl[BI[0]].ngrams[0] == (BI[1], BI[2])           # the bigram, not the bare token
    planted_rec = rec[rec.feature.isin([*UNI, BI[0]])]
    assert set(planted_rec.decile.astype(str)) == set(I.DECILES)
    assert (planted_rec.accuracy == 1.0).all()               # every decile and "not"
    assert planted_rec.groupby("feature").n.sum().min() == 10 * 10 + 100
    assert list(summary.columns) == ["sae", "decile", "mean", "ci_lo", "ci_hi", "n_features"]
    assert list(summary.decile.astype(str)) == list(I.DECILES)


def test_random_features_score_near_chance(planted):
    ctx, acts, _ = planted
    summary, rec, _ = I.detection_proxy(acts, ctx, return_details=True, seed=0)
    rnd = rec[rec.feature.isin(RANDOM)]
    assert rnd.feature.nunique() == len(RANDOM)
    tpr = rnd[rnd.decile != "not"].accuracy.mean()
    fpr = 1 - rnd[rnd.decile == "not"].accuracy.mean()
    assert abs(tpr - fpr) < 0.08                             # "fires" predicted equally often either way
    score = I.detection_score(rnd)
    assert 0.42 < score["mean"].iloc[0] < 0.58
    planted_score = I.detection_score(rec[~rec.feature.isin(RANDOM)])
    assert planted_score["mean"].iloc[0] == 1.0


def test_deterministic_for_a_seed(planted):
    ctx, acts, _ = planted
    a = I.detection_proxy(acts, ctx, seed=3, sae_name="x")
    b = I.detection_proxy(acts, ctx, seed=3, sae_name="x")
    pd.testing.assert_frame_equal(a, b)
    c = I.detection_proxy(acts, ctx, seed=4, sae_name="x")
    assert not np.allclose(a["mean"], c["mean"])             # a different split and sample


def test_custom_judge_is_called_with_explanation_and_windows(planted):
    ctx, acts, _ = planted
    calls = []

    def judge(explanation, contexts):
        calls.append((explanation, contexts))
        return [True] * len(contexts)

    tr, te = ctx.split(0.5, seed=0)
    expl = I.explain_features(acts, ctx, rows=tr, features=[0, 1, 5])
    rec = I.detection_records(acts, ctx, expl, judge=judge, rows=te, n_per_decile=3, n_not=7, width=5)
    assert [e.feature for e, _ in calls] == [0, 1, 5]
    for e, contexts in calls:
        assert isinstance(e, I.Explanation) and isinstance(contexts, list) and len(contexts) == 3 * 10 + 7
        assert all(isinstance(w, np.ndarray) and 1 <= len(w) <= 5 for w in contexts)
        fired = [w[-1] == UNI[e.feature] for w in contexts] if e.feature in UNI else None
        if fired is not None:
            assert sum(fired) == 30                           # the positives end on the planted token
    assert (rec[rec.decile != "not"].accuracy == 1).all() and (rec[rec.decile == "not"].accuracy == 0).all()
    with pytest.raises(ValueError, match="answers"):
        I.detection_records(acts, ctx, expl, judge=lambda e, c: [True], rows=te)


def test_token_match_judge_rules():
    e = I.Explanation(0, ngrams=((7,), (3, 4)))
    last = I.TokenMatchJudge()
    assert last(e, [np.array([1, 7]), np.array([3, 4]), np.array([2, 4]), np.array([7, 1]), np.array([4])]) == \
        [True, True, False, False, False]
    assert I.TokenMatchJudge("any")(e, [np.array([7, 1]), np.array([3, 4, 1])]) == [True, True]
    with pytest.raises(ValueError, match="scope"):
        I.TokenMatchJudge("middle")


def test_summary_intervals():
    rec = pd.DataFrame({"sae": "s", "feature": range(4), "decile": "3", "n": 10, "correct": 0,
                        "accuracy": [0.5, 0.7, 0.9, 0.7]})
    out = I.summarize_detection(rec)
    half = 1.959964 * np.std([0.5, 0.7, 0.9, 0.7], ddof=1) / 2
    assert out["mean"].iloc[0] == pytest.approx(0.7)
    assert out["ci_lo"].iloc[0] == pytest.approx(0.7 - half) and out["ci_hi"].iloc[0] == pytest.approx(0.7 + half)
    boot = I.summarize_detection(rec, ci="bootstrap")
    assert 0.5 <= boot["ci_lo"].iloc[0] < 0.7 < boot["ci_hi"].iloc[0] <= 0.9
    with pytest.raises(ValueError, match="ci"):
        I.summarize_detection(rec, ci="wilson")


class _Tok:
    def decode(self, ids):
        return "".join(f" t{i}" for i in ids)


def test_top_contexts_marks_the_activating_token(planted):
    ctx, acts, _ = planted
    df = I.top_contexts(acts, ctx, _Tok(), features=[0, 4], n=3, width=4)
    assert list(df.columns) == ["feature", "rank", "activation", "context"] and len(df) == 6
    assert (df.groupby("feature").activation.apply(lambda a: a.is_monotonic_decreasing)).all()
    assert df[df.feature == 0].context.str.endswith("«␣t5»").all()
    assert df[df.feature == 4].context.str.endswith("t10«␣t9»").all()
    text = I.top_contexts(acts, ctx, _Tok(), features=[4], n=2, explanations={4: I.Explanation(4, ((10, 9),), (1.0,))},
                          as_text=True)
    assert "feature 4" in text and "␣t10«␣t9» (100%)" in text


def test_llm_prompt_helpers():
    p = I.detection_prompt("the word 'be'", ["to«␣be»", "or«␣not»"])
    assert "1. to«␣be»" in p and "2. or«␣not»" in p
    assert I.parse_answers("1: yes\n2: No\n3) YES\n9: yes", 4) == [True, False, True, False]


def test_feature_acts_runs_the_sae_in_batches():
    from saelib import saes

    torch.manual_seed(0)
    x = torch.randn(300, 8)
    feats = [1, 5, 20, 31]
    for sae in (saes.build("topk", d_in=8, n_latents=32, k=4), saes.build("switch", d_in=8, n_latents=32, k=4,
                                                                          n_experts=4),
                saes.build("relu", d_in=8, n_latents=32)):
        fa = I.feature_acts(sae, x, feats, batch_size=64)
        np.testing.assert_allclose(fa.dense(), sae.encode(x)[:, feats].numpy(), rtol=1e-6, atol=1e-7)
        assert fa.n_rows == 300
    assert I.feature_acts(sae, x, feats, max_rows=70).n_rows == 70
    with pytest.raises(ValueError, match="features"):
        I.feature_acts(sae, x, [40])


def test_contexts_from_a_real_store(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from saelib import activations, saes

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=30, n_positions=12, n_embd=16, n_layer=1, n_head=2,
                                       bos_token_id=0, eos_token_id=0)).eval()
    toks = torch.randint(1, 30, (10, 12))
    toks[:, 0] = 0
    store = activations.collect(model, toks, "blocks.0.resid_post", n_tokens=100, path=tmp_path / "s")
    ctx = I.Contexts.from_store(store, toks)
    assert len(ctx) == len(store) == 100
    np.testing.assert_array_equal(ctx.token_ids, np.asarray(store.tokens))
    sae = saes.build("topk", d_in=16, n_latents=24, k=3)
    a = I.feature_acts(sae, store, [0, 7, 23], batch_size=32)
    b = I.feature_acts(sae, store.tensor(), [0, 7, 23])
    np.testing.assert_array_equal(a.dense(), b.dense())
    with pytest.raises(ValueError, match="do not match"):
        I.Contexts.from_store(store, torch.randint(1, 30, (10, 12)))


def test_ngrams_do_not_run_past_the_sequence_start():
    toks = np.array([[3, 4, 3, 4, 3, 4, 3], [3, 5, 3, 5, 3, 5, 3]])
    seq, pos = np.nonzero(np.ones_like(toks))
    ctx = I.Contexts(toks, seq, pos)
    lat = ((ctx.token_ids == 3) & (ctx.pos == 0)).astype(np.float32)[:, None]   # "3" at the start only
    e = I.explain_features(I.feature_acts_from_latents(lat, [0]), ctx)[0]
    # "(start) 3" is no pattern (it would decode to the bare token 3 with a high precision)
    assert e.ngrams == ((3,),) and e.precision[0] == pytest.approx((2 + 2 / 14) / 9)
