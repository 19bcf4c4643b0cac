"""The subject language model: a GPT-2 (Radford et al. 2019) trained from
scratch on the packed corpus, or any causal LM loaded from the hub / a local
directory. Training is cached by a hash of its config, the tokenizer and the
token data, and written atomically (weights as safetensors + tokenizer +
``history.json``), so a second call loads instead of retraining."""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import data, moe_lm
from .utils import (atomic_path, cache_dir, check_choice, check_positive_int, config_hash, entry_lock, progress,
                    usable_entry,
                    resolve_device, set_seed, tune_malloc)

LM_VERSION = 1  # bump when training changes: invalidates cached models


@contextlib.contextmanager
def _hf_quiet():
    """Silence transformers' own progress bars (weight loading/saving) for a moment."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio*lr``
    at ``steps`` (Loshchilov & Hutter 2017; the nanoGPT schedule)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _split_rows(ds, n_ctx: int) -> np.ndarray:
    arr = data.token_array(ds)
    if arr.shape[1] < n_ctx:
        raise ValueError(f"n_ctx={n_ctx} is longer than the tokenized rows ({arr.shape[1]}); re-tokenize with n_ctx")
    return arr[:, :n_ctx]


@torch.no_grad()
def evaluate(model, tokenized_split, batch_size: int = 16, max_batches: int | None = None):
    """Next-token cross-entropy per domain of a tokenized split: a DataFrame with
    columns domain, loss (nats/token), ppl = exp(loss), tokens. ``max_batches``
    caps the batches per domain (rows are pre-shuffled, so a prefix is a sample).
    A row ``domain="all"`` gives the token-weighted mean."""
    import pandas as pd

    check_positive_int("batch_size", batch_size)
    dev = next(model.parameters()).device
    was_training, _ = model.training, model.eval()
    doms = np.asarray(data.column(tokenized_split, "domain")) if len(tokenized_split) else np.array([])
    rows, tot, ntot = [], 0.0, 0
    for dom in dict.fromkeys(doms.tolist()):
        idx = np.flatnonzero(doms == dom)
        if max_batches is not None:
            idx = idx[: max_batches * batch_size]
        sel = torch.from_numpy(data.token_array(tokenized_split.select(idx)))   # only the rows evaluated
        loss_sum, n = 0.0, 0
        for i in range(0, len(sel), batch_size):
            x = sel[i:i + batch_size].to(dev)
            logits = model(input_ids=x).logits[:, :-1].float()
            loss_sum += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                        reduction="sum").item()
            n += x[:, 1:].numel()
        rows.append({"domain": dom, "loss": loss_sum / n, "ppl": math.exp(loss_sum / n), "tokens": n})
        tot, ntot = tot + loss_sum, ntot + n
    if ntot:
        rows.append({"domain": "all", "loss": tot / ntot, "ppl": math.exp(tot / ntot), "tokens": ntot})
    model.train(was_training)
    return pd.DataFrame(rows, columns=["domain", "loss", "ppl", "tokens"])


def train_lm(tokenized, tokenizer, *, n_layer: int, n_embd: int, n_head: int, n_ctx: int, steps: int,
             batch_size: int, lr: float, warmup: int, weight_decay: float = 0.1, eval_every: int,
             eval_batches: int | None = 8, seed: int = 0, device="auto", precision: str = "float32",
             n_inner: int | None = None, n_experts: int = 1, moe_every: int = 1, router_aux_coef: float = 0.01,
             capacity_factor: float | None = None, cached_only: bool = False):
    """Train ``GPT2LMHeadModel`` from scratch on ``tokenized["train"]`` with AdamW
    (betas 0.9/0.95, decoupled weight decay on matrices only), linear warm-up +
    cosine decay, gradient clipping at 1, no dropout; ``precision="bfloat16"``
    runs forward/backward under bf16 autocast (fp32 master weights; ~1.45x
    faster on CPUs with AMX, e.g. Sapphire Rapids). Per-domain validation
    loss/perplexity every ``eval_every`` steps and at the end (``eval_batches``
    batches per domain). Returns ``(model, history)``, both loaded from the
    cache directory ``cache_dir("lm", <hash>)`` (a second call does not retrain).
    ``n_inner``: FFN width (None: 4 n_embd). ``n_experts > 1``: a Switch transformer
    (:mod:`saelib.moe_lm`: Switch FFN in every ``moe_every``-th block, load-balancing loss
    ``router_aux_coef * N sum f_i P_i`` added to the LM loss, optional ``capacity_factor``).

    history: {"train": [{step, loss, lr, tokens_seen, tokens_per_s}],
              "eval": [{step, domain, loss, ppl}], "config", "n_params", "train_seconds", "path"}.
    ``cached_only=True``: never train and never load the weights: ``(None, history)`` when the
    model is cached, ``(None, None)`` when not.
    """
    for name in ("n_layer", "n_embd", "n_head", "n_ctx", "steps", "batch_size", "eval_every"):
        check_positive_int(name, locals()[name])
    if n_embd % n_head:
        raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
    if not 0 <= warmup <= steps:
        raise ValueError(f"warmup={warmup} must be in [0, steps={steps}]")
    if not lr > 0:
        raise ValueError(f"lr={lr} must be > 0")
    check_choice("precision", precision, ("float32", "bfloat16"))
    config = dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_ctx=n_ctx, steps=steps, batch_size=batch_size,
                  lr=lr, warmup=warmup, weight_decay=weight_decay, eval_every=eval_every,
                  eval_batches=eval_batches, seed=seed, precision=precision)
    moe_lm._check_moe(n_experts, moe_every, router_aux_coef, capacity_factor)
    if n_inner is not None:
        check_positive_int("n_inner", n_inner)
    extra = dict(n_inner=n_inner, n_experts=n_experts, moe_every=moe_every, router_aux_coef=router_aux_coef,
                 capacity_factor=capacity_factor)
    config.update({k: v for k, v in extra.items() if v != moe_lm.MOE_DEFAULTS.get(k)})  # defaults: keys unchanged
    key = config_hash({**config, "v": LM_VERSION, "tokenizer": data.tokenizer_hash(tokenizer),
                       "train": data.token_hash(tokenized["train"]),
                       "validation": data.token_hash(tokenized["validation"])})
    path = cache_dir("lm") / key
    if cached_only:
        if not (usable_entry(path, "language model") and (path / "history.json").exists()):
            return None, None
        return None, json.loads((path / "history.json").read_text())
    with entry_lock(path):      # a second process wanting this model waits for the first, then loads it
        if not (usable_entry(path, "language model") and (path / "history.json").exists()):
            model, history = _train(tokenized, tokenizer, config, resolve_device(device))
            with atomic_path(path) as tmp, _hf_quiet():
                model.save_pretrained(str(tmp))
                tokenizer.save_pretrained(str(tmp))
                (tmp / "history.json").write_text(json.dumps({**history, "key": key}, indent=1))
    history = json.loads((path / "history.json").read_text())
    history["path"] = str(path)
    return load_model(path, device), history


def _train(tokenized, tokenizer, config, dev):
    from transformers import GPT2Config, GPT2LMHeadModel

    c = config
    train = torch.from_numpy(_split_rows(tokenized["train"], c["n_ctx"]))
    if len(train) == 0:
        raise ValueError("tokenized['train'] has no rows; use more documents or a smaller n_ctx")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    set_seed(c["seed"])
    gcfg = GPT2Config(vocab_size=len(tokenizer), n_positions=c["n_ctx"], n_embd=c["n_embd"], n_layer=c["n_layer"],
                      n_head=c["n_head"], n_inner=c.get("n_inner"), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      bos_token_id=bos, eos_token_id=tokenizer.eos_token_id)
    if dev.type == "cpu":
        tune_malloc()                  # ~12% faster steps here: no page faults for reused activations
    model = GPT2LMHeadModel(gcfg)
    moe_lm.switchify(model, c.get("n_experts", 1), c.get("moe_every", 1), c.get("router_aux_coef", 0.01),
                     c.get("capacity_factor"))
    model = model.to(dev).train()
    model.loss_type = "ForCausalLM"
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": c["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=c["lr"], betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(c["seed"])
    perm, pos = torch.randperm(len(train), generator=gen), 0
    log_every = max(1, c["steps"] // 500)
    hist, window, seen, t_train, t_win = {"train": [], "eval": []}, [], 0, 0.0, 0.0

    def run_eval(step):
        df = evaluate(model, tokenized["validation"], c["batch_size"], c["eval_batches"])
        hist["eval"] += [{"step": step, **{k: r[k] for k in ("domain", "loss", "ppl")}} for r in df.to_dict("records")]
        model.train()
        return df

    bar = progress(range(c["steps"]), desc="train LM", unit="step")
    for step in bar:
        t0 = time.perf_counter()
        if pos + c["batch_size"] > len(perm):
            perm, pos = torch.randperm(len(train), generator=gen), 0
        x = train[perm[pos:pos + c["batch_size"]]].to(dev)
        pos += c["batch_size"]
        lr = lr_at(step, c["steps"], c["lr"], c["warmup"])
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=c.get("precision") == "bfloat16"):
            loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        (loss + moe_lm.aux_loss(model)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seen += x.numel()
        window.append(loss.item())
        t_win += time.perf_counter() - t0
        if (step + 1) % log_every == 0 or step + 1 == c["steps"]:
            hist["train"].append({"step": step + 1, "loss": float(np.mean(window)), "lr": lr, "tokens_seen": seen,
                                  "tokens_per_s": len(window) * x.numel() / t_win})
            bar.set_postfix(loss=f"{np.mean(window):.3f}", tok_s=f"{hist['train'][-1]['tokens_per_s']:.0f}")
            t_train, window, t_win = t_train + t_win, [], 0.0
        if (step + 1) % c["eval_every"] == 0 or step + 1 == c["steps"]:
            df = run_eval(step + 1)
            bar.set_postfix(val=f"{df.loss.iloc[-1]:.3f}")
    hist.update(config=c, n_params=sum(p.numel() for p in model.parameters()), train_seconds=t_train,
                tokens_per_s=seen / max(t_train, 1e-9))
    return model.eval(), hist


TRAIN_COLUMNS = ["step", "loss", "lr", "tokens_seen", "tokens_per_s"]
EVAL_COLUMNS = ["step", "domain", "loss", "ppl"]


def training_summary(history: dict | None, name: str | None = None) -> dict:
    """What chapter 00 reports about how the subject model was trained, from
    :func:`train_lm`'s ``history`` (``SubjectModel.history``), or None for a model loaded
    from the hub or from a folder without ``history.json`` (``lm.name``; not trained here).

    Returns a dict: ``trained`` (bool); ``train`` and ``eval``, DataFrames of the logged
    training rows (:data:`TRAIN_COLUMNS`) and validation rows (:data:`EVAL_COLUMNS`), empty
    with those columns when there is no history; ``steps`` and ``tokens_seen`` (ints, None
    when not trained); ``tokens_per_s`` (median over the logged intervals) and ``final_loss``
    (the last logged training loss), NaN when not trained; ``final_eval``, the last
    evaluation indexed by domain (columns step, loss, ppl; empty if none); ``note``, one
    sentence for the prose, e.g. "It was trained here for 40 steps on 10,240 tokens." or
    "It was loaded (gpt2), not trained here, so there is no training curve." (``name``:
    what was loaded).

    >>> training_summary(None, "gpt2")["tokens_seen"] is None
    True
    """
    import pandas as pd

    hist = history or {}
    train = pd.DataFrame(hist.get("train") or [])
    train = train if len(train) else pd.DataFrame(columns=TRAIN_COLUMNS)
    ev = pd.DataFrame(hist.get("eval") or [])
    ev = ev if len(ev) else pd.DataFrame(columns=EVAL_COLUMNS)
    trained = len(train) > 0
    final_eval = (ev[ev.step == ev.step.max()].set_index("domain") if len(ev)
                  else pd.DataFrame(columns=["step", "loss", "ppl"], index=pd.Index([], name="domain")))
    if trained:
        steps, seen = int(train.step.iloc[-1]), int(train.tokens_seen.iloc[-1])
        note = f"It was trained here for {steps:,} steps on {seen:,} tokens."
        return {"trained": True, "train": train, "eval": ev, "steps": steps, "tokens_seen": seen,
                "tokens_per_s": float(train.tokens_per_s.median()), "final_loss": float(train.loss.iloc[-1]),
                "final_eval": final_eval, "note": note}
    what = f" ({name})" if name else ""
    return {"trained": False, "train": train, "eval": ev, "steps": None, "tokens_seen": None,
            "tokens_per_s": float("nan"), "final_loss": float("nan"), "final_eval": final_eval,
            "note": f"It was loaded{what}, not trained here, so there is no training curve."}


def final_validation(sm, batch_size: int = 16, max_batches: int | None = None):
    """Validation loss and perplexity per domain of a :class:`SubjectModel`, a DataFrame
    indexed by domain (columns loss, ppl, ...; a row "all"): the last evaluation of its
    training history when it was trained here (no new work), else measured now with
    :func:`evaluate` on ``sm.tokenized["validation"]`` (``batch_size`` sequences per batch,
    at most ``max_batches`` batches per domain)."""
    summary = training_summary(sm.history)
    if len(summary["final_eval"]):
        return summary["final_eval"]
    return evaluate(sm.model, sm.tokenized["validation"], batch_size, max_batches).set_index("domain")


def load_model(name_or_path, device="auto"):
    """Any causal LM (``AutoModelForCausalLM``) from a local directory or the hub, in eval mode."""
    from transformers import AutoModelForCausalLM

    if moe_lm.is_switch(name_or_path):
        return moe_lm.load_pretrained(name_or_path).to(resolve_device(device)).eval()
    try:
        with _hf_quiet():
            model = AutoModelForCausalLM.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as e:
        raise ValueError(f"name_or_path={str(name_or_path)!r}: not a saved model directory, and loading it from "
                         f"the hub failed ({e})") from e
    if getattr(model, "loss_type", "") is None:
        model.loss_type = "ForCausalLM"
    return model.to(resolve_device(device)).eval()


@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens: int = 40, seed: int = 0, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None) -> list[str]:
    """Continue each prompt (BOS prepended): greedy by default, sampled with
    ``do_sample=True`` (reproducible for ``seed``). Returns the continuations."""
    check_positive_int("max_new_tokens", max_new_tokens)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    dev = next(model.parameters()).device
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 10**9)
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for p in prompts:
            ids = [bos] + tokenizer(p, add_special_tokens=False)["input_ids"]
            ids = ids[-max(1, limit - max_new_tokens):]
            x = torch.tensor([ids], device=dev)
            kw = dict(do_sample=True, temperature=temperature, top_k=top_k) if do_sample else dict(do_sample=False)
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                               pad_token_id=tokenizer.pad_token_id or bos, **kw)
            out.append(tokenizer.decode(y[0, x.shape[1]:], skip_special_tokens=False))
    return out


def prepare_data(cfg: dict):
    """The data half of :func:`subject_model` for a model we train: ``(corpus, tokenizer,
    tokenized)`` from ``cfg["data"]`` (corpus, domains, max_docs_per_domain, max_chars_per_doc,
    holdout, vocab_size, seed) and ``cfg["lm"]["n_ctx"]``, each step cached."""
    d, m = cfg["data"], cfg["lm"]
    dseed = d.get("seed", cfg.get("seed", 0))
    corpus = data.load_corpus(d.get("corpus", "minipile"), d.get("domains"), d.get("max_docs_per_domain"),
                              d.get("max_chars_per_doc"), d.get("holdout") or (), seed=dseed)
    tokenizer = data.train_tokenizer(corpus, d["vocab_size"], seed=dseed)
    return corpus, tokenizer, data.tokenize(corpus, tokenizer, m["n_ctx"])


@dataclass
class SubjectModel:
    model: object
    tokenizer: object
    corpus: object      # datasets.DatasetDict of texts
    tokenized: object   # datasets.DatasetDict of packed rows
    history: dict | None
    path: str
    n_params: int
    cfg: dict = field(default_factory=dict)


def subject_model(cfg: dict) -> SubjectModel:
    """corpus -> tokenizer -> packed tokens -> trained (or loaded) LM, all cached.

    cfg["data"]: corpus, domains, max_docs_per_domain, (max_chars_per_doc), holdout, vocab_size, seed.
    cfg["lm"]: name (hub / local path: load it and its tokenizer instead of training) or None, n_layer,
    n_embd, n_head, n_ctx, steps, batch_size, lr, warmup, (weight_decay), eval_every, eval_batches, (precision),
    (n_inner, n_experts, moe_every, router_aux_coef, capacity_factor: a Switch transformer, see train_lm).
    cfg["seed"], cfg["device"]."""
    d, m = cfg["data"], cfg["lm"]
    seed, device = cfg.get("seed", 0), cfg.get("device", "auto")
    if m.get("name"):
        corpus = data.load_corpus(d.get("corpus", "minipile"), d.get("domains"), d.get("max_docs_per_domain"),
                                  d.get("max_chars_per_doc"), d.get("holdout") or (), seed=d.get("seed", seed))
        model = load_model(m["name"], device)
        tokenizer = data.load_tokenizer(m["name"])
        n_ctx = m.get("n_ctx") or model.config.n_positions
        tokenized = data.tokenize(corpus, tokenizer, n_ctx)
        hp = Path(str(m["name"])) / "history.json"
        history = json.loads(hp.read_text()) if hp.exists() else None
        path = str(m["name"])
    else:
        corpus, tokenizer, tokenized = prepare_data(cfg)
        model, history = train_lm(tokenized, tokenizer, **_lm_kwargs(m), seed=seed, device=device)
        path = history["path"]
    return SubjectModel(model, tokenizer, corpus, tokenized, history, path,
                        sum(p.numel() for p in model.parameters()), cfg)


def _lm_kwargs(m: dict) -> dict:
    """The :func:`train_lm` arguments of a profile's ``lm`` section."""
    keys = ("n_layer", "n_embd", "n_head", "n_ctx", "steps", "batch_size", "lr", "warmup", "weight_decay",
            "eval_every", "eval_batches", "precision", "n_inner", *moe_lm.MOE_DEFAULTS)
    return {k: m[k] for k in keys if k in m}


def _cached(cfg: dict) -> bool:
    """Whether :func:`subject_model` of ``cfg`` (a trained model) would load without training."""
    _, tokenizer, tokenized = prepare_data(cfg)
    _, history = train_lm(tokenized, tokenizer, **_lm_kwargs(cfg["lm"]), seed=cfg.get("seed", 0), device="cpu",
                          cached_only=True)          # no weights loaded: subject_model loads them once, after
    return history is not None


def _train_one(cfg: dict) -> str:
    """Worker side of :func:`train_many`: train (or find cached) one subject model, return its folder."""
    return subject_model({**cfg, "device": cfg.get("device", "auto")}).path


def train_many(cfgs: list[dict], workers: int | None = None, threads: int = 1, labels=None,
               desc: str = "train LMs") -> list[SubjectModel]:
    """:func:`subject_model` for every config of ``cfgs`` (full profile dicts as from
    :func:`saelib.config.load_profile`, differing e.g. in ``lm.n_layer`` / ``lm.n_embd``),
    the training of the models not yet cached done in ``workers`` processes (None: the
    machine's cores) with ``threads`` torch threads each (:func:`saelib.pool.map_processes`).
    The data steps (corpus, tokenizer, tokens) run first, here, once per distinct data
    config, so the workers only read them from the cache. Returns the subject models in
    the order of ``cfgs``, loaded from the cache. A model trained in a worker with
    ``threads`` threads has the weights a single process with that thread count gives.
    Raises :class:`saelib.pool.WorkerError` naming the failing config (``labels[i]``);
    the models finished before stay cached."""
    from . import pool

    cfgs = [dict(c) for c in cfgs]
    workers = pool.resolve_workers(workers)
    for c in cfgs:
        if c["lm"].get("name"):
            raise ValueError("train_many trains models (lm.name must be null); load named models with subject_model")
    seen = set()
    for c in cfgs:                                   # the shared data steps, once each, in this process
        key = config_hash({"data": c["data"], "n_ctx": c["lm"]["n_ctx"], "seed": c.get("seed", 0)})
        if key not in seen:
            seen.add(key)
            prepare_data(c)
    labels = labels or [f"n_layer={c['lm']['n_layer']} n_embd={c['lm']['n_embd']}" for c in cfgs]
    todo = [i for i, c in enumerate(cfgs) if not _cached(c)]       # no pool when every model is cached
    if todo:
        pool.map_processes(_train_one, [cfgs[i] for i in todo], workers=workers, threads=threads,
                           labels=[labels[i] for i in todo], desc=desc, unit="model")
    return [subject_model(c) for c in cfgs]
