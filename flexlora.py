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
depart from the paper or from the authors' code is marked "Deviation".
"""

import functools
import json
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

SIGMA_INIT = 0.02  # std of the entries of P and Q, at init and for new directions (AdaLoRA's)
EPS = 1e-8  # the ε inside log(s_i + ε) of the entropy (paper §3)

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
        if not isinstance(base, nn.Linear):
            raise ValueError(f"FlexLoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be an integer >= 1, got {r!r}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r} (the paper's runs use 16 or 32)")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.base = base.requires_grad_(False)  # W and c stay frozen
        self.r_init, self.alpha = r, float(alpha)
        self.scaling = self.alpha / r  # s, fixed for the adapter's lifetime
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        d_out, d_in = base.weight.shape
        w = base.weight
        self.P = nn.Parameter(torch.randn(d_out, r, dtype=w.dtype, device=w.device) * SIGMA_INIT)
        self.Lambda = nn.Parameter(torch.zeros(r, dtype=w.dtype, device=w.device))  # λ = 0: ΔW = 0
        self.Q = nn.Parameter(torch.randn(r, d_in, dtype=w.dtype, device=w.device) * SIGMA_INIT)

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
        """W ← W + ΔW, for inference or export. Explicit: train()/eval() never merge."""
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
    return dict(sorted((n, m) for n, m in model.named_modules() if isinstance(m, FlexLoRALinear)))


def rank_pattern(model: nn.Module) -> dict:
    """{module name: current rank}."""
    return {name: layer.r for name, layer in adapters(model).items()}


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
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"{what} must be a string or a list of non-empty strings, got {patterns!r}")
    return patterns


def inject(model: nn.Module, target_modules, r: int, alpha: float, dropout: float = 0.0,
           trainable=()) -> dict:
    """Replace the nn.Linear modules named by `target_modules` with FlexLoRALinear, in place.

    Freezes every other parameter except those of modules (or parameters) named by
    `trainable`, e.g. ("classifier", "pooler"). Returns {module name: FlexLoRALinear}.
    """
    targets, keep = _as_list(target_modules, "target_modules"), _as_list(trainable, "trainable")
    if not targets:
        raise ValueError("target_modules is empty: name the nn.Linear modules to adapt")
    if adapters(model):
        raise ValueError("the model already has FlexLoRA adapters: inject() once per model")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = [n for n in linears if any(matches(n, t) for t in targets)]
    missing = [t for t in targets if not any(matches(n, t) for n in linears)]
    if missing:
        # list the Linear names that do exist, with layer indices collapsed to N
        known = sorted({re.sub(r"\.\d+\.", ".N.", n) for n in linears})
        raise ValueError(f"target_modules {missing} match no nn.Linear in the model. "
                         f"Its Linear modules are: {known}")
    names = [n for n, _ in model.named_parameters()]
    missing = [t for t in keep if not any(_param_matches(n, t) for n in names)]
    if missing:
        raise ValueError(f"trainable {missing} match no module or parameter of the model")

    for name, p in model.named_parameters():  # freeze everything but the `trainable` ones
        p.requires_grad_(any(_param_matches(name, t) for t in keep))
    for name in chosen:  # then wrap the targets (their base weights stay frozen)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, FlexLoRALinear(getattr(parent, child), r, alpha, dropout))
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
    r = 1 gives 0, and Σλ² = 0 gives 0. Computed in float64, so never NaN or inf.
    """
    lam = Lambda.detach().reshape(-1).to(torch.float64)
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
    if t <= t_warmup or t > total_steps - t_final:
        return 0
    if schedule == "constant":
        return b0
    p = (t - t_warmup) / (total_steps - t_final - t_warmup)
    # Deviation (authors' code): they compute round(b0·(1 − p³)); the paper says (1 − p)³.
    return math.floor(b0 * (1 - p) ** 3 + 0.5)  # round half up


def _check_schedule(b0, t_warmup, t_final, total_steps, schedule):
    for name, v in (("b0", b0), ("t_warmup", t_warmup), ("t_final", t_final),
                    ("total_steps", total_steps)):
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    if total_steps <= t_warmup + t_final:
        raise ValueError(f"total_steps ({total_steps}) must exceed t_warmup + t_final "
                         f"({t_warmup} + {t_final}): shorten the warm-up or final phase")
    if schedule not in ("cubic", "constant"):
        raise ValueError(f"schedule must be 'cubic' (the paper) or 'constant', got {schedule!r}")


def orthogonal_regularizer(model: nn.Module) -> torch.Tensor:
    """R = mean over adapters of ‖PᵀP − I‖_F + ‖QQᵀ − I‖_F (unsquared, unweighted; paper §2).

    The authors' code averages over the 2K factors instead, i.e. half of this value: to use
    their γ, add γ/2 · R to the loss (the training scripts do).

    Computed in a few large ops instead of ~20 small ones per adapter, because a GPU running a
    model of this size waits on the number of ops, not their size: the P's of equal height are
    set side by side, F = [P_1 … P_n], and of the one Gram matrix FᵀF only the diagonal blocks
    PᵢᵀPᵢ are kept (likewise the Q's of equal width, stacked). The off-diagonal blocks cost ~n×
    the flops of the needed ones, small beside a training step (bench_speed.py reports it).
    """
    layers = adapters(model)
    if not layers:
        raise ValueError("the model has no FlexLoRA adapters: call flexlora.inject() first")
    groups = {}  # one group per factor kind, size and device
    for layer in layers.values():
        groups.setdefault(("P", layer.P.shape[0], layer.P.device), []).append(layer.P)  # directions = columns
        groups.setdefault(("Q", layer.Q.shape[1], layer.Q.device), []).append(layer.Q)  # directions = rows
    total = 0.0
    device = next(iter(layers.values())).P.device
    with torch.autocast(device.type, enabled=False):  # bf16 Gram matrices are too coarse
        for (kind, _, _), factors in groups.items():
            ranks = tuple(f.shape[1] if kind == "P" else f.shape[0] for f in factors)
            if kind == "P":
                stacked = torch.cat(factors, dim=1).float()
                gram = stacked.T @ stacked
            else:
                stacked = torch.cat(factors, dim=0).float()
                gram = stacked @ stacked.T
            owner, mask, eye = _blocks(ranks, gram.device)
            sq = ((gram - eye) * mask).square().sum(1)  # per direction: its row of PᵢᵀPᵢ − I
            per_factor = torch.zeros(len(ranks), device=gram.device).index_add(0, owner, sq)
            # ‖·‖_F = sqrt of the sum; clamp: a finite (zero) gradient at an exactly orthonormal factor
            total = total + per_factor.clamp_min(torch.finfo(sq.dtype).tiny).sqrt().sum().to(device)
    return total / len(layers)


@functools.lru_cache(maxsize=64)
def _blocks(ranks: tuple, device: torch.device):
    """For factors of ranks r_1 … r_n side by side: the factor of each direction, the mask of the
    diagonal blocks, and the identity (cached: they change only when an allocation does)."""
    owner = torch.repeat_interleave(torch.arange(len(ranks)), torch.tensor(ranks)).to(device)
    mask = (owner[:, None] == owner[None, :]).float()
    return owner, mask, torch.eye(len(owner), device=device)


# -----------------------------------------------------------------------------
# Resizing an adapter in place, without breaking the optimizer or autograd


_RANK_DIM = {"P": 1, "Lambda": 0, "Q": 0}  # the axis of each factor that indexes directions


def _resize(layer: FlexLoRALinear, keep: list, grow: bool, gen: torch.Generator, optimizer):
    """Keep the directions `keep` (indices) and, if `grow`, append one new direction.

    New Parameter objects replace the old ones (an in-place resize would break the backward of
    any autograd graph still alive, e.g. last step's `loss`, METHOD.md §5.7), and the optimizer
    is re-pointed at them: its param groups keep their settings, and per-parameter state of
    the parameter's shape (Adam's exp_avg / exp_avg_sq, SGD's momentum) is sliced and
    zero-padded the same way.
    Deviation (authors' code): they rebuild the optimizer, losing all of that.
    """
    d_out, d_in = layer.P.shape[0], layer.Q.shape[1]
    if grow:  # the new direction: λ = 0 (zero impact), p and q drawn like the initial ones
        # Deviation (authors' code): they draw std-1 vectors from the global RNG in float32.
        fresh = {"P": torch.randn(d_out, 1, generator=gen) * SIGMA_INIT,  # (d_out, 1)
                 "Lambda": torch.zeros(1),
                 "Q": torch.randn(1, d_in, generator=gen) * SIGMA_INIT}  # (1, d_in)
    for name, dim in _RANK_DIM.items():
        old = getattr(layer, name)
        idx = torch.tensor(keep, dtype=torch.long, device=old.device)

        def reshape(t, new_part):  # slice the kept directions, append the new one
            t = t.index_select(dim, idx)
            return torch.cat([t, new_part.to(t.device, t.dtype)], dim) if grow else t

        param = nn.Parameter(reshape(old.detach(), fresh[name] if grow else None),
                             requires_grad=old.requires_grad)
        setattr(layer, name, param)
        if optimizer is not None:  # optimizer state of a new direction starts at zero
            state_reshape = lambda t: reshape(t, torch.zeros_like(fresh[name]) if grow else None)
            _repoint(optimizer, old, param, state_reshape)


def _repoint(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, reshape):
    """Swap `old` for `new` in the optimizer's param groups and state, in place."""
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
                state = optimizer.state.pop(old, {})
                optimizer.state[new] = {k: reshape(v) if torch.is_tensor(v) and v.shape == old.shape
                                        else v for k, v in state.items()}
                return
    raise ValueError("the optimizer does not hold the adapter parameters: build it from "
                     "model.parameters() after flexlora.inject(), and pass it to step()")


# -----------------------------------------------------------------------------
# The allocator: score, choose, prune and expand (paper §3)


class RankAllocator:
    """Moves rank between the adapters of `model` during training.

    Call step(t, optimizer) after optimizer.step() (and the LR scheduler's step), before
    zero_grad(), with t = the number of optimizer steps taken so far (1, 2, ...). At steps
    where b(t) > 0 and (t − t_warmup) is a multiple of `interval`, it prunes the smallest-|λ|
    direction of the b lowest-scoring matrices and adds a λ = 0 direction to the b
    highest-scoring ones, so the total rank stays constant.

    The defaults are the paper's rule. Options (each a departure from the paper):
      score="energy": I(Λ_k) · ‖ΔW_k‖_F / max_j ‖ΔW_j‖_F, so that a matrix whose update is
          tiny cannot look saturated (entropy alone is scale-invariant).
      score="utilization": effective rank / r = exp(I log r) / r, which drops linearly with
          idle directions where I = log(eff. rank) / log r hardly moves (16 used of 26: 0.85).
      rank1_score: the score of a rank-1 matrix, 0 (the paper's limit: fully concentrated, so
          it can never grow back) or 1 (a single direction counts as saturated).
      protect: a direction added at step t0 is neither pruned nor counted in the score while
          t − t0 ≤ protect, so it has time to learn before it is judged (its λ starts at 0,
          which makes its matrix look concentrated and itself the smallest |λ|).
    """

    def __init__(self, model: nn.Module, b0: int, t_warmup: int, t_final: int, total_steps: int,
                 interval: int, r_min: int = 1, r_max: int = None, seed: int = 0,
                 schedule: str = "cubic", score: str = "entropy", rank1_score: float = 0.0,
                 protect: int = 0):
        _check_schedule(b0, t_warmup, t_final, total_steps, schedule)
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an integer >= 1, got {interval!r}")
        if not isinstance(r_min, int) or r_min < 1:
            raise ValueError(f"r_min must be an integer >= 1, got {r_min!r}")
        if r_max is not None and (not isinstance(r_max, int) or r_max < r_min):
            raise ValueError(f"r_max must be None (no cap) or an integer >= r_min={r_min}, got {r_max!r}")
        if score not in ("entropy", "energy", "utilization"):
            raise ValueError(f"score must be 'entropy' (the paper), 'energy' or 'utilization', got {score!r}")
        if rank1_score not in (0, 1):
            raise ValueError(f"rank1_score must be 0 (the paper) or 1, got {rank1_score!r}")
        if not isinstance(protect, int) or protect < 0:
            raise ValueError(f"protect must be a number of steps >= 0, got {protect!r}")
        self.model = model
        self.layers = adapters(model)
        if not self.layers:
            raise ValueError("the model has no FlexLoRA adapters: call flexlora.inject() first")
        self.config = dict(b0=b0, t_warmup=t_warmup, t_final=t_final, total_steps=total_steps,
                           interval=interval, r_min=r_min, r_max=r_max, seed=seed, schedule=schedule,
                           score=score, rank1_score=rank1_score, protect=protect)
        # our own generator: same seed -> same new directions, on every process of a multi-GPU run
        self.generator = torch.Generator().manual_seed(seed)
        self.history = []
        # the step at which each direction was added (None: there from the start)
        self.born = {n: [None] * m.r for n, m in self.layers.items()}

    def spectra(self) -> dict:
        """{module name: λ as a float32 CPU tensor}, with one device-to-host copy in all."""
        lams = torch.cat([m.Lambda.detach().reshape(-1).float() for m in self.layers.values()]).cpu()
        if not torch.isfinite(lams).all():
            bad = [n for n, m in self.layers.items() if not torch.isfinite(m.Lambda).all()]
            raise ValueError(f"non-finite λ in {bad[:3]}: training diverged; lower the learning rate")
        return dict(zip(self.layers, lams.split([m.r for m in self.layers.values()])))

    @torch.no_grad()
    def norms(self) -> dict:
        """{module name: ‖ΔW‖_F}, from r×r Gram matrices: ‖P diag(λ) Q‖² = λᵀ (PᵀP ∘ QQᵀ) λ."""
        sq = [m.scaling ** 2 * (m.Lambda.float() @ ((m.P.float().T @ m.P.float())
                                                    * (m.Q.float() @ m.Q.float().T)) @ m.Lambda.float())
              for m in self.layers.values()]
        return dict(zip(self.layers, torch.stack(sq).clamp(min=0).sqrt().cpu().tolist()))

    def scores(self, t: int, lams: dict) -> dict:
        """{module name: importance}: I(Λ) of the directions old enough to be judged."""
        c = self.config
        out = {}
        for name, lam in lams.items():
            judged = lam[[i for i, t0 in enumerate(self.born[name]) if not self._young(t, t0)]]
            if judged.numel() == 1:
                out[name] = c["rank1_score"]
            elif c["score"] == "utilization":  # effective rank / r = exp(I · log r) / r
                out[name] = math.exp(float(spectral_entropy(judged)) * math.log(judged.numel())) / judged.numel()
            else:
                out[name] = float(spectral_entropy(judged))
        if c["score"] == "energy":  # × the matrix's share of the largest update
            norms = self.norms()
            top = max(norms.values()) or 1.0
            out = {n: v * norms[n] / top for n, v in out.items()}
        return out

    def _young(self, t, t0):
        return t0 is not None and t - t0 <= self.config["protect"]

    def step(self, t: int, optimizer: torch.optim.Optimizer = None):
        """Run an allocation if one is due at step t. Returns its record, or None."""
        c = self.config
        b = budget(t, c["b0"], c["t_warmup"], c["t_final"], c["total_steps"], c["schedule"])
        if b == 0 or (t - c["t_warmup"]) % c["interval"] != 0:
            return None
        if any(m.merged for m in self.layers.values()):
            raise ValueError("an adapter is merged: call unmerge() before training on")
        if any(len(self.born[n]) != m.r for n, m in self.layers.items()):
            raise ValueError("adapter ranks changed behind the allocator's back: after "
                             "load_adapter(), load the allocator's state_dict saved with it")
        lams = self.spectra()
        scores = self.scores(t, lams)
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

        # 3) prune: drop the direction with the smallest |λ| (among those old enough)
        # Deviation (authors' code): they take the signed argmin, which can drop the strongest.
        removed = {}
        for name in pruned:
            old = [i for i, t0 in enumerate(self.born[name]) if not self._young(t, t0)]
            removed[name] = i = min(old, key=lambda j: (abs(lams[name][j].item()), j))
            keep = [j for j in range(ranks[name]) if j != i]
            _resize(self.layers[name], keep, False, self.generator, optimizer)
            del self.born[name][i]
        # 4) expand: one new direction at λ = 0, appended as the last index
        for name in expanded:
            _resize(self.layers[name], list(range(ranks[name])), True, self.generator, optimizer)
            self.born[name].append(t)

        record = dict(step=t, b=b, k=k, scores=scores, pruned=pruned, removed=removed,
                      expanded=expanded, ranks={n: m.r for n, m in self.layers.items()})
        self.history.append(record)
        return record

    def state_dict(self) -> dict:
        return {"config": dict(self.config), "generator": self.generator.get_state(),
                "born": {n: list(v) for n, v in self.born.items()}, "history": list(self.history)}

    def load_state_dict(self, d: dict):
        if d["config"] != self.config:
            raise ValueError(f"allocator state was saved with {d['config']}, this allocator has "
                             f"{self.config}: build it with the same settings to resume")
        ranks = rank_pattern(self.model)
        if {n: len(v) for n, v in d["born"].items()} != ranks:
            raise ValueError("allocator state does not fit the adapters: inject the same "
                             "target_modules and load_adapter() the checkpoint saved with it first")
        self.generator.set_state(d["generator"])
        self.born = {n: list(v) for n, v in d["born"].items()}
        self.history = list(d["history"])


# -----------------------------------------------------------------------------
# Saving and loading (safetensors: no pickle), merging


def save_adapter(model: nn.Module, path: str):
    """Save every trainable parameter (adapters and heads) with each adapter's alpha and r_init."""
    from safetensors.torch import save_file

    layers = adapters(model)
    if not layers:
        raise ValueError("the model has no FlexLoRA adapters: call flexlora.inject() first")
    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    for name, layer in layers.items():  # adapter factors even if the user froze some
        for f in _RANK_DIM:
            tensors[f"{name}.{f}"] = getattr(layer, f).detach().contiguous()
    config = {n: {"r": m.r, "r_init": m.r_init, "alpha": m.alpha} for n, m in layers.items()}
    save_file(tensors, path, metadata={"format": "flexlora", "adapters": json.dumps(config)})


def load_adapter(model: nn.Module, path: str):
    """Load a save_adapter() file into a model injected with the same target_modules.

    The ranks, alpha and r_init come from the file, whatever r the model was injected with.
    Build the optimizer after loading: the adapter parameters are new objects.
    """
    from safetensors import safe_open

    with safe_open(path, "pt") as f:  # metadata and tensors in one read
        meta = f.metadata() or {}
        if meta.get("format") != "flexlora":
            raise ValueError(f"{path} is not a flexlora.save_adapter() file")
        config, tensors = json.loads(meta["adapters"]), {k: f.get_tensor(k) for k in f.keys()}
    layers = adapters(model)
    if set(config) != set(layers):
        extra, absent = sorted(set(config) - set(layers)), sorted(set(layers) - set(config))
        raise ValueError(f"{path} does not fit this model: adapters only in the file {extra}, "
                         f"only in the model {absent}; inject the same target_modules as saved")
    params = dict(model.named_parameters())
    for name, layer in layers.items():
        P, Q = tensors.pop(f"{name}.P"), tensors.pop(f"{name}.Q")
        Lambda = tensors.pop(f"{name}.Lambda")
        if P.shape[0] != layer.P.shape[0] or Q.shape[1] != layer.Q.shape[1]:
            raise ValueError(f"adapter {name}: the file has ΔW of shape ({P.shape[0]}, {Q.shape[1]}), "
                             f"the model ({layer.P.shape[0]}, {layer.Q.shape[1]})")
        layer.unmerge()
        for f, value in (("P", P), ("Lambda", Lambda), ("Q", Q)):
            old = getattr(layer, f)
            setattr(layer, f, nn.Parameter(value.to(old.device, old.dtype), old.requires_grad))
        layer.r_init, layer.alpha = config[name]["r_init"], config[name]["alpha"]
        layer.scaling = layer.alpha / layer.r_init
    for name, value in tensors.items():  # the other trainable parameters, e.g. the classifier
        if name not in params or params[name].shape != value.shape:
            have = tuple(params[name].shape) if name in params else "nothing"
            raise ValueError(f"{path} holds {name} of shape {tuple(value.shape)}, the model {have}")
        with torch.no_grad():
            params[name].copy_(value)


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
