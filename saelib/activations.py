"""Hooks on named sites of a transformer, and an on-disk activation store.

Site names follow TransformerLens: ``blocks.{i}.{kind}`` with kind one of

* ``resid_pre``  - the residual stream entering block i (input of the block),
* ``resid_post`` - the residual stream leaving block i (output of the block;
  for the last block this is *before* ``ln_f``, unlike HF's last hidden state),
* ``attn_out`` / ``mlp_out`` - what the attention / MLP sub-layer adds to the stream,
* ``ln1`` / ``ln2`` - the outputs of the layer norms before attention / MLP.

Any other string is taken as a module path of the model (``model.get_submodule``)
and hooks that module's output. GPT-2 (``transformer.h``), Llama/Mistral-like
(``model.layers``) and GPT-NeoX (``gpt_neox.layers``) block lists are recognised.

Training data comes from :func:`source`: an on-disk :class:`ActivationStore` (:func:`collect`)
or, for runs too large to store, a :class:`saelib.stream.ActivationStream` that computes the
same rows on the fly (profile key ``activations.mode``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import torch

import errno
import os
import shutil

from .utils import (CacheEntryError, atomic_path, cache_dir, check_choice, check_positive_int, config_hash, discard_entry,
                    entry_lock, progress, resolve_device, usable_entry, verify_entry)

SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out", "ln1", "ln2")
_BLOCK_LISTS = ("transformer.h", "model.layers", "gpt_neox.layers", "model.decoder.layers", "transformer.layers")
_SUBMODULES = {"attn_out": ("attn", "self_attn", "attention"), "mlp_out": ("mlp", "feed_forward"),
               "ln1": ("ln_1", "input_layernorm"), "ln2": ("ln_2", "post_attention_layernorm")}
STORE_VERSION = 1


# ----------------------------------------------------------------------------- sites
def blocks(model) -> torch.nn.ModuleList:
    """The list of transformer blocks of a (HF) causal LM."""
    for name in _BLOCK_LISTS:
        with contextlib.suppress(AttributeError):
            mod = model.get_submodule(name)
            if isinstance(mod, torch.nn.ModuleList):
                return mod
    raise ValueError(f"cannot find the transformer blocks of {type(model).__name__} (tried {_BLOCK_LISTS})")


def _site_error(site, n):
    return ValueError(f"site={site!r} is not allowed; use 'blocks.<i>.<kind>' with 0 <= i < {n} and kind one of "
                      f"{list(SITES)}, or a module path of the model such as 'transformer.h.0.mlp'")


def resolve_site(model, site: str):
    """Map a site name onto ``(module, where)``: ``where`` is "input" (a
    forward pre-hook reads/replaces the first argument) or "output"."""
    if not isinstance(site, str) or not site:
        raise _site_error(site, "n_layer")
    m = re.fullmatch(r"blocks\.(-?\d+)\.(\w+)", site)
    if m:
        hs = blocks(model)
        i, kind = int(m.group(1)), m.group(2)
        if kind not in SITES or not -len(hs) <= i < len(hs):
            raise _site_error(site, len(hs))
        block = hs[i]
        if kind in ("resid_pre", "resid_post"):
            return block, "input" if kind == "resid_pre" else "output"
        for name in _SUBMODULES[kind]:
            if hasattr(block, name):
                return getattr(block, name), "output"
        raise ValueError(f"site={site!r}: block {type(block).__name__} has none of {_SUBMODULES[kind]}")
    try:
        return model.get_submodule(site), "output"
    except AttributeError:
        n = len(blocks(model)) if any(hasattr(model, p.split(".")[0]) for p in _BLOCK_LISTS) else "n_layer"
        raise _site_error(site, n) from None


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _hook(model, site, fn):
    """Register ``fn(tensor) -> tensor | None`` on a site; a returned tensor replaces the site's value."""
    mod, where = resolve_site(model, site)
    if where == "input":
        def pre(m, args, kwargs):
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})
        return mod.register_forward_pre_hook(pre, with_kwargs=True)

    def post(m, args, out):
        new = fn(_first(out))
        if new is None:
            return None
        return (new, *out[1:]) if isinstance(out, tuple) else new
    return mod.register_forward_hook(post)


@contextlib.contextmanager
def capture(model, site: str):
    """Collect the site's activations of every forward pass run inside the
    block: yields a list that receives one detached tensor per call."""
    acts: list[torch.Tensor] = []
    handle = _hook(model, site, lambda x: acts.append(x.detach()))
    try:
        yield acts
    finally:
        handle.remove()


@contextlib.contextmanager
def splice(model, site: str, fn):
    """Replace the site's activation by ``fn(activation)`` in every forward pass
    run inside the block (e.g. an SAE reconstruction, or zeros for ablation)."""
    handle = _hook(model, site, fn)
    try:
        yield model
    finally:
        handle.remove()


class _Stop(Exception):
    pass


def run_to_site(model, input_ids, site: str) -> torch.Tensor:
    """The site's activation for ``input_ids`` [batch, seq], stopping the forward
    pass right after the site (later layers are not computed)."""
    got = []

    def grab(x):
        got.append(x.detach())
        raise _Stop

    handle = _hook(model, site, grab)
    try:
        model(input_ids=input_ids)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not got:
        raise ValueError(f"site={site!r} was not reached by the forward pass")
    return got[0]


def activation_site(cfg) -> str:
    """The site name of a profile: ``cfg["site"]`` (a full name such as
    "blocks.2.resid_post", or a kind plus ``cfg["layer"]``), also looked up
    under cfg["activations"] / cfg["sae"]."""
    for c in (cfg, cfg.get("activations") or {}, cfg.get("sae") or {}):
        if isinstance(c, dict) and c.get("site"):
            site, layer = str(c["site"]), c.get("layer", cfg.get("layer"))
            if "." not in site:
                check_choice("site", site, SITES)
                if layer is None:
                    raise ValueError(f"site={site!r} needs a 'layer' (or use 'blocks.<i>.{site}')")
                site = f"blocks.{int(layer)}.{site}"
            return site
    raise ValueError("cfg has no 'site' (e.g. site: blocks.2.resid_post)")


# ----------------------------------------------------------------------------- store
def model_hash(model) -> str:
    """Content hash of a model's parameters and buffers."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class ActivationStore:
    """Activations on disk (``acts.npy`` [n, d] float16/32, read by memmap) with
    the token id, sequence index and position of each row
    (``tokens.npy``/``seq.npy``/``pos.npy``) and ``meta.json``."""

    def __init__(self, path, ram_limit_bytes: int = 2**30):
        """Open the store at ``path``. Its files are checked against the checksum written with
        them (:func:`saelib.utils.verify_entry`, once per process); a damaged, truncated or
        unreadable store raises :class:`saelib.utils.CacheEntryError` (a ValueError) naming the file."""
        self.path = Path(path)
        verify_entry(self.path)
        try:
            self.meta = json.loads((self.path / "meta.json").read_text())
            self.acts = np.load(self.path / "acts.npy", mmap_mode="r")
            self.tokens, self.seq, self.pos = (np.load(self.path / f"{k}.npy", mmap_mode="r")
                                               for k in ("tokens", "seq", "pos"))
        except (OSError, ValueError, EOFError) as e:
            raise CacheEntryError(f"activation store {self.path} cannot be read: {e}") from e
        if not len(self.acts) == len(self.tokens) == self.meta.get("n", len(self.acts)):
            raise CacheEntryError(f"activation store {self.path}: acts.npy has {len(self.acts)} rows, "
                                  f"meta.json says {self.meta.get('n')}")
        self.ram_limit_bytes, self._ram = ram_limit_bytes, None

    d = property(lambda self: self.acts.shape[1])
    dtype = property(lambda self: str(self.acts.dtype))
    site = property(lambda self: self.meta["site"])

    def __len__(self):
        return self.acts.shape[0]

    def __repr__(self):
        return f"ActivationStore({len(self)} x {self.d} {self.dtype}, site={self.site!r}, path={str(self.path)!r})"

    def tensor(self) -> torch.Tensor:
        """All rows as one float32 tensor (refused when larger than ``ram_limit_bytes``)."""
        if len(self) * self.d * 4 > self.ram_limit_bytes:
            raise ValueError(f"the store ({len(self) * self.d * 4 / 2**20:.0f} MiB as float32) exceeds "
                             f"ram_limit_bytes={self.ram_limit_bytes}; use .batches() or .sample()")
        return torch.from_numpy(np.array(self.acts, dtype=np.float32))

    def sample(self, n: int, seed: int = 0, return_index: bool = False):
        """``n`` distinct random rows (float32), in random order."""
        check_positive_int("n", n)
        idx = np.random.default_rng(seed).choice(len(self), size=min(n, len(self)), replace=False)
        order = np.argsort(idx)
        out = np.empty((len(idx), self.d), np.float32)
        out[order] = self.acts[idx[order]]
        return (torch.from_numpy(out), torch.from_numpy(idx)) if return_index else torch.from_numpy(out)

    def batches(self, batch_size: int, shuffle: bool = True, seed: int = 0, device="cpu", drop_last: bool = True,
                epochs: int | None = 1):
        """Float32 batches [batch_size, d] on ``device``; ``epochs=None`` repeats forever.

        Shuffling is deterministic for ``seed`` (epoch e draws from a generator
        seeded by (seed, e)); batches are fresh tensors. When the
        store fits in ``ram_limit_bytes`` it is read once and fully permuted;
        otherwise contiguous chunks are read in random order, a few at a time,
        and rows are permuted within that buffer, so memory stays bounded.

        The buffer holds ``ram_limit_bytes // (8 d)`` rows (the profile's
        ``activations.buffer_tokens``, see :func:`source`) as 8 chunks from random places:
        consecutive batches until the next refill come from those 8 stretches of the store,
        i.e. from about ``buffer_rows / n_ctx`` documents. At the paper's size (d = 768,
        1 GiB) that is ~175k rows, ~21 batches of 8192 drawn from ~170 documents; a larger
        buffer mixes more documents at the cost of RAM, a smaller one saves RAM and
        correlates consecutive batches more."""
        check_positive_int("batch_size", batch_size)
        n, dev = len(self), resolve_device(device)
        if n < batch_size and drop_last:
            raise ValueError(f"batch_size={batch_size} is larger than the store ({n} rows) and drop_last=True")
        buf_rows = max(batch_size, self.ram_limit_bytes // (self.d * 8))
        if buf_rows >= n and self._ram is None:
            self._ram = np.array(self.acts)  # fits in RAM: read once, reused by every epoch and call
        whole = self._ram if buf_rows >= n else None
        chunk = max(batch_size, math.ceil(buf_rows / 8))  # ~8 chunks from random places per buffer
        per_buf = max(1, buf_rows // chunk)
        epoch = 0
        while epochs is None or epoch < epochs:
            rng = np.random.default_rng([seed, epoch])
            carry = np.zeros((0, self.d), self.acts.dtype)
            if whole is not None:
                groups = [[(0, n)]]
            else:
                starts = np.arange(0, n, chunk)
                if shuffle:
                    starts = rng.permutation(starts)
                spans = [(int(s), int(min(s + chunk, n))) for s in starts]
                groups = [spans[i:i + per_buf] for i in range(0, len(spans), per_buf)]
            for gi, group in enumerate(groups):
                buf = whole if whole is not None else np.concatenate([self.acts[a:b] for a, b in group])
                if len(carry):
                    buf = np.concatenate([carry, buf])
                order = rng.permutation(len(buf)) if shuffle else np.arange(len(buf))
                last = gi == len(groups) - 1
                stop = len(buf) if (last and not drop_last) else len(buf) // batch_size * batch_size
                for i in range(0, stop, batch_size):  # numpy gather of sorted rows: faster than torch's here
                    if dev.type == "cuda":            # page-locked gather, copied without blocking
                        yield _pinned_to(buf, np.sort(order[i:i + batch_size]) if shuffle
                                         else np.arange(i, min(i + batch_size, stop)), dev)
                        continue
                    rows = buf[np.sort(order[i:i + batch_size])] if shuffle else buf[i:i + batch_size].copy()
                    yield torch.from_numpy(rows).to(device=dev, dtype=torch.float32)
                carry = buf[np.sort(order[stop:])] if not last else carry[:0]
            epoch += 1


def _pinned_to(buf: np.ndarray, idx: np.ndarray, dev: torch.device) -> torch.Tensor:
    """``buf[idx]`` as float32 on the CUDA device ``dev``: gathered into page-locked memory and
    copied without blocking (as :func:`saelib.train._to_device`; the caching host allocator
    keeps the buffer until its copy is done), converted to float32 on the device."""
    host = torch.empty((len(idx), buf.shape[1]), dtype=torch.from_numpy(buf[:0]).dtype, pin_memory=True)
    np.take(buf, idx, axis=0, out=host.numpy(), mode="clip")   # idx is in range; "clip" skips a buffered copy
    return host.to(device=dev, non_blocking=True).to(torch.float32)


def _token_rows(tokens) -> torch.Tensor:
    if isinstance(tokens, torch.Tensor):
        return tokens.long().cpu()
    if isinstance(tokens, np.ndarray):
        return torch.from_numpy(tokens.astype(np.int64))
    from .data import token_array
    return torch.from_numpy(token_array(tokens))


def keep_mask(rows: torch.Tensor, bos: int | None, skip_bos: bool = True) -> torch.Tensor:
    """Which positions of ``rows`` [n_seq, n_ctx] (token ids) become activation rows: all of
    them, or with ``skip_bos`` every position but the first and every BOS token (their
    activations are outliers that act as an attention sink). Bool tensor [n_seq, n_ctx]."""
    keep = torch.ones_like(rows, dtype=torch.bool)
    if skip_bos:
        keep[:, 0] = False
        if bos is not None:
            keep &= rows != bos
    return keep


def plan_rows(counts: torch.Tensor, n_tokens: int, allow_repeat: bool = False, who: str = "collect"):
    """``(n_seq, n)``: a store of ``n_tokens`` rows takes the first ``n_seq`` sequences, whose
    kept positions (``counts`` [n_seq_total], from :func:`keep_mask`) hold ``n`` rows.

    When the tokens hold fewer than ``n_tokens`` kept positions this raises a ValueError
    (before any model runs) naming both numbers, unless ``allow_repeat=True``: then ``n`` is
    every available row, with a warning, and a trainer that asks for more rows repeats them
    (one epoch = one pass over the ``n`` rows)."""
    cum = counts.cumsum(0)
    total = int(cum[-1]) if len(cum) else 0
    if total >= n_tokens:
        return int(torch.searchsorted(cum, n_tokens).item()) + 1, n_tokens
    if not allow_repeat:
        raise ValueError(f"{who}: the tokens hold only {total} activation rows (< n_tokens={n_tokens}, from "
                         f"{len(counts)} sequences); give more documents (data.max_docs_per_domain), lower n_tokens, "
                         "or pass allow_repeat=True to use the available rows and repeat them in training")
    warnings.warn(f"{who}: only {total} activation rows available (< n_tokens={n_tokens}); using {total} "
                  "(allow_repeat=True: training repeats them)")
    return len(counts), total


STORE_DTYPES = ("float32", "float16")


def _check_store_dtype(dtype):
    if dtype == "bfloat16":
        raise ValueError("dtype='bfloat16' cannot be stored: numpy (the .npy memmap of the store) has no bfloat16; "
                         "use dtype='float16' (same 2 bytes per value, 3 more mantissa bits, range +-65504) or an "
                         "ActivationStream (activations.mode: stream), whose buffer may be bfloat16")
    check_choice("dtype", dtype, STORE_DTYPES)


@torch.inference_mode()
def collect(model, tokens, site: str, n_tokens: int, dtype: str = "float32", batch_size: int = 32, device="auto",
            ram_limit_bytes: int = 2**30, path=None, skip_bos: bool = True,
            allow_repeat: bool = False) -> ActivationStore:
    """Run ``model`` over ``tokens`` (tensor [n_seq, n_ctx] of ids, or a tokenized
    datasets split) and stream the site's activations of the first ``n_tokens``
    kept positions to an on-disk store (memmap, written in chunks, atomically).

    skip_bos: drop position 0 and every BOS token (its activations are outliers
    that act as an attention sink; :func:`keep_mask`). dtype: "float32" or "float16"
    (half the disk; |error| <= 2**-11 relative); "bfloat16" raises a ValueError (numpy
    has no bfloat16; see :func:`_check_store_dtype`). Tokens that hold fewer than
    ``n_tokens`` kept positions raise a ValueError before any work, unless
    ``allow_repeat=True`` (then the store holds the available rows; :func:`plan_rows`).
    Cached under ``cache_dir("activations")`` by a hash of model weights, tokens, site,
    n_tokens, dtype and skip_bos when ``path`` is None."""
    _check_store_dtype(dtype)
    check_positive_int("n_tokens", n_tokens)
    check_positive_int("batch_size", batch_size)
    rows = _token_rows(tokens)
    if rows.ndim != 2:
        raise ValueError(f"tokens must be 2-D [n_seq, n_ctx], got shape {tuple(rows.shape)}")
    resolve_site(model, site)  # validate before any work
    keep = keep_mask(rows, getattr(model.config, "bos_token_id", None), skip_bos)
    n_seq, n = plan_rows(keep.sum(1), n_tokens, allow_repeat, "collect")
    rows, keep = rows[:n_seq], keep[:n_seq]
    key = config_hash({"model": model_hash(model), "tokens": hashlib.sha256(rows.numpy().tobytes()).hexdigest(),
                       "site": site, "n_tokens": n_tokens, "dtype": dtype, "skip_bos": skip_bos, "v": STORE_VERSION})
    path = Path(path) if path is not None else cache_dir("activations") / key
    with entry_lock(path):          # a second process waits, then reads what the first wrote
        if usable_entry(path, "activation store"):
            try:
                if json.loads((path / "meta.json").read_text()).get("key") == key:
                    return ActivationStore(path, ram_limit_bytes)
            except (OSError, ValueError) as e:   # an entry from before checksums that does not load
                warnings.warn(f"activation store {path} cannot be loaded ({e}); removing it and rebuilding")
                discard_entry(path)
        _collect(model, rows, keep, site, n, n_tokens, dtype, batch_size, device, path, key, n_seq, skip_bos)
    return ActivationStore(path, ram_limit_bytes)


DISK_MARGIN = 1.05   # free space needed: the store's size times this


def _check_space(folder: Path, need: int) -> None:
    free = shutil.disk_usage(folder).free
    if need * DISK_MARGIN > free:
        raise OSError(errno.ENOSPC, f"collect: the activation store needs {need / 2**20:.1f} MiB in {folder} but "
                                    f"only {free / 2**20:.1f} MiB are free on that disk; free some space, or point "
                                    "$SAELIB_CACHE (or path=) at a larger disk, or lower n_tokens")


def _preallocate(file: Path, folder: Path, need: int) -> None:
    """Reserve the blocks of a memmapped file now, so a full disk is an OSError here and
    not a SIGBUS when a page of the mapping is written."""
    try:
        with open(file, "r+b") as fh:
            os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"collect: the disk holding {folder} is full (the activation store needs "
                                        f"{need / 2**20:.1f} MiB); the partial store was removed") from e
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    except AttributeError:   # no posix_fallocate on this platform
        pass


def _collect(model, rows, keep, site, n, n_tokens, dtype, batch_size, device, path, key, n_seq, skip_bos):
    """Write the store (see :func:`collect`); the caller holds the entry lock."""
    p0 = next(model.parameters())
    dev = p0.device if device == "auto" else resolve_device(device)
    if dev != p0.device:
        model.to(dev)
    was_training, _ = model.training, model.eval()
    with atomic_path(path) as tmp:
        tmp.mkdir()
        acts = tok = sq = ps = None
        w = 0
        for i in progress(range(0, len(rows), batch_size), desc=f"collect {site}", unit="batch"):
            x, k = rows[i:i + batch_size], keep[i:i + batch_size]
            a = run_to_site(model, x.to(dev), site).float().cpu()
            if acts is None:
                need = n * a.shape[-1] * np.dtype(dtype).itemsize + 3 * n * 4 + 4096 * 4
                _check_space(tmp, need)
                acts = np.lib.format.open_memmap(tmp / "acts.npy", "w+", np.dtype(dtype), (n, a.shape[-1]))
                tok, sq, ps = (np.lib.format.open_memmap(tmp / f"{f}.npy", "w+", np.int32, (n,))
                               for f in ("tokens", "seq", "pos"))
                for f in ("acts", "tokens", "seq", "pos"):
                    _preallocate(tmp / f"{f}.npy", path.parent, need)
            m = min(int(k.sum()), n - w)
            s_idx, p_idx = k.nonzero(as_tuple=True)
            s_idx, p_idx = s_idx[:m], p_idx[:m]
            acts[w:w + m] = a[s_idx, p_idx].numpy().astype(dtype, copy=False)
            tok[w:w + m], sq[w:w + m], ps[w:w + m] = x[s_idx, p_idx].numpy(), (s_idx + i).numpy(), p_idx.numpy()
            w += m
        for arr in (acts, tok, sq, ps):
            arr.flush()
        del acts, tok, sq, ps
        meta = {"key": key, "site": site, "n": n, "n_tokens_requested": n_tokens, "dtype": dtype,
                "skip_bos": skip_bos, "n_seq": n_seq, "n_ctx": rows.shape[1],
                "model": getattr(model, "name_or_path", "") or type(model).__name__, "version": STORE_VERSION}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    model.train(was_training)


# ----------------------------------------------------------------------------- store or stream
MODES = ("store", "stream")


def source(cfg: dict, model, tokens, n_tokens: int | None = None, *, site: str | None = None, device=None,
           allow_repeat: bool | None = None, **kw):
    """Training activations as the profile says: ``cfg["activations"]["mode"]`` "store"
    (:func:`collect`, an on-disk :class:`ActivationStore`) or "stream"
    (:class:`saelib.stream.ActivationStream`, computed on the fly, nothing on disk).
    Both serve the same rows (first ``n_tokens`` kept positions of ``tokens``) through the
    same interface, so ``train.fit`` / ``sweep.sweep`` take either.

    From the profile: ``site`` (:func:`activation_site`), ``device``, ``activations.n_tokens``
    (when ``n_tokens`` is None), ``activations.dtype``, ``activations.allow_repeat`` (default
    False: too few tokens raise a ValueError before any work) and
    ``activations.buffer_tokens``: the stream's mixing buffer in rows, or for a store the
    rows its shuffle buffer holds (``ram_limit_bytes = buffer_tokens * d * 8``: contiguous
    chunks of ``buffer_tokens / 8`` rows, 8 per buffer, are read in random order and permuted
    together; null keeps the store's 1 GiB default). Larger buffers mix rows of more
    documents per batch and cost RAM (store) or device memory (stream:
    ``buffer_tokens * d * itemsize``). ``kw`` goes to :func:`collect` / the stream
    (e.g. ``batch_size`` / ``model_batch_size``, ``path``)."""
    acts = cfg.get("activations") or {}
    mode = acts.get("mode", "store")
    check_choice("activations.mode", mode, MODES)
    site = site or activation_site(cfg)
    n_tokens = int(acts["n_tokens"] if n_tokens is None else n_tokens)
    device = device or cfg.get("device") or "auto"
    allow_repeat = bool(acts.get("allow_repeat", False)) if allow_repeat is None else allow_repeat
    dtype = kw.pop("dtype", acts.get("dtype", "float32"))
    buf = acts.get("buffer_tokens")
    if mode == "stream":
        from .stream import ActivationStream
        if buf is not None:
            kw.setdefault("buffer_tokens", int(buf))
        return ActivationStream(model, tokens, site, n_tokens, dtype=dtype, device=device,
                                allow_repeat=allow_repeat, **kw)
    store = collect(model, tokens, site, n_tokens, dtype=dtype, device=device, allow_repeat=allow_repeat, **kw)
    if buf is not None:
        store.ram_limit_bytes = int(buf) * store.d * 8
    return store
