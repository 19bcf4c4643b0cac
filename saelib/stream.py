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
"""
from __future__ import annotations

import hashlib
import json
import weakref
from pathlib import Path

import numpy as np
import torch

from .activations import STORE_VERSION, keep_mask, model_hash, plan_rows, resolve_site, run_to_site
from .utils import (atomic_path, cache_dir, check_choice, check_positive_int, config_hash, entry_lock, resolve_device,
                    usable_entry)

STREAM_DTYPES = ("float32", "float16", "bfloat16")
_TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_LIVE: dict[str, weakref.ref] = {}        # key -> stream of this process (a reopen by path reuses its model)


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
            self._arr, self._col = None, tokens.with_format("arrow")["input_ids"]
            self.n = len(self._col)
            first = self._col.slice(0, 1).to_pylist() if self.n else [[]]
            self.n_ctx = len(first[0])

    def __len__(self):
        return self.n

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

    Also ``ActivationStream(path)``: reopen a stream from the folder its :attr:`path` wrote
    (what :func:`saelib.sweep.sweep` does in worker processes). Raises ValueError for bad
    arguments, a bad site or too few tokens, before any model runs."""

    def __init__(self, model, tokens=None, site: str | None = None, n_tokens: int | None = None, *,
                 buffer_tokens: int = 2**18, dtype: str = "float32", device="auto", skip_bos: bool = True,
                 model_batch_size: int = 32, allow_repeat: bool = False, ram_limit_bytes=None):
        if isinstance(model, (str, Path)):   # reopen; ram_limit_bytes is what sweep passes to a store: unused
            self._reopen(Path(model), device)
            return
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
        counts, h = [], hashlib.sha256()
        step = 4096
        for i in range(0, len(self._source), step):        # kept positions per sequence, in slices
            x = self._source.take(slice(i, min(i + step, len(self._source))))
            counts.append(keep_mask(x, bos, skip_bos).sum(1))
        counts = torch.cat(counts) if counts else torch.zeros(0, dtype=torch.long)
        self.n_seq, self.n = plan_rows(counts, n_tokens, allow_repeat, "ActivationStream")
        for i in range(0, self.n_seq, step):               # the same digest as collect's (int64 rows)
            h.update(self._source.take(slice(i, min(i + step, self.n_seq))).numpy().tobytes())
        counts = counts[:self.n_seq]
        before = counts.cumsum(0) - counts
        self._used = (self.n - before).clamp(0).minimum(counts)   # rows taken from each sequence
        self._start = before.clamp(max=self.n)                     # store-order index of its first row
        self.meta = {"key": config_hash({"model": model_hash(model), "tokens": h.hexdigest(), "site": site,
                                         "n_tokens": n_tokens, "dtype": dtype, "skip_bos": skip_bos,
                                         "buffer_tokens": self.buffer_tokens, "mode": "stream",
                                         "v": STORE_VERSION}),
                     "site": site, "n": self.n, "n_tokens_requested": n_tokens, "dtype": dtype,
                     "skip_bos": skip_bos, "n_seq": self.n_seq, "n_ctx": self._source.n_ctx,
                     "buffer_tokens": self.buffer_tokens, "mode": "stream",
                     "model": getattr(model, "name_or_path", "") or type(model).__name__, "version": STORE_VERSION}
        self._d, self._path, self.peak_buffer_rows = None, None, 0
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

    # ------------------------------------------------------------------ reopening in another process
    @property
    def path(self) -> Path:
        """A cache folder (``cache_dir("streams")/<key>``) holding what another process needs
        to rebuild this stream: the pickled model (``model.pt``), the ``n_seq`` token rows
        (``tokens.npy``) and ``spec.json``. Written on first access (atomically); it is how
        :func:`saelib.sweep.sweep` hands the stream to its worker processes."""
        if self._path is None:
            path = cache_dir("streams") / self.meta["key"]
            with entry_lock(path):
                if not usable_entry(path, "activation stream"):
                    with atomic_path(path) as tmp:
                        tmp.mkdir()
                        torch.save(self.model, tmp / "model.pt")
                        out = np.lib.format.open_memmap(tmp / "tokens.npy", "w+", np.int64,
                                                        (self.n_seq, self._source.n_ctx))
                        for i in range(0, self.n_seq, 4096):      # in slices: never the whole corpus in RAM
                            out[i:i + 4096] = self._source.take(slice(i, min(i + 4096, self.n_seq))).numpy()
                        out.flush()
                        del out
                        spec = dict(site=self.site, n_tokens=self.meta["n_tokens_requested"],
                                    buffer_tokens=self.buffer_tokens, dtype=self.dtype, skip_bos=self.skip_bos,
                                    model_batch_size=self.model_batch_size, allow_repeat=True)
                        (tmp / "spec.json").write_text(json.dumps({"spec": spec, "meta": self.meta}, indent=1))
            self._path = path
        return self._path

    def _reopen(self, path: Path, device):
        spec = json.loads((path / "spec.json").read_text())
        key = spec["meta"]["key"]
        live = _LIVE.get(key, lambda: None)()
        if live is not None:                              # same process: share the model, no reload
            self.__dict__.update(live.__dict__)
            return
        model = torch.load(path / "model.pt", map_location="cpu", weights_only=False)
        tokens = np.load(path / "tokens.npy", mmap_mode="r")
        self.__init__(model, tokens, device=device, **spec["spec"])
        if self.meta["key"] != key:
            raise ValueError(f"activation stream {path}: rebuilt key {self.meta['key']} != saved {key}")
        self._path = path
