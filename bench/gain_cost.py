"""What the gain rule (flexlora_gain.py) and the Adam warm start cost per step, on CPU.

    python -m bench.gain_cost                          # MiniLM and DeBERTa-v3-base, ~5 min on 2 CPU cores
    python -m bench.gain_cost --models tiny --steps 20  # a quick look

Trains FlexLoRA (bench.speed's setup: AdamW, batch 32, length 128) with GainAllocator at b0 = 4
every Δ = 10 steps (constant b(t), read_steps = 4) and reports the median time of a plain step, a
step whose G is read by the hooks, and the allocation itself (RankAllocator.step at an anchor),
as multiples of the plain step; the ATen ops of the warm start (step() at a step without an
allocation, every matrix holding a reborn slot); and the memory the rule keeps (G of the last
anchor) and reads into (the two halves' G), against the adapters' own parameters.
"""

import argparse
import statistics
import time

import torch

import flexlora
from bench.speed import MODELS, OpCounter, build, make_batch
from flexlora_gain import GainAllocator


def measure(model_name, steps, device):
    run = build(model_name, "flexlora", device)
    model, opt = run["model"], run["optimizer"]
    alloc = GainAllocator(model, b0=4, t_warmup=0, t_final=0, total_steps=10 ** 6, interval=10,
                          schedule="constant", seed=1)
    batch = make_batch(MODELS[model_name], 32, 128, device)
    kinds = {"plain": [], "read": [], "allocation": []}
    for t in range(1, steps + 1):
        reading = bool(alloc.hooks)
        t0 = time.perf_counter()
        loss = model(**batch).loss + 0.05 * flexlora.orthogonal_regularizer(model)
        loss.backward()
        opt.step()
        t1 = time.perf_counter()
        record = alloc.step(t, opt)
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if t > 10:  # after a first interval: warm caches, an anchor to price against
            kinds["read" if reading else "plain"].append(t1 - t0 + (0 if record else t2 - t1))
            if record is not None:
                kinds["allocation"].append(t2 - t1)
    layers = flexlora.adapters(model)
    for m in layers.values():  # every matrix with a reborn slot: the warm start's most work
        j = int((~m.live).nonzero()[0])
        alloc.born[next(n for n, l in layers.items() if l is m)][j] = t
        m.live[j] = True
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    with OpCounter() as ops:
        alloc.step(steps + 1 if not alloc.is_anchor(steps + 1) else steps + 2, opt)
    opt.zero_grad(set_to_none=True)
    plain = statistics.median(kinds["plain"])
    G = sum(m.P.shape[0] * m.Q.shape[1] for m in layers.values()) * 4 / 2 ** 20
    own = sum(p.numel() for m in layers.values() for p in (m.P, m.Lambda, m.Q)) * 4 / 2 ** 20
    return dict(model=model_name, adapters=len(layers), plain_ms=1e3 * plain,
                read=statistics.median(kinds["read"]) / plain,
                allocation=statistics.median(kinds["allocation"]) / plain,
                per_step=(sum(kinds["read"]) + sum(kinds["allocation"]) + sum(kinds["plain"]))
                / (plain * (len(kinds["read"]) + len(kinds["plain"]))),
                warm_start_ops=ops.n, anchor_mb=G, reading_mb=2 * G, adapter_mb=own)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["minilm", "deberta-base"], choices=list(MODELS))
    ap.add_argument("--steps", type=int, default=40, help="training steps per model (4 allocations)")
    args = ap.parse_args()
    rows = [measure(m, args.steps, torch.device("cpu")) for m in args.models]
    print("| model | adapters | plain step | read step | allocation | mean step | warm-start ops "
          "| G kept | G read | adapter params |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['adapters']} | {r['plain_ms']:.0f} ms | {r['read']:.2f}× | "
              f"{r['allocation']:.2f}× | {r['per_step']:.3f}× | {r['warm_start_ops']} | "
              f"{r['anchor_mb']:.0f} MB | {r['reading_mb']:.0f} MB | {r['adapter_mb']:.1f} MB |")
