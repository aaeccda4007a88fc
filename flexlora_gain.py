"""The gain rule: rank moves only where the loss says a move pays (ours, beside the paper's).

flexlora.RankAllocator moves b(t) directions at every allocation, chosen by the spectral entropy
of each matrix's λ (paper §3). GainAllocator prices both sides of a move in one unit, the loss,
with a local quadratic model of it along each matrix's update ΔW
(G = ∂L/∂ΔW, h its curvature):

    L(ΔW + E) ≈ L(ΔW) + ⟨G, E⟩ + ½ h ‖E‖²

- a live direction c · p̂ q̂ᵀ (c = s λ ‖p‖ ‖q‖) is worth ½ h c*²,
  c* = c − ⟨G, p̂ q̂ᵀ⟩ / h being its coefficient after one Newton step: a newborn is
  valued where it is heading, not at 0;
- a matrix's best new direction is the top singular pair (u, σ, v) of
  G⊥ = (I − ΠP) G (I − ΠQ), the part of G its live directions cannot express, and is worth
  σ² / (2h);
- a donor's cost is what it loses: its weakest direction, or, if more, what it could itself do
  with the slot: a new direction or a turn of a live one, the top pair of G − ΠP G ΠQ (so a
  matrix still learning does not give rank away);
- a move (the cheapest donor → the matrix of largest gain) is made only if
  gain > (1 + margin) · cost, at most b(t) moves per allocation: b(t) is a cap, not a quota;
- σ is cross-fitted: the pair is chosen on one half of the batch and measured on the other (and the
  other way round), which removes the upward bias of a noisy matrix's top singular value;
- h is a secant along the path, ⟨G_t − G_a, ΔW_t − ΔW_a⟩ / ‖ΔW_t − ΔW_a‖²
  from the previous anchor a (Δ steps before; the first anchor is t_warmup), numerator and
  denominator pooled over the intervals with weights halving per interval (one interval's is
  mostly batch noise); a matrix without a positive one gets the median of the others;
- the new direction starts along the chosen pair and adds nothing to ΔW: p = u, λ = 0, q = v
  (init "gaussian") or p = 0, λ = 1, q = v ("lora"); both get a gradient at once (a random p, q at
  λ = 0 sits on a saddle).

G is read on `read_steps` steps per interval (up to each allocation, and to t_warmup) by hooks
on each adapter's input x and output gradient g: G = Σ gᵀ x, (d_out, N) x (N, d_in), summed over
each step's micro-batches and averaged over the steps. Under torch.distributed the engine
reduces parameter gradients, not these sums, so they are all-reduced here: every process
decides the same. Dropout is not seen (x, not dropout(x): the same G in expectation). Costs per
interval: on those steps, the weight gradient of every adapted matrix (as in full fine-tuning)
and the all-reduce of 2 · d_out · d_in floats per adapter; at an allocation, two QRs of d × r
and 5 power iterations of `power_iters` steps on d_out × d_in matrices per adapter. Memory: G
of the last anchor, one d_out × d_in float32 matrix per adapter, kept between anchors (and two
more while G is read). bench/gain_cost.py measures these. Tested on one
process, under DDP (2 processes) and across a checkpoint; not under torch.compile or FSDP2 (the
hooks), nor with the Trainer callback (its checkpoint is JSON).
"""

import math
import statistics

import torch

import flexlora as fl


def top_pair(X: torch.Tensor, iters: int):
    """(u, σ, v): the top singular pair of X (d_out, d_in), by power iteration from its largest row
    (no random start: every process gets the same pair); zeros for X = 0."""
    if not X.any():
        return X.new_zeros(X.shape[0]), 0.0, X.new_zeros(X.shape[1])
    v = X[X.norm(dim=1).argmax()]
    v = v / v.norm()
    for _ in range(iters):
        u = X @ v  # (d_out, d_in) x (d_in,) -> (d_out,)
        u = u / u.norm().clamp_min(1e-30)
        v = X.T @ u  # (d_in, d_out) x (d_out,) -> (d_in,)
        sigma = v.norm()
        v = v / sigma.clamp_min(1e-30)
    return u, float(sigma), v


def outside(X: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """(I − U Uᵀ) X (I − V Vᵀ): X without what the orthonormal columns U (d_out, r),
    V (d_in, r) span."""
    X = X - U @ (U.T @ X)  # (d_out, r) x (r, d_in)
    return X - (X @ V) @ V.T  # (d_out, r) x (r, d_in)


def basis(A: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning the nonzero columns of A (d, r)."""
    A = A[:, A.norm(dim=0) > 0]
    return torch.linalg.qr(A).Q if A.shape[1] else A


def crossfit(a: torch.Tensor, b: torch.Tensor, iters: int) -> float:
    """X's top singular value, from its two halves' estimates a, b (X ≈ a + b): the pair picked on
    one half, measured on the other, both ways, so that the noise of a half does not inflate it."""
    ua, _, va = top_pair(a, iters)
    ub, _, vb = top_pair(b, iters)
    return max(0.0, float(ua @ b @ va + ub @ a @ vb))  # (d_out,) x (d_out, d_in) x (d_in,)


class GainAllocator(fl.RankAllocator):
    """flexlora.RankAllocator with the gain rule (the module's docstring): same arguments, plus
    margin (a move needs gain > (1 + margin) · cost), power_iters and read_steps (steps of G
    averaged per interval). Call step(t, optimizer) after every optimizer step, as for the
    paper's rule: it also arms and reads the hooks."""

    def __init__(self, model, *args, margin: float = 0.5, power_iters: int = 20,
                 read_steps: int = 4, **kw):
        fl._need(isinstance(margin, (int, float)) and not isinstance(margin, bool)
                 and math.isfinite(margin) and margin >= 0,
                 f"margin must be a number >= 0 (0: any gain above the cost), got {margin!r}")
        power_iters, read_steps = (fl._int("power_iters", power_iters, 1),
                                   fl._int("read_steps", read_steps, 1))
        super().__init__(model, *args, **kw)
        self.config.update(rule="gain", margin=float(margin), power_iters=power_iters,
                           read_steps=read_steps)
        self.anchor = None  # {name: (G, (P, λ, Q) live)} where G was last read
        # {name: (Σ ⟨ΔG, D⟩, Σ ‖D‖²)}, decaying
        self.secant = {n: (0.0, 0.0) for n in self.layers}
        # {name: (2, d_out, d_in)}: the halves' G, summed
        self.sums, self.hooks, self.reads = {}, [], 0
        self.picks = {}  # at an allocation: {name: (weakest live index, new (u, v))}
        self.now = None  # during step(): the sums read on this step
        self._arm_for(self.last_step + 1)

    # -- G from hooks, on anchor steps only

    def is_anchor(self, t: int) -> bool:
        c = self.config
        return t >= max(c["t_warmup"], 1) and t <= c["total_steps"] - c["t_final"] \
            and (t - c["t_warmup"]) % c["interval"] == 0

    def is_read(self, t: int) -> bool:  # G is averaged over the read_steps steps up to an anchor
        return any(self.is_anchor(a)
                   for a in range(t, t + min(self.config["read_steps"], self.config["interval"])))

    def _arm_for(self, t: int):
        if not self.is_read(t) or self.hooks:
            return
        for name, m in self.layers.items():
            self.hooks.append(m.register_forward_hook(
                lambda module, args, out, name=name: self._watch(name, args[0], out)))

    def _watch(self, name, x, out):
        if out.requires_grad:  # (not under no_grad: an evaluation)
            x = x.detach()
            out.register_hook(lambda g: self._add(name, x, g))

    @torch.no_grad()
    def _add(self, name, x, g):
        # (N, d_in), (N, d_out)
        x, g = x.reshape(-1, x.shape[-1]).float(), g.reshape(-1, g.shape[-1]).float()
        half = x.shape[0] // 2  # the first and second half of the batch
        G = torch.stack([g[:half].T @ x[:half], g[half:].T @ x[half:]])  # (2, d_out, d_in)
        self.sums[name] = self.sums[name] + G if name in self.sums else G

    def _read(self):
        """The halves' G, averaged over the steps read and over the processes as DDP averages."""
        for h in self.hooks:
            h.remove()
        self.hooks = []
        (sums, self.sums), (reads, self.reads) = (self.sums, {}), (self.reads, 0)
        if set(sums) != set(self.layers) or not reads:
            return None  # no backward on these steps (or not through every adapter)
        sums = {n: G / reads for n, G in sums.items()}
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat([sums[n].reshape(-1) for n in self.layers])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            sums = dict(zip(self.layers, (f.view(sums[n].shape) for n, f in zip(
                self.layers, flat.split([sums[n].numel() for n in self.layers])))))
        return sums

    def step(self, t, optimizer=None):
        self.reads += bool(self.hooks)  # one more step's G summed in
        sums = self._read() if self.hooks and self.is_anchor(t) else None
        if sums is not None:  # ΔW where G was read (before this step's allocation)
            here = {n: tuple(f.float() for f in m.live_factors()) for n, m in self.layers.items()}
        self.now = sums
        try:
            record = super().step(t, optimizer)
        finally:
            self.now = None
        if sums is not None:
            self.anchor = {n: (sums[n].sum(0), here[n]) for n in self.layers}
        self._arm_for(t + 1)
        return record

    # -- the rule

    @torch.no_grad()
    def choose(self, b, lams):
        c = self.config
        if self.now is None or self.anchor is None:  # no G on this step, or no anchor before it
            return [], [], dict(gains={}, costs={}, curvature={})
        curv, values, gains, own, self.picks = {}, {}, {}, {}, {}
        for name, m in self.layers.items():
            P, lam, Q = (f.float() for f in m.live_factors())
            G = self.now[name].sum(0)
            G0, (P0, lam0, Q0) = self.anchor[name]
            # ΔW_t − ΔW_a: (d_out, r) x (r, d_in)
            D = m.scaling * ((P * lam) @ Q - (P0 * lam0) @ Q0)
            num, den = self.secant[name]  # pooled with the earlier intervals', halved each time
            num, den = 0.5 * num + float(((G - G0) * D).sum()), 0.5 * den + float(D.square().sum())
            self.secant[name] = (num, den)
            curv[name] = num / den if den > 0 else None  # (None: ΔW did not move)
        ok = [h for h in curv.values() if h is not None and h > 0 and math.isfinite(h)]
        if not ok:
            return [], [], dict(gains={}, costs={}, curvature=curv)
        fallback = statistics.median(ok)
        for name, m in self.layers.items():
            h = curv[name] if curv[name] in ok else fallback
            values[name], gains[name], own[name] = self._price(name, m, self.now[name], h)
        # a donor loses its weakest direction, and with the slot the use it could put it to itself
        costs = {n: max(min(values[n]), own[n]) for n in self.layers}
        # the moves: largest gain against cheapest cost, while the gain pays for it
        cap = {n: min(c["r_max"] or m.r_max, m.r_max) for n, m in self.layers.items()}
        grow = sorted((n for n, lam in lams.items() if lam.numel() < cap[n]),
                      key=lambda n: (-gains[n], n))
        prune = sorted((n for n, lam in lams.items() if lam.numel() > c["r_min"]),
                       key=lambda n: (costs[n], n))
        pruned, expanded = [], []
        for _ in range(b):
            taken = pruned + expanded
            to = next((n for n in grow if n not in taken), None)
            frm = next((n for n in prune if n not in taken and n != to), None)
            if to is None or frm is None or not gains[to] > (1 + c["margin"]) * costs[frm]:
                break
            pruned.append(frm)
            expanded.append(to)
        return pruned, expanded, dict(gains=gains, costs=costs, curvature=curv)

    def _price(self, name, m, halves, h):
        """([value of each live direction], gain of the best new direction, gain of the best use of
        a slot in place), and the picks: the weakest direction and the new one."""
        P, lam, Q = (f.float() for f in m.live_factors())
        G = halves.sum(0)
        pn, qn = P.norm(dim=0), Q.norm(dim=1)  # (r,), (r,)
        q = Q / qn[:, None]  # q̂: (r, d_in)
        Gq = G @ q.T  # (d_out, d_in) x (d_in, r) -> (d_out, r)
        # p̂; a direction with p = 0 (init "lora", newborn) heads along −G q̂
        p = torch.where(pn > 0, P / pn.clamp_min(1e-30), -Gq / Gq.norm(dim=0).clamp_min(1e-30))
        coef = m.scaling * lam * pn * qn  # c_i
        newton = coef - (p * Gq).sum(0) / h  # c* = c − ⟨G, p̂ q̂ᵀ⟩ / h
        value = (0.5 * h * newton.square()).tolist()
        U, V = basis(P), basis(Q.T)
        it = self.config["power_iters"]
        new = [outside(X, U, V) for X in halves]  # what a new direction could express
        u, _, v = top_pair(new[0] + new[1], it)
        self.picks[name] = (min(range(len(value)), key=value.__getitem__), (u, v))
        # what the slot could do in place: also rotate a live direction (all of G but
        # U Uᵀ G V Vᵀ)
        own = [X - U @ (U.T @ X @ V) @ V.T for X in halves]  # (d_out, r) x (r, r) x (r, d_in)
        return value, crossfit(*new, it) ** 2 / (2 * h), crossfit(*own, it) ** 2 / (2 * h)

    def weakest(self, name, lam):
        return self.picks[name][0]  # the live direction worth least

    def new_direction(self, name):
        m = self.layers[name]
        u, v = self.picks[name][1]
        if m.init == "lora":  # p = 0, λ = 1: P's gradient s · G v is there at once
            return torch.zeros(len(u), 1), torch.ones(1), v[None]
        return u[:, None], torch.zeros(1), v[None]  # λ = 0: λ's gradient s · uᵀ G v = s σ

    # -- checkpoints: the anchor travels with the allocator

    def state_dict(self):
        anchor = None if self.anchor is None else {n: [G.cpu(), *(f.cpu() for f in F)]
                                                   for n, (G, F) in self.anchor.items()}
        return super().state_dict() | {"anchor": anchor, "secant": dict(self.secant),
                                       "reads": self.reads,
                                       "sums": {n: G.cpu() for n, G in self.sums.items()}}

    def load_state_dict(self, d):
        super().load_state_dict(d)
        device = {n: m.P.device for n, m in self.layers.items()}
        self.anchor = None if d.get("anchor") is None else {
            n: (v[0].to(device[n]), tuple(f.to(device[n]) for f in v[1:]))
            for n, v in d["anchor"].items()}
        self.secant = {n: tuple(v) for n, v in d["secant"].items()}
        self.sums = {n: G.to(device[n]) for n, G in d["sums"].items()}  # a read in progress
        self.reads = d["reads"]
        for h in self.hooks:
            h.remove()
        self.hooks = []
        self._arm_for(self.last_step + 1)
