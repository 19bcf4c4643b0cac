"""The paper corpus in bounded memory (issue 14): a streamed hub sample is written to the cache
in shards as it streams, its splits are written shard by shard and read back memory-mapped, and
the packed token rows are built on disk; the documents and tokens are those of the in-RAM path."""
import functools
import hashlib
import math
import random
import tracemalloc

import numpy as np
import pytest

from saelib import data, utils

WORDS = "the king queen lord speak thou hath night crown sword def return import class".split()


def write_parquet(folder, n_docs=120, n_files=4, words_per_doc=40, seed=0, row_group_size=8):
    """A local stand-in for the hub's parquet conversion: ``n_files`` files of small row groups,
    with an empty document, a whitespace-only one and a duplicate (the filters must see them)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(words_per_doc)) + f" doc {i}." for i in range(n_docs)]
    texts[5], texts[9], texts[11] = "", "  \n ", texts[3]
    folder.mkdir(parents=True, exist_ok=True)
    per = math.ceil(n_docs / n_files)
    for f in range(n_files):
        part = texts[f * per:(f + 1) * per]
        pq.write_table(pa.table({"id": list(range(f * per, f * per + len(part))), "text": part}),
                       folder / f"train-{f:05d}.parquet", row_group_size=row_group_size)
    return f"hf:parquet:{folder}/*.parquet", sum(map(len, texts))


def in_ram_reference(spec, max_docs, seed, max_chars=None, fractions=(0.9, 0.05, 0.05)):
    """The corpus as the in-RAM path built it before issue 14 (every text a Python string):
    the seeded streamed sample as lists, then filter / choose / split / order in memory."""
    import datasets

    p = data.parse_hf(spec[3:])
    ids, texts, seen = [], [], set()
    for split, ds in data._open_hf(spec[3:], p, streaming=True).items():
        ds = ds.select_columns(["text"]).shuffle(seed=seed, buffer_size=data.STREAM_BUFFER)
        for row in ds.take(max_docs):
            text = row["text"] or ""
            i = f"{split}/{hashlib.blake2b(text.encode(), digest_size=8).hexdigest()}"
            if i not in seen:
                seen.add(i), ids.append(i), texts.append(text)
    keep = [i for i in range(len(ids)) if texts[i].strip()]
    if len(keep) > max_docs:
        keep = sorted(sorted(keep, key=lambda i: data._u(seed, ids[i]))[:max_docs])
    ids, texts = [ids[i] for i in keep], [texts[i][:max_chars] for i in keep]
    splits = data.split_of(ids, fractions)
    cols = {s: {"text": [], "domain": [], "id": []} for s in data.SPLITS}
    for i in sorted(range(len(ids)), key=lambda i: data._u("order", ids[i])):
        c = cols[splits[i]]
        c["text"].append(texts[i]), c["domain"].append(p["domain"]), c["id"].append(ids[i])
    feats = datasets.Features({k: datasets.Value("string") for k in ("text", "domain", "id")})
    return datasets.DatasetDict({s: datasets.Dataset.from_dict(c, features=feats) for s, c in cols.items()})


def entry(kind):
    """The one streamed-sample entry (kind="sample") or splits entry (kind="splits") in the cache."""
    found = [p for p in data.cache_dir("corpus").glob("stream-*")
             if p.is_dir() and ("-splits-" in p.name) == (kind == "splits")]
    assert len(found) == 1, found
    return found[0]


def test_streamed_corpus_is_sharded_memory_mapped_and_equals_the_in_ram_path(tmp_cache, tmp_path, monkeypatch):
    spec, _ = write_parquet(tmp_path / "owt")
    shard = 16
    dsd = data.load_corpus(spec, max_docs_per_domain=100, max_chars_per_doc=200, seed=0, streaming=True,
                           shard_docs=shard)

    # the sample was written in shards of `shard` documents (100 taken; a duplicate text is one document)
    sample = entry("sample")
    texts = data.column(data._load_shards(sample), "text")
    assert len(texts) in (99, 100) and len(list(sample.glob("shard-*"))) == math.ceil(len(texts) / shard)
    # every split is memory-mapped from the splits entry, one Arrow file per shard: no in-RAM table
    splits = entry("splits")
    for s, ds in dsd.items():
        files = {f["filename"] for f in ds.cache_files}
        assert files and all(f.startswith(str(splits / s)) for f in files), (s, files)
        assert len(files) == max(1, math.ceil(len(ds) / shard))

    # the same documents, splits, order and characters as the in-RAM path
    ref = in_ram_reference(spec, max_docs=100, seed=0, max_chars=200)
    assert list(dsd) == list(ref) == ["train", "validation", "test"]
    for s in ref:
        for col in ("text", "domain", "id"):
            assert data.column(dsd[s], col) == data.column(ref[s], col), (s, col)
    n_empty = sum(not t.strip() for t in texts)
    assert sum(map(len, dsd.values())) == len(texts) - n_empty       # empty / whitespace-only documents dropped
    assert data.corpus_hash(dsd) == data.corpus_hash(ref)
    stats, ref_stats = data.corpus_stats(dsd, batch=7), data.corpus_stats(ref)
    assert stats.equals(ref_stats)

    # packing: a memory-mapped corpus is packed on disk, to the rows the in-memory corpus gives
    tok = data.train_tokenizer(ref, vocab_size=300)
    td = data.tokenize(dsd, tok, n_ctx=16)
    assert all(td[s].cache_files for s in td)
    assert utils.verify_entry(splits, require=True) and utils.verify_entry(sample, require=True)  # nothing added
    leftovers = [p.name for p in data.cache_dir("tokenized").iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers                                   # the work files went with the temp folder
    monkeypatch.setenv("SAELIB_CACHE", str(tmp_path / "other-cache"))  # the same key: rebuild it from `ref`
    td_ref = data.tokenize(ref, tok, n_ctx=16)
    for s in ref:
        assert np.array_equal(data.token_array(td[s]), data.token_array(td_ref[s])), s
        assert data.column(td[s], "domain") == data.column(td_ref[s], "domain")
        assert data.token_hash(td[s], batch=5) == data.token_hash(td_ref[s])


def test_streamed_corpus_memory_does_not_grow_with_the_corpus(tmp_cache, tmp_path, monkeypatch):
    """Peak Python memory of loading a streamed sample is a shard plus the reader's buffers: 3x
    the documents add only their ids (~100 bytes each), while the in-RAM path holds every text."""
    monkeypatch.setattr(data, "STREAM_BUFFER", 2)      # the shuffle buffer holds 2 documents, not 10,000
    # the checksum's read buffer (16 MB, one per file) is a constant, not the corpus: smaller here
    monkeypatch.setattr(utils, "_digest", functools.partial(utils._digest, chunk=1 << 16))
    spec, n_chars = write_parquet(tmp_path / "owt", n_docs=60, n_files=2, words_per_doc=5000, row_group_size=1)
    assert n_chars > 1_500_000                         # ~27 KB per document, ~1.6 MB in all
    warm, _ = write_parquet(tmp_path / "warm", n_docs=12)   # one-time imports and set-up are not the corpus
    data.load_corpus(warm, max_docs_per_domain=6, seed=0, streaming=True, shard_docs=4)

    def peak(fn):
        tracemalloc.start()
        try:
            out = fn()
            return out, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, peak_20 = peak(lambda: data.load_corpus(spec, max_docs_per_domain=20, seed=0, streaming=True, shard_docs=4))
    dsd, peak_60 = peak(lambda: data.load_corpus(spec, max_docs_per_domain=60, seed=0, streaming=True, shard_docs=4))
    again, peak_cached = peak(lambda: data.load_corpus(spec, max_docs_per_domain=60, seed=0, streaming=True,
                                                       shard_docs=4))
    ref, peak_in_ram = peak(lambda: in_ram_reference(spec, max_docs=60, seed=0))
    assert data.corpus_hash(dsd) == data.corpus_hash(ref) == data.corpus_hash(again)
    assert 17 <= sum(map(len, small.values())) <= 20 and sum(map(len, dsd.values())) == 57   # 2 empty, 1 duplicate
    assert peak_in_ram > n_chars                                        # the old path: every text in RAM
    assert peak_60 - peak_20 < 0.1 * n_chars, (peak_20, peak_60, n_chars)   # 40 more documents: ids only
    assert peak_60 < 0.5 * peak_in_ram, (peak_60, peak_in_ram)
    assert peak_cached < 0.25 * n_chars, (peak_cached, n_chars)        # read back: memory-mapped


def test_bad_arguments_fail_before_any_download(tmp_cache, tmp_path, monkeypatch):
    import datasets

    spec, _ = write_parquet(tmp_path / "owt", n_docs=20)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("loaded data before checking"))
    with pytest.raises(ValueError, match=r"shard_docs must be a positive integer, got 0"):
        data.load_corpus(spec, max_docs_per_domain=10, streaming=True, shard_docs=0)
    with pytest.raises(ValueError, match=r"streaming='yes'.*None \(auto\), True or False"):
        data.load_corpus(spec, max_docs_per_domain=10, streaming="yes")
    with pytest.raises(ValueError, match=r"domains.*'owt'"):
        data.load_corpus(spec, domains=["wiki"], max_docs_per_domain=10, streaming=True)
    with pytest.raises(ValueError, match=r"holdout=\('owt',\) leaves no domain"):
        data.load_corpus(spec, holdout=["owt"], max_docs_per_domain=10, streaming=True)
    with pytest.raises(ValueError, match="max_docs_per_domain"):
        data.load_corpus(spec, streaming=True)


def test_sample_cached_before_sharding_still_loads(tmp_cache, tmp_path, monkeypatch):
    """A streamed sample cached as one ``save_to_disk`` folder (before shards) is read, not streamed again."""
    import datasets

    spec, _ = write_parquet(tmp_path / "owt", n_docs=40)
    dsd = data.load_corpus(spec, max_docs_per_domain=30, seed=0, streaming=True, shard_docs=7)
    sample = entry("sample")
    legacy = datasets.concatenate_datasets([datasets.load_from_disk(str(s)) for s in sorted(sample.glob("shard-*"))])
    for p in data.cache_dir("corpus").iterdir():
        utils.discard_entry(p)
    legacy.save_to_disk(str(sample))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("streamed again instead of the cache"))
    again = data.load_corpus(spec, max_docs_per_domain=30, seed=0, streaming=True, shard_docs=7)
    assert data.corpus_hash(again) == data.corpus_hash(dsd)
