"""Shared plumbing: the cache directory, config hashing, atomic writes,
device and seed handling, and progress bars that stay quiet in CI."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir(*parts: str) -> Path:
    """The cache root (``$SAELIB_CACHE``, default ``.cache/saelib`` in the repo),
    or a sub-folder of it, created if missing."""
    root = Path(os.environ.get("SAELIB_CACHE", REPO_ROOT / ".cache" / "saelib")).expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def config_hash(cfg, n: int = 12) -> str:
    """A short stable hash of a JSON-able config (key order does not matter)."""
    blob = json.dumps(cfg, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike):
    """Yield a temporary path next to ``final``; on success rename it onto
    ``final`` (file or directory), on error delete it. A reader never sees a
    half-written artifact, and an existing ``final`` is only replaced by a
    complete new one."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    target = tmp / final.name
    try:
        yield target
        if not target.exists():
            raise RuntimeError(f"atomic_path: nothing was written to {target}")
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            if old.exists():
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            os.replace(final, old)
            os.replace(target, final)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(target, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))


def resolve_device(device: str | None = "auto"):
    """``"auto"`` -> CUDA when available, else CPU; anything else is passed to
    ``torch.device`` (a bad name raises a ValueError naming ``device``)."""
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a valid torch device; use 'auto', 'cpu' or 'cuda[:i]'") from e


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
