"""FlexLoRA in one file: low-rank adaptation whose rank moves during training.

ΔW = P Λ Q is kept in SVD form (P, Λ, Q are lora_B, lora_E, lora_A in AdaLoRA and PEFT).
Every few steps, under a cubic budget schedule, a spectral-entropy score per matrix decides which
matrices lose their weakest direction and which gain one, at λ = 0, so the output does not move.
Each adapter holds a fixed number of slots and a live mask, so an allocation rewrites values in
place and never a shape: DDP, FSDP2, accelerate and torch.compile keep working. Departures from
the paper or the authors' code are marked "Deviation"; every function checks its arguments
before it acts. Saving, loading and merging for serving: flexlora_io.py.

1) FlexLoRA: Entropy-Guided Flexible Low-Rank Adaptation, Liu, Si, Jia, ICLR 2026,
   https://arxiv.org/abs/2601.22905 (not the federated "FlexLoRA" of Bai et al., 2024)
2) AdaLoRA, Zhang et al., ICLR 2023, https://arxiv.org/abs/2303.10512 (the SVD-form adapter)
3) LoRA, Hu et al., ICLR 2022, https://arxiv.org/abs/2106.09685
"""

import math
import numbers
import re
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

SIGMA_INIT = 0.02  # std of the entries of P and Q, at init and for new directions (AdaLoRA's)
INITS = ("gaussian", "lora")  # how directions start: the paper's, or LoRA's (see _fresh)
EPS = 1e-8  # the ε inside log(s_i + ε) of the entropy (paper §3)
_RANK_DIM = {"P": 1, "Lambda": 0, "Q": 0}  # the axis of each factor that indexes directions
# optimizer state starting not at 0
_FIRST = {"sum": "initial_accumulator_value", "step_size": "lr"}


def _need(ok: bool, msg: str):  # a user error gets one clear message saying what to do
    if not ok:
        raise ValueError(msg)


def _int(name: str, v, lo: int) -> int:  # an int or numpy int (not a bool, 2.0 or "2") >= lo
    ok = isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= lo
    _need(ok, f"{name} must be an integer >= {lo}, got {v!r}")
    return int(v)


def _positive(name: str, v) -> float:  # a finite real > 0, numpy's too (not a bool, NaN or "16")
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 < v < math.inf
    _need(ok, f"{name} must be a finite number > 0, got {v!r}")
    return float(v)


# -----------------------------------------------------------------------------
# The adapter
class FlexLoRALinear(nn.Module):
    """A frozen nn.Linear plus a rank-r update in SVD form, held in r_max fixed slots:

        y = x Wᵀ + c + s · x Qᵀ diag(λ ⊙ m) Pᵀ,     s = alpha / r_init

    P: (d_out, r_max), Λ: (r_max,), Q: (r_max, d_in) and the buffer `live` m: (r_max,), True
    for the r slots in use; r <= r_max <= min(d_in, d_out). ΔW = 0 at start (λ = 0;
    init="lora": P = 0), and s is fixed at creation, never following the rank: neither a new
    adapter nor a new direction moves the output. A dead slot holds zeros and, masked out, gets
    exactly zero gradient. r_max (default 2 · r, at most min(d_in, d_out)) is ours: the paper
    has no cap (README, Deviations); the tensors never change shape, so DDP, FSDP and
    torch.compile keep working through every allocation."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 init: str = "gaussian", r_max: int = None):
        super().__init__()
        _need(isinstance(base, nn.Linear),
              f"FlexLoRALinear wraps an nn.Linear, got {type(base).__name__}")
        r, alpha, full = _int("r", r, 1), _positive("alpha", alpha), min(base.weight.shape)
        _need(r <= full, f"r={r} is more than the {tuple(base.weight.shape)} matrix's rank "
                         f"{full}: R could never reach 0; pass r <= {full}")
        r_max = (min(2 * r, full) if r_max is None
                 else _int("r_max (the slots; None: 2 · r)", r_max, r))
        _need(r_max <= full,
              f"r_max={r_max} is more than the {tuple(base.weight.shape)} matrix's rank {full}")
        _need(isinstance(dropout, numbers.Real) and not isinstance(dropout, bool)
              and 0 <= dropout < 1, f"dropout must be in [0, 1): {dropout!r}")
        _need(init in INITS,
              f"init must be 'gaussian' (the paper) or 'lora' (P = 0, λ = 1), got {init!r}")
        self.base = base.requires_grad_(False)  # W and c stay frozen
        # s = alpha / r_init, fixed for life
        self.r_init, self.alpha, self.scaling = r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged, self.init = False, init
        (d_out, d_in), like = base.weight.shape, dict(dtype=base.weight.dtype,
                                                      device=base.weight.device)
        P, lam, Q = _fresh(init, d_out, r, d_in)  # slots r .. r_max - 1 start dead, at zero
        self.P = nn.Parameter(F.pad(P, (0, r_max - r)).to(**like))  # (d_out, r_max)
        self.Lambda = nn.Parameter(F.pad(lam, (0, r_max - r)).to(**like))  # (r_max,)
        self.Q = nn.Parameter(F.pad(Q, (0, 0, 0, r_max - r)).to(**like))  # (r_max, d_in)
        # (r_max,) bool
        self.register_buffer("live", torch.arange(r_max, device=like["device"]) < r)
        # a state dict always holds the unmerged W, so that it loads into any model
        # as the same function
        self.register_state_dict_post_hook(_unmerged_weight)
        self.register_load_state_dict_pre_hook(lambda module, *args: module.unmerge())

    @property
    def r(self) -> int:
        return int(self.live.sum())  # the current rank: the live slots

    @property
    def r_max(self) -> int:
        return self.live.numel()  # the slots, for life

    def delta_weight(self) -> torch.Tensor:
        # ΔW = s · P diag(λ ⊙ m) Q: (d_out, r_max) x (r_max, d_in) -> (d_out, d_in)
        return (self.P * (self.scaling * self.Lambda * self.live)) @ self.Q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y  # ΔW already sits in base.weight
        h = F.linear(self.dropout(x), self.Q)  # (..., d_in) x (d_in, r_max) -> (..., r_max)
        # P diag(λ ⊙ m): (d_out, r_max), cheaper than a (..., r_max) product
        W = self.P * (self.Lambda * self.live)
        # y + s · h Wᵀ in one op: (N, r_max) x (r_max, d_out) -> (N, d_out), N = the flattened
        # batch. (Not torch.add(y, z, alpha=s): torch 2.13's inductor drops that alpha, forward
        # and backward.)
        return torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), W.T,
                           alpha=self.scaling).view(y.shape)

    @torch.no_grad()
    def merge(self):
        """W ← W + ΔW, for inference or export; train()/eval() never merge. In bf16 or fp16
        each merge() or unmerge() rounds W (by up to 2⁻⁸ of max|W + ΔW|): merge once, or keep
        W in fp32."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W ← W − ΔW, undoing merge()."""
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def live_factors(self):
        """(P, λ, Q) of the live slots only, in slot order, detached:
        (d_out, r), (r,), (r, d_in)."""
        idx = self.live.nonzero().squeeze(1)
        return tuple(_full(getattr(self, f)).detach().index_select(d, idx)
                     for f, d in _RANK_DIM.items())

    def extra_repr(self) -> str:
        return (f"r={self.r}, r_max={self.r_max}, r_init={self.r_init}, alpha={self.alpha}, "
                f"init={self.init}, merged={self.merged}")


def _unmerged_weight(layer, state_dict, prefix, local_metadata):
    if layer.merged:  # W + ΔW sits in base.weight: the state dict gets W
        w = state_dict[prefix + "base.weight"]
        state_dict[prefix + "base.weight"] = (w - layer.delta_weight().to(w.dtype)).detach()


def _fresh(init: str, d_out: int, r: int, d_in: int, gen: torch.Generator = None):
    """r directions adding nothing to ΔW, float32: P (d_out, r), λ (r,), Q (r, d_in).
    "gaussian" (paper §2): p, q ~ N(0, σ²), λ = 0, a saddle: P, Q get no gradient, and a step of
    either moves ΔW ∝ |λ|. "lora" (ours, the training scripts' default: README, Deviations):
    p = 0, λ = 1, q ~ N(0, σ²), as LoRA's B = 0: P's gradient is there at once."""
    if init == "lora":
        return (torch.zeros(d_out, r), torch.ones(r),
                torch.randn(r, d_in, generator=gen) * SIGMA_INIT)
    P = torch.randn(d_out, r, generator=gen) * SIGMA_INIT
    return P, torch.zeros(r), torch.randn(r, d_in, generator=gen) * SIGMA_INIT


def adapters(model: nn.Module, required: bool = False) -> dict:
    """{module name: FlexLoRALinear} in the model, sorted by name
    (with `required`, at least one)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module (the model), got {type(model).__name__}")
    layers = dict(sorted((n, m) for n, m in model.named_modules() if isinstance(m, FlexLoRALinear)))
    _need(layers or not required,
          "the model has no FlexLoRA adapters: call flexlora.inject() first")
    return layers


def rank_pattern(model: nn.Module) -> dict:
    """{module name: current rank}."""
    return {name: layer.r for name, layer in adapters(model).items()}


def param_groups(model: nn.Module, lr: float, lambda_lr_ratio: float = 1.0,
                 pq_lr_ratio: float = 1.0):
    """Optimizer groups: λ at lambda_lr_ratio · lr, P and Q at pq_lr_ratio · lr, the rest
    (a head) at lr; allocations keep new factors in their group. Deviation (ours; the paper uses
    one lr): from the paper's start (λ = 0) ΔW grows ~15x more slowly than LoRA's at one lr
    (README, Deviations; bench/dynamics.py)."""
    lr, k_lam, k_pq = (_positive(n, v) for n, v in (("lr", lr),
                                                    ("lambda_lr_ratio", lambda_lr_ratio),
                                                    ("pq_lr_ratio", pq_lr_ratio)))
    rate = {id(p): k for m in adapters(model).values()
            for p, k in ((m.P, k_pq), (m.Lambda, k_lam), (m.Q, k_pq))}
    groups = {}
    for p in filter(lambda p: p.requires_grad, model.parameters()):
        groups.setdefault(rate.get(id(p), 1.0), []).append(p)
    return [{"params": params, "lr": lr * k} for k, params in groups.items()]


# -----------------------------------------------------------------------------
# Patching a model (e.g. a Hugging Face transformer) by module name
def matches(name: str, pattern: str) -> bool:
    """Does a module name match a target? A suffix on a dot boundary ("output.dense" catches
    "layer.3.output.dense", never "pooler.dense"), or a regex over the whole name."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:  # not a valid regex: it was meant as a plain suffix
        return False


def _param_matches(name: str, pattern: str) -> bool:
    # a parameter matches if its name or that of a module holding it does
    # ("pooler": "pooler.dense.bias")
    parts = name.split(".")
    return any(matches(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))


def _as_list(patterns, what: str) -> list:
    patterns = [patterns] if isinstance(patterns, str) else patterns
    _need(isinstance(patterns, (list, tuple, set))
          and all(isinstance(p, str) and p for p in patterns),
          f"{what} must be a string or a list of non-empty strings, got {patterns!r}")
    return list(patterns)


def inject(model: nn.Module, target_modules, r: int, alpha: float, dropout: float = 0.0,
           trainable=(), init: str = "gaussian", r_max: int = None) -> dict:
    """Replace the nn.Linear modules named by `target_modules` with FlexLoRALinear, in place;
    freeze all other parameters but those of the modules (or parameters) named by `trainable`,
    e.g. "pooler": these train in full, never wrapped, even under a target ".*". init: see
    _fresh; r_max: the slots of each adapter (default 2 · r), the most rank it can grow to.
    Returns {name: adapter}."""
    targets, keep = _as_list(target_modules, "target_modules"), _as_list(trainable, "trainable")
    _need(targets, "target_modules is empty: name the nn.Linear modules to adapt")
    _need(not adapters(model), "the model already has FlexLoRA adapters: inject() once per model")
    trained = {n for n, _ in model.named_parameters() if any(_param_matches(n, t) for t in keep)}
    missing = [t for t in keep if not any(_param_matches(n, t) for n in trained)]
    _need(not missing, f"trainable {missing} match no module or parameter of the model")
    # not nn.MultiheadAttention's out_proj: its forward reads out_proj.weight itself, never
    # calling it
    inside_mha = {f"{n}.out_proj" for n, m in model.named_modules()
                  if isinstance(m, nn.MultiheadAttention)}
    linears = [n for n, m in model.named_modules()
               if n  # (n = "": the model itself, which inject cannot replace)
               and isinstance(m, nn.Linear) and f"{n}.weight" not in trained
               and n not in inside_mha]
    missing = [t for t in targets if not any(matches(n, t) for n in linears)]
    known = sorted({re.sub(r"\.\d+\.", ".N.", n) for n in linears})  # layer indices collapsed to N
    _need(not missing, f"target_modules {missing} match no nn.Linear of the model outside "
                       f"`trainable`. Its Linear modules are: {known}")
    # wrap the targets (this checks r, alpha, dropout, init), then freeze all but `trainable`,
    # then swap in
    wrapped = {n: FlexLoRALinear(model.get_submodule(n), r, alpha, dropout, init, r_max)
               for n in linears if any(matches(n, t) for t in targets)}
    for name, p in model.named_parameters():
        p.requires_grad_(name in trained)
    for name, layer in wrapped.items():  # (their base weights stay frozen)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    return adapters(model)


# -----------------------------------------------------------------------------
# The three ingredients: importance score, budget schedule, orthogonal regulariser
def spectral_entropy(Lambda) -> torch.Tensor:
    """Normalised spectral-energy entropy of one matrix (paper §3), from a tensor or list of λ:

        s_i = λ_i² / Σ_j λ_j²,   I(Λ) = −(1 / log r) Σ_i s_i log(s_i + ε),   I ∈ [0, 1]

    Low I: energy in few directions (prune); high I: spread over all (expand). In float64. Where
    the paper is silent (the authors' code gives NaN): r = 1 and Σλ² = 0 give 0."""
    try:
        lam = torch.as_tensor(Lambda).detach()
    except (TypeError, ValueError, RuntimeError):  # a string, None, a ragged list
        raise ValueError(f"spectral_entropy takes the λ of one matrix, a 1-D tensor or list of "
                         f"numbers, got {type(Lambda).__name__}") from None
    _need(lam.dim() <= 1, f"spectral_entropy takes the λ of one matrix, a 1-D tensor or list, "
                          f"got shape {tuple(lam.shape)}")
    lam = lam.reshape(-1).to(torch.float64)
    _need(torch.isfinite(lam).all(), f"non-finite λ {lam.tolist()[:8]}: training diverged")
    r = lam.numel()
    if r <= 1 or not lam.any():  # our conventions, see above
        return lam.new_zeros(())
    s = (lam / lam.abs().max()) ** 2  # rescale first: 1e-30 or 1e30 give the same s as 1
    s = s / s.sum()  # s_i = λ_i² / Σ λ_j²
    I = -(s * torch.log(s + EPS)).sum() / math.log(r)  # I(Λ) = −Σ s_i log s_i / log r
    return I.clamp(0.0, 1.0)  # ε can push the extremes 1e-8 outside [0, 1]


def budget(t: int, b0: int, t_warmup: int, t_final: int, total_steps: int,
           schedule: str = "cubic") -> int:
    """b(t): how many matrices are pruned (and as many expanded) at step t (paper §3):

        p(t) = (t − t_w) / (T − t_f − t_w),
        b(t) = round(b0 · (1 − p)³)   for t_w < t ≤ T − t_f

    and 0 outside that window. schedule="constant": b(t) = b0 in it, as the authors' code runs."""
    for name, v in dict(t=t, b0=b0, t_warmup=t_warmup, t_final=t_final,
                        total_steps=total_steps).items():
        _int(name, v, 0)
    _need(total_steps > t_warmup + t_final,
          f"total_steps ({total_steps}) must exceed t_warmup + t_final")
    _need(schedule in ("cubic", "constant"),
          f"schedule must be 'cubic' (the paper) or 'constant': {schedule!r}")
    if t <= t_warmup or t > total_steps - t_final:
        return 0
    p = (t - t_warmup) / (total_steps - t_final - t_warmup)
    # Deviation (authors' code): they compute round(b0·(1 − p³)); the paper says (1 − p)³.
    return b0 if schedule == "constant" else math.floor(b0 * (1 - p) ** 3 + 0.5)  # round half up


def orthogonal_regularizer(model: nn.Module) -> torch.Tensor:
    """R = mean over adapters of ‖PᵀP − I‖_F + ‖QQᵀ − I‖_F over the live directions
    (unsquared; paper §2), in a few batched ops, not ~20 small ones per adapter (a GPU waits on
    their number): the P's of one shape stacked, (K, d_out, r_max), and their K Gram matrices in
    one bmm, live rows and columns only (the Q's alike). Deviation (authors' code): they average
    over the 2K factors, half of R, so their γ is twice ours."""
    layers = adapters(model, required=True)
    # (merged, P and Q are out of the forward: a step of R alone would move ΔW away from the
    # one in W)
    _need(not any(m.merged for m in layers.values()),
          "an adapter is merged: unmerge() it to train on")
    groups = {}  # one group per factor kind, shape and device
    for m in layers.values():
        groups.setdefault(("P", m.P.shape, m.P.device), []).append(m)  # directions = columns
        groups.setdefault(("Q", m.Q.shape, m.Q.device), []).append(m)  # directions = rows
    total, device = 0.0, next(iter(layers.values())).P.device
    with torch.autocast(device.type, enabled=False):  # bf16 Gram matrices are too coarse
        for (kind, _, _), group in groups.items():
            # (_full: under FSDP2, outside the forward, P and Q are shards; gathered with their
            # gradient)
            # (K, d_out, r_max) | (K, r_max, d_in)
            stacked = torch.stack([_full(getattr(m, kind)) for m in group]).float()
            # PᵀP | QQᵀ: (K, r_max, r_max)
            gram = stacked.mT @ stacked if kind == "P" else stacked @ stacked.mT
            live = torch.stack([m.live for m in group]).float()  # (K, r_max)
            eye = torch.eye(gram.shape[-1], device=gram.device)
            # live entries only: a dead slot gets exactly zero gradient
            sq = ((gram - eye) * (live[:, :, None] * live[:, None, :])).square().sum((1, 2))  # (K,)
            # ‖·‖_F = sqrt of the sum; clamp: a finite (zero) gradient at an exactly
            # orthonormal factor
            total = total + sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt().sum().to(device)
    return total / len(layers)


# -----------------------------------------------------------------------------
# The allocator: score, choose, then rewrite slots in place, the optimizer's state with them
def _full(t: torch.Tensor) -> torch.Tensor:
    # the whole tensor: a DTensor (FSDP2 shards P, Λ, Q between steps) is gathered, all others
    # as they are
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@torch.no_grad()
def _write_slot(t: torch.Tensor, dim: int, j: int, value):
    """t[slot j along dim] = value, in place; under FSDP2 each process writes its own shard
    of it."""
    if not hasattr(t, "full_tensor"):
        t.select(dim, j).copy_(value)
        return
    from torch.distributed.tensor import distribute_tensor
    full = t.full_tensor()
    full.select(dim, j).copy_(value)
    t.to_local().copy_(distribute_tensor(full, t.device_mesh, t.placements,
                                         src_data_rank=None).to_local())


def _set_slot(layer: FlexLoRALinear, j: int, fresh, optimizer):
    """Slot j takes the direction `fresh` = (p, λ, q), or zeros if None, and comes alive with it
    (dies without). The optimizer's state of slot j restarts where the optimizer starts it (Adam's
    moments at 0, Adagrad's sum at its initial value) and any gradient there is dropped: the
    parameters stay the same objects, so DDP, FSDP and the optimizer's groups never notice.
    Deviation (authors' code): they rebuild the optimizer, losing its state and groups."""
    groups = {id(p): g for g in getattr(optimizer, "param_groups", []) for p in g["params"]}
    for (name, dim), new in zip(_RANK_DIM.items(), fresh or (None,) * 3):
        param = getattr(layer, name)
        _write_slot(param, dim, j,
                    0.0 if new is None else new.squeeze(dim).to(param.device, param.dtype))
        if param.grad is not None:
            _write_slot(param.grad, dim, j, 0.0)
        for k, v in (optimizer.state.get(param, {}) if optimizer is not None else {}).items():
            if torch.is_tensor(v) and v.shape == param.shape:  # exp_avg, momentum_buffer, sum, ...
                _write_slot(v, dim, j, float(groups[id(param)].get(_FIRST.get(k), 0.0)))
    layer.live[j] = fresh is not None


def _inner(optimizer):
    while hasattr(optimizer, "optimizer"):  # accelerate's (and the Trainer's) AcceleratedOptimizer
        optimizer = optimizer.optimizer
    return optimizer


@torch.no_grad()
def _own_count(layers: dict, born: dict, t: int, optimizer):
    """Adam's bias correction counts the steps of a whole tensor, T, but a slot reborn at step t0
    restarted its moments at 0 (_set_slot), as a fresh Adam's a = t − t0 steps ago: with T's
    count, once T is large, its first step is (1 − β1) / √(1 − β2) ≈ 3.2× a fresh Adam's. After
    each optimizer step, redo the young slots' update with their own count, exactly a fresh
    Adam's on that slot alone:
        θ += lr · (u(T) − u(a)),   u(n) = m / (1 − β1ⁿ) / (sqrt(v / (1 − β2ⁿ)) + ε)
    (AdamW's decay θ · lr · wd is the same in both). The factors of one kind and shape are
    stacked, as in orthogonal_regularizer, with a = T on the other slots (a correction of
    exactly 0): a few dozen ops per step, not ~20 per tensor. Deviation (ours; the authors
    rebuild the optimizer). Other optimizers keep the tensor's count: SGD, RMSprop, Rprop,
    Adagrad (lr_decay 0) use none, so their reset slot already steps as a fresh one; NAdam,
    RAdam, Adamax do not."""
    optimizer = _inner(optimizer)
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return
    group = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    stacks = {}  # (factor, shape, param group) -> [(param, its state, T, each slot's age)]
    for name, layer in layers.items():
        for f in _RANK_DIM if any(born[name]) else ():
            p = getattr(layer, f)
            state = optimizer.state.get(p, {})
            if "step" in state:  # (not frozen, and stepped)
                T = float(state["step"])
                age = [min(t - t0, T) if t0 else T for t0 in born[name]]  # (a rebuilt optimizer: T)
                stacks.setdefault((f, p.shape, group[id(p)]), []).append((p, state, T, age))
    for (f, _, i), items in stacks.items():
        g, dim = optimizer.param_groups[i], _RANK_DIM[f]
        (b1, b2), v_key = g["betas"], "max_exp_avg_sq" if g["amsgrad"] else "exp_avg_sq"
        m = torch.stack([_full(s["exp_avg"]) for _, s, _, _ in items]).float()  # (K, *shape)
        v = torch.stack([_full(s[v_key]) for _, s, _, _ in items]).float()
        axis = [len(items)] + [-1 if d == dim else 1 for d in range(m.dim() - 1)]  # (K, the slots)
        a = torch.tensor([age for *_, age in items], device=m.device).view(axis)
        T = torch.tensor([[T] * len(age) for _, _, T, age in items], device=m.device).view(axis)
        u = lambda n: m / (1 - b1 ** n) / ((v / (1 - b2 ** n)).sqrt() + g["eps"])  # noqa: E731
        delta = g["lr"] * (u(T) - u(a))  # 0 where a = T
        params = [p for p, *_ in items]
        if any(hasattr(p, "full_tensor") for p in params):
            for p, d in zip(params, delta.unbind(0)):
                _add_(p, d.to(p.dtype))
        else:
            torch._foreach_add_(params, [d.to(p.dtype) for p, d in zip(params, delta.unbind(0))])


@torch.no_grad()
def _add_(t: torch.Tensor, delta: torch.Tensor):
    """t += delta (a whole tensor), in place; under FSDP2 each process adds its own shard."""
    from torch.distributed.tensor import distribute_tensor
    t.to_local().add_(distribute_tensor(delta, t.device_mesh, t.placements,
                                        src_data_rank=None).to_local())


def _check_processes_agree(layers: dict, t: int):
    """Under torch.distributed (DDP, FSDP: every process calls step()), all must hold the same
    live slots after an allocation: the same weights give the same decisions, so a difference is
    a bug. Costs one all-reduce of 2 · Σ r_max integers."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    live = torch.cat([m.live for m in layers.values()]).int()
    spread = torch.stack([live, -live])  # max(live) and -min(live) in one MAX all-reduce
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    if not torch.equal(spread[0], -spread[1]):
        differ = [n for n, lo, hi in zip(layers,
                                          (-spread[1]).split([m.r_max for m in layers.values()]),
                                          spread[0].split([m.r_max for m in layers.values()]))
                  if not torch.equal(lo, hi)]
        raise RuntimeError(f"step {t}: the processes' adapters differ after the allocation "
                           f"({differ[:3]}): they were trained apart (a model not wrapped in DDP "
                           f"or FSDP, or unequal seeds)")


def _check_can_move(layers: dict, c: dict):
    # the first allocation step; b(t) only decreases after it
    first = c["t_warmup"] + c["interval"]
    b = budget(first, c["b0"], c["t_warmup"], c["t_final"], c["total_steps"], c["schedule"])
    _need(b > 0, f"this allocator never allocates: at its first allocation step "
                 f"({first} = t_warmup + interval) b(t) is "
                 f"{'past the window' if first > c['total_steps'] - c['t_final'] else '0'}; "
                 f"shorten the interval or t_warmup + t_final, or raise b0 "
                 f"(b0=0 for a fixed-rank run)")
    _need(len(layers) > 1, "one adapter: rank moves between matrices, so nothing would ever "
                           "move; adapt more modules, or pass b0=0 for a fixed-rank run")
    prunable = any(m.r > c["r_min"] for m in layers.values())
    growable = any(m.r < min(c["r_max"] or m.r_max, m.r_max) for m in layers.values())
    _need(prunable and growable,
          f"no adapter can {'lose' if not prunable else 'gain'} a direction "
          f"(r_min={c['r_min']}, r_max={c['r_max']}, the slots): nothing would ever move; "
          f"widen them, or b0=0")


class RankAllocator:
    """Moves rank between the adapters of `model` during training (paper §3). Call
    step(t, optimizer) after optimizer.step() (and the LR scheduler's), before zero_grad(),
    t = optimizer steps so far. When b(t) > 0 and (t − t_warmup) % interval == 0, the b
    lowest-scoring matrices lose their weakest direction (smallest |λ|: spectra()) and the b
    highest-scoring gain a new one: the total rank stays. Growth stops at r_max (default: each
    adapter's slots). The score is the paper's I(Λ); to try another, subclass and override
    scores(), or choose(), weakest() and new_direction() for another rule (flexlora_gain.py).
    warm_start: a reborn slot steps as a fresh Adam (_own_count); call step() after every
    optimizer step, with the optimizer, for it. One allocator per model: a newer one on the same
    adapters takes them over, and the older one's step() refuses."""

    def __init__(self, model: nn.Module, b0: int, t_warmup: int, t_final: int, total_steps: int,
                 interval: int, r_min: int = 1, r_max: int = None, seed: int = 0,
                 schedule: str = "cubic", warm_start: bool = True):
        budget(0, b0, t_warmup, t_final, total_steps, schedule)  # checks the schedule's arguments
        # numpy's too
        b0, t_warmup, t_final, total_steps = int(b0), int(t_warmup), int(t_final), int(total_steps)
        interval, r_min, seed = (_int("interval", interval, 1), _int("r_min", r_min, 1),
                                 _int("seed", seed, 0))
        _need(seed < 2 ** 63, f"seed must be below 2**63 (a torch.Generator's), got {seed}")
        r_max = None if r_max is None else _int("r_max (None: the adapters' slots)", r_max, r_min)
        self.model, self.layers = model, adapters(model, required=True)
        small = {n: m.r_max for n, m in self.layers.items() if m.r_max < (r_max or 0)}
        _need(not small, f"r_max={r_max} is more than the slots of "
                         f"{dict(list(small.items())[:3])}: "
                         f"inject(..., r_max={r_max}) gives the adapters room for it")
        outside = {n: m.r for n, m in self.layers.items() if not r_min <= m.r <= (r_max or m.r)}
        _need(not outside, f"r_min={r_min} and r_max={r_max} must bracket every adapter's "
                           f"current rank (or nothing moves), "
                           f"not {dict(list(outside.items())[:3])}")
        _need(isinstance(warm_start, bool), f"warm_start must be True or False, got {warm_start!r}")
        self.config = dict(b0=b0, t_warmup=t_warmup, t_final=t_final, total_steps=total_steps,
                           interval=interval, r_min=r_min, r_max=r_max, seed=seed,
                           schedule=schedule)
        if not warm_start:  # (kept out of config otherwise: older checkpoints load unchanged)
            self.config["warm_start"] = False
        # (b0 = 0: a fixed-rank run, on purpose) an allocator that could never move is a mistake
        if b0 > 0:
            _check_can_move(self.layers, self.config)
        # our own generator: same seed -> same new directions, on every process of a multi-GPU run
        self.generator = torch.Generator().manual_seed(seed)
        # last_step: the t of the last step() call; t must grow
        self.history, self.last_step = [], 0
        # the step t at which each slot's direction was added (0: there from the start, or dead)
        self.born = {n: [0] * m.r_max for n, m in self.layers.items()}
        # the newest allocator on these adapters drives them: an older one's step() refuses
        self._owner = object()
        for m in self.layers.values():
            m._flexlora_owner = self._owner
        self._watched, self._unused = None, False  # _check_order's optimizer; a gradient since?

    def _check_order(self, optimizer):
        """step() belongs after optimizer.step(): hooks note when a gradient lands on one adapter
        parameter (_unused = True) and when the optimizer steps (False). A warning, not an error:
        a GradScaler that skips a step (inf gradients) looks the same."""
        inner = _inner(optimizer)
        if self._watched is not inner:  # the first call with it: no step seen yet
            probe = next((p for m in self.layers.values() for f in _RANK_DIM
                          for p in [getattr(m, f)] if p.requires_grad), None)
            if probe is not None:
                probe.register_post_accumulate_grad_hook(lambda _: setattr(self, "_unused", True))
                inner.register_step_post_hook(lambda *_: setattr(self, "_unused", False))
            self._watched, self._unused = inner, False
        elif self._unused:
            warnings.warn("RankAllocator.step() ran between backward() and optimizer.step(): "
                          "the gradients were not used yet; call it after optimizer.step()",
                          stacklevel=3)

    def spectra(self) -> dict:
        """{module name: each live direction's size, in slot order, a float32 CPU tensor}, with
        few device-to-host copies: λ (paper §3, the singular values as R keeps P, Q
        near-orthonormal). Deviation (ours), init="lora": P starts at 0 and carries the size
        while λ stays near 1, so |λ_i|·‖p_i‖·‖q_i‖, the i-th term of ΔW / s."""
        def size(m):
            lam = _full(m.Lambda)
            return (lam if m.init == "gaussian"
                    else lam.abs() * _full(m.P).norm(dim=0) * _full(m.Q).norm(dim=1))
        flat = torch.cat([size(m).detach().reshape(-1).float() for m in self.layers.values()]).cpu()
        live = torch.cat([m.live for m in self.layers.values()]).cpu()
        slots = dict(zip(self.layers, live.split([m.r_max for m in self.layers.values()])))
        lams = {n: lam[slots[n]] for n, lam in
                zip(self.layers, flat.split([m.r_max for m in self.layers.values()]))}
        factors = [_full(getattr(m, f)) for m in self.layers.values() for f in ("P", "Q")]
        bad = [n for n, lam in lams.items() if not torch.isfinite(lam).all()]
        # one norm over all P, Q: any NaN shows
        if not torch.isfinite(torch.nn.utils.get_total_norm(factors)):
            bad += [n for n, m in self.layers.items()
                    if not all(torch.isfinite(_full(getattr(m, f))).all() for f in ("P", "Q"))]
        _need(not bad, f"non-finite P, λ or Q in {sorted(set(bad))[:3]}: training diverged; "
                       f"lower the learning rate")
        return lams

    def scores(self, lams: dict) -> dict:
        """{module name: importance} from spectra()'s λ: the paper's I(Λ).
        Low: prune, high: expand."""
        return {name: float(spectral_entropy(lam)) for name, lam in lams.items()}

    def choose(self, b: int, lams: dict):
        """(pruned, expanded, what to record): which matrices lose a direction and which gain one,
        as many of each, at most b. The paper's rule (§3): the lowest and highest scores()."""
        scores, c = self.scores(lams), self.config
        odd = {n: v for n, v in scores.items()
               if not (isinstance(v, numbers.Real) and math.isfinite(v))}
        _need(not odd and set(scores) == set(lams),
              f"scores() must give a finite number for every adapter, "
              f"got {dict(list(odd.items())[:3]) or sorted(set(lams) ^ set(scores))[:3]}")
        ranks = {n: lam.numel() for n, lam in lams.items()}
        cap = {n: min(c["r_max"] or m.r_max, m.r_max) for n, m in self.layers.items()}
        # 1) candidates, ties broken by name so that every process decides the same
        prune = sorted((n for n in ranks if ranks[n] > c["r_min"]), key=lambda n: (scores[n], n))
        grow = sorted((n for n in ranks if ranks[n] < cap[n]), key=lambda n: (-scores[n], n))
        # 2) the largest k <= b such that the k lowest are pruned and k others grow: the total rank
        #    is conserved, and 3 matrices with b = 8 still move one direction (k = 1)
        k = min(b, len(prune))
        while k > 0 and len([n for n in grow if n not in prune[:k]]) < k:
            k -= 1
        return prune[:k], [n for n in grow if n not in prune[:k]][:k], dict(scores=scores)

    def weakest(self, name: str, lam: torch.Tensor) -> int:
        """Which live direction of `name` a prune removes (its index among the live slots): the
        smallest |λ| (spectra()'s size; the first of equals).
        Deviation (authors' code): they take the signed argmin, which can drop the strongest."""
        return int(lam.abs().argmin())

    def new_direction(self, name: str):
        """The direction an expansion adds, (p, λ, q): (d_out, 1), (1,), (1, d_in), adding nothing
        to ΔW: drawn like the initial ones (_fresh), from the allocator's own generator.
        Deviation (authors' code): std 1, from the global RNG, in float32."""
        layer = self.layers[name]
        return _fresh(layer.init, layer.P.shape[0], 1, layer.Q.shape[1], self.generator)

    def step(self, t: int, optimizer: torch.optim.Optimizer = None):
        """Run an allocation if one is due at step t. Returns its record, or None. Every call first
        gives each reborn slot its own Adam step count (_own_count; warm_start=False: not)."""
        _need(_int("t", t, 1) > self.last_step, f"step({t}) after step({self.last_step}): t counts "
              f"the optimizer steps taken and must increase (to resume, load_state_dict() the "
              f"saved allocator)")
        if optimizer is not None and not hasattr(optimizer, "param_groups"):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, "
                            f"got {type(optimizer).__name__}")
        _need(all(getattr(m, "_flexlora_owner", None) is self._owner
                  for m in self.layers.values()),
              "another RankAllocator was made on these adapters since this one, and drives them "
              "now: step() that one alone (two would both move rank, doubling b(t))")
        if optimizer is not None:
            self._check_order(optimizer)
        c = self.config
        if optimizer is not None and c.get("warm_start", True):
            _own_count(self.layers, self.born, t, optimizer)  # the optimizer step just taken
        b = budget(t, c["b0"], c["t_warmup"], c["t_final"], c["total_steps"], c["schedule"])
        if b == 0 or (t - c["t_warmup"]) % c["interval"] != 0:
            self.last_step = t
            return None
        _need(not any(m.merged for m in self.layers.values()),
              "an adapter is merged: unmerge() it to train on")
        lams = self.spectra()
        pruned, expanded, info = self.choose(b, lams)
        # nothing has changed yet: can the optimizer's state follow the slots to be rewritten?
        params = [getattr(self.layers[n], f) for n in pruned + expanded for f in _RANK_DIM]
        if optimizer is None and any(p.requires_grad for p in params):
            warnings.warn("RankAllocator.step(t) rewrote adapter slots with no optimizer: if one "
                          "trains them, its state there is stale; pass it: step(t, optimizer)",
                          stacklevel=2)
        elif optimizer is not None:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            _need(all(id(p) in held for p in params if p.requires_grad),
                  "the optimizer does not hold the adapters: build it from model.parameters() "
                  "after flexlora.inject(), and pass it to step()")
            # LBFGS: flat state; Adafactor: factored row/column statistics
            kind = type(optimizer).__name__
            shaped = all(not torch.is_tensor(v) or v.dim() == 0 or v.shape == p.shape
                         for p in params for v in optimizer.state.get(p, {}).values())
            _need(kind not in ("LBFGS", "Adafactor") and shaped,
                  f"{kind} keeps state not shaped like each parameter, whose slots cannot be "
                  f"reset: use Adam, AdamW, SGD, RMSprop, Adagrad, Rprop")
        # 3) prune: the weakest direction's slot dies, at zero
        removed = {}
        for name in pruned:
            live = self.layers[name].live.nonzero().squeeze(1).tolist()
            removed[name] = live[self.weakest(name, lams[name])]
            _set_slot(self.layers[name], removed[name], None, optimizer)
            self.born[name][removed[name]] = 0
        # 4) expand: the first dead slot takes the new direction
        added = {}
        for name in expanded:
            layer = self.layers[name]
            added[name] = int((~layer.live).nonzero()[0])  # (r < r_max: there is one)
            _set_slot(layer, added[name], self.new_direction(name), optimizer)
            self.born[name][added[name]] = t
        _check_processes_agree(self.layers, t)
        record = dict(step=t, b=b, k=len(pruned), **info, pruned=pruned, removed=removed,
                      expanded=expanded, added=added,
                      ranks={n: m.r for n, m in self.layers.items()})
        self.history.append(record)
        self.last_step = t
        return record

    def state_dict(self) -> dict:
        return {"config": dict(self.config), "generator": self.generator.get_state(),
                "history": list(self.history), "last_step": self.last_step,
                "born": {n: list(v) for n, v in self.born.items()}}

    def load_state_dict(self, d: dict):
        _need(isinstance(d, dict) and {"config", "generator", "history"} <= set(d),
              "load_state_dict() takes what RankAllocator.state_dict() returned")
        _need(d["config"] == self.config,
              f"allocator saved with {d['config']}: build it with the same settings")
        ranks = d["history"][-1]["ranks"] if d["history"] else rank_pattern(self.model)
        _need(ranks == rank_pattern(self.model),
              "saved for other ranks: load_adapter() its checkpoint first")
        self.generator.set_state(d["generator"])
        self.history = list(d["history"])
        self.last_step = d.get("last_step",  # (or older files)
                               d["history"][-1]["step"] if d["history"] else 0)
        born = d.get("born",  # (older files: none young)
                     {n: [0] * m.r_max for n, m in self.layers.items()})
        _need({n: len(v) for n, v in born.items()} == {n: m.r_max for n, m in self.layers.items()},
              "allocator state does not fit the adapters' slots: "
              "load_adapter() its checkpoint first")
        self.born = {n: list(v) for n, v in born.items()}


def churn(history: list) -> dict:
    """Prune/expand oscillation in RankAllocator.history: of the directions added at one
    allocation (added_with_a_next: those followed by another allocation), how many the very next
    one removed (added_removed_at_next), and the matrices that flip between the prune and expand
    sets."""
    added = removed = flips = 0
    for prev, cur in zip(history, history[1:]):
        added += len(prev["expanded"])
        # the same slot
        removed += sum(cur["removed"].get(n) == slot for n, slot in prev["added"].items())
        flips += len(set(prev["expanded"]) & set(cur["pruned"]))  # grown, then pruned
        flips += len(set(prev["pruned"]) & set(cur["expanded"]))  # pruned, then grown
    return dict(added_with_a_next=added, added_removed_at_next=removed, flips=flips)
