"""Profiles: ``saelib/profiles/{quick,full,paper}.yaml`` resolved with overrides.

A notebook's parameters cell holds ``profile = "quick"`` and ``overrides = {}``
(a nested dict); the next cell calls :func:`load_profile`. Every override key
must already exist in the profile, so a typo fails loudly instead of being
silently ignored.
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def _merge(base: dict, over: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for key, val in over.items():
        if key not in out:
            allowed = ", ".join(sorted(out))
            raise ValueError(f"overrides: unknown key {where}{key!r}; allowed keys here: {allowed}")
        if isinstance(out[key], dict) and isinstance(val, dict):
            out[key] = _merge(out[key], val, f"{where}{key}.")
        else:
            out[key] = copy.deepcopy(val)
    return out


def load_profile(profile: str = "quick", overrides: dict | None = None, **top_level) -> dict:
    """Return the resolved config dict of ``profile`` with ``overrides`` merged in.

    ``top_level`` keyword arguments whose value is not None are merged as
    top-level overrides (e.g. ``device="cpu"``)."""
    names = available_profiles()
    if profile not in names:
        raise ValueError(f"profile={profile!r} is not defined; choose one of {names}")
    cfg = yaml.safe_load((PROFILE_DIR / f"{profile}.yaml").read_text())
    if overrides is not None and not isinstance(overrides, dict):
        raise ValueError(f"overrides must be a dict (nested like the profile), got {type(overrides).__name__}")
    cfg = _merge(cfg, dict(overrides or {}), "")
    cfg = _merge(cfg, {k: v for k, v in top_level.items() if v is not None}, "")
    return cfg


def section(cfg: dict, name: str) -> dict:
    """``cfg[name]`` with a clear error when the profile lacks the section."""
    if name not in cfg:
        raise KeyError(f"profile {cfg.get('name')!r} has no section {name!r}")
    return cfg[name]
