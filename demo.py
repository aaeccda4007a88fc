"""FlexLoRA on a toy problem whose answer is known: offline, about half a minute on a CPU.

    python demo.py                     # 10 matrices, planted ranks 0 0 1 1 2 2 4 4 8 8, r0 = 3
    python demo.py --seed 1 --steps 6000

A teacher adds a planted low-rank update ΔW_k of a known rank to each of n frozen random
matrices; the student is the same frozen matrices with FlexLoRA adapters of a uniform initial
rank r0, trained to match the teacher's outputs on random inputs. The script prints how the
ranks move, where they end against the planted ranks, and how often a direction added at one
allocation is removed again at the next (the prune/expand oscillation).
"""

import argparse
import time

import torch
import torch.nn as nn

import flexlora as fl

# -----------------------------------------------------------------------------
# The toy problem


class Matrices(nn.Module):
    """n independent d×d linear maps applied to one input: (B, d) -> (B, n, d)."""

    def __init__(self, n: int, d: int):
        super().__init__()
        self.mats = nn.ModuleList(nn.Linear(d, d) for _ in range(n))

    def forward(self, x):
        return torch.stack([m(x) for m in self.mats], dim=1)


def make_problem(planted, d=32, seed=0):
    """Teacher and frozen student base: the teacher's matrix k is the student's + ΔW_k of rank
    planted[k], with singular values spread between 0.5 and 1."""
    g = torch.Generator().manual_seed(seed)
    student = Matrices(len(planted), d)
    for m in student.mats:  # reproducible base weights
        nn.init.normal_(m.weight, std=d ** -0.5, generator=g)
        nn.init.zeros_(m.bias)
    teacher = Matrices(len(planted), d)
    teacher.load_state_dict(student.state_dict())
    with torch.no_grad():
        for m, k in zip(teacher.mats, planted):
            if k == 0:
                continue
            U, _ = torch.linalg.qr(torch.randn(d, k, generator=g))  # (d, k) orthonormal
            V, _ = torch.linalg.qr(torch.randn(d, k, generator=g))
            S = torch.linspace(1.0, 0.5, k)  # planted singular values
            m.weight += U @ torch.diag(S) @ V.T  # ΔW_k = U S Vᵀ
    return teacher.requires_grad_(False), student


def train(planted, r0=3, steps=3000, b0=2, t_warmup=200, t_final=600, interval=20, lr=1e-2,
          gamma=0.1, batch=128, d=32, seed=0, log_every=0, r_max=16, rule="paper"):
    """Train the student; returns (student, allocator, list of losses). rule: "paper" (the
    entropy score, flexlora.RankAllocator) or "gain" (flexlora_gain.GainAllocator)."""
    torch.manual_seed(seed)
    teacher, student = make_problem(planted, d, seed)
    # the slots: room to grow to r_max
    fl.inject(student, r"mats\.\d+", r=r0, alpha=r0, r_max=r_max)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr,
                            weight_decay=0.0)
    if rule == "gain":
        from flexlora_gain import GainAllocator as Allocator
    else:
        Allocator = fl.RankAllocator
    alloc = Allocator(student, b0, t_warmup, t_final, steps, interval, seed=seed)
    losses = []
    for t in range(1, steps + 1):
        x = torch.randn(batch, d)
        mse = (student(x) - teacher(x)).pow(2).mean()
        loss = mse + gamma * fl.orthogonal_regularizer(student)
        loss.backward()
        opt.step()
        alloc.step(t, opt)  # after optimizer.step(), before zero_grad()
        opt.zero_grad(set_to_none=True)
        losses.append(mse.item())
        if log_every and t % log_every == 0:
            ranks = " ".join(f"{r:2d}" for r in fl.rank_pattern(student).values())
            b = fl.budget(t, b0, t_warmup, t_final, steps)
            print(f"step {t:5d} | mse {mse.item():.5f} | b(t) {b} | ranks {ranks}")
    return student, alloc, losses


# -----------------------------------------------------------------------------

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass  # --help: the docstring as written, and every flag's default


def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--planted", type=int, nargs="+", default=[0, 0, 1, 1, 2, 2, 4, 4, 8, 8],
                    help="the rank of each teacher update ΔW_k: one matrix per number")
    ap.add_argument("--r0", type=int, default=3, help="initial rank of every adapter")
    ap.add_argument("--steps", type=int, default=3000, help="steps of 128 random inputs")
    ap.add_argument("--b0", type=int, default=2, help="matrices changed at the first allocation")
    ap.add_argument("--interval", type=int, default=20, help="Δ: steps between allocations")
    ap.add_argument("--seed", type=int, default=0, help="the problem, inputs, new directions")
    ap.add_argument("--r_max", type=int, default=16,
                    help="slots per adapter: the most rank a matrix can reach")
    ap.add_argument("--rule", default="paper", choices=["paper", "gain"],
                    help="which matrices move: the paper's entropy score, "
                         "or flexlora_gain.py's priced moves")
    return ap.parse_args(argv)


if __name__ == "__main__":
    args = get_args()
    from scipy.stats import spearmanr

    t0 = time.time()
    student, alloc, losses = train(args.planted, r0=args.r0, steps=args.steps, b0=args.b0,
                                   interval=args.interval, seed=args.seed,
                                   log_every=args.steps // 15, r_max=args.r_max, rule=args.rule)
    final = list(fl.rank_pattern(student).values())
    c = fl.churn(alloc.history)
    print(f"\nplanted ranks   {args.planted}  (total {sum(args.planted)})")
    print(f"final ranks     {final}  (total {sum(final)}, conserved from {args.r0} x {len(final)})")
    print(f"rank correlation (Spearman) {spearmanr(args.planted, final).statistic:.2f}")
    print(f"mse {losses[0]:.4f} -> {losses[-1]:.5f} in {args.steps} steps, "
          f"{len(alloc.history)} allocations, {time.time() - t0:.0f} s")
    print(f"oscillation: {c['added_removed_at_next']} of {c['added_with_a_next']} added directions "
          f"removed at the very next allocation")
