"""saelib.pool and lm.train_many: independent trainings side by side give what they give alone."""
import pytest
import torch

from saelib import lm, pool
from test_data import write_files

LM = dict(name=None, n_layer=1, n_embd=16, n_head=2, n_ctx=32, steps=12, batch_size=8, lr=1e-2, warmup=2,
          eval_every=12, eval_batches=1)


def _square(x):
    return x * x


def _fail_on_three(x):
    if x == 3:
        raise KeyError("three")
    return x


def test_map_processes_keeps_order_and_names_the_failing_item():
    assert pool.map_processes(_square, [3, 1, 2], workers=2) == [9, 1, 4]
    assert pool.map_processes(_square, [3, 1, 2], workers=1) == [9, 1, 4]
    with pytest.raises(pool.WorkerError, match="'c'.*KeyError"):
        pool.map_processes(_fail_on_three, [1, 2, 3], workers=1, labels=["a", "b", "c"])
    with pytest.raises(ValueError, match="workers"):
        pool.map_processes(_square, [1], workers=0)
    with pytest.raises(ValueError, match="threads"):
        pool.map_processes(_square, [1], workers=1, threads=0)
    assert pool.default_workers() >= 1


def test_train_many_gives_the_models_trained_alone(tmp_path, monkeypatch):
    corpus = write_files(tmp_path / "txt", n_docs=30)
    base = {"seed": 0, "device": "cpu", "data": {"corpus": corpus, "domains": None, "max_docs_per_domain": None,
                                                  "max_chars_per_doc": None, "holdout": [], "vocab_size": 300}}
    cfgs = [{**base, "lm": dict(LM)}, {**base, "lm": dict(LM, n_embd=32, n_layer=2)}]
    monkeypatch.setenv("SAELIB_CACHE", str(tmp_path / "alone"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = [lm.subject_model(c) for c in cfgs]
    finally:
        torch.set_num_threads(n)
    monkeypatch.setenv("SAELIB_CACHE", str(tmp_path / "pool"))
    many = lm.train_many(cfgs, workers=2)
    for a, b in zip(alone, many):
        assert a.history["train"][-1]["loss"] == b.history["train"][-1]["loss"]
        for (k, p), (_, q) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
            assert torch.equal(p, q), k
    with pytest.raises(ValueError, match="lm.name"):
        lm.train_many([{**base, "lm": dict(LM, name="gpt2")}])
    # every model cached: no pool is started, the cached models come back
    def no_pool(*a, **k):
        raise AssertionError("the pool was started although every model is cached")
    monkeypatch.setattr(pool, "map_processes", no_pool)
    again = lm.train_many(cfgs, workers=2)
    assert [m.path for m in again] == [m.path for m in many]
    # one model missing: only that one goes to the pool
    calls = []
    monkeypatch.setattr(pool, "map_processes", lambda fn, items, **k: calls.append(k["labels"]) or [fn(i) for i in items])
    lm.train_many([cfgs[0], {**base, "lm": dict(LM, steps=6, eval_every=6)}], workers=2, labels=["cached", "new"])
    assert calls == [["new"]]
