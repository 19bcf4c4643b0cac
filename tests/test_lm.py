"""saelib.lm: a tiny GPT-2 trains, is cached, reloads identically."""
import math

import pytest
import torch

from saelib import data, lm
from test_data import write_files

ARCH = dict(n_layer=1, n_embd=32, n_head=2, n_ctx=32, steps=40, batch_size=8, lr=1e-2, warmup=5, eval_every=20,
            eval_batches=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAELIB_CACHE", str(root / "cache"))
        corpus = write_files(root / "txt", n_docs=40)
        dsd = data.load_corpus(corpus)
        tok = data.train_tokenizer(dsd, vocab_size=300)
        td = data.tokenize(dsd, tok, n_ctx=32)
        model, hist = lm.train_lm(td, tok, **ARCH)
        yield dict(corpus=corpus, dsd=dsd, tok=tok, td=td, model=model, hist=hist, mp=mp)


def test_loss_drops_and_history(setup):
    hist = setup["hist"]
    tr = hist["train"]
    assert tr[-1]["step"] == 40 and tr[-1]["tokens_seen"] == 40 * 8 * 32
    assert tr[-1]["loss"] < tr[0]["loss"] - 1.0 and all(r["tokens_per_s"] > 0 for r in tr)
    ev = [r for r in hist["eval"] if r["domain"] == "all"]
    assert [r["step"] for r in ev] == [20, 40] and ev[-1]["loss"] < math.log(300)
    assert {r["domain"] for r in hist["eval"]} == {"alpha", "beta", "all"}
    assert all(abs(r["ppl"] - math.exp(r["loss"])) < 1e-6 * r["ppl"] for r in hist["eval"])


def test_second_call_loads_from_cache(setup, monkeypatch):
    monkeypatch.setattr(lm, "_train", lambda *a, **k: pytest.fail("retrained instead of loading the cache"))
    model, hist = lm.train_lm(setup["td"], setup["tok"], **ARCH)
    assert hist == setup["hist"]
    for (n, p), (_, q) in zip(model.state_dict().items(), setup["model"].state_dict().items()):
        assert torch.equal(p, q), n


def test_training_is_deterministic(setup):
    cfg = dict(ARCH, steps=5, eval_every=5, lr=1e-3, warmup=1, seed=3)
    h1 = lm._train(setup["td"], setup["tok"], dict(cfg, weight_decay=0.1), torch.device("cpu"))[1]
    h2 = lm._train(setup["td"], setup["tok"], dict(cfg, weight_decay=0.1), torch.device("cpu"))[1]
    assert [r["loss"] for r in h1["train"]] == [r["loss"] for r in h2["train"]]
    assert h1["eval"] == h2["eval"]
    h3 = lm._train(setup["td"], setup["tok"], dict(cfg, weight_decay=0.1, precision="bfloat16"), torch.device("cpu"))[1]
    assert abs(h3["train"][-1]["loss"] - h1["train"][-1]["loss"]) < 0.1  # bf16 autocast: same run, rounded


def test_load_model_identical_logits_and_evaluate(setup):
    model = setup["model"]
    again = lm.load_model(setup["hist"]["path"], device="cpu")
    x = torch.from_numpy(data.token_array(setup["td"]["validation"])[:4])
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, again(input_ids=x).logits)
    df = lm.evaluate(again, setup["td"]["validation"], batch_size=4, max_batches=1)
    assert list(df.columns) == ["domain", "loss", "ppl", "tokens"]
    assert set(df.domain) == {"alpha", "beta", "all"} and (df.tokens[df.domain != "all"] == 4 * 31).all()
    with pytest.raises(ValueError, match="name_or_path"):
        lm.load_model(setup["hist"]["path"] + "-missing")


def test_generate(setup):
    m, tok = setup["model"], setup["tok"]
    greedy = lm.generate(m, tok, ["the king", "def"], max_new_tokens=8)
    assert len(greedy) == 2 and greedy == lm.generate(m, tok, ["the king", "def"], max_new_tokens=8)
    s1 = lm.generate(m, tok, "the", max_new_tokens=8, do_sample=True, seed=1)
    assert s1 == lm.generate(m, tok, "the", max_new_tokens=8, do_sample=True, seed=1)
    assert all(isinstance(t, str) and t for t in greedy + s1)


def test_lr_schedule_and_bad_args(setup):
    assert lm.lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lm.lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert lm.lr_at(100, 100, 1.0, 10) == pytest.approx(0.1)
    assert lm.lr_at(55, 100, 1.0, 10) == pytest.approx(0.55)
    with pytest.raises(ValueError, match="n_head"):
        lm.train_lm(setup["td"], setup["tok"], **dict(ARCH, n_head=3))
    with pytest.raises(ValueError, match="steps"):
        lm.train_lm(setup["td"], setup["tok"], **dict(ARCH, steps=0))


def test_subject_model_pipeline(setup):
    cfg = {"seed": 0, "device": "cpu",
           "data": {"corpus": setup["corpus"], "domains": None, "max_docs_per_domain": None, "holdout": [],
                    "vocab_size": 300, "seed": 0},
           "lm": {"name": None, **ARCH}}
    sm = lm.subject_model(cfg)  # everything comes from the module's cache: same corpus, tokenizer, model
    assert sm.path == setup["hist"]["path"] and sm.history == setup["hist"]
    assert sm.n_params == sum(p.numel() for p in setup["model"].parameters())
    assert data.tokenizer_hash(sm.tokenizer) == data.tokenizer_hash(setup["tok"])
    loaded = lm.subject_model({**cfg, "lm": {"name": sm.path, "n_ctx": None}})
    assert loaded.path == sm.path and loaded.history["train"] == sm.history["train"]
    assert data.token_hash(loaded.tokenized["train"]) == data.token_hash(sm.tokenized["train"])


def test_training_summary_of_a_trained_and_of_a_loaded_model(setup):
    s = lm.training_summary(setup["hist"])
    assert s["trained"] and s["steps"] == 40 and s["tokens_seen"] == 40 * 8 * 32
    assert isinstance(s["tokens_seen"], int) and s["tokens_per_s"] > 0 and math.isfinite(s["final_loss"])
    assert list(s["train"].step)[-1] == 40 and set(s["eval"].domain) == {"alpha", "beta", "all"}
    assert sorted(s["final_eval"].index) == ["all", "alpha", "beta"] and (s["final_eval"].step == 40).all()
    assert "trained here for 40 steps on 10,240 tokens" in s["note"]

    none = lm.training_summary(None, "gpt2")     # a hub / local model without history.json
    assert not none["trained"] and none["steps"] is None and none["tokens_seen"] is None
    assert math.isnan(none["tokens_per_s"]) and math.isnan(none["final_loss"])
    assert len(none["train"]) == 0 and list(none["train"].columns) == lm.TRAIN_COLUMNS
    assert len(none["eval"]) == 0 and len(none["final_eval"]) == 0 and "ppl" in none["final_eval"].columns
    assert none["note"] == "It was loaded (gpt2), not trained here, so there is no training curve."
    assert lm.training_summary({})["trained"] is False


def test_final_validation_from_history_or_measured(setup):
    trained = lm.SubjectModel(setup["model"], setup["tok"], setup["dsd"], setup["td"], setup["hist"], "x", 0)
    f = lm.final_validation(trained)
    assert f.ppl.to_dict() == {r["domain"]: r["ppl"] for r in setup["hist"]["eval"] if r["step"] == 40}
    loaded = lm.SubjectModel(setup["model"], setup["tok"], setup["dsd"], setup["td"], None, "x", 0)
    g = lm.final_validation(loaded, batch_size=4, max_batches=1)   # no history: measured on the validation split
    assert sorted(g.index) == ["all", "alpha", "beta"] and (g.ppl > 1).all()
    assert abs(g.loss["all"] - f.loss["all"]) < 0.5         # the same model, a smaller sample
