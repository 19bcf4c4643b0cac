"""Activations computed on the fly: the subject model runs while the SAE trains.

An :class:`ActivationStream` is the no-disk twin of
:class:`saelib.activations.ActivationStore`. It holds the same rows a store of the
same ``tokens``, ``site``, ``n_tokens`` and ``skip_bos`` would hold (the first
``n_tokens`` kept positions, sequences in order, :func:`saelib.activations.keep_mask`),
but computes them with the model at every pass instead of reading a memmap, so an
820M-token run at d = 768 needs a buffer of a few GB instead of a 1.26 TB store
(the ``paper`` profile, ``activations.mode: stream``).

Shuffling follows SAELens's mixing buffer (``sae_lens/training/mixing_buffer.py``:
fill a buffer of ``buffer_size`` activations, permute it, serve half of it as
batches, keep the other half and refill), with one change that keeps memory at one
buffer: served rows are not cut out and concatenated; their slots are refilled in
place by the next activations, so the buffer is one preallocated tensor
``[buffer_tokens, d]`` on the model's device. Like EleutherAI's sparsify (which
"does not cache activations on disk, but rather computes them on-the-fly") the
model forward runs in the training process, on the same device; unlike sparsify,
which trains on each forward batch as it comes, rows are mixed across
``buffer_tokens / n_ctx`` sequences first (sequence order itself is permuted per
epoch), so one batch never holds a single document's correlated tokens.

Trade-off of ``buffer_tokens``: a batch mixes rows of about ``buffer_tokens / n_ctx``
sequences; memory is ``buffer_tokens * d * itemsize(dtype)`` bytes on the device.
The duck-typed interface of the store (``batches``, ``sample``, ``len``, ``d``,
``meta["key"]``) makes :func:`saelib.train.fit` and :func:`saelib.sweep.sweep`
accept a stream unchanged.

Nothing of a stream is written to disk, also not when :func:`saelib.sweep.sweep` trains
SAEs on it in worker processes: :meth:`ActivationStream.portable` hands a worker the model
by its name (a saved folder or hub name, when that loads the same weights) or else through
shared memory, the tokens as the memory-mapped ``datasets`` split they came from or through
shared memory, and the plan of rows, so each worker rebuilds the stream without a copy.
"""
from __future__ import annotations

import hashlib
import mmap
import weakref
from pathlib import Path

import numpy as np
import torch

from .activations import STORE_VERSION, keep_mask, model_hash, plan_rows, resolve_site, run_to_site
from .utils import check_choice, check_positive_int, config_hash, resolve_device

STREAM_DTYPES = ("float32", "float16", "bfloat16")
_TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_LIVE: dict[str, weakref.ref] = {}        # key -> stream of this process (from_portable here returns it)


class _Rows:
    """Token rows [n_seq, n_ctx] read in slices, never copied whole: a tensor, an ndarray
    (also a ``np.memmap``) or a tokenized ``datasets`` split (its memory-mapped arrow column)."""

    def __init__(self, tokens):
        if isinstance(tokens, (torch.Tensor, np.ndarray)):
            self._arr, self._col = tokens, None
            if tokens.ndim != 2:
                raise ValueError(f"tokens must be 2-D [n_seq, n_ctx], got shape {tuple(tokens.shape)}")
            self.n, self.n_ctx = int(tokens.shape[0]), int(tokens.shape[1])
        else:
            self._ds = tokens
            self._arr, self._col = None, tokens.with_format("arrow")["input_ids"]
            self.n = len(self._col)
            first = self._col.slice(0, 1).to_pylist() if self.n else [[]]
            self.n_ctx = len(first[0])

    def __len__(self):
        return self.n

    def portable(self, n_seq: int):
        """A picklable reference to the first ``n_seq`` rows that copies nothing to disk:
        a ``datasets`` split itself (it pickles as the paths of its memory-mapped arrow files),
        a ``np.memmap`` as ``(file, dtype, shape, offset, order)``, a tensor / array as a copy
        of those rows in the smallest integer dtype that holds them (:func:`_narrow_int`),
        pickled through shared memory by torch's multiprocessing pickler."""
        if self._col is not None:
            return ("dataset", self._ds)
        a = self._arr
        if (isinstance(a, np.memmap) and isinstance(a.base, mmap.mmap) and a.filename is not None
                and (a.flags.c_contiguous or a.flags.f_contiguous)):   # the mapping itself, not a view of it
            return ("memmap", a.filename, a.dtype.str, a.shape, int(a.offset), "C" if a.flags.c_contiguous else "F")
        part = a[:n_seq].detach().cpu() if isinstance(a, torch.Tensor) else torch.from_numpy(np.array(a[:n_seq]))
        return ("tensor", part.to(_narrow_int(part)).contiguous())

    def take(self, idx) -> torch.Tensor:
        """Rows ``idx`` (a slice or an int array) as an int64 CPU tensor [len(idx), n_ctx]."""
        if self._col is None:
            a = self._arr[idx]
            return a.long().cpu() if isinstance(a, torch.Tensor) else torch.from_numpy(np.array(a, np.int64))
        if isinstance(idx, slice):
            part = self._col.slice(idx.start, idx.stop - idx.start)
        else:
            part = self._col.take(np.asarray(idx, np.int64))
        if hasattr(part, "combine_chunks"):
            part = part.combine_chunks()
        flat = part.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        return torch.from_numpy(flat.reshape(-1, self.n_ctx))


def _narrow_int(t: torch.Tensor) -> torch.dtype:
    """The smallest integer dtype that holds the values of ``t`` (token ids: uint16 for GPT-2's
    50257, a quarter of int64)."""
    if t.numel() == 0 or t.is_floating_point():
        return t.dtype
    lo, hi = int(t.min()), int(t.max())
    for dt in (torch.uint8, torch.uint16, torch.int32):
        info = torch.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return dt
    return torch.int64


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


class ActivationStream:
    """Shuffled activation batches computed by ``model`` while training reads them.

    ``ActivationStream(model, tokens, site, n_tokens, ...)``:

    * ``tokens``: token ids [n_seq, n_ctx] (tensor, ndarray or memmap) or a tokenized
      ``datasets`` split (read in slices of its arrow column);
    * ``site``: a site name (:func:`saelib.activations.resolve_site`);
    * ``n_tokens``: rows per epoch, the first ``n_tokens`` kept positions (as a store's);
      fewer available raise a ValueError before any model runs unless ``allow_repeat``
      (:func:`saelib.activations.plan_rows`);
    * ``buffer_tokens``: rows of the mixing buffer (memory bound: the buffer tensor is
      ``[buffer_tokens, d]`` of ``dtype`` on the model's device); must be >= 2 x every
      ``batch_size`` asked of :meth:`batches`;
    * ``dtype``: the buffer's dtype, "float32" | "float16" | "bfloat16" (batches are float32);
    * ``device``: where the model runs and the buffer lives ("auto": CUDA when present);
    * ``model_batch_size``: sequences per forward pass (memory of one forward; does not
      change the rows or their order).

    Another process gets the stream from :meth:`portable` (what :func:`saelib.sweep.sweep`
    sends its workers; nothing is written to disk). Raises ValueError for bad arguments, a
    bad site or too few tokens, before any model runs."""

    def __init__(self, model, tokens=None, site: str | None = None, n_tokens: int | None = None, *,
                 buffer_tokens: int = 2**18, dtype: str = "float32", device="auto", skip_bos: bool = True,
                 model_batch_size: int = 32, allow_repeat: bool = False):
        if isinstance(model, (str, Path)):
            raise ValueError(f"ActivationStream({str(model)!r}): a stream is not reopened from a folder any more "
                             "(nothing is written to disk); pass the model and tokens, or hand it to another "
                             "process with stream.portable()")
        if tokens is None or site is None or n_tokens is None:
            raise ValueError("ActivationStream(model, tokens, site, n_tokens, ...) needs tokens, site and n_tokens")
        check_positive_int("n_tokens", n_tokens)
        check_positive_int("buffer_tokens", buffer_tokens)
        check_positive_int("model_batch_size", model_batch_size)
        check_choice("dtype", dtype, STREAM_DTYPES)
        resolve_site(model, site)                          # validate before any work
        self.model, self.site, self.dtype, self.skip_bos = model, site, dtype, skip_bos
        self.buffer_tokens, self.model_batch_size = int(buffer_tokens), int(model_batch_size)
        self.device = resolve_device(device)
        self._source = _Rows(tokens)
        bos = getattr(getattr(model, "config", None), "bos_token_id", None)
        self._bos = bos
        self._model_hash, self._model_ref, self._tokens_ref = model_hash(model), None, None
        counts, h = [], hashlib.sha256()
        step = 4096
        for i in range(0, len(self._source), step):        # kept positions per sequence, in slices
            x = self._source.take(slice(i, min(i + step, len(self._source))))
            counts.append(keep_mask(x, bos, skip_bos).sum(1))
        counts = torch.cat(counts) if counts else torch.zeros(0, dtype=torch.long)
        self.n_seq, self.n = plan_rows(counts, n_tokens, allow_repeat, "ActivationStream")
        self.allow_repeat = bool(allow_repeat)   # False: a run longer than the stream is refused (sweep.train_sae)
        for i in range(0, self.n_seq, step):               # the same digest as collect's (int64 rows)
            h.update(self._source.take(slice(i, min(i + step, self.n_seq))).numpy().tobytes())
        counts = counts[:self.n_seq]
        before = counts.cumsum(0) - counts
        self._used = (self.n - before).clamp(0).minimum(counts)   # rows taken from each sequence
        self._start = before.clamp(max=self.n)                     # store-order index of its first row
        self.meta = {"key": config_hash({"model": self._model_hash, "tokens": h.hexdigest(), "site": site,
                                         "n_tokens": n_tokens, "dtype": dtype, "skip_bos": skip_bos,
                                         "buffer_tokens": self.buffer_tokens, "mode": "stream",
                                         "v": STORE_VERSION}),
                     "site": site, "n": self.n, "n_tokens_requested": n_tokens, "dtype": dtype,
                     "skip_bos": skip_bos, "n_seq": self.n_seq, "n_ctx": self._source.n_ctx,
                     "buffer_tokens": self.buffer_tokens, "mode": "stream",
                     "model": getattr(model, "name_or_path", "") or type(model).__name__, "version": STORE_VERSION}
        self._d, self.peak_buffer_rows = None, 0
        _LIVE[self.meta["key"]] = weakref.ref(self)

    # ------------------------------------------------------------------ interface of a store
    def __len__(self):
        return self.n

    def __repr__(self):
        return (f"ActivationStream({self.n} x {self.d} {self.dtype}, site={self.site!r}, "
                f"buffer_tokens={self.buffer_tokens}, device={str(self.device)!r})")

    @property
    def d(self) -> int:
        """Width of the site's activations (one forward pass of one sequence, once)."""
        if self._d is None:
            self._d = int(self._forward(self._source.take(slice(0, 1))).shape[-1])
        return self._d

    @torch.no_grad()   # not inference_mode: batches feed autograd in train.fit
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        p0 = next(m.parameters(), None)
        if p0 is not None and p0.device != self.device:
            m.to(self.device)
        was_training = m.training
        m.eval()
        try:
            return run_to_site(m, x.to(self.device), self.site)
        finally:
            m.train(was_training)

    def _rows_of(self, seqs: np.ndarray):
        """Activations of the used kept positions of sequences ``seqs``, in (sequence, position)
        order, as ``dtype`` on the device; yielded per forward pass."""
        for i in range(0, len(seqs), self.model_batch_size):
            s = seqs[i:i + self.model_batch_size]
            x = self._source.take(s)
            keep = keep_mask(x, self._bos, self.skip_bos)
            keep &= keep.cumsum(1) <= self._used[torch.from_numpy(np.asarray(s, np.int64))][:, None]
            a = self._forward(x)
            yield a[keep.to(a.device)].to(_TORCH_DTYPE[self.dtype])

    def batches(self, batch_size: int, shuffle: bool = True, seed: int = 0, device="cpu", drop_last: bool = True,
                epochs: int | None = 1):
        """Float32 batches [batch_size, d] on ``device``; ``epochs=None`` repeats forever.

        One epoch runs the model over the ``n_seq`` sequences (in an order drawn from
        ``(seed, epoch)`` when ``shuffle``) and serves each of the ``n`` rows once. With
        ``shuffle`` the rows pass through the mixing buffer (``buffer_tokens`` rows, filled,
        permuted by a generator seeded from ``(seed, epoch)``, half served, the served slots
        refilled; at the end of the epoch the rest is permuted and served): the same seed
        gives the same batches. Without ``shuffle`` rows come in store order. Batches stay
        on the model's device until moved to ``device`` (no host copy from CUDA to CUDA).
        Raises ValueError when ``2 * batch_size > buffer_tokens`` (shuffle) or
        ``batch_size > n`` with ``drop_last``."""
        check_positive_int("batch_size", batch_size)
        dev = resolve_device(device)
        if batch_size > self.n and drop_last:
            raise ValueError(f"batch_size={batch_size} is larger than the stream ({self.n} rows) and drop_last=True")
        if shuffle and 2 * batch_size > self.buffer_tokens:
            raise ValueError(f"batch_size={batch_size} needs buffer_tokens >= {2 * batch_size} (the mixing buffer "
                             f"serves half of its {self.buffer_tokens} rows per refill)")
        epoch = 0
        while epochs is None or epoch < epochs:
            order = np.arange(self.n_seq)
            if shuffle:
                order = np.random.default_rng([seed, epoch]).permutation(self.n_seq)
            order = order[self._used.numpy()[order] > 0]
            src = self._rows_of(order)
            it = self._mixed(src, batch_size, _seed(seed, epoch), drop_last) if shuffle else \
                self._ordered(src, batch_size, drop_last)
            for b in it:
                yield b.to(device=dev, dtype=torch.float32)
            epoch += 1

    def _ordered(self, src, batch_size, drop_last):
        pend = None
        for a in src:
            pend = a if pend is None else torch.cat([pend, a])
            stop = len(pend) // batch_size * batch_size
            for i in range(0, stop, batch_size):
                yield pend[i:i + batch_size]
            pend = pend[stop:]
        if pend is not None and len(pend) and not drop_last:
            yield pend

    def _mixed(self, src, batch_size, seed, drop_last):
        """The mixing buffer: one tensor [buffer_tokens, d]; ``free`` lists the slots to fill next."""
        g = torch.Generator().manual_seed(seed)
        cap, buf, m = self.buffer_tokens, None, 0        # m: occupied slots
        free = None                                      # slot indices to fill, in order
        for a in src:
            j = 0
            while j < len(a):
                if buf is None:
                    buf = torch.empty((cap, a.shape[1]), dtype=a.dtype, device=a.device)
                    free = torch.arange(cap, device=a.device)
                t = min(len(free), len(a) - j)
                buf[free[:t]] = a[j:j + t]
                free, m, j = free[t:], m + t, j + t
                self.peak_buffer_rows = max(self.peak_buffer_rows, m)
                if len(free) == 0:                       # full: permute, serve half, refill those slots
                    perm = torch.randperm(cap, generator=g).to(buf.device)
                    serve = max(batch_size, cap // 2 // batch_size * batch_size)
                    for i in range(0, serve, batch_size):
                        yield buf[perm[i:i + batch_size]]
                    free, m = perm[:serve], cap - serve
        if buf is None:
            return
        occupied = torch.ones(cap, dtype=torch.bool, device=buf.device)
        occupied[free] = False
        slots = occupied.nonzero().squeeze(1)
        slots = slots[torch.randperm(len(slots), generator=g).to(buf.device)]
        stop = len(slots) if not drop_last else len(slots) // batch_size * batch_size
        for i in range(0, stop, batch_size):
            yield buf[slots[i:i + batch_size]]

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0, return_index: bool = False):
        """``n`` distinct random rows (float32 [min(n, len), d], CPU), in random order: the rows
        :meth:`ActivationStore.sample` with the same seed returns from a store of the same
        tokens (indices in store order, drawn by ``np.random.default_rng(seed)``). Runs the
        model on the sequences that hold them (at most ``n`` sequences)."""
        check_positive_int("n", n)
        idx = np.random.default_rng(seed).choice(self.n, size=min(n, self.n), replace=False)
        start = self._start.numpy()
        seq = np.searchsorted(start, idx, side="right") - 1   # the last of equal starts: the one with rows
        rank = idx - start[seq]
        out = torch.empty((len(idx), self.d), dtype=torch.float32)
        uniq = np.unique(seq)
        for i in range(0, len(uniq), self.model_batch_size):
            s = uniq[i:i + self.model_batch_size]
            x = self._source.take(s)
            keep = keep_mask(x, self._bos, self.skip_bos)
            a = self._forward(x).to(_TORCH_DTYPE[self.dtype]).float().cpu()
            sel = np.nonzero(np.isin(seq, s))[0]
            r = torch.from_numpy(np.searchsorted(s, seq[sel]))
            want = torch.from_numpy(rank[sel] + 1)[:, None]
            pos = (keep[r] & (keep[r].cumsum(1) == want)).int().argmax(1)
            out[torch.from_numpy(sel)] = a[r, pos]
        return (out, torch.from_numpy(idx)) if return_index else out

    # ------------------------------------------------------------------ handing the stream to another process
    def portable(self):
        """``(opener, state)``: what a worker process needs to rebuild this stream,
        ``opener(state)`` (:meth:`from_portable`), picklable, with nothing written to disk.
        :func:`saelib.sweep.sweep` sends it to its worker processes.

        * The model travels by name when it has one (``name_or_path``: a saved model folder
          such as the subject model's cache entry, or a hub name) and loading that name gives
          the same weights (checked once here by :func:`saelib.activations.model_hash`, and
          again in the worker); otherwise the module itself is pickled, its tensors through
          shared memory (torch's multiprocessing pickler: no copy on disk, none per worker).
        * The tokens travel as they came: a tokenized ``datasets`` split by its memory-mapped
          arrow files, a ``np.memmap`` by its file name, a tensor / array as a copy of only the
          ``n_seq`` rows the stream reads, in the smallest integer dtype that holds them (uint16
          for GPT-2's vocabulary: 1.6 GB for the paper's 820M tokens, made once per stream),
          through shared memory (``/dev/shm``, RAM).
        * The plan (rows per sequence, the key, the site's width) is sent, not recomputed, so a
          worker does not rescan the corpus. In this process :meth:`from_portable` returns
          this very stream."""
        if self._model_ref is None:          # once per stream: every sweep reuses the same references
            self._model_ref = _model_ref(self.model, self._model_hash)
            self._tokens_ref = self._source.portable(self.n_seq)
        state = {k: getattr(self, k) for k in _STATE}
        state.update(model=self._model_ref, tokens=self._tokens_ref)
        return ActivationStream.from_portable, state

    @classmethod
    def from_portable(cls, state: dict) -> ActivationStream:
        """The stream :meth:`portable` describes (the live one when it exists in this process)."""
        live = _LIVE.get(state["meta"]["key"], lambda: None)()
        if live is not None:
            return live
        kind, ref = state["model"][0], state["model"][1]
        if kind == "name":
            model = _load_named(ref)
            if model_hash(model) != state["model"][2]:
                raise ValueError(f"activation stream: the model {ref!r} loaded in this process has other weights "
                                 f"than the stream's model (hash {state['model'][2]})")
        else:
            model = ref
        self = cls.__new__(cls)
        self.__dict__.update({k: state[k] for k in _STATE})
        self.model, self._source = model, _Rows(_open_tokens(state["tokens"]))
        self._model_hash = state["model"][2]
        self._model_ref, self._tokens_ref, self.peak_buffer_rows = state["model"], state["tokens"], 0
        _LIVE[self.meta["key"]] = weakref.ref(self)
        return self


_STATE = ("site", "dtype", "skip_bos", "buffer_tokens", "model_batch_size", "device", "_bos", "n_seq", "n",
          "_used", "_start", "meta", "_d")


def _load_named(name):
    from .lm import load_model

    return load_model(name, "cpu")


def _model_ref(model, digest: str):
    """``("name", name_or_path, hash)`` when loading that name gives weights of hash ``digest``,
    else ``("module", model, hash)`` (pickled; its tensors go through shared memory)."""
    name = str(getattr(model, "name_or_path", "") or "")
    if name:
        try:
            if model_hash(_load_named(name)) == digest:
                return ("name", name, digest)
        except (OSError, ValueError, RuntimeError):   # not loadable here (offline hub, a removed folder)
            pass
    return ("module", model, digest)


def _open_tokens(ref):
    kind = ref[0]
    if kind == "memmap":
        _, file, dtype, shape, offset, order = ref
        return np.memmap(file, dtype=np.dtype(dtype), mode="r", shape=tuple(shape), offset=offset, order=order)
    return ref[1]
