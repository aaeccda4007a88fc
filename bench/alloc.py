"""Does the rank go where it is needed? FlexLoRA's allocation on planted problems.

    python -m bench.alloc                              # all problems, variants, 3 seeds (~25 min on 2 CPU cores)
    python -m bench.alloc --problems isolated --seeds 0 --variants paper energy   # one quick look

Each problem has a teacher whose adapted matrices carry planted low-rank updates of known
rank; a student with FlexLoRA adapters of a uniform initial rank learns to match it. Problems:
- isolated: independent matrices (ranks 0 1 2 4 8 16, twice, at two singular-value scales);
- entangled: a residual MLP whose layers carry planted updates (layers can compensate);
- transformer: a tiny DeBERTa built from a config, planted updates in a few of its matrices,
  matched on the teacher's last hidden states.
The variants of the rule are VariantAllocator's options (below). For each variant and each seed
it reports the final and time-averaged ranks against the planted ones (Spearman), the rank mass
parked on matrices that need none, the matrices left below their planted rank, the fit (loss,
relative error of ΔW), and churn: directions removed at the allocation right after they were
added, and matrices that flip between expand and prune at consecutive allocations. Fixed-rank
adapters at the same total rank (LoRA's setting) are the reference. Writes runs/bench_alloc/results.json, a markdown
table (results.md) and ranks.png (planted vs allocated).
"""

import argparse
import json
import math
import os
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import flexlora as fl
from flexlora_gain import GainAllocator

# -----------------------------------------------------------------------------
# Variants of the allocation rule: a RankAllocator whose scores() departs from the paper's

SCORES = ("entropy", "energy", "utilization")


class VariantAllocator(fl.RankAllocator):
    """flexlora.RankAllocator with options, each a departure from the paper (defaults = the paper):

      score="energy": I(Λ_k) · ‖ΔW_k‖_F / max_j ‖ΔW_j‖_F, so that a matrix whose update is tiny
          cannot look saturated (entropy alone is scale-invariant; a reviewer's proposal).
      score="utilization": effective rank / r = exp(I log r) / r, which drops linearly with idle
          directions where I = log(eff. rank) / log r hardly moves (16 used of 26: 0.85).
      rank1_score: the score of a rank-1 matrix, 0 (the paper's limit: fully concentrated, so it
          can never grow back) or 1 (a single direction counts as saturated).
      protect: a direction added at step t0 is neither pruned nor counted in the score while
          t − t0 ≤ protect, so it has time to learn before it is judged (its λ starts at 0, which
          makes its matrix look concentrated and itself the smallest |λ|).
    """

    def __init__(self, model, *args, score="entropy", rank1_score=0, protect=0, **kw):
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        if rank1_score not in (0, 1):
            raise ValueError(f"rank1_score must be 0 (the paper) or 1, got {rank1_score!r}")
        if not isinstance(protect, int) or protect < 0:
            raise ValueError(f"protect must be a number of steps >= 0, got {protect!r}")
        super().__init__(model, *args, **kw)
        self.config.update(score=score, rank1_score=rank1_score, protect=protect)
        self.t = 0

    def step(self, t, optimizer=None):
        self.t = t
        return super().step(t, optimizer)

    def spectra(self):
        # a young direction is shown to the rule as λ = inf: never the smallest |λ|, and scores()
        # leaves it out of its matrix's score
        lams = super().spectra()  # the live slots, in slot order
        for name, lam in lams.items():
            born = [self.born[name][s] for s in self.layers[name].live.nonzero().squeeze(1).tolist()]
            young = [i for i, t0 in enumerate(born) if t0 and self.t - t0 <= self.config["protect"]]  # 0: old
            lam[young] = float("inf")
        return lams

    def scores(self, lams):
        c, out = self.config, {}
        for name, lam in lams.items():
            judged = lam[torch.isfinite(lam)]  # the directions old enough to be judged
            if judged.numel() == 1:
                out[name] = c["rank1_score"]
            elif c["score"] == "utilization":  # effective rank / r = exp(I · log r) / r
                out[name] = math.exp(float(fl.spectral_entropy(judged)) * math.log(judged.numel())) / judged.numel()
            else:
                out[name] = float(fl.spectral_entropy(judged))
        if c["score"] == "energy":  # × the matrix's share of the largest update
            norms = self.norms()
            top = max(norms.values()) or 1.0
            out = {n: v * norms[n] / top for n, v in out.items()}
        return out

    @torch.no_grad()
    def norms(self):
        """{module name: ‖ΔW‖_F}, from r×r Gram matrices: ‖P diag(λ) Q‖² = λᵀ (PᵀP ∘ QQᵀ) λ."""
        lams = [(m.Lambda * m.live).float() for m in self.layers.values()]  # dead slots: 0
        sq = [m.scaling ** 2 * (lam @ ((m.P.float().T @ m.P.float()) * (m.Q.float() @ m.Q.float().T)) @ lam)
              for m, lam in zip(self.layers.values(), lams)]
        return dict(zip(self.layers, torch.stack(sq).clamp(min=0).sqrt().cpu().tolist()))


# -----------------------------------------------------------------------------
# planted problems: (teacher, student, target regex, {name: planted ΔW}, input sampler)


def planted_update(d_out, d_in, rank, scale, g):
    """A rank-`rank` matrix with singular values spread from scale to scale / 2."""
    if rank == 0:
        return torch.zeros(d_out, d_in)
    U, _ = torch.linalg.qr(torch.randn(d_out, rank, generator=g))
    V, _ = torch.linalg.qr(torch.randn(d_in, rank, generator=g))
    return U @ torch.diag(torch.linspace(scale, scale / 2, rank)) @ V.T


def plant(teacher, student, planted, scales, g):
    """Copy the student's weights into the teacher and add the planted updates."""
    teacher.load_state_dict(student.state_dict())
    deltas = {}
    with torch.no_grad():
        for (name, rank), scale in zip(planted.items(), scales):
            W = teacher.get_submodule(name).weight
            deltas[name] = planted_update(*W.shape, rank, scale, g)
            W += deltas[name]
    return teacher.requires_grad_(False), deltas


class Matrices(nn.Module):
    """n independent d×d linear maps applied to one input: (B, d) -> (B, n, d) (demo.py's toy)."""

    def __init__(self, n, d):
        super().__init__()
        self.mats = nn.ModuleList(nn.Linear(d, d) for _ in range(n))

    def forward(self, x):
        return torch.stack([m(x) for m in self.mats], dim=1)


def isolated(seed, d=48):
    torch.manual_seed(seed)  # every weight below depends on the seed alone
    g = torch.Generator().manual_seed(seed)
    ranks = [0, 1, 2, 4, 8, 16] * 2
    student = Matrices(len(ranks), d)
    for m in student.mats:
        nn.init.normal_(m.weight, std=d ** -0.5, generator=g)
    planted = {f"mats.{i}": r for i, r in enumerate(ranks)}
    teacher, deltas = plant(Matrices(len(ranks), d), student, planted, [1.0] * 6 + [0.3] * 6, g)
    return teacher, student, r"mats\.\d+", deltas, lambda gen: torch.randn(128, d, generator=gen)


class ResidualMLP(nn.Module):
    """h ← h + W_l gelu(h), for l = 1 … L: each layer's update reaches the output through all
    the layers after it, so layers can partly stand in for each other."""

    def __init__(self, n, d):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(F.gelu(x))
        return x


def entangled(seed, d=32):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    ranks = [0, 6, 0, 2, 1, 0, 4, 0]
    student = ResidualMLP(len(ranks), d)
    for m in student.layers:
        nn.init.normal_(m.weight, std=0.5 * d ** -0.5, generator=g)
        nn.init.zeros_(m.bias)
    planted = {f"layers.{i}": r for i, r in enumerate(ranks)}
    teacher, deltas = plant(ResidualMLP(len(ranks), d), student, planted, [0.5] * len(ranks), g)
    return teacher, student, r"layers\.\d+", deltas, lambda gen: torch.randn(128, d, generator=gen)


class HiddenStates(nn.Module):
    """A tiny DeBERTa's last hidden states, so the student matches the teacher's."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).last_hidden_state


def transformer(seed, d=32):
    from transformers import DebertaV2Config, DebertaV2Model
    torch.manual_seed(seed)
    cfg = DebertaV2Config(vocab_size=200, hidden_size=d, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=2 * d, max_position_embeddings=32, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)
    student, teacher = HiddenStates(DebertaV2Model(cfg)), HiddenStates(DebertaV2Model(cfg))
    g = torch.Generator().manual_seed(seed)
    names = [n for n, m in student.named_modules() if isinstance(m, nn.Linear)]
    want = {"layer.0.attention.self.query_proj": 4, "layer.0.attention.self.value_proj": 8,
            "layer.1.intermediate.dense": 6, "layer.1.output.dense": 2}
    planted = {n: next((r for k, r in want.items() if n.endswith(k)), 0) for n in names}
    teacher, deltas = plant(teacher, student, planted, [1.0] * len(planted), g)
    return (teacher.eval(), student.eval(), r".*\.(query_proj|key_proj|value_proj|dense)", deltas,
            lambda gen: torch.randint(0, 200, (32, 16), generator=gen))


PROBLEMS = {"isolated": (isolated, 6, 3000), "entangled": (entangled, 3, 3000),
            "transformer": (transformer, 4, 1500)}  # builder, r0, steps

# -----------------------------------------------------------------------------
# the variants compared (VariantAllocator options); "fixed" = no allocation (LoRA)

VARIANTS = {
    "fixed": None,
    "paper": {},
    "rank1=1": dict(rank1_score=1),
    "protect": dict(protect="interval"),
    "energy": dict(score="energy"),
    "energy+rank1": dict(score="energy", rank1_score=1),
    "energy+rank1+protect": dict(score="energy", rank1_score=1, protect="interval"),
    "util": dict(score="utilization"),
    "util+protect": dict(score="utilization", protect="interval"),
    "constant b": dict(schedule="constant"),
    "long warm-up": dict(t_warmup="x3"),
    "gain": dict(rule="gain"),  # flexlora_gain.GainAllocator: a move only where it pays
    "gain m=0": dict(rule="gain", margin=0.0),
    "gain m=1": dict(rule="gain", margin=1.0),
}


def run(problem, variant, seed, b0=2, interval=20, lr=1e-2, gamma=0.1):
    build, r0, steps = PROBLEMS[problem]
    teacher, student, targets, deltas, sample = build(seed)
    torch.manual_seed(seed)
    # as many slots as the smallest matrix has singular values: the cap never binds
    fl.inject(student, targets, r=r0, alpha=r0,
              r_max=min(min(m.weight.shape) for m in student.modules() if isinstance(m, nn.Linear)))
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    options = dict(VARIANTS[variant] or {})
    t_warmup, t_final = steps // 15, steps // 5
    if options.pop("t_warmup", None):
        t_warmup *= 3
    if options.get("protect") == "interval":
        options["protect"] = interval
    alloc = None
    if options.pop("rule", None) == "gain":
        alloc = GainAllocator(student, b0, t_warmup, t_final, steps, interval, seed=seed, **options)
    elif VARIANTS[variant] is not None:
        alloc = VariantAllocator(student, b0, t_warmup, t_final, steps, interval, seed=seed, **options)
    gen = torch.Generator().manual_seed(seed + 1000)
    losses = []
    for t in range(1, steps + 1):
        x = sample(gen)
        with torch.no_grad():
            y = teacher(x)
        mse = F.mse_loss(student(x), y)
        (mse + gamma * fl.orthogonal_regularizer(student)).backward()
        opt.step()
        if alloc:
            alloc.step(t, opt)
        opt.zero_grad(set_to_none=True)
        losses.append(mse.item())
    return report(student, alloc, deltas, losses, r0, steps)


def spearman(a, b):
    """Rank correlation (average ranks for ties); NaN when one side is constant (fixed ranks)."""
    from scipy.stats import spearmanr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on constant input
        return float(spearmanr(a, b).statistic)


def report(student, alloc, deltas, losses, r0, steps):
    layers = fl.adapters(student)
    names = [n for n, m in student.named_modules() if m in layers.values()]  # model order
    planted = [int(torch.linalg.matrix_rank(deltas[n]).item()) for n in names]
    final = [layers[n].r for n in names]
    history = alloc.history if alloc else []
    # time-averaged rank: each allocation's ranks hold until the next one
    avg = torch.zeros(len(names))
    last_t, last = 0, torch.full((len(names),), float(r0))
    for h in history:
        avg += (h["step"] - last_t) * last
        last_t, last = h["step"], torch.tensor([float(h["ranks"][n]) for n in names])
    avg = ((avg + (steps - last_t) * last) / steps).tolist()
    c = fl.churn(history)
    removed, added = c["added_removed_at_next"], c["added_with_a_next"]
    flips = c["flips"]
    moves = sum(h["k"] for h in history)
    err = sum((layers[n].delta_weight().detach() - deltas[n]).pow(2).sum() for n in names)
    ref = sum(deltas[n].pow(2).sum() for n in names)
    idle = sum(f - 1 for f, p in zip(final, planted) if p == 0)  # above r_min on no-need matrices
    starved = sum(f < p for f, p in zip(final, planted))
    return dict(names=names, planted=planted, final=final, avg=[round(a, 2) for a in avg],
                spearman_final=spearman(planted, final), spearman_avg=spearman(planted, avg),
                idle_rank=idle, starved=starved, starved_while_idle=starved if idle else 0,
                loss=sum(losses[-50:]) / 50, loss0=losses[0],
                delta_err=math.sqrt(float(err / ref)), churn=removed, added=added,
                churn_pct=100 * removed / max(added, 1), flips=flips, moves=moves,
                flip_pct=100 * flips / max(moves, 1))


# -----------------------------------------------------------------------------


def mean_std(v):
    m = sum(v) / len(v)
    return m, (sum((x - m) ** 2 for x in v) / max(len(v) - 1, 1)) ** 0.5


def table(results, problems, variants):
    cols = [("Spearman final", "spearman_final", "{:.2f}"), ("Spearman avg", "spearman_avg", "{:.2f}"),
            ("idle rank", "idle_rank", "{:.1f}"), ("starved", "starved", "{:.1f}"),
            ("ΔW rel. err", "delta_err", "{:.3f}"), ("loss", "loss", "{:.2e}"),
            ("churn %", "churn_pct", "{:.0f}"), ("flips %", "flip_pct", "{:.0f}")]
    lines = []
    for p in problems:
        lines += [f"\n**{p}** (planted ranks {results[p][variants[0]][0]['planted']})\n",
                  "| variant | final ranks (seed 0) | " + " | ".join(c for c, _, _ in cols) + " |",
                  "|---" * (len(cols) + 2) + "|"]
        for v in variants:
            rs = results[p][v]
            cells = []
            for _, key, fmt in cols:
                m, s = mean_std([r[key] for r in rs])
                if math.isnan(m):  # e.g. the rank correlation of constant (fixed) ranks
                    cells.append("—")
                else:
                    cells.append(fmt.format(m) + (f" ± {fmt.format(s)}" if len(rs) > 1 else ""))
            lines.append(f"| {v} | {' '.join(map(str, rs[0]['final']))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results, problems, variants, path):
    """Planted rank vs final rank (mean over seeds) per matrix, for a few variants."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shown = [v for v in ("paper", "util", "energy", "long warm-up") if v in variants]
    fig, axes = plt.subplots(1, len(problems), figsize=(5.5 * len(problems), 3.8), squeeze=False)
    for ax, p in zip(axes[0], problems):
        planted = results[p][variants[0]][0]["planted"]
        x = list(range(len(planted)))
        ax.bar(x, planted, color="lightgray", label="planted")
        for v in shown:
            runs = results[p][v]
            mean = [sum(r["final"][i] for r in runs) / len(runs) for i in x]
            ax.plot(x, mean, marker="o", label=v)
        ax.set_title(f"{p}: final rank per matrix (mean of {len(results[p][variants[0]])} seeds)")
        ax.set_xlabel("adapted matrix (model order)")
        ax.set_ylabel("rank")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/bench_alloc")
    args = ap.parse_args()
    torch.set_num_threads(1)  # small matrices: threads only add overhead
    os.makedirs(args.out, exist_ok=True)
    results, t0 = {}, time.time()
    for p in args.problems:
        results[p] = {}
        for v in args.variants:
            results[p][v] = [run(p, v, s) for s in args.seeds]
            r = results[p][v][0]
            print(f"{p:11s} {v:22s} final {r['final']} spearman {r['spearman_final']:.2f} "
                  f"err {r['delta_err']:.3f} churn {r['churn']}/{r['added']} flips {r['flips']}/{r['moves']} "
                  f"[{time.time() - t0:.0f} s]", flush=True)
    md = table(results, args.problems, args.variants)
    print(md)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md + "\n")
    plot(results, args.problems, args.variants, os.path.join(args.out, "ranks.png"))
