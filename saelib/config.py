"""Profiles: ``saelib/profiles/{quick,full,paper}.yaml`` resolved with overrides.

A notebook's parameters cell holds ``profile = "quick"`` and ``overrides = {}``
(a nested dict); the next cell calls :func:`load_profile`. Every override is
checked before anything runs, so the runner, papermill and a Python caller all
get the same ValueError naming the key path and what is allowed:

* the key must already exist in the profile (a typo fails loudly);
* a section (``lm``, ``chapter01``, ...) takes a mapping, never a scalar;
* a leaf takes a value of the kind the profiles hold there (the union over all
  profiles, so ``max_docs_per_domain`` is "a positive integer or null" because
  ``full`` has null and ``quick`` 120). Numbers that YAML 1.1 reads as strings
  (``1e-3``, written without a dot) are read as numbers; an integral float
  (``1e3``) is accepted where an integer is expected;
* ranges: numbers are finite and >= 0; counts, sizes, steps and learning rates
  (:data:`POSITIVE`) are > 0 unless some profile itself holds 0 there (the
  ``paper`` profile's ``lm.steps: 0`` for a hub model that is not trained);
* a leaf that is null in every profile takes the kind named in :data:`HINTS`
  (``lm.capacity_factor``: a positive number or null), else any scalar;
* then :func:`check_config` checks what the resolved config alone decides:
  the activation ``site`` against ``lm.n_layer``, ``activations.mode`` (store | stream),
  ``activations.dtype`` (bfloat16 only for a stream), ``activations.buffer_tokens``
  (null only for a store),
  ``device``, the corpus spec and domains, ``lm.n_embd % lm.n_head``,
  ``lm.warmup <= lm.steps``.
"""
from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import yaml

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"

# leaf names whose numbers must be > 0 (unless a profile holds 0 there)
POSITIVE = frozenset("""
    steps batch_size lr lr_base n_layer n_embd n_head n_ctx eval_every eval_batches n_tokens vocab_size
    max_docs_per_domain max_chars_per_doc gen_tokens stat_tokens eval_tokens eval_rows lr_seqs n_boot k width
    widths n_experts n_active flop_matched_experts width_matched_experts min_expert_width max_points perplexity
    buffer_tokens
    n_features n_show rounds moe_every capacity_factor n_latents d_in n_seeds seeds_per_point workers n_inner
    total_width active_width scale_active factor
""".split())
# the kind of leaves that some profile leaves null (or an empty list): (python types, nullable)
_NUM = (int, float)
HINTS = {
    "name": ((str,), True),
    "max_docs_per_domain": ((int,), True),
    "max_chars_per_doc": ((int,), True),
    "lr_base": (_NUM, True),
    "threads": ((int,), True),
    "buffer_tokens": ((int,), True),
    "workers": ((int,), True),
    "n_inner": ((int,), True),
    "moe_every": ((int,), False),
    "capacity_factor": (_NUM, True),
    "router_aux_coef": (_NUM, False),
    "perplexity": (_NUM, False),
    "lr": (_NUM, False),
    "holdout": ((list, str), False),
    "domains": ((list, str), False),
    "shapes": ((list, str), False),
}
ACT_DTYPES = ("float32", "float16", "bfloat16")   # bfloat16: stream only (numpy, the store's format, has none)
ACT_MODES = ("store", "stream")
_NUMBER_RE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:inf|nan)", re.I)
_DEVICE_RE = re.compile(r"auto|cpu|mps|(?:cuda|xpu)(?::\d+)?")


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def _read(profile: str) -> dict:
    return yaml.safe_load((PROFILE_DIR / f"{profile}.yaml").read_text())


# ---------------------------------------------------------------------------
# the schema: what every profile holds at each key path
# ---------------------------------------------------------------------------
def _kind(val):
    """A leaf value's kind: 'null', 'bool', 'int', 'float', 'str', ('list', elem kinds), 'dict'."""
    if val is None:
        return "null"
    for typ, name in _KINDS:          # bool before int: a bool is an int to isinstance
        if isinstance(val, typ):
            return name
    return type(val).__name__


_KINDS = ((bool, "bool"), (int, "int"), (float, "float"), (str, "str"), (dict, "dict"), (list, "list"))


def _leaf_schema(path: tuple, profiles: list[dict]) -> dict:
    """{kinds, elem_kinds, positive, nullable} of the leaf at ``path``, over the profiles that have it."""
    vals = []
    for p in profiles:
        node = p
        for key in path:
            if not isinstance(node, dict) or key not in node:
                break
            node = node[key]
        else:
            vals.append(node)
    kinds = {_kind(v) for v in vals}
    elems = {_kind(e) for v in vals if isinstance(v, list) for e in v}
    nums = [x for v in vals for x in (v if isinstance(v, list) else [v])
            if isinstance(x, (int, float)) and not isinstance(x, bool)]
    name = path[-1]
    nullable = "null" in kinds
    hint = HINTS.get(name)
    if hint is not None:
        types, hint_null = hint
        nullable = nullable or hint_null
        if types[0] is list:
            kinds, elems = (kinds - {"null"}) | {"list"}, elems | {_PY_KIND[types[1]]}
        elif kinds <= {"null", "int", "float"}:
            kinds = (kinds - {"null"}) | {_PY_KIND[t] for t in types}
    kinds.discard("null")
    positive = name in POSITIVE and all(x > 0 for x in nums)
    nonneg = all(x >= 0 for x in nums)
    return dict(kinds=kinds, elems=elems, positive=positive, nonneg=nonneg, nullable=nullable)


_PY_KIND = {int: "int", float: "float", str: "str", bool: "bool"}


def _describe(sch: dict) -> str:
    """What a leaf allows, in words: 'a positive integer or null', 'a list of strings', ..."""
    def words(kinds, plural=False):
        out = []
        if "bool" in kinds:
            out.append("true/false")
        if kinds & {"int", "float"}:
            sign = "positive" if sch["positive"] else "non-negative" if sch["nonneg"] else ""
            noun = "number" if "float" in kinds else "integer"
            out.append(" ".join(filter(None, ["" if plural else "a", sign, noun + ("s" if plural else "")])))
        if "str" in kinds:
            out.append("strings" if plural else "a string")
        return " or ".join(out) or ("values" if plural else "a value")
    parts = []
    if sch["kinds"] - {"list"} or not sch["kinds"]:
        parts.append(words(sch["kinds"] - {"list"}))
    if "list" in sch["kinds"]:
        parts.append(f"a list of {words(sch['elems'], plural=True)}")
    if sch["nullable"]:
        parts.append("null")
    return " or ".join(parts)


def _coerce_scalar(val, kinds: set, sch: dict, where: str, allowed: str):
    """``val`` as one of ``kinds`` (numbers from numeric strings), range-checked; ValueError otherwise."""
    def bad():
        return ValueError(f"overrides: {where}={val!r} is not allowed; expected {allowed}")

    if isinstance(val, bool):
        if "bool" in kinds:
            return val
        raise bad()
    if kinds & {"int", "float"}:
        num = val
        if isinstance(val, str) and _NUMBER_RE.fullmatch(val.strip()) and "str" not in kinds:
            num = float(val)
            num = int(num) if "float" not in kinds and num.is_integer() else num
        if isinstance(num, (int, float)):
            if "float" not in kinds:
                if isinstance(num, float):
                    if not (math.isfinite(num) and num.is_integer()):
                        raise bad()
                    num = int(num)
            if isinstance(num, float) and not math.isfinite(num):
                raise bad()
            if (sch["positive"] and not num > 0) or (sch["nonneg"] and not num >= 0):
                raise bad()
            return num
    if isinstance(val, str) and "str" in kinds:
        return val
    if not kinds:          # null in every profile and no hint: any scalar, numbers read as numbers
        if isinstance(val, str) and _NUMBER_RE.fullmatch(val.strip()):
            return float(val) if not re.fullmatch(r"[-+]?\d+", val.strip()) else int(val)
        if isinstance(val, (int, float, str)):
            return val
    raise bad()


def _check_leaf(val, path: tuple, profiles: list[dict]):
    sch = _leaf_schema(path, profiles)
    where = ".".join(path)
    allowed = _describe(sch)
    if val is None:
        if sch["nullable"] or not sch["kinds"]:
            return None
        raise ValueError(f"overrides: {where}=None (null) is not allowed; expected {allowed}")
    if isinstance(val, dict):
        raise ValueError(f"overrides: {where} is a single value, not a section; expected {allowed}, got {val!r}")
    if isinstance(val, (list, tuple)):
        if "list" not in sch["kinds"]:
            raise ValueError(f"overrides: {where}={val!r} is not allowed; expected {allowed}")
        elem_sch = {**sch, "nullable": False}
        return [_coerce_scalar(v, sch["elems"], elem_sch, f"{where}[{i}]", allowed) if not isinstance(v, (list, dict))
                else _raise(f"overrides: {where}[{i}]={v!r} is not allowed; expected {allowed}")
                for i, v in enumerate(val)]
    if "list" in sch["kinds"] and not (sch["kinds"] - {"list"}):
        raise ValueError(f"overrides: {where}={val!r} is not allowed; expected {allowed}")
    return _coerce_scalar(val, sch["kinds"] - {"list"}, sch, where, allowed)


def _raise(msg):
    raise ValueError(msg)


def _merge(base: dict, over: dict, path: tuple, profiles: list[dict]) -> dict:
    out = copy.deepcopy(base)
    where = "".join(f"{p}." for p in path)
    for key, val in over.items():
        if key not in out:
            allowed = ", ".join(sorted(map(str, out)))
            raise ValueError(f"overrides: unknown key {where}{key!r}; allowed keys here: {allowed}")
        if isinstance(out[key], dict):
            if not isinstance(val, dict):
                raise ValueError(f"overrides: {where}{key} is a section; give a mapping of its keys "
                                 f"({', '.join(sorted(map(str, out[key])))}), got {val!r}")
            out[key] = _merge(out[key], val, (*path, key), profiles)
        else:
            out[key] = _check_leaf(copy.deepcopy(val), (*path, key), profiles)
    return out


# ---------------------------------------------------------------------------
# checks on the resolved config
# ---------------------------------------------------------------------------
def check_config(cfg: dict) -> dict:
    """Check what the resolved config alone decides, before any work (ValueError naming the key):
    ``site`` (``blocks.<i>.<site>``: ``-n_layer <= i < n_layer`` for our own LM, the site kind in
    ``activations.SITES``), ``activations.mode``/``dtype``/``buffer_tokens``, ``device``,
    ``data.corpus``/``domains``/``holdout``,
    ``lm.n_embd % lm.n_head == 0``, ``lm.warmup <= lm.steps`` and ``lm.steps``/``lr``/``eval_every``/
    ``batch_size`` > 0 (our own LM), ``data.vocab_size >= 258``.
    Returns ``cfg``."""
    from .activations import SITES
    from .data import DOMAINS

    dev = cfg.get("device")
    if dev is not None and not (isinstance(dev, str) and _DEVICE_RE.fullmatch(dev)):
        raise ValueError(f"device={dev!r} is not allowed; use 'auto', 'cpu', 'cuda' or 'cuda:<i>'")
    acts = cfg.get("activations") or {}
    mode = acts.get("mode", "store")
    if mode not in ACT_MODES:
        raise ValueError(f"activations.mode={mode!r} is not allowed; choose one of {list(ACT_MODES)} (store: "
                         "collect to disk first; stream: run the model while training)")
    if "dtype" in acts and acts["dtype"] not in ACT_DTYPES:
        raise ValueError(f"activations.dtype={acts['dtype']!r} is not allowed; choose one of {list(ACT_DTYPES)}")
    if acts.get("dtype") == "bfloat16" and mode == "store":
        raise ValueError("activations.dtype='bfloat16' is not allowed with activations.mode='store' (numpy, the "
                         "store's format, has no bfloat16); use 'float16' or activations.mode='stream'")
    buf = acts.get("buffer_tokens")
    if buf is None and mode == "stream":
        raise ValueError("activations.buffer_tokens=None (null) is not allowed with activations.mode='stream'; "
                         "give the mixing buffer's size in rows (a positive integer, e.g. 2097152)")
    lmc = cfg.get("lm") or {}
    own_lm = not lmc.get("name")
    site = cfg.get("site")
    if site is not None:
        m = re.fullmatch(r"blocks\.(-?\d+)\.(\w+)", site) if isinstance(site, str) else None
        if isinstance(site, str) and m is None and not own_lm:
            pass   # a module path of a hub model: resolved when the model is loaded
        elif m is None or m.group(2) not in SITES:
            raise ValueError(f"site={site!r} is not allowed; use 'blocks.<layer>.<site>' with <site> one of "
                             f"{list(SITES)}")
        elif own_lm and "n_layer" in lmc and not -lmc["n_layer"] <= int(m.group(1)) < lmc["n_layer"]:
            raise ValueError(f"site={site!r}: layer {m.group(1)} does not exist in a model with "
                             f"lm.n_layer={lmc['n_layer']}; use a layer in 0..{lmc['n_layer'] - 1}")
    if own_lm:
        if {"n_embd", "n_head"} <= set(lmc) and lmc["n_embd"] % lmc["n_head"]:
            raise ValueError(f"lm.n_embd={lmc['n_embd']} must be divisible by lm.n_head={lmc['n_head']}")
        if {"warmup", "steps"} <= set(lmc) and lmc["warmup"] > lmc["steps"]:
            raise ValueError(f"lm.warmup={lmc['warmup']} must be in [0, lm.steps={lmc['steps']}]")
        for key in ("steps", "lr", "eval_every", "batch_size"):   # 0 is only meaningful for a hub model (paper)
            if key in lmc and not lmc[key] > 0:
                raise ValueError(f"lm.{key}={lmc[key]!r} must be > 0 when we train our own LM (lm.name is null)")
    d = cfg.get("data") or {}
    corpus = d.get("corpus")
    if corpus is not None and not (corpus == "minipile" or str(corpus).startswith(("hf:", "files:"))):
        raise ValueError(f"data.corpus={corpus!r} is not allowed; use 'minipile', 'hf:<name>[:<config>]' "
                         "or 'files:<glob>'")
    if corpus == "minipile":
        for key in ("domains", "holdout"):
            for dom in d.get(key) or []:
                if dom not in DOMAINS:
                    raise ValueError(f"data.{key}: {dom!r} is not a minipile domain; choose from {list(DOMAINS)}")
    if own_lm and d.get("vocab_size") is not None and d["vocab_size"] < 258:
        raise ValueError(f"data.vocab_size={d['vocab_size']} must be >= 258 (256 bytes + <|endoftext|> + one merge)")
    return cfg


def load_profile(profile: str = "quick", overrides: dict | None = None, **top_level) -> dict:
    """Return the resolved config dict of ``profile`` with ``overrides`` merged in.

    ``top_level`` keyword arguments whose value is not None are merged as
    top-level overrides (e.g. ``device="cpu"``). Every override is checked against
    the profiles' keys, kinds and ranges, then :func:`check_config` runs; a bad value
    raises a ValueError naming the key path and what is allowed (see the module doc)."""
    names = available_profiles()
    if profile not in names:
        raise ValueError(f"profile={profile!r} is not defined; choose one of {names}")
    cfg = _read(profile)
    if overrides is not None and not isinstance(overrides, dict):
        raise ValueError(f"overrides must be a dict (nested like the profile), got {type(overrides).__name__}: "
                         f"{overrides!r}")
    profiles = [cfg] + [_read(n) for n in names if n != profile]
    cfg = _merge(cfg, dict(overrides or {}), (), profiles)
    cfg = _merge(cfg, {k: v for k, v in top_level.items() if v is not None}, (), profiles)
    return check_config(cfg)


def section(cfg: dict, name: str) -> dict:
    """``cfg[name]`` with a clear error when the profile lacks the section."""
    if name not in cfg:
        raise KeyError(f"profile {cfg.get('name')!r} has no section {name!r}")
    return cfg[name]
