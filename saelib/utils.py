"""Shared plumbing: the cache directory, config hashing, atomic writes,
device and seed handling, and progress bars that stay quiet in CI."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir(*parts: str) -> Path:
    """The cache root (``$SAELIB_CACHE``, default ``.cache/saelib`` in the repo),
    or a sub-folder of it, created if missing; a sub-folder is first cleared of the
    temp leftovers of killed writes (:func:`clean_stale`)."""
    root = Path(os.environ.get("SAELIB_CACHE", REPO_ROOT / ".cache" / "saelib")).expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    if parts:
        clean_stale(path)   # leftovers of killed writes (only where no live writer holds the lock)
    return path


def config_hash(cfg, n: int = 12) -> str:
    """A short stable hash of a JSON-able config (key order does not matter)."""
    blob = json.dumps(cfg, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


# ---------------------------------------------------------------------------
# cache entries: locks, atomic replacement, checksums, stale temp folders
# ---------------------------------------------------------------------------
STALE_AFTER = 300.0                       # seconds without a change before a temp leftover may be removed
CHECKSUM_FILE = ".saelib-checksum.json"   # inside a directory entry; a file entry gets .<name>.xxh3 beside it
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?:[a-z0-9_]{8}\.tmp|old)$")
_verified: dict[str, tuple] = {}          # entries verified by this process: path -> manifest stat


class CacheEntryError(ValueError):
    """A cache entry is damaged (checksum mismatch, missing or truncated file). The message names the file."""


def _lock_path(path: Path) -> Path:
    """The lock file of entry ``path``: in ``<cache root>/.locks/`` (not beside the entry, so a
    cache folder lists only entries), named by a hash of the entry's absolute path."""
    root = Path(os.environ.get("SAELIB_CACHE", REPO_ROOT / ".cache" / "saelib")).expanduser() / ".locks"
    root.mkdir(parents=True, exist_ok=True)
    full = str(Path(path).expanduser().absolute())
    return root / f"{Path(path).name[:40]}-{hashlib.sha256(full.encode()).hexdigest()[:16]}.lock"


@contextlib.contextmanager
def entry_lock(path: str | os.PathLike, timeout: float = -1):
    """Hold the inter-process lock of cache entry ``path`` (a ``filelock.FileLock`` in
    ``<cache root>/.locks/``, named by a hash of the entry's absolute path; re-entrant within
    a process). Wrap "check the entry, build it if missing, write it" in it: a second
    process waits, then finds the entry and reads it instead of building it again.
    ``timeout`` seconds (-1: wait for ever); a timeout raises ``filelock.Timeout``. Entries
    inside a private ``*.tmp`` folder are not locked."""
    path = Path(path)
    if path.parent.name.endswith(".tmp"):
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = _file_lock(path)
    lock.acquire(timeout=timeout)
    try:
        yield path
    finally:
        lock.release()


def _file_lock(path: Path):
    """The process-wide (singleton, re-entrant) ``FileLock`` of entry ``path``."""
    import filelock

    return filelock.FileLock(str(_lock_path(Path(path))), is_singleton=True)


def _lock_is_free(path: Path) -> bool:
    """True when no live process holds ``path``'s entry lock (checked without waiting)."""
    import filelock

    lock = _file_lock(path)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        return False
    lock.release()
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _idle_seconds(p: Path) -> float:
    """Seconds since anything in ``p`` (a file or folder tree) was last modified."""
    import time

    try:
        stamps = [p.lstat().st_mtime] + ([q.lstat().st_mtime for q in p.rglob("*")] if p.is_dir() else [])
    except FileNotFoundError:
        return 0.0
    return time.time() - max(stamps)


def clean_stale(folder: str | os.PathLike, name: str | None = None, min_idle: float | None = None) -> list[Path]:
    """Remove the temp folders (``.<name>.<random>.tmp``) and ``.<name>.old`` leftovers of
    writes that were killed, in ``folder`` (only those of entry ``name`` if given). A
    leftover is removed only while its entry's lock is free, i.e. no live process is
    writing it (every :func:`atomic_path` write holds the lock), and, as a second guard
    for writers that do not lock, only when nothing in it changed for ``min_idle``
    seconds (default :data:`STALE_AFTER`). :func:`cache_dir` calls it for the folder it
    returns; :func:`atomic_path` for the entry it writes, with ``min_idle=0`` (it holds that
    entry's lock, so a rerun after a killed write frees the space at once). Returns what was removed."""
    folder, removed = Path(folder), []
    min_idle = STALE_AFTER if min_idle is None else min_idle
    if not folder.is_dir():
        return removed
    for p in list(folder.iterdir()):
        m = _TMP_RE.match(p.name)
        if not m or (name is not None and m.group("name") != name):
            continue
        if min_idle > 0 and _idle_seconds(p) < min_idle:
            continue
        if _lock_is_free(folder / m.group("name")):   # re-entrant: a lock we hold ourselves counts as free
            _remove(p)
            removed.append(p)
    return removed


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    import ctypes
    import platform

    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    return fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, checksum: bool = True):
    """Yield a temporary path next to ``final``; on success rename it onto ``final`` (file
    or directory), on error delete it. A reader never sees a half-written artifact, and an
    existing ``final`` is only replaced by a complete new one, in one atomic step (a
    directory is swapped in with ``renameat2(RENAME_EXCHANGE)``: no moment without an
    entry). The entry's :func:`entry_lock` is held throughout (re-entrant, so callers wrap
    check-build-write in it), and leftovers of killed writes of this entry are removed
    first. ``checksum``: a directory entry gets a content manifest (:func:`write_checksum`)
    that :func:`verify_entry` checks."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with entry_lock(final):
        if not final.parent.name.endswith(".tmp"):   # we hold the lock: any leftover of this entry is dead
            clean_stale(final.parent, final.name, min_idle=0)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        target = tmp / final.name
        try:
            yield target
            if not target.exists():
                raise RuntimeError(f"atomic_path: nothing was written to {target}")
            if checksum and target.is_dir():
                write_checksum(target)
            if target.is_dir() and final.is_dir() and not final.is_symlink() and _exchange(target, final):
                pass                          # the old entry is now at `target`, removed below with tmp
            elif final.is_dir() and not final.is_symlink():
                old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
                os.replace(final, old / "old")     # fallback: a short gap, but under the entry lock
                os.replace(target, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(target, final)     # a file (or a new directory): one atomic rename
            _verified.pop(str(final), None)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _digest(path: Path, chunk: int = 1 << 24) -> str:
    import xxhash

    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _manifest_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name != CHECKSUM_FILE
                  and not p.name.endswith(".lock"))


def write_checksum(path: str | os.PathLike) -> Path:
    """Write the content checksum of cache entry ``path``: for a directory
    ``path/.saelib-checksum.json`` (size and xxh3-64 of every file), for a file
    ``.<name>.xxh3`` beside it. xxh3 reads ~5 GB/s, so a 512 MB activation store costs
    about 0.1-0.3 s. :func:`atomic_path` calls it for directory entries. Returns the manifest path."""
    path = Path(path)
    if path.is_dir():
        files = {str(p.relative_to(path)): [p.stat().st_size, _digest(p)] for p in _manifest_files(path)}
        out = path / CHECKSUM_FILE
        out.write_text(json.dumps({"algo": "xxh3_64", "files": files}, indent=0, sort_keys=True))
    elif path.is_file():
        out = path.parent / f".{path.name}.xxh3"
        out.write_text(json.dumps({"algo": "xxh3_64", "files": {path.name: [path.stat().st_size, _digest(path)]}}))
    else:
        raise FileNotFoundError(f"write_checksum: {path} does not exist")
    return out


def verify_entry(path: str | os.PathLike, require: bool = False) -> bool:
    """Check cache entry ``path`` against its checksum manifest (see :func:`write_checksum`).

    Returns True when every file matches (remembered per process with the files' stat, so a
    second call on untouched files costs only the stats), False when ``path`` does not exist or has no manifest (an entry written before
    checksums; ``require=True`` makes that an error). Raises :class:`CacheEntryError`
    (a ValueError) naming the file when one is missing, truncated, grown or changed."""
    path = Path(path)
    if not path.exists():
        return False
    manifest = path / CHECKSUM_FILE if path.is_dir() else path.parent / f".{path.name}.xxh3"
    if not manifest.exists():
        if require:
            raise CacheEntryError(f"cache entry {path} has no checksum manifest ({manifest.name})")
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        raise CacheEntryError(f"cache entry {path}: its checksum manifest {manifest} is unreadable ({e})") from None
    root = path if path.is_dir() else path.parent
    stamp = tuple(_stat(p) for p in [manifest, *(root / rel for rel in files)])
    if _verified.get(str(path)) == stamp:   # verified before and no file touched since: skip the read
        return True
    for rel, (size, digest) in files.items():
        f = root / rel
        if not f.is_file():
            raise CacheEntryError(f"cache entry {path}: file {f} is missing")
        if f.stat().st_size != size:
            raise CacheEntryError(f"cache entry {path}: file {f} has {f.stat().st_size} bytes, "
                                  f"{size} were written (truncated or grown)")
        if _digest(f) != digest:
            raise CacheEntryError(f"cache entry {path}: file {f} does not match its checksum (damaged on disk)")
    _verified[str(path)] = stamp
    return True


def _stat(p: Path):
    try:
        st = p.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns


def usable_entry(path: str | os.PathLike, what: str = "cache entry") -> bool:
    """True when cache entry ``path`` exists and verifies (or predates checksums). A damaged
    entry is removed with a warning naming the file, and False is returned so the caller
    rebuilds it. Call it while holding :func:`entry_lock` ``(path)``."""
    import warnings

    path = Path(path)
    if not path.exists():
        return False
    try:
        verify_entry(path)
        return True
    except CacheEntryError as e:
        warnings.warn(f"{what}: {e}; removing it and rebuilding", stacklevel=2)
        discard_entry(path)
        return False


def discard_entry(path: str | os.PathLike) -> None:
    """Remove cache entry ``path`` (and its file checksum); call it holding its :func:`entry_lock`."""
    path = Path(path)
    _verified.pop(str(path), None)
    _remove(path)
    _remove(path.parent / f".{path.name}.xxh3")


def cached(path: str | os.PathLike, build, load, what: str = "cache entry"):
    """``load(path)`` of cache entry ``path``, building it first with ``build(path)`` (which
    writes it through :func:`atomic_path`) when it is missing or damaged. Runs under
    :func:`entry_lock`, so of two processes wanting the same entry one builds and the other
    waits and loads. A damaged entry (checksum mismatch, or an entry without checksum that
    fails to load) is removed with a warning naming the file and rebuilt; if the freshly
    built entry does not load either, that error is raised with the path."""
    import warnings

    path = Path(path)
    with entry_lock(path):
        if usable_entry(path, what):
            try:
                return load(path)
            except Exception as e:  # noqa: BLE001 - a truncated legacy entry: rebuild it
                warnings.warn(f"{what} {path} cannot be loaded ({type(e).__name__}: {e}); removing it and "
                              "rebuilding", stacklevel=2)
                discard_entry(path)
        build(path)
        try:
            return load(path)
        except Exception as e:  # noqa: BLE001
            raise CacheEntryError(f"{what} {path} was just written but does not load: {e}") from e


def write_json_atomic(path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))


def resolve_device(device: str | None = "auto"):
    """``"auto"`` -> CUDA when available, else CPU; anything else is passed to
    ``torch.device`` (a bad name raises a ValueError naming ``device``). A CUDA device
    turns on TF32 matmuls and convolutions (:func:`enable_tf32`) for this process."""
    import torch

    if device is None or device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device={device!r} is not a valid torch device; use 'auto', 'cpu' or 'cuda[:i]'") from e
    if dev.type == "cuda":
        enable_tf32()
    return dev


def enable_tf32() -> bool:
    """Let float32 matmuls and cuDNN convolutions use TensorFloat-32 tensor cores (Ampere and
    later): inputs rounded to a 10-bit mantissa, sums in float32, several times the matmul
    throughput of full float32 (torch's default since 1.12). Set by :func:`resolve_device`
    whenever it returns a CUDA device. The SAE losses and the papers' metrics are insensitive
    to it (relative error ~1e-3 per product), but GPU numbers then differ from CPU ones beyond
    float32 rounding; ``SAELIB_TF32=0`` keeps full float32. Sets torch's ``allow_tf32`` flags
    (``torch.backends.cuda.matmul.allow_tf32``, ``torch.backends.cudnn.allow_tf32``), the
    settings :mod:`saelib.bench` reads back: torch >= 2.9 refuses to read them once the newer
    ``fp32_precision`` settings were written, so this module does not mix the two. Returns
    whether TF32 is on."""
    import torch

    if os.environ.get("SAELIB_TF32", "1").lower() in ("0", "false", "no"):
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


# glibc malloc settings for training processes (see tune_malloc)
MALLOC_MMAP_THRESHOLD = 32 * 2**20    # glibc's maximum: smaller blocks come from the heap
MALLOC_TRIM_THRESHOLD = 2**30         # keep up to 1 GiB of freed memory at the top of the heap
MALLOC_TOP_PAD = 64 * 2**20           # grow the heap in 64 MiB steps
MALLOC_MMAP_MAX = 0                   # no mmap for big blocks either: the heap serves and keeps them
_malloc_tuned = False


def tune_malloc() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the kernel.

    A training step allocates and frees the same few [batch, d] tensors every step. With
    glibc's defaults, freed memory at the top of the heap (and every block of 32 MiB or
    more) is returned to the kernel and faulted back in, page by page, on the next
    step: on this project's 2-core VM a fresh 8 MiB tensor costs up to ~18 ms of page
    faults against 0.3 ms for a reused one. This sets ``M_MMAP_THRESHOLD`` (32 MiB),
    ``M_MMAP_MAX`` (0: blocks above the threshold, e.g. a dense SAE's [B, n_latents]
    activations, come from the heap too), ``M_TRIM_THRESHOLD`` (1 GiB) and
    ``M_TOP_PAD`` (64 MiB) with ``mallopt``, like the ``MALLOC_*_`` environment
    variables would. The cost: the process keeps up to 1 GiB of freed heap mapped (glibc
    still falls back to mmap if the heap cannot grow). Numerics are unchanged. Called by
    ``train.fit``, ``lm.train_lm`` and ``saelib.bench``; a no-op (False) where glibc is not
    the allocator."""
    global _malloc_tuned
    if not _malloc_tuned:
        _malloc_tuned = mallopt(mmap_threshold=MALLOC_MMAP_THRESHOLD, trim_threshold=MALLOC_TRIM_THRESHOLD,
                                top_pad=MALLOC_TOP_PAD, mmap_max=MALLOC_MMAP_MAX)
    return _malloc_tuned


_MALLOPT = {"trim_threshold": -1, "top_pad": -2, "mmap_threshold": -3, "mmap_max": -4}


def mallopt(trim: bool = False, **settings: int) -> bool:
    """glibc's ``mallopt`` for the named settings (``trim_threshold``, ``top_pad``,
    ``mmap_threshold``, ``mmap_max``), then ``malloc_trim(0)`` if ``trim``. False where
    glibc is not the allocator or a setting was refused."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = all(libc.mallopt(_MALLOPT[name], int(val)) == 1 for name, val in settings.items())
        if trim:
            libc.malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return ok


def set_seed(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def quiet() -> bool:
    """Progress bars are off in CI (``CI`` set) or when ``SAELIB_QUIET=1``."""
    return bool(os.environ.get("CI")) or os.environ.get("SAELIB_QUIET", "0") not in ("", "0")


def progress(iterable=None, **kwargs):
    """``tqdm.auto.tqdm`` that is disabled in CI / quiet mode."""
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", quiet())
    kwargs.setdefault("mininterval", 1.0)
    return tqdm(iterable, **kwargs)


def check_choice(name: str, value, allowed) -> None:
    """Raise a ValueError naming the parameter and the allowed values."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {sorted(map(str, allowed))}")


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def prefetch(iterable, depth: int = 2):
    """Iterate ``iterable`` in a background thread, up to ``depth`` items ahead (same items,
    same order). An exception of the producer is raised at the consumer's next ``next()``;
    closing the generator stops the thread at its next item. Used to overlap a CUDA step
    with the gather and copy of the next batches (the gather releases the GIL)."""
    import queue
    import threading

    check_positive_int("depth", depth)
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce():
        try:
            for item in iterable:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((done, None))
        except BaseException as e:     # handed to the consumer
            q.put((done, e))

    thread = threading.Thread(target=produce, name="saelib-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, err = q.get()
            if err is not None:
                raise err
            if item is done:
                return
            yield item
    finally:
        stop.set()
