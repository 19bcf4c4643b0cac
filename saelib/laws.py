"""The experiments of [laws] (Saoud et al., "Scaling Laws, Sparse Activation, and
Mechanistic Interpretability in Transformer Architectures") at our scale: chapter 03.

* :func:`model_plan`: the sixteen subject models (standard and Switch, four sizes, two
  batch regimes, one epoch each) as profile dicts for :func:`saelib.lm.train_many`;
* :func:`summarize_models` / :func:`paper_table1` / :func:`efficiency`: table I, ours and the paper's;
* :func:`routing_table`: routing statistics of every Switch model ([laws] sec. III-D, V-C);
* :func:`paper_sites`, :func:`capture_sites`, :func:`analyze_model`: Algorithm 1 (an L1 SAE
  per site, SAE sparsity eq. 6, the superposition score eq. 5 in its candidate readings
  :func:`superposition_readings`), one model per worker process;
* :func:`superposition_checks`: each reading against the paper's range and orderings.

The Switch transformer itself is :mod:`saelib.moe_lm`.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from .moe_lm import cost_eq3, measured_flops_per_token, param_counts, routing_stats
from .utils import check_positive_int
# ----------------------------------------------------------------------------- chapter 03: the sixteen models
PAPER_SIZES = ("Tiny", "Small", "Medium", "Large")
REGIMES = ("9727", "12969")   # [laws] "batches per epoch"; same corpus -> batch sizes in ratio 12969 : 9727 = 4 : 3


def efficiency(n_params, ppl):
    """[laws] table I's "Efficiency" column, recovered from its numbers: ``1000 / (N * PPL)``
    with ``N`` the total parameters in millions (reproduces all 16 printed values to
    +-0.0025). Works on scalars and arrays."""
    out = 1000.0 / (np.asarray(n_params, dtype=float) / 1e6 * np.asarray(ppl, dtype=float))
    return float(out) if out.ndim == 0 else out


def model_plan(cfg: dict):
    """The sixteen subject-model configs of chapter 03 from ``cfg["chapter03"]``.

    ``cfg["chapter03"]``: ``data`` (overrides of ``cfg["data"]``: the fixed corpus one
    epoch runs over), ``n_ctx``, ``sizes`` ({Tiny..Large: {n_embd, n_layer, n_head,
    n_inner, n_experts}}), ``batch_size`` ([B for "9727", B for "12969"]), ``lr``,
    ``warmup_frac``, ``eval_batches``. Each model trains for one epoch of the training
    split, ``steps = rows // B`` (so batches per epoch are in the ratio of the two B).
    Returns ``(plan, cfgs)``: a DataFrame (model, arch, size, regime, batch_size, steps,
    n_experts, n_embd, n_layer, n_head, n_inner) and the profile dicts for
    :func:`saelib.lm.train_many`, in the same order."""
    import copy

    import pandas as pd

    from . import data, lm

    c3 = cfg["chapter03"]
    if len(c3["batch_size"]) != len(REGIMES):
        raise ValueError(f"chapter03.batch_size must list {len(REGIMES)} batch sizes (regimes {REGIMES}), "
                         f"got {c3['batch_size']!r}")
    base = copy.deepcopy(cfg)
    base["data"].update(c3.get("data") or {})
    base["data"].setdefault("seed", cfg.get("seed", 0))   # a model seed (e.g. a replicate) never changes the data
    base["lm"].update(name=None, n_ctx=c3["n_ctx"])
    rows = len(data.token_array(lm.prepare_data(base)[2]["train"]))
    plan, cfgs = [], []
    for arch in ("standard", "switch"):
        for regime, B in zip(REGIMES, c3["batch_size"]):
            check_positive_int("chapter03.batch_size", B)
            steps = rows // B
            if steps < 1:
                raise ValueError(f"chapter03.batch_size={B} is larger than the corpus ({rows} rows)")
            for size in PAPER_SIZES:
                s = dict(c3["sizes"][size])
                n_exp = int(s.pop("n_experts"))
                E = n_exp if arch == "switch" else 1
                m = copy.deepcopy(base)
                m["lm"].update(s, n_experts=E, batch_size=int(B), steps=int(steps), lr=float(c3["lr"]),
                               warmup=max(1, int(c3["warmup_frac"] * steps)), eval_every=int(steps),
                               eval_batches=c3.get("eval_batches"))
                cfgs.append(m)
                plan.append({"model": f"{arch.capitalize()}-{size}", "arch": arch, "size": size, "regime": regime,
                             "batch_size": int(B), "steps": int(steps), "n_experts": E, **s})
    plan = pd.DataFrame(plan)
    plan.attrs["rows"] = rows
    return plan, cfgs


def epoch_cfg(cfg: dict, batch_size: int, rows: int, seed: int | None = None) -> dict:
    """A copy of a :func:`model_plan` config trained for one epoch of ``rows`` sequences at
    ``batch_size`` (steps, warm-up fraction and evaluation point follow), optionally with
    another model ``seed`` (the data keep theirs)."""
    import copy

    check_positive_int("batch_size", batch_size)
    c3 = cfg["chapter03"]
    out = copy.deepcopy(cfg)
    steps = rows // batch_size
    if steps < 1:
        raise ValueError(f"batch_size={batch_size} is larger than the corpus ({rows} rows)")
    out["lm"].update(batch_size=int(batch_size), steps=int(steps), warmup=max(1, int(c3["warmup_frac"] * steps)),
                     eval_every=int(steps))
    if seed is not None:
        out["seed"] = int(seed)
    return out


def run_algorithm2(cfg: dict, rows: int, B0: int, tau: float, B_min: int, decay_factor: float,
                   eval_batch_size: int = 16) -> dict:
    """[laws] Algorithm 2 (:func:`saelib.moe_lm.adaptive_batch_size`) on the Switch model of
    ``cfg``: ``train_eval(B)`` trains it from the same initialisation (same seed) for one epoch
    of ``rows`` sequences at batch size ``B`` (cached; one thread, in this process) and returns
    ``p = 1 / PPL`` on the whole validation split. Returns the algorithm's dict plus ``runs``, a
    DataFrame (B, steps, val_ppl, train_seconds, path) in the order tried."""
    import pandas as pd

    from . import lm
    from .moe_lm import adaptive_batch_size

    runs = []

    def train_eval(B):
        cf = epoch_cfg(cfg, B, rows)
        sm = lm.train_many([cf], workers=1, threads=1, labels=[f"B={B}"], desc="Algorithm 2")[0]
        ppl = float(lm.evaluate(sm.model, sm.tokenized["validation"], eval_batch_size).set_index("domain").ppl["all"])
        runs.append({"B": B, "steps": cf["lm"]["steps"], "val_ppl": ppl,
                     "train_seconds": float(sm.history["train_seconds"]), "path": sm.path})
        return 1.0 / ppl

    out = adaptive_batch_size(train_eval, B0, tau, B_min, decay_factor)
    out["runs"] = pd.DataFrame(runs)
    return out


# ----------------------------------------------------------------------------- chapter 03: SAE analysis (Algorithm 1)
def paper_sites(n_layer: int, final: str = "transformer.ln_f") -> dict:
    """[laws] table II/III layer names -> our GPT-2 sites: ``embedding`` -> ``blocks.0.resid_pre``
    (token + position embedding), ``layer_i_attn`` -> ``blocks.i.attn_out``, ``layer_i_norm1``
    -> ``blocks.i.ln1`` (output of the norm before attention), ``layer_i_norm2`` ->
    ``blocks.i.ln2`` (output of the norm around the FFN; GPT-2 is pre-norm, so this is the
    pre-FFN norm), ``final_norm`` -> ``transformer.ln_f``."""
    check_positive_int("n_layer", n_layer)
    out = {"embedding": "blocks.0.resid_pre"}
    for i in range(n_layer):
        out.update({f"layer_{i}_attn": f"blocks.{i}.attn_out", f"layer_{i}_norm1": f"blocks.{i}.ln1",
                    f"layer_{i}_norm2": f"blocks.{i}.ln2"})
    out["final_norm"] = final
    return out


@torch.no_grad()
def capture_sites(model, tokens, sites, n_tokens: int, batch_size: int = 16, skip_bos: bool = True) -> dict:
    """Activations of several sites in one pass: ``{site: float32 [n, d]}`` for the first
    ``n_tokens`` positions of ``tokens`` ([n_seq, n_ctx] ids or a tokenized split),
    position 0 (BOS) dropped when ``skip_bos``."""
    import contextlib

    from .activations import _token_rows, capture

    check_positive_int("n_tokens", n_tokens)
    rows = _token_rows(tokens)
    per = rows.shape[1] - (1 if skip_bos else 0)
    rows = rows[: math.ceil(n_tokens / per)]
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    out = {s: [] for s in sites}
    with contextlib.ExitStack() as stack:
        got = {s: stack.enter_context(capture(model, s)) for s in sites}
        for i in range(0, len(rows), batch_size):
            model(input_ids=rows[i:i + batch_size].to(dev))
            for s in sites:
                a = got[s].pop()
                out[s].append((a[:, 1:] if skip_bos else a).reshape(-1, a.shape[-1]).float().cpu())
    model.train(was)
    return {s: torch.cat(v)[:n_tokens] for s, v in out.items()}


def superposition_readings(latents: torch.Tensor, acts: torch.Tensor) -> dict:
    """[laws] eq. 5, ``S = tr(C) / ||C||_F``, as written and in the readings that could land
    in [0, 1]: for ``C`` from the SAE latents (Algorithm 1: "final activations") and from
    the layer's activations, correlation and covariance, the raw ``S`` (in [1, sqrt(n)]),
    ``S / sqrt(n)``, ``1 / S = ||C||_F / tr C`` and the participation ratio over n,
    ``S^2 / n`` (n = dimensions with nonzero variance). Keys ``"<source> <kind> <reading>"``."""
    from . import metrics

    out = {}
    for src, x in (("latents", latents), ("activations", acts)):
        for kind in ("correlation", "covariance"):
            s = metrics.superposition_score(x, kind)
            sn = metrics.superposition_score(x, kind, normalized=True)
            out.update({f"{src} {kind} S": s, f"{src} {kind} S/sqrt(n)": sn, f"{src} {kind} 1/S": 1 / s,
                        f"{src} {kind} PR/n": sn ** 2})
    return out


def analyze_model(job: dict) -> list[dict]:
    """[laws] Algorithm 1 on one saved model, every site of :func:`paper_sites`: an L1 SAE
    (eq. 4, ``kind="relu"``, ``4 * d_in`` latents, trained and cached by
    :func:`saelib.sweep.train_sae`) on ``job["n_tokens"]`` training activations, then on
    held-out activations: SAE sparsity (eq. 6, :func:`saelib.metrics.activation_sparsity`
    of the latents), FVU, the final training loss and :func:`superposition_readings`.

    ``job``: path, train_tokens, eval_tokens (id tensors), n_tokens, eval_tokens_n,
    l1_coef, steps, batch_size, lr, seed, plus labels copied into every row. Returns one
    dict per site; ``seconds`` = capture time + the SAE's training time (from its cache
    record) + metric time. A module-level function, so :func:`saelib.pool.map_processes`
    can run one model per worker."""
    from . import lm, metrics, sweep

    t0 = time.perf_counter()
    model = lm.load_model(job["path"], device="cpu")
    sites = paper_sites(model.config.n_layer)
    tr = capture_sites(model, job["train_tokens"], list(sites.values()), job["n_tokens"])
    ev = capture_sites(model, job["eval_tokens"], list(sites.values()), job["eval_tokens_n"])
    t_capture = (time.perf_counter() - t0) / len(sites)
    rows = []
    for name, site in sites.items():
        t1 = time.perf_counter()
        x = tr[site]
        run = sweep.train_sae(x, "relu", n_latents=4 * x.shape[1], l1_coef=job["l1_coef"], steps=job["steps"],
                              batch_size=job["batch_size"], lr=job["lr"], seed=job["seed"])
        sae = run.sae.eval()
        with torch.no_grad():
            out = sae(ev[site])
            h = out.latents
        readings = superposition_readings(h, ev[site])
        hist = run.history
        rows.append({**job.get("labels", {}), "layer": name, "site": site, "d_in": int(x.shape[1]),
                     "sae_loss": float(hist["loss"].iloc[-1]), "sae_loss_first": float(hist["loss"].iloc[0]),
                     "fvu": metrics.fvu(ev[site], out.x_hat), "sparsity": metrics.activation_sparsity(h),
                     "L0": float((h != 0).float().sum(1).mean()), **readings,
                     "seconds": t_capture + run.seconds + time.perf_counter() - t1})
    return rows


# ----------------------------------------------------------------------------- chapter 03: tables
_PAPER_T1 = """\
Standard-Tiny standard 9727 13.12 13.12 133.97 0.571 10.21
Standard-Small standard 9727 27.76 27.76 149.15 0.244 15.74
Standard-Medium standard 9727 46.74 46.74 139.02 0.154 25.25
Standard-Large standard 9727 76.47 76.47 101.26 0.129 42.72
Switch-Tiny switch 9727 13.51 13.51 138.99 0.533 9.66
Switch-Small switch 9727 35.13 35.13 162.53 0.175 16.23
Switch-Medium switch 9727 117.68 117.68 175.72 0.048 29.21
Switch-Large switch 9727 597.33 597.33 120.91 0.014 70.74
Standard-Tiny standard 12969 13.12 13.12 152.50 0.502 12.45
Standard-Small standard 12969 27.76 27.76 175.86 0.205 20.22
Standard-Medium standard 12969 46.74 46.74 184.51 0.117 33.35
Standard-Large standard 12969 76.47 76.47 127.44 0.103 58.20
Switch-Tiny switch 12969 13.51 13.51 154.79 0.478 13.35
Switch-Small switch 12969 35.13 35.13 196.19 0.145 22.54
Switch-Medium switch 12969 117.68 117.68 227.92 0.037 39.58
Switch-Large switch 12969 597.33 597.33 166.66 0.010 97.01"""


def paper_table1():
    """[laws] table I as printed (the paper's numbers, for comparison): model, arch,
    regime, total_M, active_M, test_ppl, efficiency, time_h."""
    import pandas as pd

    cols = ["model", "arch", "regime", "total_M", "active_M", "test_ppl", "efficiency", "time_h"]
    rows = [ln.split() for ln in _PAPER_T1.splitlines()]
    df = pd.DataFrame(rows, columns=cols)
    for c in cols[3:]:
        df[c] = df[c].astype(float)
    df["size"] = df.model.str.split("-").str[1]
    return df


def summarize_models(plan, sms, batch_size: int = 16) -> "pd.DataFrame":
    """Table I for our models: ``plan`` columns plus total / active parameters (and
    non-embedding), test loss and perplexity (the whole test split), validation
    perplexity at the end of training, efficiency (:func:`efficiency`), training time
    (s, from the training record), measured forward FLOPs per token, ``2 N_active``
    (without the position embedding) and eq. 3 as FLOPs, ``2 E_k M / E`` with M = N_total."""
    import pandas as pd

    from . import data, lm

    rows = []
    for r, sm in zip(plan.to_dict("records"), sms):
        pc = param_counts(sm.model)
        test = lm.evaluate(sm.model, sm.tokenized["test"], batch_size=batch_size).set_index("domain").loc["all"]
        val = [e for e in sm.history["eval"] if e["domain"] == "all"][-1]
        ids = torch.from_numpy(data.token_array(sm.tokenized["test"])[:2])
        wpe = sm.model.transformer.wpe.weight.numel()
        rows.append({**r, "N_total": pc["total"], "N_active": pc["active"],
                     "N_total_nonemb": pc["non_embedding_total"], "N_active_nonemb": pc["non_embedding_active"],
                     "test_loss": float(test.loss), "test_ppl": float(test.ppl), "val_ppl": float(val["ppl"]),
                     "efficiency": efficiency(pc["total"], float(test.ppl)),
                     "train_seconds": float(sm.history["train_seconds"]),
                     "flops_measured": measured_flops_per_token(sm.model, ids),
                     "flops_2N_active": 2.0 * (pc["active"] - wpe),
                     "flops_eq3": 2.0 * cost_eq3(pc["total"], r["n_experts"]), "path": sm.path})
    return pd.DataFrame(rows)


def routing_table(plan, sms, max_rows: int | None = None, tokens_of=lambda sm: sm.tokenized["test"]):
    """:func:`routing_stats` of every Switch model on held-out text: ``(summary, stats)``:
    a DataFrame (plan columns + :meth:`RoutingStats.summary` per layer) and
    ``{model label: RoutingStats}`` for the figures (label = "model regime")."""
    import pandas as pd

    frames, stats = [], {}
    for r, sm in zip(plan.to_dict("records"), sms):
        if r["n_experts"] == 1:
            continue
        rs = routing_stats(sm.model, tokens_of(sm), max_rows=max_rows)
        stats[f"{r['model']} {r['regime']}"] = rs
        frames.append(rs.summary().assign(**{k: r[k] for k in ("model", "size", "regime")}))
    return pd.concat(frames, ignore_index=True), stats


def sae_jobs(plan, sms, cfg: dict) -> list[dict]:
    """The :func:`analyze_model` job of every model (``cfg["chapter03"]["sae"]``: l1_coef,
    steps, batch_size, lr, n_tokens, eval_tokens): training activations from the train
    split, evaluation activations from the validation split."""
    from . import data

    s = cfg["chapter03"]["sae"]
    jobs = []
    for r, sm in zip(plan.to_dict("records"), sms):
        jobs.append(dict(path=sm.path, train_tokens=torch.from_numpy(data.token_array(sm.tokenized["train"])),
                         eval_tokens=torch.from_numpy(data.token_array(sm.tokenized["validation"])),
                         n_tokens=s["n_tokens"], eval_tokens_n=s["eval_tokens"], l1_coef=s["l1_coef"],
                         steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"], seed=cfg.get("seed", 0),
                         labels={k: r[k] for k in ("model", "arch", "size", "regime")}))
    return jobs


def layer_type(name: str) -> str:
    """``embedding`` / ``attention`` / ``norm`` (norm1, norm2, final_norm) of a :func:`paper_sites` name."""
    return "embedding" if name == "embedding" else "attention" if name.endswith("_attn") else "norm"


READINGS = tuple(f"{src} {kind} {r}" for src in ("latents", "activations") for kind in ("correlation", "covariance")
                 for r in ("S", "S/sqrt(n)", "1/S", "PR/n"))


def superposition_checks(sae: "pd.DataFrame", paper_range=(0.136, 0.230), tol: float = 0.003) -> "pd.DataFrame":
    """Each reading of eq. 5 (:data:`READINGS`) against the paper's numbers and orderings,
    from :func:`analyze_model` rows: ``in_range`` (share of values inside the paper's
    [0.136, 0.230]), ``attn_min``/``attn_max``/``norm_min``/``norm_max``, ``attn_gt_norm``
    (share of (model, regime, layer index) where the attention score beats both norms of
    the same layer), ``medium_top`` (Standard-Medium has the highest model-average score
    among the standard models, in every regime: share of regimes), ``regime_diff``
    (median |score(9727) - score(12969)| over matching model-site pairs) and
    ``regime_within`` (share of pairs within ``tol``)."""
    import pandas as pd

    d = sae.copy()
    d["type"] = d.layer.map(layer_type)
    d["idx"] = d.layer.str.extract(r"layer_(\d+)_")[0]
    rows = []
    lo, hi = paper_range
    for rd in READINGS:
        v = d[rd]
        att = d[d.type == "attention"]
        nrm = d[d.type == "norm"]
        wins = []
        for (m, reg, i), g in d[d.idx.notna()].groupby(["model", "regime", "idx"]):
            a = g[g.type == "attention"][rd]
            n = g[g.type == "norm"][rd]
            if len(a) and len(n):
                wins.append(bool(a.iloc[0] > n.max()))
        std = d[d.arch == "standard"].groupby(["regime", "size"])[rd].mean()
        top = [std.loc[reg].idxmax() == "Medium" for reg in std.index.get_level_values(0).unique()]
        piv = d.pivot_table(index=["model", "layer"], columns="regime", values=rd)
        diff = (piv[REGIMES[0]] - piv[REGIMES[1]]).abs().dropna() if set(REGIMES) <= set(piv.columns) else pd.Series()
        rows.append({"reading": rd, "min": float(v.min()), "max": float(v.max()),
                     "in_range": float(((v >= lo) & (v <= hi)).mean()),
                     "attn_min": float(att[rd].min()), "attn_max": float(att[rd].max()),
                     "norm_min": float(nrm[rd].min()), "norm_max": float(nrm[rd].max()),
                     "attn_gt_norm": float(np.mean(wins)) if wins else float("nan"),
                     "medium_top": float(np.mean(top)) if top else float("nan"),
                     "regime_diff": float(diff.median()) if len(diff) else float("nan"),
                     "regime_within": float((diff <= tol).mean()) if len(diff) else float("nan")})
    return pd.DataFrame(rows)
