"""``python -m saelib.train``: train one SAE from the command line, on one process or many.

    python -m saelib.train --data acts.npy --kind switch --n-latents 4096 --k 32 \\
        --n-experts 16 --steps 1000 --batch-size 4096 --seed 0 --out runs/sw16
    torchrun --standalone --nproc-per-node 2 -m saelib.train --data acts.npy --kind switch \\
        --n-latents 4096 --k 32 --n-experts 16 --steps 1000 --batch-size 4096 --expert-parallel --out runs/sw16-ep

Flags mirror :func:`saelib.saes.build` and :func:`saelib.train.fit` (``--n-latents`` is
``n_latents``, ...); ``--config FILE.yaml`` gives the same settings as a mapping (flags on the
command line win). ``--data``: a ``.npy`` array ``[n, d_in]`` (memory-mapped), a
``.safetensors`` file (one tensor, or ``--data-key``) or a folder written by
:func:`saelib.activations.collect` (an ActivationStore). ``--out DIR`` receives ``sae/``
(:meth:`SAE.save`), ``history.jsonl`` (one JSON object per logged interval) and
``run.json`` (settings, world size, seconds, bytes sent per step); with
``--checkpoint-every N`` also ``checkpoint.pt``, from which a rerun of the same command
resumes (with any number of ranks). Under ``torchrun`` the ranks train data parallel, or
expert parallel with ``--expert-parallel`` (switch/scale), see :mod:`saelib.distributed`.
Bad flags, unreadable data and ``n_experts`` not divisible by the number of ranks stop the
run with a message before any work (exit status 2).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from . import saes

BUILD_FLAGS = ("n_latents", "k", "n_experts", "n_active", "l1_coef", "alpha", "feature_scaling", "decomposition",
               "renormalize_router", "weight_before_topk", "balance_scale", "seed")
FLAGS = ("kind", "n_latents", "k", "n_experts", "n_active", "l1_coef", "alpha", "feature_scaling", "decomposition",
         "renormalize_router", "weight_before_topk", "balance_scale", "steps", "batch_size", "lr",
         "seed", "normalize", "aux_k", "log_every", "data", "data_key", "out", "expert_parallel",
         "checkpoint_every", "device", "overwrite")


def _aux_k(text: str):
    low = str(text).lower()
    if low in ("false", "0", "no", "off"):
        return False
    if low in ("true", "yes", "on"):
        return True
    try:
        value = int(low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--aux-k must be true, false or a positive integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"--aux-k must be true, false or a positive integer, got {text!r}")
    return value


def _bool(text) -> bool:
    low = str(text).lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m saelib.train", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Train one SAE (saes.build + train.fit) on one process, or on many "
                                            "under torchrun (data or expert parallel).",
                                epilog="examples:\n" + __doc__.split("\n\n")[1])
    p.add_argument("--config", type=Path, help="YAML file with any of these settings (underscored names)")
    a = p.add_argument_group("SAE (saes.build)")
    a.add_argument("--kind", choices=saes.KINDS)
    a.add_argument("--n-latents", type=_positive)
    a.add_argument("--k", type=_positive, help="latents per row (topk, batchtopk, switch, scale)")
    a.add_argument("--n-experts", type=_positive, help="switch/scale (default 1)")
    a.add_argument("--n-active", type=_positive, help="scale: experts per row (default 2)")
    a.add_argument("--l1-coef", type=float, help="relu/gated sparsity coefficient")
    a.add_argument("--alpha", type=float, help="switch/scale load-balancing weight (default 3)")
    a.add_argument("--feature-scaling", type=_bool, help="scale: true (default) or false")
    a.add_argument("--decomposition", choices=saes.DECOMPOSITIONS, help="scale feature scaling's W_low (default mean)")
    a.add_argument("--renormalize-router", action="store_true", default=None,
                   help="scale: the official code's softmax over the selected experts' probabilities")
    a.add_argument("--weight-before-topk", action="store_true", default=None,
                   help="scale: the official code's TopK over router-weighted activations")
    a.add_argument("--balance-scale", choices=saes.BALANCE_SCALES, help="switch/scale: raw (default) or normalized")
    t = p.add_argument_group("training (train.fit)")
    t.add_argument("--steps", type=_positive, help="default 2000")
    t.add_argument("--batch-size", type=_positive, help="global batch (rows per step over all ranks), default 1024")
    t.add_argument("--lr", type=float, help="default 2e-4 / sqrt(n_latents / 2**14)")
    t.add_argument("--seed", type=int)
    t.add_argument("--normalize", choices=("unit", "none"), help="default unit")
    t.add_argument("--aux-k", type=_aux_k, help="AuxK: false (default), true (k_aux = d_in // 2) or k_aux")
    t.add_argument("--log-every", type=_positive)
    t.add_argument("--checkpoint-every", type=_positive, help="write DIR/checkpoint.pt every N steps (resumable)")
    t.add_argument("--device", help="auto (default), cpu, cuda")
    io = p.add_argument_group("data, output, parallelism")
    io.add_argument("--data", type=Path, help=".npy, .safetensors, or an ActivationStore folder")
    io.add_argument("--data-key", help="tensor name in a .safetensors file with several")
    io.add_argument("--out", type=Path, help="output folder")
    io.add_argument("--overwrite", action="store_true", default=None, help="replace a finished SAE in --out")
    io.add_argument("--expert-parallel", action="store_true", default=None,
                    help="switch/scale under torchrun: each rank owns n_experts / world_size experts")
    return p


DEFAULTS = dict(n_experts=1, seed=0, normalize="unit", aux_k=False, steps=2000, batch_size=1024,
                expert_parallel=False, device="auto", overwrite=False)


def settings(argv=None) -> tuple[dict, argparse.ArgumentParser]:
    """Parse ``argv`` (+ ``--config``) into one dict of settings; errors exit via argparse."""
    p = parser()
    ns = p.parse_args(argv)
    cfg = dict(DEFAULTS)
    if ns.config is not None:
        try:
            import yaml

            loaded = yaml.safe_load(ns.config.read_text()) or {}
        except (OSError, ValueError) as e:
            p.error(f"--config {ns.config}: {e}")
        if not isinstance(loaded, dict):
            p.error(f"--config {ns.config} must hold a mapping of settings")
        unknown = sorted(set(loaded) - set(FLAGS))
        if unknown:
            p.error(f"--config {ns.config}: unknown settings {unknown}; allowed: {sorted(FLAGS)}")
        actions = {a.dest: a for a in p._actions}
        for key, val in loaded.items():      # the flags' own checks, on the file's values
            act = actions[key]
            if act.type is None and act.choices is None and act.const is True:
                if not isinstance(val, bool):
                    p.error(f"--config {ns.config}: {key} must be true or false, got {val!r}")
                continue
            try:
                val = act.type(str(val)) if act.type is not None else val
            except (argparse.ArgumentTypeError, ValueError) as e:
                p.error(f"--config {ns.config}: {key}: {e}")
            if act.choices is not None and val not in act.choices:
                p.error(f"--config {ns.config}: {key}={val!r} is not allowed; choose one of {list(act.choices)}")
            loaded[key] = val
        cfg.update(loaded)
    cfg.update({key: val for key, val in vars(ns).items() if val is not None and key != "config"})
    for key in ("data", "out"):
        if cfg.get(key) is None:
            p.error(f"--{key} is required")
        cfg[key] = Path(cfg[key])
    if cfg.get("kind") is None or cfg.get("n_latents") is None:
        p.error("--kind and --n-latents are required")
    if cfg["normalize"] == "none":
        cfg["normalize"] = None
    return cfg, p


def open_data(path: Path, key: str | None = None):
    """The training data at ``path``: a tensor ``[n, d_in]`` (``.npy`` memory-mapped,
    ``.safetensors``) or an :class:`saelib.activations.ActivationStore` (a folder). Raises
    ValueError naming the path when it is missing, of another type or not 2-D."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"--data {path}: no such file or folder")
    if path.is_dir():
        if not (path / "meta.json").exists():
            raise ValueError(f"--data {path}: a folder must be an activation store (meta.json + acts.npy)")
        from .activations import ActivationStore

        return ActivationStore(path)
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise ValueError(f"--data {path}: not a readable .npy array ({e})") from e
        if arr.ndim != 2 or arr.dtype.kind != "f":
            raise ValueError(f"--data {path}: needs a 2-D float array [n, d_in], got shape {arr.shape} {arr.dtype}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)   # read-only memory map: never written to
            return torch.from_numpy(arr)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if key is None and len(keys) != 1:
                raise ValueError(f"--data {path} holds tensors {keys}; choose one with --data-key")
            key = keys[0] if key is None else key
            if key not in keys:
                raise ValueError(f"--data-key {key!r} is not in {path} (it holds {keys})")
            t = f.get_tensor(key)
        if t.ndim != 2 or not t.is_floating_point():
            raise ValueError(f"--data {path}[{key}]: needs a 2-D float tensor [n, d_in], got {tuple(t.shape)} {t.dtype}")
        return t
    raise ValueError(f"--data {path}: use a .npy or .safetensors file or an activation store folder")


def main(argv=None) -> int:
    """Run the command; returns the exit status (0). See the module docstring."""
    from . import distributed

    cfg, p = settings(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg["batch_size"] % world_size:
        p.error(f"--batch-size {cfg['batch_size']} is not divisible by the {world_size} ranks")
    if cfg["expert_parallel"]:
        if cfg["kind"] not in saes.MOE_KINDS:
            p.error(f"--expert-parallel needs --kind in {list(saes.MOE_KINDS)}, got {cfg['kind']}")
        if cfg["n_experts"] % world_size:
            p.error(f"--n-experts {cfg['n_experts']} is not divisible by the {world_size} ranks "
                    "(expert parallelism gives each rank n_experts / world_size experts)")
        if cfg["aux_k"]:
            p.error("--aux-k is not implemented with --expert-parallel")
    out = cfg["out"]
    ckpt = out / "checkpoint.pt" if cfg.get("checkpoint_every") else None
    if (out / "sae").exists() and not cfg["overwrite"] and not (ckpt is not None and ckpt.exists()):
        p.error(f"--out {out} already holds a trained SAE; pass another --out or --overwrite")
    try:
        data = open_data(cfg["data"], cfg.get("data_key"))
        d_in = data.d if not torch.is_tensor(data) else data.shape[1]
        build = {key: cfg[key] for key in BUILD_FLAGS if cfg.get(key) is not None}
        sae = saes.build(cfg["kind"], d_in=int(d_in), **build)
        if cfg["batch_size"] > len(data):
            raise ValueError(f"--batch-size {cfg['batch_size']} exceeds the {len(data)} rows of --data")
    except ValueError as e:
        p.error(str(e))
    import torch.distributed as dist

    started = not (dist.is_available() and dist.is_initialized())
    rank, world_size = distributed.init(cfg["device"])
    fit_kw = {key: cfg[key] for key in ("steps", "batch_size", "lr", "seed", "normalize", "aux_k", "log_every",
                                        "checkpoint_every", "device") if cfg.get(key) is not None}
    hist = distributed.fit(sae, data, checkpoint_path=ckpt, expert_parallel=cfg["expert_parallel"],
                           progress=sys.stderr.isatty(), **fit_kw)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        sae.save(out / "sae")
        (out / "history.jsonl").write_text(hist.to_json(orient="records", lines=True))
        run = dict(settings={k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.items()},
                   world_size=world_size, seconds=hist.attrs.get("seconds"),
                   bytes_per_step=hist.attrs.get("traffic_per_step"))
        (out / "run.json").write_text(json.dumps(run, indent=2, default=str))
        last = hist.iloc[-1]
        print(f"{cfg['kind']} x{world_size} ranks: {int(last['step'])} steps, loss {last['loss']:.4g}, "
              f"fvu {last['fvu']:.4f}, L0 {last['l0']:.1f} -> {out / 'sae'}")
    if started and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
