"""FlexLoRA in one file: low-rank adaptation whose rank moves during training.

ΔW = P Λ Q is kept in SVD form. A spectral-entropy score per adapted matrix decides, every
few steps under a cubic budget schedule, which matrices lose their weakest direction and
which gain a new one; a new direction starts at λ = 0, so the model's output does not move.

References:
1) FlexLoRA: Entropy-Guided Flexible Low-Rank Adaptation, Liu, Si, Jia, ICLR 2026,
   https://arxiv.org/abs/2601.22905 (not the federated "FlexLoRA" of Bai et al., 2024)
2) AdaLoRA, Zhang et al., ICLR 2023, https://arxiv.org/abs/2303.10512 (the SVD-form adapter)
3) LoRA, Hu et al., ICLR 2022, https://arxiv.org/abs/2106.09685

Symbols: P, Λ, Q here are lora_B, lora_E, lora_A in AdaLoRA and PEFT. Every place where we
depart from the paper or from the authors' code is marked "Deviation". Every function checks
its arguments before it changes anything: after an error, all is left as it was.
"""

import functools
import json
import math
import numbers
import os
import re
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

SIGMA_INIT = 0.02  # std of the entries of P and Q, at init and for new directions (AdaLoRA's)
EPS = 1e-8  # the ε inside log(s_i + ε) of the entropy (paper §3)
_RANK_DIM = {"P": 1, "Lambda": 0, "Q": 0}  # the axis of each factor that indexes directions
_FIRST = {"sum": "initial_accumulator_value", "step_size": "lr"}  # optimizer state not starting at 0


def _need(ok: bool, msg: str):  # a user error gets one clear message saying what to do
    if not ok:
        raise ValueError(msg)


def _int(name: str, v, lo: int) -> int:
    _need(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= lo,
          f"{name} must be an integer >= {lo}, got {v!r}")
    return int(v)


def _alpha(name: str, v) -> float:
    _need(isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 < v < math.inf,
          f"{name} must be a finite number > 0 (the paper's runs use 16 or 32), got {v!r}")
    return float(v)


# -----------------------------------------------------------------------------
# The adapter

class FlexLoRALinear(nn.Module):
    """A frozen nn.Linear plus a rank-r update in SVD form:

        y = x Wᵀ + c + s · x Qᵀ diag(λ) Pᵀ,     s = alpha / r_init

    P: (d_out, r), Λ: (r,), Q: (r, d_in). λ starts at 0, so ΔW = 0 and the model is unchanged.
    The scale s is fixed at creation and never follows the current rank: that is what makes
    a new direction with λ = 0 exactly output-neutral.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        _need(isinstance(base, nn.Linear), f"FlexLoRALinear wraps an nn.Linear, got {type(base).__name__}")
        r, alpha = _int("r", r, 1), _alpha("alpha", alpha)
        _need(isinstance(dropout, numbers.Real) and 0 <= dropout < 1, f"dropout must be in [0, 1): {dropout!r}")
        self.base = base.requires_grad_(False)  # W and c stay frozen
        self.r_init, self.alpha = r, alpha
        self.scaling = self.alpha / r  # s, fixed for the adapter's lifetime
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        (d_out, d_in), like = base.weight.shape, dict(dtype=base.weight.dtype, device=base.weight.device)
        self.P = nn.Parameter(torch.randn(d_out, r, **like) * SIGMA_INIT)
        self.Lambda = nn.Parameter(torch.zeros(r, **like))  # λ = 0: ΔW = 0
        self.Q = nn.Parameter(torch.randn(r, d_in, **like) * SIGMA_INIT)

    @property
    def r(self) -> int:
        return self.Lambda.numel()  # the current rank

    def delta_weight(self) -> torch.Tensor:
        # ΔW = s · P diag(λ) Q: (d_out, r) x (r, d_in) -> (d_out, d_in)
        return (self.P * (self.scaling * self.Lambda)) @ self.Q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y  # ΔW already sits in base.weight
        h = F.linear(self.dropout(x), self.Q)  # (..., d_in) x (d_in, r) -> (..., r)
        # fold λ into P first (a (d_out, r) product is cheaper than a (..., r) one); s rides on the add
        return torch.add(y, F.linear(h, self.P * self.Lambda), alpha=self.scaling)  # (..., r) -> (..., d_out)

    @torch.no_grad()
    def merge(self):
        """W ← W + ΔW, for inference or export. Explicit: train()/eval() never merge.
        In bf16 or fp16, merge() then unmerge() rounds W twice (by up to 2⁻⁸ of max|W + ΔW|, and
        cycles add up); in fp32 it is exact to ~1e-7. Merge once, to export, or keep W in fp32."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W ← W − ΔW, undoing merge()."""
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, r_init={self.r_init}, alpha={self.alpha}, merged={self.merged}"


def adapters(model: nn.Module) -> dict:
    """{module name: FlexLoRALinear} for every adapter in the model, sorted by name."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module (the model), got {type(model).__name__}")
    return dict(sorted((n, m) for n, m in model.named_modules() if isinstance(m, FlexLoRALinear)))


def rank_pattern(model: nn.Module) -> dict:
    """{module name: current rank}."""
    return {name: layer.r for name, layer in adapters(model).items()}


def param_groups(model: nn.Module, lr: float, lambda_lr_ratio: float = 1.0) -> list:
    """Optimizer groups for the trainable parameters: every λ at lambda_lr_ratio · lr, the rest
    at lr, e.g. torch.optim.AdamW(param_groups(model, 1e-3, lambda_lr_ratio=16)).

    Deviation (ours; the paper trains λ at the same rate as P and Q): under Adam each parameter
    moves by about lr per step, whatever its gradient. LoRA's ΔW = s·B·A grows through the
    d_out·r entries of B; here P and Q stay near orthonormal and ΔW's size sits in the r values
    of λ, so at one lr ΔW grows ~√d_out times more slowly (bench/dynamics.py measures it).
    An allocation swaps a resized λ into its predecessor's group, so the ratio stays.
    """
    for name, v in (("lr", lr), ("lambda_lr_ratio", lambda_lr_ratio)):
        _need(isinstance(v, numbers.Real) and 0 < v < math.inf, f"{name} must be a finite number > 0, got {v!r}")
    lams = {id(m.Lambda) for m in adapters(model).values()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    if lambda_lr_ratio == 1:  # the paper: one group
        return [{"params": trainable, "lr": lr}]
    groups = [{"params": [p for p in trainable if id(p) not in lams], "lr": lr},
              {"params": [p for p in trainable if id(p) in lams], "lr": lr * lambda_lr_ratio}]
    return [g for g in groups if g["params"]]


def _injected(model: nn.Module) -> dict:  # adapters(model), of which there must be some
    layers = adapters(model)
    _need(layers, "the model has no FlexLoRA adapters: call flexlora.inject() first")
    return layers


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


def _as_list(patterns, what: str) -> list:
    patterns = [patterns] if isinstance(patterns, str) else patterns
    _need(isinstance(patterns, (list, tuple, set)) and all(isinstance(p, str) and p for p in patterns),
          f"{what} must be a string or a list of non-empty strings, got {patterns!r}")
    return list(patterns)


def inject(model: nn.Module, target_modules, r: int, alpha: float, dropout: float = 0.0,
           trainable=()) -> dict:
    """Replace the nn.Linear modules named by `target_modules` with FlexLoRALinear, in place.

    Freezes every other parameter except those of modules (or parameters) named by
    `trainable`, e.g. ("classifier", "pooler"): these are trained in full, never wrapped, even
    where a target pattern such as ".*" covers them. Returns {module name: FlexLoRALinear}.
    """
    targets, keep = _as_list(target_modules, "target_modules"), _as_list(trainable, "trainable")
    _need(targets, "target_modules is empty: name the nn.Linear modules to adapt")
    _need(not adapters(model), "the model already has FlexLoRA adapters: inject() once per model")
    names = [n for n, _ in model.named_parameters()]
    missing = [t for t in keep if not any(_param_matches(n, t) for n in names)]
    _need(not missing, f"trainable {missing} match no module or parameter of the model")
    trained = {n for n in names if any(_param_matches(n, t) for t in keep)}
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and f"{n}.weight" not in trained]
    missing = [t for t in targets if not any(matches(n, t) for n in linears)]
    known = sorted({re.sub(r"\.\d+\.", ".N.", n) for n in linears})  # layer indices collapsed to N
    _need(not missing, f"target_modules {missing} match no nn.Linear of the model outside `trainable`. "
                       f"Its Linear modules are: {known}")

    # wrap the targets (this checks r, alpha, dropout), then freeze all but `trainable`, then swap in
    wrapped = {n: FlexLoRALinear(model.get_submodule(n), r, alpha, dropout)
               for n in linears if any(matches(n, t) for t in targets)}
    for name, p in model.named_parameters():
        p.requires_grad_(name in trained)
    for name, layer in wrapped.items():  # (their base weights stay frozen)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    return adapters(model)


def _param_matches(name: str, pattern: str) -> bool:
    # a parameter matches if its own name or that of a module holding it does:
    # "classifier" opens "classifier.weight", "pooler" opens "pooler.dense.bias"
    parts = name.split(".")
    return any(matches(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))


# -----------------------------------------------------------------------------
# The three ingredients: importance score, budget schedule, orthogonal regulariser

def spectral_entropy(Lambda: torch.Tensor) -> torch.Tensor:
    """Normalised spectral-energy entropy of one matrix (paper §3):

        s_i = λ_i² / Σ_j λ_j²,     I(Λ) = −(1 / log r) Σ_i s_i log(s_i + ε),     I ∈ [0, 1]

    Low I: the energy sits in few directions (prune). High I: spread over all (expand).
    Conventions where the paper is silent (the authors' code returns NaN for both):
    r = 1 gives 0, and Σλ² = 0 gives 0. Computed in float64, so never NaN or inf; a
    non-finite λ (diverged training) raises ValueError. Lambda: a tensor or a list of numbers.
    """
    lam = torch.as_tensor(Lambda).detach().reshape(-1).to(torch.float64)
    _need(torch.isfinite(lam).all(), f"non-finite λ {lam.tolist()[:8]}: training diverged; "
                                     f"lower the learning rate")
    r = lam.numel()
    peak = lam.abs().max() if r else lam.new_zeros(())
    if r <= 1 or peak == 0:
        return lam.new_zeros(())
    s = (lam / peak) ** 2  # rescale first: 1e-30 or 1e30 give the same s as 1
    s = s / s.sum()  # s_i = λ_i² / Σ λ_j²
    I = -(s * torch.log(s + EPS)).sum() / math.log(r)  # I(Λ) = −Σ s_i log s_i / log r
    return I.clamp(0.0, 1.0)  # ε can push the extremes 1e-8 outside [0, 1]


def budget(t: int, b0: int, t_warmup: int, t_final: int, total_steps: int,
           schedule: str = "cubic") -> int:
    """b(t): how many matrices are pruned (and as many expanded) at step t (paper §3).

        p(t) = (t − t_w) / (T − t_f − t_w),   b(t) = round(b0 · (1 − p)³)   for t_w < t ≤ T − t_f

    and 0 outside that window. schedule="constant" gives b(t) = b0 inside the window, which is
    what the authors' released code runs (its cubic scheduler is off by default).
    """
    _check_schedule(b0, t_warmup, t_final, total_steps, schedule)
    if _int("t", t, 0) <= t_warmup or t > total_steps - t_final:
        return 0
    if schedule == "constant":
        return b0
    p = (t - t_warmup) / (total_steps - t_final - t_warmup)
    # Deviation (authors' code): they compute round(b0·(1 − p³)); the paper says (1 − p)³.
    return math.floor(b0 * (1 - p) ** 3 + 0.5)  # round half up


def _check_schedule(b0, t_warmup, t_final, total_steps, schedule):
    for name, v in dict(b0=b0, t_warmup=t_warmup, t_final=t_final, total_steps=total_steps).items():
        _int(name, v, 0)
    _need(total_steps > t_warmup + t_final, f"total_steps ({total_steps}) must exceed t_warmup + t_final "
                                             f"({t_warmup} + {t_final}): shorten the warm-up or final phase")
    _need(schedule in ("cubic", "constant"), f"schedule must be 'cubic' (the paper) or 'constant': {schedule!r}")


def orthogonal_regularizer_plain(model: nn.Module) -> torch.Tensor:
    """R = mean over adapters of ‖PᵀP − I‖_F + ‖QQᵀ − I‖_F (unsquared; paper §2), one adapter at
    a time. Reads as the definition; orthogonal_regularizer below computes the same, faster."""
    layers = _injected(model).values()
    norm = torch.linalg.matrix_norm  # Frobenius
    eye = lambda m: torch.eye(m.r, device=m.P.device)
    return sum(norm(m.P.T @ m.P - eye(m)) + norm(m.Q @ m.Q.T - eye(m)) for m in layers) / len(layers)


def orthogonal_regularizer(model: nn.Module) -> torch.Tensor:
    """R as above, in a few large ops instead of ~20 small ones per adapter: a GPU running a
    model of this size waits on the number of ops, not their size. The P's of equal height are
    set side by side, F = [P_1 … P_n], and of the one Gram matrix FᵀF only the diagonal blocks
    PᵢᵀPᵢ are kept (likewise the Q's of equal width, stacked). The loss adds γ · R.
    Deviation (authors' code): they average over the 2K factors, half of R, so their γ is twice ours.
    """
    layers = _injected(model)
    groups = {}  # one group per factor kind, size and device
    for layer in layers.values():
        groups.setdefault(("P", layer.P.shape[0], layer.P.device), []).append(layer.P)  # directions = columns
        groups.setdefault(("Q", layer.Q.shape[1], layer.Q.device), []).append(layer.Q)  # directions = rows
    total = 0.0
    device = next(iter(layers.values())).P.device
    with torch.autocast(device.type, enabled=False):  # bf16 Gram matrices are too coarse
        for (kind, _, _), factors in groups.items():
            dim = _RANK_DIM[kind]
            stacked = torch.cat(factors, dim=dim).float()
            gram = stacked.T @ stacked if kind == "P" else stacked @ stacked.T  # (Σr, Σr)
            ranks = tuple(f.shape[dim] for f in factors)
            owner, mask, eye = _blocks(ranks, gram.device)
            sq = ((gram - eye) * mask).square().sum(1)  # per direction: its row of PᵢᵀPᵢ − I
            per_factor = torch.zeros(len(ranks), device=gram.device).index_add(0, owner, sq)
            # ‖·‖_F = sqrt of the sum; clamp: a finite (zero) gradient at an exactly orthonormal factor
            total = total + per_factor.clamp_min(torch.finfo(sq.dtype).tiny).sqrt().sum().to(device)
    return total / len(layers)


@functools.lru_cache(maxsize=64)
def _blocks(ranks: tuple, device: torch.device):
    # factors of ranks r_1 … r_n side by side: the factor of each direction, the mask of the
    # diagonal blocks, and the identity (cached: they change only when an allocation does)
    owner = torch.repeat_interleave(torch.arange(len(ranks)), torch.tensor(ranks)).to(device)
    mask = (owner[:, None] == owner[None, :]).float()
    return owner, mask, torch.eye(len(owner), device=device)


# -----------------------------------------------------------------------------
# Resizing an adapter in place, without breaking the optimizer or autograd

def _resize(layer: FlexLoRALinear, keep: list, grow: bool, gen: torch.Generator, optimizer):
    """Keep the directions `keep` (indices) and, if `grow`, append one new direction.

    New Parameter objects replace the old ones (an in-place resize breaks the backward of any
    autograd graph still alive, e.g. last step's `loss`); the optimizer is re-pointed at them,
    its groups' settings kept, and state of the parameter's shape (Adam's exp_avg / exp_avg_sq,
    SGD's momentum, Adagrad's sum) sliced, and padded with the value the optimizer starts it at.
    Deviation (authors' code): they rebuild the optimizer, losing all of that.
    """
    fresh = {}
    if grow:  # the new direction: λ = 0 (zero impact), p and q drawn like the initial ones
        # Deviation (authors' code): they draw std-1 vectors from the global RNG in float32.
        fresh = {"P": torch.randn(layer.P.shape[0], 1, generator=gen) * SIGMA_INIT,  # (d_out, 1)
                 "Lambda": torch.zeros(1),
                 "Q": torch.randn(1, layer.Q.shape[1], generator=gen) * SIGMA_INIT}  # (1, d_in)
    for name, dim in _RANK_DIM.items():
        old = getattr(layer, name)
        idx = torch.tensor(keep, dtype=torch.long, device=old.device)

        def reshape(t, new=None):  # slice the kept directions, append the new one
            t = t.index_select(dim, idx)
            return t if new is None else torch.cat([t, new.to(t.device, t.dtype)], dim)

        param = nn.Parameter(reshape(old.detach(), fresh.get(name)), requires_grad=old.requires_grad)
        setattr(layer, name, param)
        if optimizer is not None:
            _repoint(optimizer, old, param, reshape, fresh.get(name))


def _repoint(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, reshape, fresh=None):
    """Swap `old` for `new` in the optimizer's param groups and state, in place. State of the
    parameter's shape goes through reshape(); a new direction's starts where the optimizer
    starts it: at 0, but Adagrad's sum at initial_accumulator_value and Rprop's step size at lr."""
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
                state = optimizer.state.pop(old, {})
                for k, v in state.items():
                    if torch.is_tensor(v) and v.shape == old.shape:
                        start = float(group.get(_FIRST.get(k), 0.0))
                        state[k] = reshape(v, None if fresh is None else torch.full_like(fresh, start))
                optimizer.state[new] = state
                return


def _check_optimizer(optimizer, params: list):
    """Before an allocation changes anything: can the optimizer follow `params` as they resize?"""
    if optimizer is None:
        if any(p.requires_grad for p in params):
            warnings.warn("RankAllocator.step(t) resized adapters with no optimizer: the new parameters "
                          "are in none and will not train; pass it: step(t, optimizer)", stacklevel=3)
        return
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    _need(all(id(p) in held for p in params if p.requires_grad), "the optimizer does not hold the adapter "
          "parameters: build it from model.parameters() after flexlora.inject(), and pass it to step()")
    kind = type(optimizer).__name__  # LBFGS: flat state; Adafactor: factored row/column statistics
    shaped = all(not torch.is_tensor(v) or v.dim() == 0 or v.shape == p.shape
                 for p in params for v in optimizer.state.get(p, {}).values())
    _need(kind not in ("LBFGS", "Adafactor") and shaped, f"{kind} keeps state not shaped like each parameter, "
          f"which a rank change cannot resize: use Adam, AdamW, SGD, RMSprop, Adagrad or Rprop")


# -----------------------------------------------------------------------------
# The allocator: score, choose, prune and expand (paper §3)

class RankAllocator:
    """Moves rank between the adapters of `model` during training (paper §3).

    Call step(t, optimizer) after optimizer.step() (and the LR scheduler's step), before
    zero_grad(), with t = the number of optimizer steps taken so far (1, 2, ...; it must grow)
    and the optimizer: Adam, AdamW, SGD, RMSprop, Adagrad or Rprop (LBFGS and Adafactor keep
    state that cannot be resized). At steps where b(t) > 0 and (t − t_warmup) is a multiple of
    `interval`, it prunes the smallest-|λ| direction of the b lowest-scoring matrices and adds a
    λ = 0 direction to the b highest-scoring ones, so the total rank stays constant. The score
    is the paper's I(Λ); to try another, subclass and override scores(). schedule="constant"
    runs the authors' code's b(t).
    """

    def __init__(self, model: nn.Module, b0: int, t_warmup: int, t_final: int, total_steps: int,
                 interval: int, r_min: int = 1, r_max: int = None, seed: int = 0, schedule: str = "cubic"):
        _check_schedule(b0, t_warmup, t_final, total_steps, schedule)
        interval, r_min, seed = _int("interval", interval, 1), _int("r_min", r_min, 1), _int("seed", seed, 0)
        r_max = None if r_max is None else _int("r_max (None: no cap)", r_max, r_min)
        self.model, self.layers = model, _injected(model)
        outside = {n: m.r for n, m in self.layers.items() if not r_min <= m.r <= (r_max or m.r)}
        _need(not outside, f"r_min={r_min} and r_max={r_max} must bracket every adapter's current rank "
                           f"(or nothing moves), not {dict(list(outside.items())[:3])}")
        self.config = dict(b0=b0, t_warmup=t_warmup, t_final=t_final, total_steps=total_steps,
                           interval=interval, r_min=r_min, r_max=r_max, seed=seed, schedule=schedule)
        # our own generator: same seed -> same new directions, on every process of a multi-GPU run
        self.generator = torch.Generator().manual_seed(seed)
        self.history = []
        self.last_step = 0  # the t of the last step() call: t must move forward

    def spectra(self) -> dict:
        """{module name: λ as a float32 CPU tensor}, with one device-to-host copy in all."""
        lams = torch.cat([m.Lambda.detach().reshape(-1).float() for m in self.layers.values()]).cpu()
        if not torch.isfinite(lams).all():
            bad = [n for n, m in self.layers.items() if not torch.isfinite(m.Lambda).all()]
            raise ValueError(f"non-finite λ in {bad[:3]}: training diverged; lower the learning rate")
        return dict(zip(self.layers, lams.split([m.r for m in self.layers.values()])))

    def scores(self, lams: dict) -> dict:
        """{module name: importance} from spectra()'s λ: the paper's I(Λ). Low: prune, high: expand."""
        return {name: float(spectral_entropy(lam)) for name, lam in lams.items()}

    def step(self, t: int, optimizer: torch.optim.Optimizer = None):
        """Run an allocation if one is due at step t. Returns its record, or None."""
        _need(_int("t", t, 1) > self.last_step, f"step({t}) after step({self.last_step}): t counts the "
              f"optimizer steps taken and must increase (to resume, load_state_dict() the saved allocator)")
        if optimizer is not None and not hasattr(optimizer, "param_groups"):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        c = self.config
        b = budget(t, c["b0"], c["t_warmup"], c["t_final"], c["total_steps"], c["schedule"])
        if b == 0 or (t - c["t_warmup"]) % c["interval"] != 0:
            self.last_step = t
            return None
        _need(not any(m.merged for m in self.layers.values()), "an adapter is merged: unmerge() it to train on")
        lams = self.spectra()
        scores = self.scores(lams)
        ranks = {n: lam.numel() for n, lam in lams.items()}

        # 1) candidates, ties broken by name so that every process decides the same
        prune = sorted((n for n in ranks if ranks[n] > c["r_min"]), key=lambda n: (scores[n], n))
        grow = sorted((n for n in ranks if c["r_max"] is None or ranks[n] < c["r_max"]),
                      key=lambda n: (-scores[n], n))
        # 2) the largest k <= b such that the k lowest are pruned and k others grow: the total
        #    rank is conserved, and 3 matrices with b = 8 still move one direction (k = 1)
        k = min(b, len(prune))
        while k > 0 and len([n for n in grow if n not in prune[:k]]) < k:
            k -= 1
        pruned = prune[:k]
        expanded = [n for n in grow if n not in pruned][:k]
        # nothing has changed yet: check that the optimizer can follow the parameters to be resized
        _check_optimizer(optimizer, [getattr(self.layers[n], f) for n in pruned + expanded for f in _RANK_DIM])

        # 3) prune: drop the direction with the smallest |λ|
        # Deviation (authors' code): they take the signed argmin, which can drop the strongest.
        removed = {}
        for name in pruned:
            removed[name] = i = min(range(ranks[name]), key=lambda j: (abs(lams[name][j].item()), j))
            keep = [j for j in range(ranks[name]) if j != i]
            _resize(self.layers[name], keep, False, self.generator, optimizer)
        # 4) expand: one new direction at λ = 0, appended as the last index
        for name in expanded:
            _resize(self.layers[name], list(range(ranks[name])), True, self.generator, optimizer)

        record = dict(step=t, b=b, k=k, scores=scores, pruned=pruned, removed=removed,
                      expanded=expanded, ranks={n: m.r for n, m in self.layers.items()})
        self.history.append(record)
        self.last_step = t
        return record

    def state_dict(self) -> dict:
        return {"config": dict(self.config), "generator": self.generator.get_state(),
                "history": list(self.history), "last_step": self.last_step}

    def load_state_dict(self, d: dict):
        _need(isinstance(d, dict) and {"config", "generator", "history"} <= set(d),
              "load_state_dict() takes what RankAllocator.state_dict() returned")
        _need(d["config"] == self.config, f"allocator state was saved with {d['config']}, this allocator has "
                                          f"{self.config}: build it with the same settings to resume")
        ranks = d["history"][-1]["ranks"] if d["history"] else rank_pattern(self.model)
        _need(ranks == rank_pattern(self.model), "allocator state does not fit the adapters: inject the same "
              "target_modules and load_adapter() the checkpoint saved with it first")
        self.generator.set_state(d["generator"])
        self.history = list(d["history"])
        # checkpoints written before last_step was kept: the last allocation's step
        self.last_step = d.get("last_step", d["history"][-1]["step"] if d["history"] else 0)


# -----------------------------------------------------------------------------
# Saving and loading (safetensors: no pickle), merging

def save_adapter(model: nn.Module, path: str):
    """Save every trainable parameter (adapters and heads) with each adapter's alpha and r_init."""
    from safetensors.torch import save_file

    layers = _injected(model)
    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    tensors |= {f"{name}.{f}": getattr(layer, f).detach().contiguous()  # even if the user froze some
                for name, layer in layers.items() for f in _RANK_DIM}
    config = {n: {"r": m.r, "r_init": m.r_init, "alpha": m.alpha} for n, m in layers.items()}
    save_file(tensors, path, metadata={"format": "flexlora", "adapters": json.dumps(config)})


def load_adapter(model: nn.Module, path: str):
    """Load a save_adapter() file into a model injected with the same target_modules.

    The ranks, alpha and r_init come from the file, whatever r the model was injected with.
    Build the optimizer after loading: the adapter parameters are new objects.
    """
    from safetensors import SafetensorError, safe_open

    layers, params = adapters(model), dict(model.named_parameters())
    _need(not os.path.isdir(path), f"{path} is a directory: pass the file that save_adapter() wrote")
    try:  # read all of it (metadata and tensors in one read), then check all of it
        with safe_open(path, "pt") as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        config = _check_adapter_file(meta, tensors, layers, params)
    except (ValueError, SafetensorError) as e:
        raise ValueError(f"{path} cannot be loaded, nothing was changed: {e}") from None

    for name, layer in layers.items():  # then apply, knowing that all of it fits
        layer.unmerge()
        for f in _RANK_DIM:
            old = getattr(layer, f)
            value = tensors.pop(f"{name}.{f}").to(old.device, old.dtype)
            setattr(layer, f, nn.Parameter(value, requires_grad=old.requires_grad))
        layer.r_init, layer.alpha = config[name]
        layer.scaling = layer.alpha / layer.r_init
    with torch.no_grad():
        for name, value in tensors.items():  # the other trainable parameters, e.g. the classifier
            params[name].copy_(value)


def _check_adapter_file(meta: dict, tensors: dict, layers: dict, params: dict) -> dict:
    """load_adapter's checks, all before anything changes. Returns {adapter: (r_init, alpha)}."""
    _need(meta.get("format") == "flexlora" and "adapters" in meta, "not a flexlora.save_adapter() file")
    try:
        config = json.loads(meta["adapters"])
    except json.JSONDecodeError as e:
        raise ValueError(f"its 'adapters' metadata is broken JSON ({e})") from None
    _need(isinstance(config, dict) and all(isinstance(c, dict) for c in config.values()),
          "its 'adapters' metadata is not a {module name: {r, r_init, alpha}} object")
    extra, absent = sorted(set(config) - set(layers)), sorted(set(layers) - set(config))
    _need(not extra and not absent, f"adapters only in the file {extra}, only in the model {absent}; "
                                    f"inject the same target_modules as saved")
    own = [f"{n}.{f}" for n in layers for f in _RANK_DIM]
    _need(set(own) <= set(tensors), f"tensors {sorted(set(own) - set(tensors))[:3]} are missing")
    for name, layer in layers.items():
        P, lam, Q = (tensors[f"{name}.{f}"] for f in _RANK_DIM)  # P: (d_out, r), λ: (r,), Q: (r, d_in)
        r, d_out, d_in = lam.shape[0] if lam.dim() == 1 else 0, layer.P.shape[0], layer.Q.shape[1]
        _need(r >= 1 and P.shape == (d_out, r) and Q.shape == (r, d_in), f"adapter {name}: P {tuple(P.shape)}, "
              f"λ {tuple(lam.shape)}, Q {tuple(Q.shape)} make no ΔW of the model's shape ({d_out}, {d_in})")
    for name, value in tensors.items():
        have = tuple(params[name].shape) if name in params else "nothing"
        _need(name in own or have == value.shape, f"has {name} of shape {tuple(value.shape)}, the model {have}")
        _need(torch.isfinite(value).all(), f"{name} holds non-finite values (saved from a diverged run?)")
    return {n: (_int(f"{n}: r_init", c.get("r_init"), 1), _alpha(f"{n}: alpha", c.get("alpha")))
            for n, c in config.items()}


def merge(model: nn.Module):
    """Fold every adapter into its base weight (W ← W + ΔW)."""
    for layer in adapters(model).values():
        layer.merge()


def unmerge(model: nn.Module):
    """Undo merge()."""
    for layer in adapters(model).values():
        layer.unmerge()


def unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and put its plain nn.Linear back, in place: the model then saves and
    loads like the original architecture (for serving). Training its adapters ends here."""
    for name, layer in adapters(model).items():
        layer.merge()  # W ← W + ΔW
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base)
    return model
