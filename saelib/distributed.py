"""Data- and expert-parallel SAE training on ``torch.distributed`` (launched with ``torchrun``).

[switch] sec. 5: "each expert can be placed on a separate GPU, leading to significant wall
clock training speed ups". This module trains one SAE on ``W`` ranks so that the result
equals a one-process :func:`saelib.train.fit` on the same global batch, to float tolerance:

* **Process group** (:func:`init`): ``nccl`` when CUDA is present, ``gloo`` on CPU, from
  the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``).
* **Data parallel** (every kind): global batch ``b`` (``B`` rows, the batch
  :func:`saelib.train.batch_stream` yields) is split into ``W`` contiguous shards of
  ``B / W`` rows; rank ``r`` computes on shard ``r``. The loss of a rank is the mean over its
  rows, so the global loss is the mean of the ranks' losses and the gradients are
  all-reduced (sum, the loss being divided by ``W`` before backward; one flat buffer).
  Clipping, Adam and decoder renormalisation then run on identical gradients and weights.
  BatchTopK keeps the ``k * B`` largest activations of the *global* batch: each rank sends
  its ``k * B`` largest to all (``all_gather``), every rank derives the same cut, keeps its
  entries ``>= cut`` and adds the same cut to the inference threshold. Switch/scale: the
  load-balancing term ``alpha d N sum_i f_i P_i`` uses the global counts ``f_i``
  (``all_reduce``), ``P_i`` the rank's mean, so the ranks' gradients average to the global
  one. Logged numbers (loss parts, L0, FVU from the global variance, dead latents from the
  global firing mask, expert load) are global.
* **Expert parallel** (switch, scale; ``expert_parallel=True``): rank ``r`` owns experts
  ``r E/W .. (r+1) E/W - 1`` (rows of ``W_enc``, ``W_dec`` and ``omega``; its Adam state
  too); router, ``b_pre``, ``b_router`` (and ``lp_transform``) are replicated and
  all-reduced like data parallel. Each rank routes its own ``B / W`` rows; every (row,
  slot) pair travels to the rank owning its expert and back with ``all_to_all`` inside an
  autograd Function (:class:`AllToAll`: all-to-all forward, the inverse all-to-all
  backward, as DeepSpeed-MoE's / Megatron's ``_AllToAll``). Per pair: ``x s`` out, the
  expert's ``min(k, m)`` largest activations back (scale: the global TopK over the
  ``n_active`` experts is taken on the row's rank from these candidates, which contain it),
  the weighted coefficients out, the expert's partial reconstruction ``[d]`` back.

Checkpoints are the format of :func:`saelib.train.fit` (full model, full Adam state, same
settings record): a checkpoint written by a W-rank run resumes in a one-process
``train.fit`` and vice versa (every rank reads the file: a shared file system is assumed).

Not done here (issue 14): streamed activations, CUDA-tested paths, AuxK with expert
parallelism (refused with a ValueError). Each rank reads the whole global batch from a
store and keeps its shard (a tensor/``.npy`` source reads only the shard's rows).
"""
from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist

from . import kernels, saes, train, utils
from .utils import atomic_path, check_positive_int

SHARDED = ("W_enc", "W_dec", "omega")          # expert-parallel: split by expert; the rest is replicated


# ---------------------------------------------------------------------------
# process group
# ---------------------------------------------------------------------------
def backend_for(device) -> str:
    """``"nccl"`` for a CUDA device, ``"gloo"`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init(device="auto") -> tuple[int, int]:
    """Join the process group described by the ``torchrun`` environment, once; return
    ``(rank, world_size)``. Without ``WORLD_SIZE`` in the environment (a plain ``python``
    run) nothing is initialised and ``(0, 1)`` is returned. The backend is ``nccl`` when
    ``device`` resolves to CUDA (each rank then uses ``cuda:LOCAL_RANK``), else ``gloo``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    dev = utils.resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend_for(dev))
    return dist.get_rank(), dist.get_world_size()


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the current process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ---------------------------------------------------------------------------
# collectives, with the bytes each rank passes to them counted
# ---------------------------------------------------------------------------
_traffic: dict | None = None


@contextlib.contextmanager
def count_traffic():
    """Count the bytes this rank hands to collectives inside the block: yields a dict
    ``{"all_to_all": bytes addressed to other ranks, "all_reduce": payload bytes,
    "all_gather": payload bytes, "broadcast": payload bytes}`` (what the tensors passed in
    hold; a ring all-reduce moves ~``2 (W-1)/W`` times its payload over the wire)."""
    global _traffic
    prev, _traffic = _traffic, {"all_to_all": 0, "all_reduce": 0, "all_gather": 0, "broadcast": 0}
    try:
        yield _traffic
    finally:
        if prev is not None:
            for key, val in _traffic.items():
                prev[key] += val
        _traffic = prev


@contextlib.contextmanager
def _not_counted():
    global _traffic
    prev, _traffic = _traffic, None
    try:
        yield
    finally:
        _traffic = prev


def _count(kind, nbytes):
    if _traffic is not None:
        _traffic[kind] += int(nbytes)


def _all_reduce(t, op=None):
    _count("all_reduce", t.numel() * t.element_size())
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op)
    return t


def _all_gather(t) -> list:
    _count("all_gather", t.numel() * t.element_size())
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


def _all_to_all(x, send: list, recv: list):
    """Rows ``x[sum(send[:j]) : sum(send[:j+1])]`` go to rank ``j``; returns the
    ``sum(recv)`` rows received, ordered by source rank."""
    row = x[0].numel() * x.element_size() if x.dim() > 1 else x.element_size()
    rank = dist.get_rank()
    _count("all_to_all", row * (sum(send) - send[rank]))
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send)
    return out


class AllToAll(torch.autograd.Function):
    """Differentiable all-to-all of rows: forward sends ``send[j]`` rows to rank ``j`` and
    receives ``recv[j]`` from it; backward sends the gradients back the inverse way
    (DeepSpeed-MoE / Megatron-LM ``_AllToAll``). Every rank must call it (in the same
    order) whenever one does, also with zero rows."""

    @staticmethod
    def forward(ctx, x, send, recv):
        ctx.splits = (send, recv)
        return _all_to_all(x, send, recv)

    @staticmethod
    def backward(ctx, grad):
        send, recv = ctx.splits
        return _all_to_all(grad, recv, send), None, None


# ---------------------------------------------------------------------------
# the ranks' share of the data
# ---------------------------------------------------------------------------
def shard_stream(data, batch_size: int, seed: int, rank: int, world_size: int, start: int = 0, device="cpu"):
    """Rank ``rank``'s rows of each global batch of :func:`saelib.train.batch_stream`
    (rows ``rank * b .. (rank+1) * b - 1``, ``b = batch_size / world_size``), as float32
    ``[b, d]``. A tensor source reads only those rows (the same permutations as
    ``batch_stream``); a store's global batch is read whole and sliced."""
    b = batch_size // world_size
    lo = rank * b
    if not torch.is_tensor(data):
        for x in train.batch_stream(data, batch_size, seed, start=start, device=device):
            yield x[lo:lo + b]
        return
    n = len(data)
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size={batch_size} exceeds the {n} rows of data")
    step, epoch, perm = start, None, None
    while True:
        e, j = divmod(step, per_epoch)
        if e != epoch:
            epoch = e
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + e))
        yield data[perm[j * batch_size + lo:j * batch_size + lo + b]].to(device=device, dtype=torch.float32)
        step += 1


# ---------------------------------------------------------------------------
# expert-parallel shard of an SAE
# ---------------------------------------------------------------------------
def shard_experts(sae, rank: int, world_size: int) -> saes.SAE:
    """An SAE holding rank ``rank``'s ``n_experts / world_size`` experts (copies of their
    ``W_enc``/``W_dec`` rows and ``omega`` entries) and sharing ``sae``'s replicated
    parameters (``b_pre``, ``W_router``, ``b_router``, ``lp_transform``: the same Parameter
    objects). Raises ValueError when ``n_experts`` is not divisible by ``world_size``."""
    check_expert_parallel(sae.config, world_size)
    E_loc = sae.n_experts // world_size
    cfg = dict(sae.config, n_latents=E_loc * sae.m, n_experts=E_loc)
    with torch.device("meta"):
        loc = saes.SAE(cfg)
    rows = slice(rank * E_loc * sae.m, (rank + 1) * E_loc * sae.m)
    for name, p in sae.named_parameters():
        if name in SHARDED:
            part = p.detach()[rows] if name != "omega" else p.detach()[rank * E_loc:(rank + 1) * E_loc]
            setattr(loc, name, torch.nn.Parameter(part.clone()))
        else:
            setattr(loc, name, p)
    loc.rank, loc.E_loc = rank, E_loc
    return loc


def check_expert_parallel(config: dict, world_size: int) -> None:
    """ValueError unless expert parallelism applies: kind switch/scale and ``n_experts``
    divisible by ``world_size``."""
    if config["kind"] not in saes.MOE_KINDS:
        raise ValueError(f"expert_parallel needs kind in {list(saes.MOE_KINDS)}, got kind={config['kind']!r}")
    if config.get("weight_before_topk"):
        raise ValueError("expert_parallel does not implement weight_before_topk=True (the official Scale code's "
                         "TopK order); train it data-parallel (expert_parallel=False) or in one process")
    if config["n_experts"] % world_size:
        raise ValueError(f"expert_parallel: n_experts={config['n_experts']} is not divisible by the world size "
                         f"{world_size}; use a number of ranks that divides it")


class _Run:
    """One rank's training state: the SAE (full; expert parallel: full-shaped but only its
    replicated parameters are current while training), its local parameters and optimizer."""

    def __init__(self, sae, rank, world_size, expert_parallel):
        self.sae, self.rank, self.W, self.ep = sae, rank, world_size, expert_parallel
        self.loc = shard_experts(sae, rank, world_size) if expert_parallel else None
        own = dict(self.loc.named_parameters()) if expert_parallel else {}
        self.names = [name for name, _ in sae.named_parameters()]
        self.params = [own[name] if name in SHARDED and expert_parallel else p for name, p in sae.named_parameters()]
        self.sharded = [name in SHARDED and expert_parallel for name in self.names]
        self.load = None
        self.release()
        self.guess = None

    # -- forward passes -------------------------------------------------
    def forward(self, x):
        sae = self.sae
        if self.ep:
            return self._forward_ep(x)
        if sae.kind == "batchtopk" and sae.training:
            return self._forward_batchtopk(x)
        out = sae(x)
        if out.expert_idx is not None:
            self._global_load(out.expert_idx)
        return out

    def _global_load(self, expert_idx):
        sae = self.sae
        counts = torch.bincount(expert_idx.flatten(), minlength=sae.n_experts).to(torch.float64)
        _all_reduce(counts)
        self.load = (counts / (expert_idx.numel() * self.W)).to(sae.W_dec.dtype)

    def _forward_batchtopk(self, x):
        """BatchTopK over the global batch: the local ``k * B`` largest (B global) contain
        this rank's part of the global selection; the cut is the (k B)-th largest of all."""
        sae, s = self.sae, self.sae.norm_scaling_factor
        xs = x.reshape(-1, sae.d_in).to(sae.W_dec.dtype)
        xs = xs * s if s != 1 else xs
        kB = sae.k * xs.shape[0] * self.W
        v, i, local_cut = kernels.batch_topk_encode(xs, sae.W_enc, sae.b_enc, sae.k * self.W, b_pre=sae.b_pre,
                                                    guess=self.guess)
        self.guess = local_cut or None
        with torch.no_grad():
            flat = v.detach().flatten()
            top = flat.topk(min(kB, flat.numel())).values
            cand = torch.zeros(kB, dtype=flat.dtype, device=flat.device)
            cand[:len(top)] = top
            cut = float(torch.cat(_all_gather(cand)).topk(kB).values[-1])   # 0: fewer positives than kB
        if cut > 0:
            v = v * (v.detach() >= cut)
            sae.threshold_sum += cut
            sae.threshold_count += 1
        x_hat = kernels.sparse_decode(v, i, sae.W_dec) + sae.b_pre
        return saes.SAEOutput(x_hat / s if s != 1 else x_hat, saes._l0(v), values=v, indices=i)

    def _forward_ep(self, x):
        """Expert-parallel switch/scale forward on this rank's rows (see the module docstring)."""
        sae, loc, W, r = self.sae, self.loc, self.W, self.rank
        d, m, E_loc, s = sae.d_in, sae.m, loc.E_loc, sae.norm_scaling_factor
        xs = x.reshape(-1, d).to(sae.W_dec.dtype)
        xs = xs * s if s != 1 else xs
        p, eidx, weight = sae._route(xs)
        B, A = eidx.shape
        self._global_load(eidx)
        with kernels.section("dispatch"):
            flat = eidx.reshape(-1)                                   # (row, slot) pairs
            dest = flat.div(E_loc, rounding_mode="floor")
            order = torch.argsort(dest, stable=True)
            inverse = kernels._inverse(order)
            send_t = torch.bincount(dest, minlength=W)
            recv_t = _all_to_all(send_t, [1] * W, [1] * W)
            send, recv = send_t.tolist(), recv_t.tolist()
            x_in = _all_to_all(xs.index_select(0, order.div(A, rounding_mode="floor")), send, recv)
            e_in = _all_to_all((flat % E_loc).index_select(0, order), send, recv)
        kk = min(sae.k, m)
        z, idx = kernels.expert_topk_encode(x_in, loc.expert_encoder(), e_in[:, None], kk, b_pre=sae.b_pre)
        z_pairs = AllToAll.apply(z, recv, send).index_select(0, inverse).view(B, A * kk)
        i_pairs = _all_to_all(idx + r * E_loc * m, recv, send).index_select(0, inverse).view(B, A * kk)
        w_slot = weight.gather(1, eidx)                               # p_e of each pair's expert
        if A == 1:                                                    # switch: the expert's TopK is the row's
            v_pairs = z_pairs * w_slot
            values, indices = v_pairs, i_pairs
        else:                                                         # scale: one TopK over the A experts
            top = z_pairs.detach().topk(sae.k, dim=1).indices
            keep = torch.zeros_like(z_pairs).scatter_(1, top, 1.0)
            v_pairs = z_pairs * keep * w_slot.repeat_interleave(kk, dim=1)
            values, indices = v_pairs.gather(1, top), i_pairs.gather(1, top)
        v_in = AllToAll.apply(v_pairs.reshape(B * A, kk).index_select(0, order), send, recv)
        part = kernels.sparse_decode(v_in, idx, loc.W_dec)           # owner's partial reconstructions
        x_hat = AllToAll.apply(part, recv, send).index_select(0, inverse).view(B, A, d).sum(1) + sae.b_pre
        return saes.SAEOutput(x_hat / s if s != 1 else x_hat, saes._l0(values), values=values, indices=indices,
                              router_probs=p, expert_idx=eidx,
                              loss_terms={"router_probs": p, "router_weight": weight})

    # -- gradients ------------------------------------------------------
    def sync_grads(self):
        """Sum the replicated parameters' gradients over ranks (one flat buffer); expert
        shards keep theirs (their owner already received every rank's contribution). A
        missing gradient counts as zero, as in one process (a full tensor whose unused
        rows get zeros)."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        rep = [p.grad for p, sh in zip(self.params, self.sharded) if not sh]
        flat = torch.cat([g.reshape(-1) for g in rep])
        _all_reduce(flat)
        offset = 0
        for g in rep:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def grad_norm(self):
        rep = [p.grad for p, sh in zip(self.params, self.sharded) if not sh]
        total = torch.nn.utils.get_total_norm(rep).double() ** 2
        own = [p.grad for p, sh in zip(self.params, self.sharded) if sh]
        if own:
            sq = torch.nn.utils.get_total_norm(own).double().reshape(1) ** 2
            total = total + _all_reduce(sq)[0]
        return total.sqrt().float()

    @property
    def decoder_owner(self):
        return self.loc if self.ep else self.sae

    # -- full model and optimizer state (expert parallel: gathered) -------
    def release(self):
        """Expert parallel: free the full SAE's expert tensors while training (each rank then
        holds only its shard, ``O(n d / W)``); :meth:`gather_full` brings them back."""
        if self.ep:
            for name, sh in zip(self.names, self.sharded):
                if sh:
                    t = getattr(self.sae, name)
                    t.data = t.data.new_empty(0)

    def gather_full(self):
        """Put every rank's expert shards into ``self.sae``'s full tensors (collective)."""
        if not self.ep:
            return
        with torch.no_grad():
            for name, p, sh in zip(self.names, self.params, self.sharded):
                if sh:
                    getattr(self.sae, name).data = torch.cat(_all_gather(p.detach()))

    def full_optim_state(self, opt):
        sd = opt.state_dict()
        if not self.ep:
            return sd
        state = {}
        for i, sh in enumerate(self.sharded):
            st = dict(sd["state"].get(i, {}))
            if sh and st:
                for key in ("exp_avg", "exp_avg_sq"):
                    st[key] = torch.cat(_all_gather(st[key]))
            if st:
                state[i] = st
        return {"state": state, "param_groups": sd["param_groups"]}

    def local_optim_state(self, full):
        if not self.ep:
            return full
        state = {}
        for i, (name, sh) in enumerate(zip(self.names, self.sharded)):
            st = dict(full["state"].get(i, {}))
            if sh and st:
                n = self.params[i].shape[0]
                for key in ("exp_avg", "exp_avg_sq"):
                    st[key] = st[key][self.rank * n:(self.rank + 1) * n].clone()
            if st:
                state[i] = st
        return {"state": state, "param_groups": full["param_groups"]}


@contextlib.contextmanager
def _loaded(sae, load):
    """``sae.expert_load`` returns the global ``load`` inside the block (so ``sae.loss``
    weighs the balancing term with the global counts)."""
    if load is None:
        yield
        return
    object.__setattr__(sae, "expert_load", lambda out: load)
    try:
        yield
    finally:
        object.__delattr__(sae, "expert_load")


def _step(run, opt, x, lr, k_aux, aux_k_coef, dead, step):
    """One optimisation step on this rank's rows ``x``; returns ``(fired, loss, grad_norm,
    stats)``: the latents that fired on any rank, the global loss and gradient norm, and the
    batch statistics (identical on every rank), all tensors on the device (nothing is read
    back to the host; :class:`saelib.train.StepLog` checks finiteness at log rows)."""
    sae, W = run.sae, run.W
    for group in opt.param_groups:
        group["lr"] = lr
    out = run.forward(x)
    with _loaded(sae, run.load):
        loss, parts = sae.loss(x, out, sync=False)
    if k_aux:
        aux = sae.auxk_loss(x, out, dead, k_aux)
        loss = loss + aux_k_coef * aux
        parts["auxk"] = aux.detach().double() * aux_k_coef
    xr = x.reshape(-1, sae.d_in).double()
    head = torch.stack([loss.detach().double(), *(v.double() for v in parts.values()), out.l0_tensor.double()])
    packed = _all_reduce(torch.cat([head, xr.sum(0), xr.square().sum(0)]))
    glob = packed[:len(head)] / W
    loss_, l0 = glob[0], glob[-1]
    parts = dict(zip(parts, glob[1:-1]))
    B = x.shape[0] * W
    mean, sq = packed[len(head):len(head) + sae.d_in] / B, packed[len(head) + sae.d_in:] / B
    var = (sq - mean.square()).clamp_min(0).sum()
    s2d = sae.norm_scaling_factor ** 2
    stats = {"loss": loss_, **parts, "mse": parts["recon"] / (s2d * sae.d_in),
             "fvu": train.fvu_ratio_tensor(parts["recon"] / s2d, var, sq.sum()), "l0": l0}
    if run.load is not None:
        stats["expert_load"] = run.load.double()
    opt.zero_grad(set_to_none=True)
    (loss / W).backward()
    with kernels.section("optimizer"):
        run.sync_grads()
        run.decoder_owner.remove_parallel_grad_()
        total = run.grad_norm()
        torch.nn.utils.clip_grads_with_norm_(run.params, 1.0, total)   # a factor of 1 changes nothing
        opt.step()
        run.decoder_owner.normalize_decoder_()
    fired = sae.fired(out).to(torch.uint8)
    _all_reduce(fired, dist.ReduceOp.MAX)
    return fired.bool(), loss_, total, stats


# ---------------------------------------------------------------------------
# fit on W ranks
# ---------------------------------------------------------------------------
def fit(sae, data, steps: int = 2000, batch_size: int = 1024, lr: float | None = None, seed: int = 0,
        log_every: int | None = None, aux_k: bool | int = False, aux_k_coef: float = 1 / 32,
        normalize: str | None = "unit", dead_window: int | None = None, checkpoint_path=None,
        checkpoint_every: int | None = None, device="auto", progress: bool = True,
        sample_size: int = train.SAMPLE_ROWS, expert_parallel: bool = False) -> pd.DataFrame:
    """:func:`saelib.train.fit` on every rank of the current process group (call it on all
    ranks with the same arguments); same parameters, same history, same checkpoint format.
    Without a process group (or with one rank) it is ``train.fit`` itself.

    ``batch_size`` is the global batch ``B``; each rank computes on ``B / W`` rows.
    ``expert_parallel``: switch/scale only, ``n_experts`` divisible by ``W``. Every rank
    returns the full trained SAE (expert shards gathered) and the same history;
    ``history.attrs["traffic_per_step"]`` holds the bytes this rank passed to collectives
    per step (see :func:`count_traffic`), ``attrs["world_size"]`` the number of ranks.
    Rank 0 writes the checkpoint. Errors (ValueError before any work): ``batch_size`` not
    divisible by ``W``, ``n_experts`` not divisible by ``W``, expert parallelism for a
    dense kind or with AuxK."""
    rank, W = world()
    if expert_parallel:
        check_expert_parallel(sae.config, W)
        if aux_k:
            raise ValueError("aux_k is not implemented with expert_parallel=True (the dead latents' residual "
                             "would need a further all-to-all); use data parallelism for AuxK")
    check_positive_int("batch_size", batch_size)
    if batch_size % W:
        raise ValueError(f"batch_size={batch_size} is not divisible by the world size {W}; "
                         "each rank takes batch_size / world_size rows")
    if W == 1:
        t0 = time.perf_counter()
        hist = train.fit(sae, data, steps=steps, batch_size=batch_size, lr=lr, seed=seed, log_every=log_every,
                         aux_k=aux_k, aux_k_coef=aux_k_coef, normalize=normalize, dead_window=dead_window,
                         checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every, device=device,
                         progress=progress, sample_size=sample_size)
        hist.attrs.update(world_size=1, traffic_per_step={}, seconds=time.perf_counter() - t0)
        return hist
    lr, log_every, k_aux, dead_window, args = train.settings(
        sae, data, steps=steps, batch_size=batch_size, lr=lr, seed=seed, log_every=log_every, aux_k=aux_k,
        aux_k_coef=aux_k_coef, normalize=normalize, dead_window=dead_window, checkpoint_path=checkpoint_path,
        checkpoint_every=checkpoint_every, sample_size=sample_size)
    dev = utils.resolve_device(device)
    sae.to(dev)
    since_fired = torch.zeros(sae.n_latents, dtype=torch.long, device=dev)
    history, acc, start, wall0 = [], {}, 0, 0.0
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    state = train.resume(ckpt, args, dev)
    if state is not None:
        sae.config.update(state["config"])
        sae.load_state_dict(state["model"])
        since_fired.copy_(state["since_fired"])
        history, acc, start, wall0 = state["history"], state["acc"], state["step"], state["wall_time"]
    else:
        train.init_run(sae, data, sample_size=sample_size, seed=seed, normalize=normalize, device=dev)
        with torch.no_grad():          # every rank starts from rank 0's weights (as DDP does)
            for t in [*sae.parameters(), *sae.buffers()]:
                _count("broadcast", t.numel() * t.element_size() if rank == 0 else 0)
                dist.broadcast(t.data, 0)
    run = _Run(sae, rank, W, expert_parallel)
    opt = train._optimizer(run.params, lr)
    if state is not None:
        opt.load_state_dict(run.local_optim_state(state["optim"]))
        del state
        if start >= steps:
            run.gather_full()
            sae.eval()
            return _finish(history, args, W, {}, 0)

    log = train.StepLog(dev, acc)

    def checkpoint(step, final=False):
        log.check()                # a checkpoint never holds weights after a non-finite step
        run.gather_full()
        optim = run.full_optim_state(opt)
        if rank == 0:
            st = dict(args=args, config=sae.config, model=sae.state_dict(), optim=optim,
                      since_fired=since_fired, history=history, acc=log.state(), step=step,
                      wall_time=wall0 + time.perf_counter() - t0)
            with atomic_path(ckpt) as tmp:
                torch.save(st, tmp)
        if not final:
            run.release()
        dist.barrier()

    decay_start = int(steps * (1 - train.DECAY_FRACTION))
    stream = shard_stream(data, batch_size, seed, rank, W, start=start, device=dev)
    sae.train()
    if run.loc is not None:
        run.loc.train()
    bar = utils.progress(range(start, steps), total=steps, initial=start, desc=f"fit {sae.kind} x{W}",
                         **({"disable": True} if not progress or rank else {}))
    t0 = time.perf_counter()
    with count_traffic() as traffic, log.first_error():
        for step in bar:
            if sae.kind == "batchtopk" and step == decay_start:
                sae.reset_threshold_()
            x = next(stream)
            dead = since_fired >= dead_window
            cur_lr = train.lr_at(step, steps, lr)
            fired, loss, grad_norm, stats = _step(run, opt, x, cur_lr, k_aux, aux_k_coef, dead, step)
            since_fired.add_(batch_size).masked_fill_(fired, 0)
            log.add(step, loss, grad_norm, stats)
            if (step + 1) % log_every == 0 or step + 1 == steps:
                omega = None
                if hasattr(sae, "omega"):
                    omega = torch.cat(_all_gather(run.loc.omega.detach())) if run.ep else sae.omega
                history.append(train.log_row(log, sae, step, batch_size, cur_lr, since_fired, dead_window,
                                             wall0 + time.perf_counter() - t0, bar, omega=omega))
            if ckpt is not None and checkpoint_every is not None and (step + 1) % checkpoint_every == 0 \
                    and step + 1 < steps:
                with _not_counted():    # checkpoint gathers are not training traffic
                    checkpoint(step + 1)
        seconds = time.perf_counter() - t0
    if hasattr(bar, "close"):
        bar.close()
    n_steps = steps - start
    if ckpt is not None:
        checkpoint(steps, final=True)
    else:
        run.gather_full()
    sae.eval()
    return _finish(history, args, W, traffic, n_steps, seconds)


def _finish(history, args, W, traffic, n_steps, seconds=0.0):
    df = train._frame(history, args)
    df.attrs.update(world_size=W, seconds=seconds,
                    traffic_per_step={k: v / n_steps for k, v in traffic.items()} if n_steps else {})
    return df


# ---------------------------------------------------------------------------
# launching W local processes (tests, measurements; torchrun does this for the CLI)
# ---------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank, nprocs, port, threads, fn, args, queue):
    import pickle
    import traceback

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(nprocs), LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    try:
        if nprocs > 1:
            dist.init_process_group("gloo")
        result = fn(*args)
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:   # noqa: BLE001 - reported to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(fn, nprocs: int, *args, threads: int = 1, timeout: float = 600.0) -> list:
    """Run ``fn(*args)`` in ``nprocs`` fresh processes joined in a ``gloo`` process group on
    this machine (``nprocs=1``: one process, no group), each with ``threads`` torch threads;
    return the ranks' results in rank order. ``fn`` must be importable (module level); its
    results are pickled. A failure in any rank raises RuntimeError with that rank's
    traceback; the processes are stopped after ``timeout`` seconds. Processes are spawned, so
    a script calling this needs the ``if __name__ == "__main__":`` guard."""
    import multiprocessing as mp
    import pickle
    import queue as queue_mod

    check_positive_int("nprocs", nprocs)
    check_positive_int("threads", threads)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_child, args=(r, nprocs, port, threads, fn, args, q), daemon=True)
             for r in range(nprocs)]
    for p in procs:
        p.start()
    results, errors = {}, []
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < nprocs:
            try:
                rank, ok, payload = q.get(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            except queue_mod.Empty:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"launch: {nprocs} processes did not finish within {timeout} s") from None
                if errors or any(p.exitcode not in (None, 0) for p in procs):
                    break
                continue
            if ok:
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank}:\n{payload}")
                deadline = min(deadline, time.monotonic() + 10)   # the others may wait in a collective
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join()
    if errors or len(results) < nprocs:
        raise RuntimeError("launch: a rank failed\n" + ("\n".join(errors) or "a process exited without a result (a script that calls launch needs the "
                                                  "`if __name__ == '__main__':` guard: processes are spawned)"))
    return [results[r] for r in range(nprocs)]


def fit_worker(spec: dict, data, fit_kwargs: dict, expert_parallel: bool = False):
    """Build ``saes.build(**spec)`` and train it with :func:`fit` on the current process
    group; returns ``(history, state_dict)`` (for :func:`launch`)."""
    sae = saes.build(**spec)
    hist = fit(sae, data, expert_parallel=expert_parallel, **fit_kwargs)
    return hist, {k: v.detach().cpu().clone() for k, v in sae.state_dict().items()}


# the measurements and the cost model live in saelib.parallel_cost (one concept per module)
from .parallel_cost import cost_model, measure_scaling, pays_from_batch  # noqa: E402,F401
