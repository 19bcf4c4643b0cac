"""saelib.specialization: chapter 02's token classes, omega law, overlap shapes, case study."""
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from saelib import interp, saes
from saelib import specialization as S


class FakeTokenizer:
    """decode([i]) -> PIECES[i]; len() -> vocabulary size (what word_ends needs)."""
    PIECES = ["<bos>", "The", " call", "ed", " dog", ".", " us", "e", "d", " need", " Walk", "\n"]

    def __len__(self):
        return len(self.PIECES)

    def decode(self, ids):
        return "".join(self.PIECES[i] for i in ids)


TOK = FakeTokenizer()
# "<bos>The called dog. used need Walked\n"
ROW = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 3, 11]


def test_word_ends_joins_bpe_pieces_and_marks_the_last_token():
    we = S.word_ends(torch.tensor([ROW]), TOK)
    assert we.word.tolist() == ["the", "called", "dog", "used", "need", "walked"]
    assert we.pos.tolist() == [1, 3, 4, 8, 9, 11]          # the last token of each word
    assert (we.seq == 0).all()


def test_word_ends_rejects_non_matrix():
    with pytest.raises(ValueError, match="n_seq, n_ctx"):
        S.word_ends(torch.tensor(ROW), TOK)


def test_domain_word_counts_and_past_tense_class():
    texts = ["I called and used it. Need a call, use.", "We called a hundred. It used a bed; call use need",
             "called used walked hundred sacred need"]
    counts = S.domain_word_counts(texts, ["a", "b", "c"])
    assert counts.loc["called"].tolist() == [1, 1, 1] and counts.loc["walked"].tolist() == [0, 0, 1]
    cls = S.past_tense_class(counts, min_count=1, min_len=4)
    # called/used: base form present and in every domain; walked: one domain; hundred/sacred: no base;
    # need: -eed; bed: too short
    assert sorted(cls.index) == ["called", "used"]
    assert cls.loc["used", "base"] == "use" and cls.loc["called", "base"] == "call"
    with pytest.raises(ValueError, match="same length"):
        S.domain_word_counts(["x"], ["a", "b"])


def test_class_rows_finds_member_ends_in_a_store():
    T = torch.tensor([ROW, ROW])
    seq, pos = np.nonzero(np.ones((2, len(ROW)), bool)[:, :])
    keep = pos > 0
    store = SimpleNamespace(seq=seq[keep], pos=pos[keep], tokens=T.numpy()[seq[keep], pos[keep]])
    rows = S.class_rows(store, T, TOK, ["called", "walked"])
    assert [(store.seq[r], store.pos[r]) for r in rows] == [(0, 3), (0, 11), (1, 3), (1, 11)]
    bad = SimpleNamespace(seq=store.seq, pos=store.pos, tokens=store.tokens + 1)
    with pytest.raises(ValueError, match="do not match"):
        S.class_rows(bad, T, TOK, ["called"])


def test_split_by_domain_and_kept_positions():
    import datasets

    feats = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"), length=3), "domain": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"input_ids": [[0, 1, 2], [0, 3, 4], [0, 0, 5]], "domain": ["a", "b", "a"]}, features=feats)
    tr, ho = S.split_by_domain(ds, "b")
    assert tr.tolist() == [[0, 1, 2], [0, 0, 5]] and ho.tolist() == [[0, 3, 4]]
    assert S.kept_positions(tr, bos=0) == 3            # position 0 and the inner BOS are skipped
    with pytest.raises(ValueError, match="holdout='z'"):
        S.split_by_domain(ds, "z")


def test_omega_trace_final_and_law():
    hist = pd.DataFrame({"step": [1, 2], "omega": [[0.0, 0.2], [0.1, 0.3]]})
    tr = S.omega_trace(hist)
    assert np.allclose(tr["mean"], [0.1, 0.2]) and np.allclose(tr["min"], [0.0, 0.1]) and np.allclose(tr["max"], [0.2, 0.3])
    with pytest.raises(ValueError, match="without feature scaling"):
        S.omega_trace(pd.DataFrame({"step": [1]}))
    e = np.array([1, 2, 4, 8, 16])
    law = S.fit_omega_law(e, 0.1 * e ** 0.5, n_boot=0)
    assert law["rho"] == pytest.approx(1.0) and law["b"] == pytest.approx(0.5) and law["r2"] == pytest.approx(1.0)
    down = S.fit_omega_law(e, 1.0 / e, n_boot=0)
    assert down["rho"] == pytest.approx(-1.0) and down["b"] == pytest.approx(-1.0)
    assert math.isnan(S.fit_omega_law(e, -e, n_boot=0)["b"])   # no positive omega: no power law
    sae = saes.build("scale", d_in=8, n_latents=32, k=4, n_experts=4, n_active=2)
    with torch.no_grad():
        sae.omega.copy_(torch.tensor([0.0, 0.1, 0.2, 0.3]))
    assert S.omega_final(sae) == pytest.approx(0.15)
    with pytest.raises(ValueError, match="no omega"):
        S.omega_final(saes.build("scale", d_in=8, n_latents=32, k=4, n_experts=4, feature_scaling=False))


def test_instability_smooth_vs_jumpy():
    smooth = pd.DataFrame({"mse": np.geomspace(1.0, 0.5, 40)})
    jumpy = pd.DataFrame({"mse": np.geomspace(1.0, 0.5, 40) * np.tile([1.0, 1.3], 20)})
    assert S.instability(smooth) == pytest.approx(0.0, abs=1e-12)
    assert S.instability(jumpy) > 0.1
    with pytest.raises(ValueError, match="last"):
        S.instability(smooth, last=0)


def test_top_share():
    assert S.top_share(torch.tensor([10, 0, 0, 0, 0, 0, 0, 0, 0, 0]), 0.1) == pytest.approx(1.0)
    assert S.top_share(torch.ones(10), 0.1) == pytest.approx(0.1)
    assert S.top_share(torch.tensor([1, 3]), 0.1) == pytest.approx(0.75)     # at least one expert


def test_overlap_stats_hand_cases():
    st = S.overlap_stats([10, 2, 5, 1])
    assert st["bimodal"] and st["primary_at_zero"] and st["second_mode"] == 2
    assert st["zero_share"] == pytest.approx(10 / 18)
    assert st["mean_nonzero"] == pytest.approx((1 * 2 + 2 * 5 + 3 * 1) / 8)
    mono = S.overlap_stats([10, 5, 2])
    assert not mono["bimodal"] and math.isnan(mono["second_mode"])
    assert not S.overlap_stats([1, 5, 2])["bimodal"]                          # largest bin not at 0
    with pytest.raises(ValueError):
        S.overlap_stats([0, 0])


def test_reduction():
    assert S.reduction(0.5, 0.3) == pytest.approx(0.4) and S.reduction(0.5, 0.6) == pytest.approx(-0.2)
    assert math.isnan(S.reduction(0.0, 0.1))


def test_route_and_case_features_reconstruct_the_token():
    torch.manual_seed(0)
    sae = saes.build("scale", d_in=16, n_latents=64, k=6, n_experts=8, n_active=3).eval()
    x = torch.randn(16)
    r = S.route(sae, x)
    out = sae(x[None])
    assert len(r) == 3 and r.probability.is_monotonic_decreasing
    assert sorted(r.expert) == sorted(out.expert_idx[0].tolist())
    f = S.case_features(sae, x)
    assert f.activation.is_monotonic_decreasing and set(f.expert) <= set(r.expert)
    assert ((f.feature // sae.m) == f.expert).all() and ((f.feature % sae.m) == f.local).all()
    x_hat = torch.tensor(f.activation.tolist()) @ sae.W_dec.detach()[f.feature.tolist()] + sae.b_pre.detach()
    assert torch.allclose(x_hat, out.x_hat[0], atol=1e-5)
    with pytest.raises(ValueError, match="n_experts"):
        S.route(saes.build("topk", d_in=16, n_latents=32, k=4), x)


def test_feature_label_from_top_tokens():
    toks = np.array([[0, 2, 3, 4, 2, 3, 4, 5]])
    seq, pos = np.zeros(7, int), np.arange(1, 8)
    ctx = interp.Contexts(toks, seq, pos)
    lat = np.zeros((7, 3), np.float32)
    lat[[1, 4], 0] = [2.0, 1.0]                 # feature 0: token 3 ("ed") twice
    lat[[0, 1, 2], 1] = [3.0, 2.0, 1.0]         # feature 1: three different tokens
    acts = interp.feature_acts_from_latents(lat, [0, 1, 2])
    assert S.feature_label(acts, ctx, TOK, 0) == "ed ×2"
    assert S.feature_label(acts, ctx, TOK, 1).startswith("mixed: call")
    assert S.feature_label(acts, ctx, TOK, 2) == "(silent)"


def test_evaluate_domains_needs_a_set():
    with pytest.raises(ValueError, match="at least one"):
        S.evaluate_domains([], {})


# ---------------------------------------------------------------------------
# chapter 02's training data: a store, or (paper profile) a stream that writes nothing
# ---------------------------------------------------------------------------
SITE = "blocks.1.resid_post"


@pytest.fixture(scope="module")
def tiny_lm():
    """A 2-layer GPT-2 stand-in for the subject model and its training-domain token rows."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_positions=12, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    tok = torch.randint(1, 50, (30, 12), generator=torch.Generator().manual_seed(0))
    tok[:, 0] = 0
    return GPT2LMHeadModel(cfg).eval(), tok


def _chapter02_code(*starts):
    """The notebook's statements that begin with one of ``starts`` (with their continuation
    lines), in notebook order; the same in the book's copy."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    found = []
    for nb in ("notebooks/02_scale_sae.ipynb", "book/chapters/02_scale_sae.ipynb"):
        cells = json.loads((root / nb).read_text(encoding="utf-8"))["cells"]
        lines, inside = [], False
        for ln in (ln for c in cells if c["cell_type"] == "code" for ln in c["source"]):
            inside = ln.startswith(starts) or (inside and ln[:1].isspace())
            if inside:
                lines.append(ln if ln.endswith("\n") else ln + "\n")
        found.append(lines)
    assert sum(ln.startswith(starts) for ln in found[0]) == len(starts) and found[0] == found[1]
    return "".join(found[0])


def _chapter02_line():
    """The notebook's statement that makes chapter 02's SAE training data."""
    return _chapter02_code("store = ")


def _run_line(cfg, model, tok):
    ns = {"S": S, "cfg": cfg, "c": cfg["chapter02"], "sm": SimpleNamespace(model=model), "tr_tok": tok,
          "site": cfg["site"], "col": {"dtype": cfg["activations"]["dtype"], "device": "cpu"}}
    exec(_chapter02_line(), ns)                                      # noqa: S102 (the notebook's own line)
    return ns["store"]


def test_chapter02_training_data_store_mode_is_the_capped_store(tiny_lm, tmp_cache):
    from saelib import activations, config, sweep

    model, tok = tiny_lm
    for n in (200, 10_000):                                          # 10k > the 330 kept positions: capped
        cfg = config.load_profile("quick", {"site": SITE, "activations": {"n_tokens": n}})
        old = S.collect_capped(model, tok, SITE, n, dtype="float32", device="cpu")   # what chapter 02 did
        got = _run_line(cfg, model, tok)
        assert isinstance(got, activations.ActivationStore) and got.path == old.path
        assert sweep.data_key(got) == sweep.data_key(old) and got.ram_limit_bytes == old.ram_limit_bytes
        assert len(got) == min(n, S.kept_positions(tok, 0))


def test_chapter02_training_data_paper_stream_mode_writes_no_store(tiny_lm, tmp_cache):
    from saelib import activations, config, stream

    model, tok = tiny_lm
    over = {"site": SITE, "device": "cpu", "activations": {"n_tokens": 200, "buffer_tokens": 64},
            "chapter02": {"steps": 2, "batch_size": 50, "budget": {"factor": 2}}}   # budget run: 200 rows
    cfg = config.load_profile("paper", over)                        # activations.mode: stream, float16
    assert cfg["activations"]["mode"] == "stream"
    got = _run_line(cfg, model, tok)
    assert isinstance(got, stream.ActivationStream) and len(got) == 200 and got.buffer_tokens == 64
    rows = torch.cat(list(got.batches(50, shuffle=False, drop_last=False)))
    assert not tmp_cache.exists() or not any(tmp_cache.rglob("*.npy"))    # no store anywhere in the cache
    ref = activations.collect(model, tok, SITE, 200, dtype="float16")  # the rows a store would hold
    torch.testing.assert_close(rows, ref.tensor(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="n_tokens=10000"):         # allow_repeat: false, no silent cap
        S.training_data(config.load_profile("paper", {**over, "activations": {"n_tokens": 10_000}}), model, tok)


def test_chapter02_stream_serves_the_budget_run_without_repeats(tiny_lm, tmp_cache):
    """Paper profile: the budget run trains factor x steps x batch_size rows; the stream must hold
    them all (allow_repeat: false), not activations.n_tokens and a silent second pass."""
    from saelib import config, stream, train

    model, tok = tiny_lm
    tok = tok.clone()
    tok[:, 1] = torch.arange(1, len(tok) + 1)                                  # every row's context differs
    ch = {"steps": 5, "batch_size": 30, "budget": {"factor": 2}}                 # budget run: 10 x 30 = 300 rows
    over = {"site": SITE, "device": "cpu", "activations": {"n_tokens": 100, "buffer_tokens": 64}, "chapter02": ch}
    got = _run_line(config.load_profile("paper", over), model, tok)
    assert isinstance(got, stream.ActivationStream) and len(got) == 300
    batches = train.batch_stream(got, ch["batch_size"], seed=0)                # what the budget run reads
    rows = torch.cat([next(batches) for _ in range(ch["budget"]["factor"] * ch["steps"])])
    assert len(torch.unique(rows, dim=0)) == len(rows)                         # every row at most once
    with pytest.raises(ValueError, match="n_tokens=600"):                      # tokens too few: an error, no repeat
        _run_line(config.load_profile("paper", {**over, "chapter02": {**ch, "steps": 10}}), model, tok)
    assert not tmp_cache.exists() or not any(tmp_cache.rglob("*.npy"))


class Tok50(FakeTokenizer):
    """A tokenizer for the tiny LM's 50 ids: word pieces, suffixes and punctuation."""
    PIECES = ["<bos>"] + [[" call", " walk", " use", "ed", "d", ".", " jump", "s", ","][i % 9] for i in range(49)]


def _class_cell(store, model, tok, cfg):
    """Chapter 02's class-row lines (cell ``cls_x = ...``) on the tiny LM: the training rows
    ``store``, the validation groups the two halves of ``tok``; returns (cls_x, namespace)."""
    col = {"dtype": cfg["activations"]["dtype"], "device": "cpu"}
    va_tok, ho_tok = tok[:15], tok[15:]
    ns = {"S": S, "torch": torch, "c": {**cfg["chapter02"], "eval_tokens": 120}, "site": SITE, "col": col,
          "sm": SimpleNamespace(model=model, tokenizer=Tok50()), "store": store, "tr_tok": tok,
          "members": pd.DataFrame(index=["called", "walked", "used", "jumped", "calls"]),
          "va_tok": va_tok, "ho_tok": ho_tok,
          "val_in": S.collect_capped(model, va_tok, SITE, 100, **col), "val_out": S.collect_capped(model, ho_tok, SITE, 100, **col)}
    exec(_chapter02_code("cls_src = ", "cls_x = "), ns)              # noqa: S102 (the notebook's own lines)
    return ns["cls_x"], ns


def test_chapter02_class_rows_store_mode_unchanged(tiny_lm, tmp_cache):
    from saelib import config

    model, tok = tiny_lm
    cfg = config.load_profile("quick", {"site": SITE, "activations": {"n_tokens": 200}})
    store = _run_line(cfg, model, tok)
    got, ns = _class_cell(store, model, tok, cfg)
    old = torch.cat([st.tensor()[S.class_rows(st, t, Tok50(), ns["members"].index)]      # what chapter 02 did
                     for st, t in ((store, tok), (ns["val_in"], ns["va_tok"]), (ns["val_out"], ns["ho_tok"]))])
    assert ns["cls_src"] is store and len(got) > 10 and torch.equal(got, old)


def test_chapter02_class_rows_stream_mode_read_a_capped_store(tiny_lm, tmp_cache):
    """Paper profile: a stream records no seq/pos/tokens; the training-domain class rows come from
    a capped store of eval_tokens rows of the same tokens (the stream's first rows)."""
    from saelib import activations, config, stream

    model, tok = tiny_lm
    over = {"site": SITE, "device": "cpu", "activations": {"n_tokens": 200, "buffer_tokens": 64},
            "chapter02": {"steps": 2, "batch_size": 50}}
    cfg = config.load_profile("paper", over)
    data = _run_line(cfg, model, tok)
    assert isinstance(data, stream.ActivationStream)
    got, ns = _class_cell(data, model, tok, cfg)
    small = ns["cls_src"]
    assert isinstance(small, activations.ActivationStore) and len(small) == 120 and small.dtype == "float16"
    ref = torch.cat([st.tensor()[S.class_rows(st, t, Tok50(), ns["members"].index)]
                     for st, t in ((small, tok), (ns["val_in"], ns["va_tok"]), (ns["val_out"], ns["ho_tok"]))])
    assert len(got) > 5 and torch.equal(got, ref)
    first = torch.cat(list(data.batches(40, shuffle=False)))[:120]            # the stream's first rows
    torch.testing.assert_close(first, small.tensor(), rtol=0, atol=1e-6)


def test_class_acts_reads_only_the_class_rows(tiny_lm, tmp_cache):
    from saelib import activations

    model, tok = tiny_lm
    store = S.collect_capped(model, tok, SITE, 200, dtype="float16")
    members = ["called", "walked", "used"]
    big = activations.ActivationStore(store.path, ram_limit_bytes=1)           # .tensor() refuses this store
    with pytest.raises(ValueError, match="ram_limit_bytes"):
        big.tensor()
    rows = S.class_rows(store, tok, Tok50(), members)
    got = S.class_acts(big, tok, Tok50(), members)
    assert got.dtype == torch.float32 and len(got) == len(rows) > 0 and torch.equal(got, store.tensor()[rows])
    assert S.class_acts(store, tok, Tok50(), ["zzz"]).shape == (0, store.d)
