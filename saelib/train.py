"""The training recipe of [switch] appendix A, for every kind in :mod:`saelib.saes`.

* ``b_pre`` (and ``b_router``) start at the geometric median (Weiszfeld) of a sample;
  the encoder starts parallel to the decoder (done by :func:`saelib.saes.build`).
* Every step: the gradient component parallel to each decoder row is removed, the
  gradient norm is clipped at 1, Adam (0.9, 0.999) steps, decoder rows are renormalised.
* ``lr`` defaults to ``2e-4 / sqrt(n_latents / 2**14)`` (Gao et al. 1/sqrt(M) law),
  constant, then linear decay to 0 over the last 20% of steps.
* Optional AuxK (Gao et al. app. B.1): ``k_aux = d_in // 2`` dead latents, coefficient 1/32.
* ``normalize="unit"`` (the default) scales inputs by ``s = sqrt(d_in / E||x||^2)`` estimated on the
  sample (Anthropic April-2024 update, SAELens ``expected_average_only_in``); ``s`` is
  stored as ``sae.config["norm_scaling_factor"]`` and applied inside ``sae(x)``, so the
  SAE still takes and returns raw activations and save/load/metrics stay consistent.
  It is the default so that ``saes.build`` + ``fit`` with no options work on activations
  of any scale: the default L1 coefficients (``saes.DEFAULT_L1``), the load-balancing
  weight ``alpha * d`` and the learning-rate law all assume inputs with E||x||^2 = d_in.
  ``normalize=None`` trains on the raw scale.
* FVU of data without variance (constant rows, all zeros, a one-row batch) is NaN
  (:func:`fvu_ratio`), never a huge number; all-zero data with ``normalize="unit"``
  and non-finite data raise a ValueError before the first step.
* A latent is dead when it has not fired in the last ``dead_window`` tokens, default
  ``min(10**6, steps * batch_size // 5)`` (and at least one batch): 1M tokens as in the
  papers, scaled down so a short run can still see latents die.
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import time
from pathlib import Path

import pandas as pd
import torch

from . import kernels, utils
from .utils import atomic_path, check_choice, check_positive_int, resolve_device

DECAY_FRACTION = 0.2
SAMPLE_ROWS = 8192


@torch.no_grad()
def geometric_median(points: torch.Tensor, max_iter: int = 100, tol: float = 1e-5) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed Euclidean distance to ``points``."""
    pts = points.double()
    guess = pts.mean(0)
    for _ in range(max_iter):
        w = 1.0 / (pts - guess).norm(dim=1).clamp_min(1e-12)
        new = (w[:, None] * pts).sum(0) / w.sum()
        if (new - guess).norm() < tol * max(1.0, float(guess.norm())):
            guess = new
            break
        guess = new
    return guess.to(points.dtype)


def lr_at(step: int, steps: int, lr: float) -> float:
    """Constant, then linear decay to 0 over the last 20% of ``steps``."""
    decay_start = int(steps * (1 - DECAY_FRACTION))
    if step < decay_start:
        return lr
    return lr * (steps - step) / max(1, steps - decay_start)


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------
def _check_data(data, d_in, batch_size):
    if torch.is_tensor(data):
        if data.ndim != 2 or data.shape[1] != d_in:
            raise ValueError(f"data must be a tensor [n, d_in={d_in}], got shape {tuple(data.shape)}")
        if batch_size > len(data):
            raise ValueError(f"batch_size={batch_size} exceeds the {len(data)} rows of data")
        return
    if not (hasattr(data, "batches") and hasattr(data, "sample")):
        raise ValueError(f"data must be a tensor [n, d_in] or an activation store with .batches() and .sample(), "
                         f"got {type(data).__name__}")
    d = getattr(data, "d", d_in)
    if d != d_in:
        raise ValueError(f"data has d={d} but the SAE has d_in={d_in}")


def _sample(data, n, seed):
    if torch.is_tensor(data):
        g = torch.Generator().manual_seed(seed)
        return data[torch.randperm(len(data), generator=g)[:n]].float()
    try:
        n = min(n, len(data))
    except TypeError:
        pass
    return torch.as_tensor(data.sample(n, seed=seed)).float()


def batch_stream(data, batch_size: int, seed: int, start: int = 0, device="cpu"):
    """Infinite deterministic stream of float batches, positioned at batch ``start``.

    Tensor: epoch ``e`` is the permutation drawn from ``Generator(seed * 1_000_003 + e)``
    (resuming costs nothing). Store: ``data.batches(..., seed=seed, epochs=None)`` when the
    store takes ``epochs`` (saelib's ActivationStore), else epoch ``e`` is
    ``data.batches(..., seed=seed * 1_000_003 + e)``; resuming skips ``start`` batches."""
    if torch.is_tensor(data):
        n = len(data)
        per_epoch = n // batch_size
        if per_epoch == 0:
            raise ValueError(f"batch_size={batch_size} exceeds the {n} rows of data")
        step = start
        epoch, perm = None, None
        while True:
            e, j = divmod(step, per_epoch)
            if e != epoch:
                epoch = e
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + e))
            yield _to_device(data, perm[j * batch_size:(j + 1) * batch_size], device)
            step += 1
    if "epochs" in inspect.signature(data.batches).parameters:   # saelib's ActivationStore
        epochs = [data.batches(batch_size, shuffle=True, seed=seed, device=device, epochs=None)]
    else:                                                        # one call per epoch
        epochs = (data.batches(batch_size, shuffle=True, seed=seed * 1_000_003 + e, device=device)
                  for e in itertools.count())
    skipped = 0
    for it in epochs:
        got = False
        for b in it:
            got = True
            if skipped < start:
                skipped += 1
                continue
            yield torch.as_tensor(b).to(device=device, dtype=torch.float32)
        if not got:
            raise ValueError(f"data.batches({batch_size}) yielded no batch (fewer rows than batch_size?)")


def _to_device(data, rows, device):
    """``data[rows]`` as float32 on ``device``. From CPU data to CUDA the rows are gathered
    into page-locked memory and copied without blocking (the host goes on to the next
    batch while the device computes); the caching host allocator keeps the buffer alive
    until its copy is done."""
    device = torch.device(device)
    if device.type == "cuda" and data.device.type == "cpu":
        buf = torch.empty((len(rows), *data.shape[1:]), dtype=data.dtype, pin_memory=True)
        torch.index_select(data, 0, rows, out=buf)
        return buf.to(device=device, non_blocking=True).to(torch.float32)
    return data[rows].to(device=device, dtype=torch.float32)


# ---------------------------------------------------------------------------
# one optimisation step (module level so tests can interrupt a run)
# ---------------------------------------------------------------------------
def _train_step(sae, opt, x, lr, aux_k, aux_k_coef, dead, step):
    """One step of the recipe. Returns ``(out, loss, grad_norm, parts)``: the loss, the
    gradient norm and the parts as detached 0-dim tensors on the device. No value is read
    back to the host (a CUDA step queues its work and returns); non-finite values are
    caught by :class:`StepLog` at the next log row."""
    for group in opt.param_groups:
        group["lr"] = lr
    out = sae(x)
    loss, parts = sae.loss(x, out, sync=False)
    if aux_k:
        aux = sae.auxk_loss(x, out, dead, aux_k)
        loss = loss + aux_k_coef * aux
        parts["auxk"] = aux.detach().double() * aux_k_coef
    opt.zero_grad(set_to_none=True)
    loss.backward()
    with kernels.section("optimizer"):
        sae.remove_parallel_grad_()
        params = [p for p in sae.parameters() if p.grad is not None]
        total = clip_grad_norm_(params)
        opt.step()
        sae.normalize_decoder_()
    return out, loss.detach(), total, parts


def clip_grad_norm_(params, max_norm: float = 1.0) -> torch.Tensor:
    """Clip the gradients of ``params`` to a global L2 norm of ``max_norm`` ([switch] app. A:
    norm 1) and return the norm before clipping, a 0-dim tensor (non-finite for a non-finite
    gradient; no error is raised here, so nothing waits for the device). The factor
    ``min(1, max_norm / (norm + 1e-6))`` is applied unconditionally (torch's
    ``clip_grads_with_norm_``); a factor of 1 leaves the gradients bit-identical."""
    total = torch.nn.utils.get_total_norm([p.grad for p in params], error_if_nonfinite=False)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


class StepLog:
    """The per-step statistics of a run, kept on the device and read back once per log row.

    ``add(step, loss, grad_norm, stats)`` sums ``stats`` (0-dim or 1-dim tensors, summed in
    float64) and remembers, on the device, the first step whose loss or gradient norm is
    not finite; ``check()`` raises FloatingPointError naming that step; ``means()`` returns
    the interval's means as Python numbers (lists for 1-dim statistics), one host read in
    all, and starts a new interval. ``state()``/the ``acc`` argument carry an unfinished
    interval through a checkpoint (a dict of sums and ``_n``)."""

    def __init__(self, device, acc: dict | None = None):
        acc = dict(acc or {})
        self.n = acc.pop("_n", 0)
        self.acc = acc
        self.bad = torch.full((2,), -1, dtype=torch.long, device=device)   # first bad step: loss, gradient

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, stats: dict) -> None:
        ok = torch.stack([torch.isfinite(loss), torch.isfinite(grad_norm)])
        self.bad = torch.where((self.bad < 0) & ~ok, step, self.bad)
        for key, val in stats.items():
            val = val.double() if torch.is_tensor(val) else val
            self.acc[key] = self.acc.get(key, 0.0) + val
        self.n += 1

    def check(self) -> None:
        """Raise FloatingPointError when a step so far had a non-finite loss or gradient."""
        loss_step, grad_step = self.bad.tolist()
        if loss_step >= 0 and not 0 <= grad_step < loss_step:   # the earlier of the two; the loss on a tie
            raise FloatingPointError(f"fit: the loss is not finite (NaN or inf) at step {loss_step}; lower lr, "
                                     "use normalize='unit', or check the data for NaN/inf")
        if grad_step >= 0:
            raise FloatingPointError(f"fit: non-finite gradient at step {grad_step}")

    def means(self, extra: dict | None = None) -> dict:
        """``{key: sum / n}`` of the interval, plus ``extra`` (tensors read in the same
        host read, returned as numbers or lists), after :meth:`check`."""
        self.check()
        items = {**{k: v / self.n for k, v in self.acc.items()}, **(extra or {})}
        dev = self.bad.device
        ts = [torch.as_tensor(v, dtype=torch.float64, device=dev) for v in items.values()]
        flat = torch.cat([t.reshape(-1) for t in ts]).tolist() if ts else []
        row, i = {}, 0
        for (key, _), t in zip(items.items(), ts):
            row[key] = flat[i] if t.dim() == 0 else flat[i:i + t.numel()]
            i += t.numel()
        self.acc, self.n = {}, 0
        return row

    def state(self) -> dict:
        return {**self.acc, "_n": self.n}

    @contextlib.contextmanager
    def first_error(self):
        """Inside the block, an error raised after a non-finite step (a kernel fed NaN
        weights, say) is reported as the FloatingPointError of that step."""
        try:
            yield
        except FloatingPointError:
            raise
        except Exception as e:
            try:
                self.check()
            except FloatingPointError as fp:
                raise fp from e
            raise


def _optimizer(params, lr):
    """Adam (0.9, 0.999); the fused kernel (one pass over each parameter) where torch has it."""
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), fused=fused or None)


FVU_REL_TOL = 1e-9   # FVU is undefined (NaN) when the variance is below this fraction of E||x||^2


def fvu_ratio(sq_err: float, var: float, mean_sq: float, rel_tol: float = FVU_REL_TOL) -> float:
    """FVU = ``sq_err / var`` (per-row squared error over the total variance ``sum_i Var(x_i)``),
    and the one convention for data without variance: NaN when ``var <= rel_tol * mean_sq``
    (``mean_sq = E||x||^2``; constant rows, a one-row batch, all zeros), since below that the
    variance is rounding noise and the ratio would be 1e17 or more, not a measurement."""
    if not var > rel_tol * mean_sq or not var > 0:
        return float("nan")
    return sq_err / var


def _check_sample(sample, normalize):
    """Refuse data training cannot use, before any step: non-finite values, and (with
    ``normalize="unit"``) rows that are all zero."""
    if not bool(torch.isfinite(sample).all()):
        raise ValueError("data holds NaN or inf values (found in the sample used to initialise the SAE); "
                         "clean the activations before training")
    if normalize == "unit" and not float(sample.double().pow(2).sum(1).mean()) > 0:
        raise ValueError("data: every sampled row is zero, so normalize='unit' cannot scale the inputs to "
                         "E||x||^2 = d_in and there is nothing to reconstruct; training cannot proceed")


def fvu_ratio_tensor(sq_err: torch.Tensor, var: torch.Tensor, mean_sq: torch.Tensor,
                     rel_tol: float = FVU_REL_TOL) -> torch.Tensor:
    """:func:`fvu_ratio` on 0-dim float64 tensors, without reading them to the host."""
    ok = (var > rel_tol * mean_sq) & (var > 0)
    return torch.where(ok, sq_err / var, torch.full_like(var, float("nan")))


def _batch_stats(sae, x, out, recon):
    """mse and fvu from the step's ``recon`` (0-dim tensor, mean_b ||(x - x_hat) s||^2) and
    the batch variance (float64 accumulation), l0 and the expert load: 0-dim / 1-dim tensors
    on the device, no further pass over the error and no host read."""
    with torch.no_grad():
        x = x.reshape(-1, sae.d_in)
        s2d = sae.norm_scaling_factor ** 2
        var, mean = torch.var_mean(x, 0, correction=0)
        var = var.double().sum()                              # sum_i Var(x_i)
        sq = var + mean.double().square().sum()               # E ||x||^2
        recon = recon.double()
        st = {"mse": recon / (s2d * sae.d_in), "fvu": fvu_ratio_tensor(recon / s2d, var, sq), "l0": out.l0_tensor}
        if out.expert_idx is not None:
            st["expert_load"] = sae.expert_load(out).double()
        return st


# ---------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------
def fit(sae, data, steps: int = 2000, batch_size: int = 1024, lr: float | None = None, seed: int = 0,
        log_every: int | None = None, aux_k: bool | int = False, aux_k_coef: float = 1 / 32,
        normalize: str | None = "unit", dead_window: int | None = None, checkpoint_path=None,
        checkpoint_every: int | None = None, device="auto", progress: bool = True,
        sample_size: int = SAMPLE_ROWS) -> pd.DataFrame:
    """Train ``sae`` in place on ``data`` (tensor ``[n, d_in]`` or activation store) and
    return the history, a DataFrame with one row per ``log_every`` steps (default
    ``max(1, steps // 50)``), values averaged over the steps of the interval:

    ``step``, ``tokens``; ``loss`` (total) and its parts ``recon`` (mean ||x s - x_hat s||^2,
    normalised units), ``l1``, ``aux_recon``, ``lb``, ``auxk`` where the kind has them;
    ``mse`` (mean squared error per element, raw units, [scale] eq. A.1), ``fvu``
    (fraction of variance unexplained; NaN for a batch without variance, see
    :func:`fvu_ratio`), ``l0``; ``dead_frac`` (fraction of latents silent
    for ``dead_window`` tokens, at the end of the interval); ``lr``; switch/scale:
    ``expert_load`` (list, f_i per expert) and, with feature scaling, ``omega`` (list);
    batchtopk: ``threshold``; ``wall_time`` (seconds since the run began, summed over
    resumed segments).

    ``aux_k``: False, True (``k_aux = d_in // 2``) or the int ``k_aux``.
    ``checkpoint_path`` + ``checkpoint_every``: a resumable checkpoint (model, Adam state,
    step, dead-latent counters, history) written atomically every ``checkpoint_every``
    steps and at the end; calling ``fit`` again with the same arguments resumes from it
    and gives the same numbers as an uninterrupted run (same seed, same thread count);
    a finished checkpoint just returns its history. A NaN/inf loss or gradient raises
    FloatingPointError naming the first bad step, at the next history row or checkpoint
    (the step reads nothing back to the host, so the check waits for a row; no checkpoint
    is written after a bad step). Deterministic for a given ``seed``.

    Every call without a checkpoint to resume starts a run: ``b_pre``/``b_router`` are
    set to the geometric median of ``sample_size`` rows (other weights are kept, so a
    built SAE starts from the recipe's initialisation), Adam and the schedule start over.
    ``history.attrs`` holds the run's settings (``lr``, ``dead_window``, ``k_aux``, ...)."""
    lr, log_every, k_aux, dead_window, args = settings(
        sae, data, steps=steps, batch_size=batch_size, lr=lr, seed=seed, log_every=log_every, aux_k=aux_k,
        aux_k_coef=aux_k_coef, normalize=normalize, dead_window=dead_window, checkpoint_path=checkpoint_path,
        checkpoint_every=checkpoint_every, sample_size=sample_size)
    dev = resolve_device(device)
    sae.to(dev)
    if dev.type == "cpu":
        utils.tune_malloc()        # no page faults for the step's reused temporaries
    opt = _optimizer(sae.parameters(), lr)
    since_fired = torch.zeros(sae.n_latents, dtype=torch.long, device=dev)
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    state = resume(ckpt, args, dev)
    history, acc, start, wall0 = [], {}, 0, 0.0
    if state is not None:
        sae.config.update(state["config"])
        sae.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        since_fired.copy_(state["since_fired"])
        history, acc, start, wall0 = state["history"], state["acc"], state["step"], state["wall_time"]
        if start >= steps:
            sae.eval()
            return _frame(history, args)
    else:
        init_run(sae, data, sample_size=sample_size, seed=seed, normalize=normalize, device=dev)
    log = StepLog(dev, acc)

    def checkpoint(step):
        log.check()                # a checkpoint never holds weights after a non-finite step
        state = dict(args=args, config=sae.config, model=sae.state_dict(), optim=opt.state_dict(),
                     since_fired=since_fired, history=history, acc=log.state(), step=step,
                     wall_time=wall0 + time.perf_counter() - t0)
        with atomic_path(ckpt) as tmp:
            torch.save(state, tmp)

    decay_start = int(steps * (1 - DECAY_FRACTION))
    stream = _prefetch(batch_stream(data, batch_size, seed, start=start, device=dev), dev)
    t0 = time.perf_counter()
    sae.train()
    bar = utils.progress(range(start, steps), total=steps, initial=start, desc=f"fit {sae.kind}",
                         **({"disable": True} if not progress else {}))
    with log.first_error():
        for step in bar:
            if sae.kind == "batchtopk" and step == decay_start:
                sae.reset_threshold_()   # theta = mean over the batches of the last 20% of steps
            x = next(stream)
            dead = since_fired >= dead_window
            cur_lr = lr_at(step, steps, lr)
            out, loss, grad_norm, parts = _train_step(sae, opt, x, cur_lr, k_aux, aux_k_coef, dead, step)
            since_fired.add_(x.shape[0]).masked_fill_(sae.fired(out), 0)
            log.add(step, loss, grad_norm, {"loss": loss, **parts, **_batch_stats(sae, x, out, parts["recon"])})
            if (step + 1) % log_every == 0 or step + 1 == steps:
                history.append(log_row(log, sae, step, batch_size, cur_lr, since_fired, dead_window,
                                       wall0 + time.perf_counter() - t0, bar))
            if ckpt is not None and checkpoint_every is not None and (step + 1) % checkpoint_every == 0 \
                    and step + 1 < steps:
                checkpoint(step + 1)
    if hasattr(bar, "close"):
        bar.close()
    if ckpt is not None:
        checkpoint(steps)
    sae.eval()
    return _frame(history, args)


def settings(sae, data, *, steps, batch_size, lr, seed, log_every, aux_k, aux_k_coef, normalize, dead_window,
             checkpoint_path, checkpoint_every, sample_size):
    """Check :func:`fit`'s arguments (ValueError naming the parameter, before any work) and
    resolve the defaults. Returns ``(lr, log_every, k_aux, dead_window, args)``, ``args``
    the run's settings as recorded in the checkpoint and ``history.attrs``. Shared by
    :func:`fit` and :func:`saelib.distributed.fit`."""
    check_positive_int("steps", steps)
    check_positive_int("batch_size", batch_size)
    check_positive_int("sample_size", sample_size)
    check_choice("normalize", normalize, (None, "unit"))
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number or None, got {lr!r}")
    if log_every is None:
        log_every = max(1, steps // 50)
    check_positive_int("log_every", log_every)
    if isinstance(aux_k, bool):
        k_aux = sae.d_in // 2 if aux_k else 0
    else:
        check_positive_int("aux_k", aux_k)
        k_aux = int(aux_k)
    if dead_window is None:
        dead_window = max(batch_size, min(10**6, steps * batch_size // 5))
    check_positive_int("dead_window", dead_window)
    if checkpoint_every is not None:
        check_positive_int("checkpoint_every", checkpoint_every)
        if checkpoint_path is None:
            raise ValueError("checkpoint_every needs checkpoint_path")
    _check_data(data, sae.d_in, batch_size)
    lr = 2e-4 / math.sqrt(sae.n_latents / 2**14) if lr is None else float(lr)
    arch = {k: v for k, v in sae.config.items() if k not in ("seed", "norm_scaling_factor")}
    args = dict(sae=arch, steps=steps, batch_size=batch_size, lr=lr,
                seed=seed, log_every=log_every, k_aux=k_aux, aux_k_coef=aux_k_coef, normalize=normalize,
                dead_window=dead_window, sample_size=sample_size)
    return lr, log_every, k_aux, dead_window, args


def resume(ckpt: Path | None, args: dict, device) -> dict | None:
    """The checkpoint at ``ckpt`` (loaded onto ``device``), or None when there is none;
    ValueError naming the differing settings when it holds a run with other ``args``."""
    if ckpt is None or not ckpt.exists():
        return None
    state = torch.load(ckpt, map_location=device, weights_only=False)
    if state["args"] != args:
        diff = {k: (state["args"].get(k), v) for k, v in args.items() if state["args"].get(k) != v}
        raise ValueError(f"checkpoint_path={str(ckpt)!r} holds a run with other settings (saved, now): {diff}; "
                         "pass another checkpoint_path or delete it")
    return state


@torch.no_grad()
def init_run(sae, data, *, sample_size: int, seed: int, normalize, device) -> None:
    """The start of a run ([switch] app. A): seed, check a sample of ``sample_size`` rows,
    set the input scaling factor (``normalize="unit"``), ``b_pre``/``b_router`` to the
    sample's geometric median, decoder rows to unit norm."""
    utils.set_seed(seed)
    sample = _sample(data, sample_size, seed).to(device)
    _check_sample(sample, normalize)
    if normalize == "unit":
        sae.config["norm_scaling_factor"] = math.sqrt(sae.d_in / float(sample.double().pow(2).sum(1).mean()))
    median = geometric_median(sample * sae.norm_scaling_factor)
    sae.b_pre.copy_(median)
    if hasattr(sae, "b_router"):
        sae.b_router.copy_(median)
    sae.normalize_decoder_()


def log_row(log: StepLog, sae, step: int, batch_size: int, lr: float, since_fired, dead_window: int,
            wall_time: float, bar=None, omega=None) -> dict:
    """One history row (see :func:`fit`) at the end of ``step``: the interval's means from
    ``log``, ``dead_frac``, ``lr``, ``omega`` (switch/scale with feature scaling; pass
    ``omega`` to override ``sae.omega``), ``threshold`` (batchtopk), ``wall_time``. Shows
    loss, l0 and fvu on the progress ``bar``."""
    row = {"step": step + 1, "tokens": (step + 1) * batch_size}
    extra = {"dead_frac": (since_fired >= dead_window).double().mean()}
    if omega is None and hasattr(sae, "omega"):
        omega = sae.omega
    if omega is not None:
        extra["omega"] = omega.detach().double().reshape(-1)
    means = log.means(extra)
    om = means.pop("omega", None)
    row.update(means)
    row["lr"] = lr
    if om is not None:
        row["omega"] = om
    if sae.kind == "batchtopk":
        row["threshold"] = sae.threshold
    row["wall_time"] = wall_time
    if hasattr(bar, "set_postfix"):
        bar.set_postfix(loss=f"{row['loss']:.4g}", l0=f"{row['l0']:.1f}", fvu=f"{row['fvu']:.3f}")
    return row


def _prefetch(batches, device, depth: int = 2):
    """``batches`` as they are, or on CUDA produced ``depth`` ahead by a background thread
    (the gather and the host-to-device copy of the next batches overlap the current step;
    same batches, same order). Errors of the producer surface at the next ``next()``."""
    if torch.device(device).type != "cuda":
        return batches
    return utils.prefetch(batches, depth)


def _frame(history, args):
    df = pd.DataFrame(history)
    df.attrs.update(args)      # the run's settings (lr, dead_window, ...) travel with it
    return df


if __name__ == "__main__":
    from .train_cli import main
    raise SystemExit(main())
