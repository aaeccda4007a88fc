"""What train_glue.py and train_vit.py share: the flags, the choice of method (FlexLoRA, or
LoRA / AdaLoRA from PEFT at a matched trainable-parameter budget), the one training loop with
evaluation and checkpoint/resume, and the outputs of a run.

A run directory (--output_dir) ends up holding:
    metrics.json         config, trainable-parameter counts, every evaluation, final and best,
                         wall time
    rank_history.json    every rank allocation (FlexLoRA's RankAllocator.history, AdaLoRA's
                         masks)
    adapter.safetensors  FlexLoRA: adapter + head, for flexlora_io.load_adapter
                         (PEFT methods: adapter/)
    peft_adapter/        FlexLoRA: the same as a PEFT LoRA adapter, for PeftModel.from_pretrained
    merged/              with --save_merged: ΔW folded into W, a plain transformers model for
                         serving
    (ranks.png, rank_history.png: python -m bench.plots RUN_DIR draws them from
     rank_history.json)
    checkpoint/          everything --resume needs (adapter, optimizer, LR scheduler, allocator,
                         RNG)

The command-line contract (one-line errors, Ctrl-C, one run per folder, atomic writes) is in
cli.py; loading a model from the Hub or a folder is in loading.py. A run whose loss turns
non-finite stops with exit code 1, keeping its last good checkpoint. Warnings (predictions all
one class, a single planned allocation) are printed at the end and kept in metrics.json.
"""

import argparse
import atexit
import copy
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import nullcontext


def interrupted_while_starting(*_):
    print("error: interrupted while starting: nothing was written", file=sys.stderr, flush=True)
    os._exit(130)


# run as train_glue.py or train_vit.py: Ctrl-C while torch loads is this line, not an abort in
# torch's C++; then KeyboardInterrupt again (main: resumable)
AS_SCRIPT = os.path.basename(getattr(sys.modules["__main__"], "__file__", None) or "") in (
    "train_glue.py", "train_vit.py")
if AS_SCRIPT:
    signal.signal(signal.SIGINT, interrupted_while_starting)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402

import cli  # noqa: E402
import flexlora  # noqa: E402  (flexlora_hf, transformers, peft: imported where used: quick --help)
import flexlora_io  # noqa: E402

if AS_SCRIPT:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# -----------------------------------------------------------------------------
# Flags shared by both scripts (each script adds its # data and # model groups and its defaults)


def add_common_args(parser):
    # flexlora (and the budget the baselines are matched to)
    g = parser.add_argument_group("flexlora")
    g.add_argument("--method", default="flexlora", choices=["flexlora", "lora", "adalora"],
                   help="lora / adalora: PEFT baselines at FlexLoRA's trainable-parameter count")
    g.add_argument("--target_modules",
                   help="comma-separated Linear names to adapt (default: found)")
    g.add_argument("--r", type=int, help="initial rank of every adapted matrix (FlexLoRA keeps Σr)")
    g.add_argument("--alpha", type=float, help="scale s = alpha / r, fixed for the whole run")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="dropout on the adapter input")
    g.add_argument("--b0", type=int, default=4,
                   help="matrices pruned/expanded at the first allocation "
                        "(0: none, a fixed-rank run)")
    g.add_argument("--t_w", type=int, help="warm-up steps before the first allocation")
    g.add_argument("--t_f", type=int, help="final steps without allocations")
    g.add_argument("--delta", type=int, help="Δ: steps between allocations")
    g.add_argument("--rule", default="paper", choices=["paper", "gain"],
                   help="which matrices move: the paper's entropy score, "
                        "or flexlora_gain's priced moves")
    g.add_argument("--schedule", default="cubic", choices=["cubic", "constant"],
                   help="b(t): the paper's cubic decay, "
                        "or constant b0 (the authors' released code)")
    g.add_argument("--r_min", type=int, default=1, help="no matrix is pruned below this rank")
    g.add_argument("--r_max", type=int, default=None,
                   help="FlexLoRA's slots per matrix: the most rank it can grow to (default 2·r)")
    g.add_argument("--gamma", type=float,
                   help="γ: the loss is task + γ·R, R = flexlora.orthogonal_regularizer")
    g.add_argument("--target_r", type=int, default=None,
                   help="AdaLoRA only: final average rank "
                        "(default round(2r/3), AdaLoRA's own ratio)")
    # optimizer
    g = parser.add_argument_group("optimizer")
    g.add_argument("--lr", type=float, help="peak learning rate of AdamW")
    g.add_argument("--init", default="lora", choices=["lora", "gaussian", "orthonormal"],
                   help="FlexLoRA's directions at start (and when added): "
                        "lora (ours, README Deviations): P = 0, λ = 1, Q ~ N(0, 0.02²), "
                        "as LoRA's B = 0 (flexlora._fresh); gaussian: P, Q ~ N(0, 0.02²), "
                        "λ = 0 (the paper; it trains fast with --lambda_lr_ratio 16 "
                        "--pq_lr_ratio 3); orthonormal: P, Q orthonormal at start, λ = 0")
    g.add_argument("--lambda_lr_ratio", type=float, default=1.0,
                   help="FlexLoRA: λ's learning rate / --lr "
                        "(1: the paper; see flexlora.param_groups); "
                        "AdaLoRA: lora_E's (1: PEFT's; train_common.Peft.param_groups)")
    g.add_argument("--pq_lr_ratio", type=float, default=1.0,
                   help="FlexLoRA: P's and Q's learning rate / --lr (1: the paper); "
                        "AdaLoRA: lora_A's and lora_B's")
    g.add_argument("--lr_scale", type=float, default=1.0,
                   help="multiplies the peak learning rate (--lr or the task's default)")
    g.add_argument("--weight_decay", type=float, help="AdamW decay (not on biases and norms)")
    g.add_argument("--batch_size", type=int, default=32, help="examples per optimizer step")
    g.add_argument("--epochs", type=int, help="passes over the training set")
    g.add_argument("--warmup_ratio", type=float, default=0.06,
                   help="linear LR warm-up, then linear decay")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="0 turns clipping off")
    # run
    g = parser.add_argument_group("run")
    g.add_argument("--seed", type=int, default=6,
                   help="model head, data order, new directions (authors': 6)")
    g.add_argument("--output_dir", help="default: runs/<script>-<task>-<method>-<time>")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --output_dir")
    g.add_argument("--resume", metavar="DIR",
                   help="continue the interrupted run in DIR, with its settings")
    g.add_argument("--stop_after", type=int, default=0,
                   help="stop after this many steps, leaving a checkpoint "
                        "(simulates an interruption)")
    g.add_argument("--holdout", type=int, default=0,
                   help="keep this many training examples out of training and score them "
                        "at each evaluation (holdout_* metrics): choose hyperparameters on them, "
                        "never on dev")
    g.add_argument("--eval_every", type=int, default=1,
                   help="epochs between evaluations (and at the end)")
    g.add_argument("--ckpt_every", type=int, default=0,
                   help="steps between checkpoints (0: at each eval)")
    g.add_argument("--log_every", type=int, default=50, help="steps between log lines")
    g.add_argument("--eval_batch_size", type=int, default=64, help="examples per evaluation batch")
    g.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
    g.add_argument("--no_bf16", action="store_true", help="no bf16 autocast on CUDA")
    g.add_argument("--save_merged", action="store_true",
                   help="also write merged/: ΔW folded into W, a plain transformers model, "
                        "with its preprocessor")
    g.add_argument("--smoke", action="store_true",
                   help="offline: tiny model, built-in data, < 1 min on CPU")


def check_args(args):
    """Every shared flag in range, before anything is loaded or written: die() on the first bad one.
    (Values may come from a saved args.json: types are checked too.)"""
    def need(flag, ok, what):
        v = getattr(args, flag, None)
        if not ok(v):
            cli.die(f"--{flag} {v!r}: must be {what}")

    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    is_num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    for flag, lo in (("r", 1), ("b0", 0), ("r_min", 1), ("batch_size", 1), ("epochs", 1),
                     ("seed", 0), ("stop_after", 0), ("eval_every", 1), ("ckpt_every", 0),
                     ("log_every", 1), ("eval_batch_size", 1), ("num_workers", 0),
                     ("holdout", 0)):
        need(flag, lambda v: is_int(v) and v >= lo, f"an integer >= {lo}")
    # None: default
    for flag, lo in (("t_w", 0), ("t_f", 0), ("delta", 1), ("r_max", 1), ("target_r", 1)):
        need(flag, lambda v: v is None or is_int(v) and v >= lo, f"an integer >= {lo}")
    for flag in ("alpha", "lr", "lr_scale", "lambda_lr_ratio", "pq_lr_ratio"):
        need(flag, lambda v: is_num(v) and v > 0, "a finite number > 0")
    for flag in ("gamma", "weight_decay", "max_grad_norm"):
        need(flag, lambda v: is_num(v) and v >= 0, "a finite number >= 0 (0: off)")
    need("lora_dropout", lambda v: is_num(v) and 0 <= v < 1, "a probability in [0, 1)")
    need("warmup_ratio", lambda v: is_num(v) and 0 <= v <= 1,
         "a fraction of the training steps, in [0, 1]")
    need("method", lambda v: v in ("flexlora", "lora", "adalora"), "flexlora, lora or adalora")
    need("schedule", lambda v: v in ("cubic", "constant"), "cubic or constant")
    need("init", lambda v: v in ("gaussian", "orthonormal", "lora"),
         "gaussian, orthonormal or lora")
    # combinations
    need("r_min", lambda v: v <= args.r, f"<= --r ({args.r}), the rank every matrix starts at")
    need("r_max", lambda v: v is None or v >= args.r,
         f">= --r ({args.r}), the rank every matrix starts at")
    if args.method == "adalora":
        need("target_r", lambda v: v is None or v <= args.r,
             f"<= --r ({args.r}): AdaLoRA masks rank away")
    if args.target_modules is not None:
        need("target_modules", lambda v: isinstance(v, str) and all(v.split(",")),
             "comma-separated module names, none empty")


def fit_window(args, total_steps):
    """Short runs: shrink t_w and t_f proportionally so that allocations still happen. Δ stays the
    task's (lowered only to leave room for one allocation): a direction added at zero needs some
    steps to grow before it is scored again, and with Δ shrunk to 1 most new ones were pruned at
    the very next step."""
    t_w, t_f, delta = args.t_w, args.t_f, args.delta
    if t_w + t_f + delta <= total_steps:
        return
    if t_w + t_f >= total_steps:
        # keep t_w : t_f and let the two phases take 60% of the run
        # (60-70% in the paper's GLUE runs)
        f = 0.6 * total_steps / (t_w + t_f)
        args.t_w, args.t_f = round(t_w * f), round(t_f * f)
    # room for one allocation
    args.delta = max(1, min(args.delta, total_steps - args.t_w - args.t_f))
    if args.t_w + args.t_f + args.delta > total_steps:
        raise ValueError(f"{total_steps} training steps are too few for any rank allocation: "
                         f"train longer (--epochs, --max_train_samples) or lower --batch_size")
    print(f"note: the allocation window t_w {t_w}, t_f {t_f}, Δ {delta} does not fit in "
          f"{total_steps} steps; scaled to t_w {args.t_w}, t_f {args.t_f}, Δ {args.delta}")


def allocation_steps(args, total_steps):
    """The steps at which FlexLoRA's RankAllocator will move rank: every Δ steps after t_w where
    b(t) > 0."""
    return [t for t in range(args.t_w + args.delta, total_steps - args.t_f + 1, args.delta)
            if flexlora.budget(t, args.b0, args.t_w, args.t_f, total_steps, args.schedule) > 0]


def fit_delta(args, total_steps):
    """FlexLoRA in a short run: the cubic b(t) rounds to 0 late in the window, so a large Δ may
    leave no allocation that moves rank. Then lower Δ to the largest that leaves one; if none
    does, die(): the run would silently be LoRA at a fixed rank (--b0 0 asks for that on
    purpose)."""
    if args.b0 == 0 or allocation_steps(args, total_steps):
        return
    for delta in range(args.delta - 1, 0, -1):
        if allocation_steps(argparse.Namespace(**{**vars(args), "delta": delta}), total_steps):
            print(f"note: with Δ {args.delta}, b(t) is 0 at every allocation step of these "
                  f"{total_steps} steps; Δ lowered to {delta}")
            args.delta = delta
            return
    cli.die(f"FlexLoRA's schedule allows no rank allocation in these {total_steps} steps "
            f"(t_w {args.t_w}, t_f {args.t_f}, b0 {args.b0}, {args.schedule} b(t)): "
            f"it would be a fixed-rank run. Raise --b0, lower --t_w or --t_f, train longer, "
            f"or pass --b0 0 for a fixed-rank run on purpose")


# -----------------------------------------------------------------------------
# Distributed: torchrun --nproc_per_node N runs N copies of the script, one per device
#
# The model is wrapped once in torch's DistributedDataParallel: the adapters never change shape
# (an allocation rewrites slots in place), so DDP's all-reduce of the gradients holds across every
# allocation. Every rank then takes the same optimizer step and the same allocation (RankAllocator
# draws new directions from its own seeded generator, and checks that the processes' live slots
# agree; AdaLoRA scores the all-reduced gradients). forward_sync_buffers=False: a live mask that
# differed between processes would be a bug to see, not one for rank 0's copy to paper over.
#
# --batch_size is the global batch: at each step the N ranks split the same seeded batch, so N
# processes compute what one does with the whole batch (up to float rounding and the dropout
# masks), with the same steps, LR schedule and allocation window.


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0  # this process


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1  # how many


def launch(args, name, check, out):
    """Join torchrun's process group (when launched by torchrun), then prepare_output_dir on rank
    0 alone, whose decisions the other ranks take (the run directory; --resume: the saved settings).
    Rank 0 alone clears an --overwrite'n run too, once every rank has loaded
    (train(): out.start)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and "MASTER_ADDR" not in os.environ:
        cli.die("WORLD_SIZE is set but no launcher started this process: "
                "run it with torchrun --nproc_per_node N (or unset WORLD_SIZE)")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
        if rank() > 0:
            sys.stdout = open(os.devnull, "w")  # rank 0 alone prints (errors still reach stderr)
    if world() == 1:
        return cli.prepare_output_dir(args, name, check, out)
    settings = [None]
    if rank() == 0:
        try:
            settings = [vars(cli.prepare_output_dir(args, name, check, out))]
        finally:  # on an error too: no rank waits for ever
            dist.broadcast_object_list(settings)
    else:
        dist.broadcast_object_list(settings)
        if settings[0] is None:
            raise SystemExit(2)  # rank 0 has said why
        vars(args).update(settings[0])
    if args.batch_size < world():
        cli.die(f"--batch_size {args.batch_size} is the global batch, split over {world()} "
                f"processes: make it at least {world()}")
    return args


def leave(result):
    """The end of train() under torchrun: every rank waits for rank 0's last writes, so all reach
    the process's exit, and its teardown of the process group, together (in CI a rank tearing
    gloo down while rank 0 still wrote aborted once; not reproduced in 40 runs since). Rank 0
    died writing: exit 1 (it said why)."""
    if world() > 1:
        try:
            dist.barrier()
        except RuntimeError:  # (DistBackendError is one): rank 0 is gone
            raise SystemExit(1) from None
    return result


def wrap(net, device):
    """net in DistributedDataParallel under torchrun (which starts every rank from rank 0's
    weights), else net itself."""
    if world() == 1:
        return net
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(net, device_ids=ids,
                                                     forward_sync_buffers=False)


def seed_dropout(args, state):
    """Under torchrun, each rank its own dropout stream: seed + rank, or the one its checkpoint
    saved."""
    streams = state.get("rank_rng") or []
    if len(streams) == world():
        cpu, cuda = streams[rank()]
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
    else:
        if state:
            print(f"note: the checkpoint holds no dropout streams for {world()} processes: "
                  f"fresh ones")
        torch.manual_seed(args.seed + rank())


def rank_rng():
    """Every rank's RNG state (its dropout stream), gathered on every rank, for a checkpoint."""
    mine = (torch.get_rng_state(),
            torch.cuda.get_rng_state() if torch.cuda.is_available() else None)
    streams = [None] * world()
    dist.all_gather_object(streams, mine)
    return streams


# -----------------------------------------------------------------------------
# Methods: FlexLoRA, or LoRA / AdaLoRA from PEFT at the same trainable-parameter count. Each is
# an object the loop drives the same way: net (what it calls), regularizer() (R, or None),
# allocate(t, optimizer) after optimizer.step(), ranks(), history (every rank change), its
# state for a checkpoint, and its adapter files.


def find_targets(model, candidates, override=None):
    """The first list of target modules in `candidates` all of whose entries name a Linear of
    `model` (module names differ between architectures), or --target_modules if given."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    known = sorted({re.sub(r"\.\d+\.", ".N.", n) for n in names})  # layer indices collapsed to N
    if override:
        missing = [t for t in override.split(",") if not any(flexlora.matches(n, t) for n in names)]
        if missing:
            raise ValueError(f"--target_modules: no Linear layer of this model matches "
                             f"{', '.join(missing)}; its Linear layers are {known}")
        return override.split(",")
    for targets in candidates:
        if all(any(flexlora.matches(n, t) for n in names) for t in targets):
            return list(targets)
    raise ValueError(f"target modules {candidates} do not all match this model's Linear layers; "
                     f"pass --target_modules a,b,c from: {known}")


def hold_out(train_set, args):
    """(training examples, held-out examples or None): --holdout N takes N examples out of
    training, the same N for every seed and method, so their scores compare hyperparameters."""
    if not args.holdout:
        return train_set, None
    if not 0 < args.holdout < len(train_set):
        cli.die(f"--holdout {args.holdout}: give fewer examples than the {len(train_set)} "
                f"of training")
    order = np.random.default_rng(0).permutation(len(train_set)).tolist()
    return ([train_set[i] for i in order[args.holdout:]],
            [train_set[i] for i in order[:args.holdout]])


def count(params):
    return sum(p.numel() for p in params)


class FlexLoRA:
    """flexlora.py in the loop: the model itself, its regulariser and its RankAllocator."""

    def __init__(self, model, args, targets, trainable, total_steps):
        flexlora.inject(model, targets, r=args.r, alpha=args.alpha, dropout=args.lora_dropout,
                        trainable=trainable, init="lora" if args.init == "lora" else "gaussian",
                        r_max=args.r_max)
        self.net = model
        rule = flexlora.RankAllocator
        # (older checkpoints' args have no --rule)
        if getattr(args, "rule", "paper") == "gain":
            from flexlora_gain import GainAllocator as rule
        self.allocator = rule(model, b0=args.b0, t_warmup=args.t_w, t_final=args.t_f,
                              total_steps=total_steps, interval=args.delta, r_min=args.r_min,
                              r_max=args.r_max, seed=args.seed, schedule=args.schedule)
        if args.init == "orthonormal":  # P, Q start orthonormal, R's minimum (paper: N(0, σ²))
            gen = torch.Generator().manual_seed(args.seed)
            with torch.no_grad():
                for m in flexlora.adapters(model).values():  # the live slots, 0 .. r - 1
                    (d_out, d_in), r = m.base.weight.shape, m.r
                    # (d_out, r)
                    m.P[:, :r] = torch.linalg.qr(torch.randn(d_out, r, generator=gen))[0]
                    m.Q[:r] = torch.linalg.qr(torch.randn(d_in, r, generator=gen))[0].T  # (r, d_in)
        K = len(flexlora.adapters(model))
        print(f"flexlora: {K} matrices, r = {args.r} (total rank {args.r * K}), "
              f"alpha {args.alpha:g} (s = {args.alpha / args.r:.3g}), b0 {args.b0}, "
              f"t_w {args.t_w}, t_f {args.t_f}, Δ {args.delta}, {args.schedule} b(t), "
              f"γ {args.gamma:g}")

    @property
    def history(self):
        return self.allocator.history  # its records of every allocation

    def regularizer(self):
        return flexlora.orthogonal_regularizer(self.net)

    def allocate(self, t, optimizer):
        self.allocator.step(t, optimizer)  # rewrites slots and their optimizer state in place

    def budget(self, t):
        c = self.allocator.config
        return flexlora.budget(t, c["b0"], c["t_warmup"], c["t_final"], c["total_steps"],
                               c["schedule"])

    def ranks(self):
        return flexlora.rank_pattern(self.net)

    def state_dict(self):
        return {"allocator": self.allocator.state_dict()}

    def load_state_dict(self, state):
        self.allocator.load_state_dict(state["allocator"])

    def save_weights(self, path):
        flexlora_io.save_adapter(self.net, path)

    def load_weights(self, path):
        # into the same slots, before the optimizer is built
        flexlora_io.load_adapter(self.net, path)

    def save(self, out_dir):
        import flexlora_hf

        flexlora_io.save_adapter(self.net, os.path.join(out_dir, "adapter.safetensors"))
        # the same adapter as a PEFT LoRA one
        # (exact: lora_A = Q, lora_B = P diag(λ), per-module ranks)
        task = "SEQ_CLS" if type(self.net).__name__.endswith("ForSequenceClassification") else None
        flexlora_hf.export_peft(self.net, os.path.join(out_dir, "peft_adapter"), task_type=task,
                                base_model_name_or_path=self.net.config.name_or_path or None)

    def merged(self):
        return flexlora_io.unload(copy.deepcopy(self.net))  # a copy: plain nn.Linear layers, W + ΔW


class Peft:
    """The baselines, LoRA or AdaLoRA from PEFT: everything PEFT-specific is in this class.

    net is PEFT's LoraModel / AdaLoraModel: AdaLoraModel.forward adds AdaLoRA's orthogonal penalty
    to out.loss (PeftModel.forward would skip it); the PeftModel writes the adapter.
    """

    def __init__(self, model, args, targets, trainable, total_steps, counts, sum_d):
        import peft

        self.adalora = args.method == "adalora"
        if not self.adalora:
            # the integer LoRA rank whose r·Σ(d_in + d_out) comes closest to FlexLoRA's count
            r_lora = max(1, round(counts["flexlora_adapter"] / sum_d))
            config = peft.LoraConfig(r=r_lora, lora_alpha=args.alpha,
                                     lora_dropout=args.lora_dropout, target_modules=targets,
                                     modules_to_save=list(trainable))
            counts.update(lora_r=r_lora)
            print(f"lora (PEFT): {counts['matrices']} matrices, r = {r_lora}, alpha {args.alpha:g}")
        else:
            # AdaLoRA's P, Λ, Q have FlexLoRA's shapes: init_r = r matches the count exactly;
            # it then masks down to target_r on average
            # (default 2/3 of r, AdaLoRA's 1.5 init/target ratio)
            target_r = args.target_r or max(1, round(2 * args.r / 3))
            config = peft.AdaLoraConfig(init_r=args.r, target_r=target_r, lora_alpha=args.alpha,
                                        lora_dropout=args.lora_dropout, target_modules=targets,
                                        modules_to_save=list(trainable), tinit=args.t_w,
                                        tfinal=args.t_f, deltaT=args.delta, total_step=total_steps,
                                        # PEFT's R: a mean over 2K factors
                                        orth_reg_weight=2 * args.gamma)
            counts.update(init_r=args.r, target_r=target_r)
            print(f"adalora (PEFT): {counts['matrices']} matrices, "
                  f"init_r {args.r} -> target_r {target_r}, alpha {args.alpha:g}, "
                  f"tinit {args.t_w}, tfinal {args.t_f}, deltaT {args.delta}, γ {args.gamma:g} "
                  f"(masks may change in steps {args.t_w + 1}-{total_steps - args.t_f} of "
                  f"{total_steps}); lr × {args.lambda_lr_ratio:g} on lora_E, "
                  f"× {args.pq_lr_ratio:g} on lora_A, lora_B")
        self.saved = peft.get_peft_model(model, config)
        self.net = self.saved.base_model
        self.history = []  # AdaLoRA's masks, each time they change

    @staticmethod
    def param_groups(net, lr, lambda_lr_ratio=1.0, pq_lr_ratio=1.0):
        """AdaLoRA's optimizer groups, as flexlora.param_groups makes FlexLoRA's: lora_E (its λ) at
        lambda_lr_ratio · lr, lora_A and lora_B (its Q, P) at pq_lr_ratio · lr, the rest (the head)
        at lr. 1 and 1 (the defaults) are one lr, as in PEFT and the AdaLoRA paper. Deviation (ours)
        otherwise: from AdaLoRA's start (E = 0, A, B ~ N(0, 0.02²)) ΔW grows ~14x more slowly than
        LoRA's at one lr, the saddle of FlexLoRA's --init gaussian (bench/README.md, "The AdaLoRA
        baseline")."""
        rate = {"lora_E": lambda_lr_ratio, "lora_A": pq_lr_ratio, "lora_B": pq_lr_ratio}
        groups = {}
        for n, p in net.named_parameters():
            if p.requires_grad:
                factor = next((k for k in rate if f".{k}." in n), None)
                groups.setdefault(rate[factor] if factor else 1.0, []).append(p)
        return [{"params": params, "lr": lr * k} for k, params in groups.items()]

    def regularizer(self):
        return None  # AdaLoRA's is in its loss already; LoRA has none

    def allocate(self, t, optimizer):
        if self.adalora:
            pattern = self.net.peft_config["default"].rank_pattern
            self.net.update_and_allocate(t)  # PEFT: every step (importance EMA), masks every deltaT
            if self.net.peft_config["default"].rank_pattern is not pattern:  # a new mask was set
                ranks = self.ranks()
                self.history.append(dict(step=t, total=sum(ranks.values()), ranks=ranks))

    def ranks(self):
        """{module name: rank}, names as in the unwrapped model; AdaLoRA: directions left
        unmasked."""
        import peft

        model = self.net.model
        ranks = {n: m.r["default"] for n, m in model.named_modules()
                 if isinstance(m, peft.tuners.lora.LoraLayer)}
        pattern = self.net.peft_config["default"].rank_pattern if self.adalora else None
        for key, mask in (pattern or {}).items():
            ranks[key.replace(".lora_E.default", "")] = int(sum(mask))
        return ranks

    def state_dict(self):
        state = dict(history=self.history)
        if self.adalora:  # AdaLoRA's importance averages and its current masks
            ra = self.net.rankallocator
            state.update(ipt=ra.ipt, exp_avg_ipt=ra.exp_avg_ipt, exp_avg_unc=ra.exp_avg_unc,
                         rank_pattern=self.net.peft_config["default"].rank_pattern)
        return {"peft": state}

    def load_state_dict(self, state):
        s = state["peft"]
        self.history = s["history"]
        if self.adalora:
            ra = self.net.rankallocator
            ra.ipt, ra.exp_avg_ipt, ra.exp_avg_unc = s["ipt"], s["exp_avg_ipt"], s["exp_avg_unc"]
            self.net.peft_config["default"].rank_pattern = s["rank_pattern"]

    def save_weights(self, path):
        from safetensors.torch import save_file

        save_file({n: p.detach().contiguous() for n, p in self.net.named_parameters()
                   if p.requires_grad}, path)

    def load_weights(self, path):
        from safetensors.torch import load_file

        try:
            tensors = load_file(path)
        except Exception as e:  # SafetensorError: truncated or not a safetensors file
            raise ValueError(f"{path} cannot be loaded ({str(e).strip()[:200]})") from None
        params = dict(self.net.named_parameters())
        unexpected = sorted(set(tensors) - set(params))
        wrong = [n for n, v in tensors.items() if n in params and v.shape != params[n].shape]
        if unexpected or wrong:  # checked before anything is copied
            raise ValueError(f"{path} does not fit this model: {(unexpected + wrong)[:3]}")
        self.net.load_state_dict(tensors, strict=False)

    def save(self, out_dir):
        self.saved.save_pretrained(os.path.join(out_dir, "adapter"))  # PEFT's adapter format

    def merged(self):
        return copy.deepcopy(self.saved).merge_and_unload()  # a copy, the heads included


def setup_method(model, args, targets, trainable, total_steps):
    """Adapt `model` with args.method at FlexLoRA's trainable-parameter count.
    Returns (method, counts)."""
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and any(flexlora.matches(n, t) for t in targets)]
    K, r = len(linears), args.r
    sum_d = sum(m.in_features + m.out_features for m in linears)  # Σ (d_in + d_out)
    # one direction of P, Λ, Q costs d_in + d_out + 1 parameters
    counts = dict(matrices=K, total_rank=r * K, flexlora_adapter=r * (sum_d + K))
    if args.method == "flexlora":
        method = FlexLoRA(model, args, targets, trainable, total_steps)
    else:
        method = Peft(model, args, targets, trainable, total_steps, counts, sum_d)
    params = [(n, p) for n, p in method.net.named_parameters() if p.requires_grad]
    adapter = count(p for n, p in params if re.search(r"(lora_[ABE]|\.P|\.Lambda|\.Q)(\.|$)", n))
    head = count(p for _, p in params) - adapter
    if args.method == "flexlora":
        # the live directions (the budget), not the r_max slots (the memory)
        counts["adapter_slots"] = adapter
        adapter = sum(m.r * (m.P.shape[0] + m.Q.shape[1] + 1)
                      for m in flexlora.adapters(method.net).values())
    counts.update(adapter=adapter, head=head, trainable=adapter + head,
                  total=count(method.net.parameters()))
    print(f"trainable parameters: adapters {adapter:,} + head {counts['head']:,} "
          f"= {counts['trainable']:,} "
          f"({100 * counts['trainable'] / counts['total']:.2f}% of {counts['total'] / 1e6:.1f}M); "
          f"FlexLoRA's adapters at r = {r}: {counts['flexlora_adapter']:,}")
    return method, counts


def build_optimizer(net, args):
    # AdamW; FlexLoRA's λ, P, Q at their --*_lr_ratio × lr; no decay on biases and norms
    # (as HF's Trainer)
    no_decay = {id(p) for n, p in net.named_parameters() if "bias" in n or "norm" in n.lower()}
    groups = []
    # AdaLoRA: its E, A, B
    groups_of = Peft.param_groups if args.method == "adalora" else flexlora.param_groups
    for g in groups_of(net, args.lr * args.lr_scale, args.lambda_lr_ratio, args.pq_lr_ratio):
        for decay in (True, False):
            params = [p for p in g["params"] if (id(p) not in no_decay) == decay]
            groups.append(dict(g, params=params, weight_decay=args.weight_decay if decay else 0.0))
    return torch.optim.AdamW([g for g in groups if g["params"]])


# -----------------------------------------------------------------------------
# Checkpoints: written to checkpoint.tmp/, then swapped in, so a crash never leaves half of one


def save_checkpoint(args, method, optimizer, scheduler, state):
    """state["logged"]: (loss sum, R sum, steps) since the last log line, this rank's."""
    loss, orth, n = state["logged"]
    loss = loss.clone()
    if world() > 1:  # called on every rank: it gathers their dropout streams; rank 0 alone writes
        dist.all_reduce(loss)  # the global batch's, as Meter.line() sums it
        state = dict(state, rank_rng=rank_rng())
        if rank() > 0:
            return
    state["logged"] = (loss.cpu(), orth.cpu(), n)
    out = os.path.join(args.output_dir, "checkpoint")
    tmp, old = out + ".tmp", out + ".old"
    # checkpoint.old alone is the last checkpoint: never delete it
    cli.recover_checkpoint(args.output_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    state = dict(state, **method.state_dict(), optimizer=optimizer.state_dict(),
                 scheduler=scheduler.state_dict(), rng=torch.get_rng_state(),
                 cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
    try:
        os.makedirs(tmp)
        method.save_weights(os.path.join(tmp, "adapter.safetensors"))
        torch.save(state, os.path.join(tmp, "state.pt"))
        with open(os.path.join(tmp, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
    except (OSError, RuntimeError) as e:
        # a full disk (torch.save's zip writer raises RuntimeError): keep the last
        shutil.rmtree(tmp, ignore_errors=True)
        last = (f"continue from its last checkpoint with --resume {args.output_dir}"
                if os.path.isdir(out) else "start it again with --overwrite")
        why = getattr(e, "strerror", None) or str(e).strip()[:200]
        cli.die(f"could not write a checkpoint in {args.output_dir} ({why}): make room, "
                f"then {last}", code=1)
    # the swap: a crash between the two renames leaves checkpoint.old, which recover_checkpoint()
    # puts back
    if os.path.exists(out):
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(args, method):
    """Load the checkpoint's adapter into `method` (before the optimizer is built on it); return its
    state. A damaged or foreign checkpoint: die(), naming the file."""
    ckpt = os.path.join(args.output_dir, "checkpoint")
    files = [os.path.join(ckpt, f) for f in ("state.pt", "adapter.safetensors")]
    again = (f"this run cannot continue: start it again with --output_dir {args.output_dir} "
             f"--overwrite")
    for f in files:
        if not os.path.isfile(f):
            cli.die(f"--resume {args.output_dir}: {f} is missing; {again}")
    try:  # tensors and plain containers only (weights_only): a checkpoint never needs more
        state = torch.load(files[0], weights_only=True)
    except Exception as e:
        # truncated (RuntimeError, EOFError), or not a torch.save() file (UnpicklingError)
        cli.die(f"--resume {args.output_dir}: {files[0]} is damaged or not a checkpoint of these "
                f"scripts ({type(e).__name__}); {again}")
    need = {"step", "evals", "optimizer", "scheduler", "rng", "cuda_rng"}
    if not isinstance(state, dict) or not need <= set(state):
        cli.die(f"--resume {args.output_dir}: {files[0]} is not a checkpoint of these scripts; "
                f"{again}")
    try:
        # flexlora_io.load_adapter checks all of the file before changing anything
        method.load_weights(files[1])
    except ValueError as e:
        cli.die(f"--resume {args.output_dir}: {e}; {again}")
    return state


def restore(state, method, optimizer, scheduler):
    """Put the optimizer, LR scheduler, method and RNG back where the checkpoint left them."""
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        method.load_state_dict(state)
        torch.set_rng_state(state["rng"])  # dropout continues as if never interrupted
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:  # another version's or run's state
        raise ValueError(f"the checkpoint's state does not fit this run ({type(e).__name__}: "
                         f"{str(e).strip()[:200]}); was it written by another version of these "
                         f"scripts?") from None


# -----------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def predict(net, dataset, collate, args, notes=None):
    """Logits and labels of a whole dataset, as numpy arrays (float32). Under torchrun each rank
    predicts its slice and every rank gets all of them back. Predictions all alike: a line in
    `notes` (a list), if given."""
    device = next(net.parameters()).device
    if world() > 1:
        dataset = torch.utils.data.Subset(dataset,
                                          np.array_split(np.arange(len(dataset)), world())[rank()])
    net.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.eval_batch_size,
                                         collate_fn=collate, num_workers=args.num_workers,
                                         generator=torch.Generator())
    logits, labels = [], []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels.append(batch.pop("labels").float().cpu())
        with autocast(args, device):
            logits.append(net(**batch).logits.float().cpu())
    net.train()
    # None: no example here
    mine = (torch.cat(logits).numpy(), torch.cat(labels).numpy()) if logits else None
    parts = [mine]
    if world() > 1:  # every rank's slice, in order (a set smaller than the world leaves some empty)
        parts = [None] * world()
        dist.all_gather_object(parts, mine)
    logits, labels = (np.concatenate(x) for x in zip(*(p for p in parts if p is not None)))
    if not np.isfinite(logits).all():  # a metric would count them as some class: no score at all
        raise FloatingPointError("the model's outputs are non-finite")  # (on every rank alike)
    preds = logits.argmax(-1) if logits.shape[1] > 1 else logits[:, 0]
    if len(preds) > 1 and np.ptp(preds) <= 1e-6 * max(1.0, float(np.abs(preds).max())):
        what = f"class {preds[0]}" if logits.shape[1] > 1 else f"the score {preds[0]:.4g}"
        if notes is not None:
            notes.append(f"all {len(preds)} examples predicted as {what}")
    return logits, labels


def bf16(args, device):
    return device.type == "cuda" and not args.no_bf16


def autocast(args, device):
    # bf16 autocast on CUDA (--no_bf16 to turn off); plain float32 on CPU
    return torch.autocast("cuda", dtype=torch.bfloat16) if bf16(args, device) else nullcontext()


# -----------------------------------------------------------------------------
# The training loop


def build(args, model, targets, trainable, T, device):
    """The method on `model`, its optimizer and LR schedule, and on --resume the checkpoint's state
    put back into all three (the adapter first, then the optimizer built on it)."""
    from transformers import get_linear_schedule_with_warmup

    # flexlora's checks of r, alpha, the window; a checkpoint that does not fit
    with cli.user_errors():
        if args.method != "lora":  # (LoRA's rank never moves: no window)
            fit_window(args, T)
        if args.method == "flexlora":
            fit_delta(args, T)
        model.to(device)
        method, counts = setup_method(model, args, targets, trainable, T)
        # what was adapted, for metrics.json
        args.target_modules = args.target_modules or ",".join(targets)
        state = load_checkpoint(args, method) if args.resume else {}
        optimizer = build_optimizer(method.net, args)
        scheduler = get_linear_schedule_with_warmup(optimizer, round(args.warmup_ratio * T), T)
        if state:
            restore(state, method, optimizer, scheduler)
    if args.resume and args.stop_after and args.stop_after <= state["step"]:
        cli.die(f"--stop_after {args.stop_after}: the checkpoint in {args.output_dir} is at step "
                f"{state['step']} already; pass a later step, or none to finish the run")
    if args.method == "flexlora":
        # 0 only with --b0 0 (fit_delta)
        counts["planned_allocations"] = len(allocation_steps(args, T))
    return method, counts, optimizer, scheduler, state


def epoch_loader(args, train_set, collate, device, epoch, skip):
    """This rank's batches of an epoch from batch `skip` on. The order depends on (seed, epoch)
    only, so a resumed run sees the same batches; the generator keeps the DataLoader off the global
    RNG (dropout's). A rank's slice of a global batch left empty (a last batch smaller than the
    world) computes one example, weighted 0 (train(): share)."""
    order = np.random.default_rng([args.seed, epoch]).permutation(len(train_set))
    B = args.batch_size
    shards = [np.array_split(order[j:j + B], world())[rank()]
              for j in range(skip * B, len(order), B)]
    return iter(torch.utils.data.DataLoader(train_set,
                                            batch_sampler=[(s if len(s) else order[:1]).tolist()
                                                           for s in shards],
                                            collate_fn=collate, num_workers=args.num_workers,
                                            pin_memory=device.type == "cuda",
                                            generator=torch.Generator()))


class Divergence:
    """The first step whose loss or gradient norm was not finite, kept on the device (no sync per
    step) and read where the loop syncs anyway: log lines, evaluations, checkpoints."""

    def __init__(self, args, device, last_ckpt, pbar):
        self.args, self.pbar, self.last_ckpt = args, pbar, last_ckpt  # last_ckpt: the step on disk
        self.first_bad = torch.zeros((), dtype=torch.long, device=device)

    def mark(self, t, finite):
        self.first_bad.masked_fill_((self.first_bad == 0) & ~finite, t)

    def fail(self, what):
        self.pbar.close()
        kept = (f"the last good checkpoint (step {self.last_ckpt}) is kept in "
                f"{self.args.output_dir}/checkpoint"
                if self.last_ckpt is not None else "no checkpoint had been written")
        cli.die(f"training diverged: {what}. Nothing was saved from it; {kept}. Lower --lr or "
                f"--lr_scale (the peak learning rate is {self.args.lr * self.args.lr_scale:g}) "
                f"and run again", code=1)

    def check(self, t, optimizer, weights=True):
        first = self.first_bad.item()
        if world() > 1:  # every rank stops together, at the first step that failed on any of them
            steps = [None] * world()
            dist.all_gather_object(steps, first)
            first = min((s for s in steps if s), default=0)
        if first:
            self.fail(f"the loss became non-finite at step {first}")
        # (the same on every rank)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if weights and not torch.stack([torch.isfinite(p).all() for p in params]).all():
            self.fail(f"the trained weights are non-finite at step {t}")


def step(args, ddp, method, optimizer, scheduler, batch, share, t, divergence, device):
    """One optimizer step t on this rank's part of the global batch (share: its fraction of the
    examples), then the allocation. Returns (the task loss · share, R or None), detached."""
    with autocast(args, device):
        loss = ddp(**batch).loss  # task loss (+ AdaLoRA's penalty, added by PEFT)
    task = loss.detach() * share
    loss = loss * (share * world())  # DDP averages over ranks: the global batch's mean
    orth = method.regularizer()  # FlexLoRA's R
    if orth is not None:
        loss = loss + args.gamma * orth  # the paper's loss: task + γ·R
    loss.backward()
    finite = torch.isfinite(loss.detach())  # this rank's (Divergence.check asks every rank)
    if args.max_grad_norm > 0:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        finite &= torch.isfinite(torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm))
    divergence.mark(t, finite)
    optimizer.step()
    scheduler.step()
    try:
        # after optimizer.step() and the LR scheduler, before zero_grad()
        method.allocate(t, optimizer)
    except ValueError:  # flexlora's allocator refuses non-finite λ
        divergence.check(t, optimizer)
        raise
    optimizer.zero_grad(set_to_none=True)
    return task, None if orth is None else orth.detach()


class Meter:
    """What a log line averages: the task loss and R summed since the last line (on the device:
    read only when a line is printed) and the time per step, evaluations excluded."""

    def __init__(self, device, logged=None):
        self.loss, self.orth = torch.zeros((), device=device), torch.zeros((), device=device)
        self.n, self.timed, self.tick = 0, 0, time.time()
        if logged is not None:  # the checkpoint's steps since its last line: the next line
            loss, orth, self.n = logged  # averages them too, as the uninterrupted run's does
            self.loss += loss.to(device) if rank() == 0 else 0  # (summed over the ranks: rank 0's)
            self.orth += orth.to(device)

    def add(self, task, orth):
        self.loss += task
        self.orth += 0.0 if orth is None else orth
        self.n, self.timed = self.n + 1, self.timed + 1

    def pause(self, seconds):
        self.tick += seconds  # an evaluation does not count as step time

    def logged(self):
        return self.loss, self.orth, self.n

    def line(self, args, method, optimizer, t):
        """Step t's log line; the sums start again."""
        ms = 1000 * (time.time() - self.tick) / self.timed
        if world() > 1:
            dist.all_reduce(self.loss)  # the global batch's loss
        line = f"step {t} | loss {self.loss.item() / self.n:.4f}"
        if args.method == "flexlora":
            line += f" | orth {self.orth.item() / self.n:.4f} | b(t) {method.budget(t)}"
        g = optimizer.param_groups[0]  # the schedule's lr (λ, P and Q train at multiples of it)
        lr_now = args.lr * args.lr_scale * g["lr"] / g["initial_lr"]
        self.loss.zero_(), self.orth.zero_()
        self.n, self.timed, self.tick = 0, 0, time.time()
        return (line + f" | rank {sum(method.ranks().values())} | lr {lr_now:.1e} | "
                f"{ms:.0f} ms/step")


def evaluation(evaluate, net, t, T, steps_per_epoch, divergence):
    """evaluate(net, notes) at step t, printed: (its record for metrics.json, at T a warning if
    the predictions were all alike, else None). Non-finite outputs: divergence.fail()."""
    notes = []
    try:
        metrics = evaluate(net, notes)
    except FloatingPointError as e:  # predict(): non-finite logits
        divergence.fail(f"{e} at step {t}")
    divergence.pbar.write(f"eval step {t}: "
                          + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    record = dict(step=t, epoch=round(t / steps_per_epoch, 3), **metrics)
    if t < T or not notes:
        return record, None
    return record, (f"the final evaluation predicts one and the same for every example "
                     f"({notes[0]}): the model has collapsed, and its metrics mean little; try "
                     f"another --lr or --lr_scale, or train longer")


def train(args, out, model, train_set, collate, evaluate, targets, trainable, score_key="score",
          source=None, processor=None):
    """Fine-tune `model` with args.method and write every output of the run to args.output_dir.

    train_set: a map-style dataset whose items `collate` turns into a batch dict with "labels";
    out: the OutputDir of resumable(); evaluate(net, notes) -> {metric: value}, with `score_key`
    the one that picks the best evaluation (notes: predict's);
    source: {"model": ..., "data": ...}, what was really loaded, for metrics.json;
    processor: the tokenizer or image processor, saved beside the model in merged/.
    Returns metrics.json's content, or None when --stop_after ends the run early (or on ranks > 0).
    """
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available()
                          else "cpu")
    steps_per_epoch = math.ceil(len(train_set) / args.batch_size)
    T = args.epochs * steps_per_epoch  # total optimizer steps
    method, counts, optimizer, scheduler, state = build(args, model, targets, trainable, T, device)
    net, start = method.net, state.get("step", 0)
    evals, elapsed = state.get("evals", []), state.get("elapsed", 0.0)
    collapsed = state.get("collapsed")  # a warning for the end: the final predictions all alike
    if world() > 1:
        seed_dropout(args, state)
    ddp = wrap(net, device)  # the forward; net itself for the rest (its parameters are DDP's)
    if rank() == 0:
        out.start(args)  # everything has loaded: only now is an --overwrite'n run cleared
    if state:
        print(f"resumed at step {start} of {T}")
    initial_ranks = state.get("initial_ranks") or method.ranks()
    eval_steps = args.eval_every * steps_per_epoch
    ckpt_steps = args.ckpt_every or eval_steps
    print(f"{len(train_set):,} training examples, batch {args.batch_size}: "
          f"{steps_per_epoch} steps/epoch, {T} steps; device {device}"
          + (" (bf16 autocast)" if bf16(args, device) else "")
          + (f"; {world()} processes, {args.batch_size / world():g} examples each"
             if world() > 1 else ""))

    net.train()
    batches, t0, meter = None, time.time(), Meter(device, state.get("logged"))
    pbar = tqdm(total=T, initial=start, desc="train", dynamic_ncols=True, disable=rank() > 0)
    divergence = Divergence(args, device, start if args.resume else None, pbar)
    for s in range(start, T):
        epoch, i = divmod(s, steps_per_epoch)
        if batches is None or i == 0:
            batches = epoch_loader(args, train_set, collate, device, epoch, i)
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        # examples in the global batch
        n = min(args.batch_size, len(train_set) - i * args.batch_size)
        # this rank's part of them (1 on one process)
        share = (n // world() + (rank() < n % world())) / n
        t = s + 1  # optimizer steps taken, after this one
        task, orth = step(args, ddp, method, optimizer, scheduler, batch, share, t, divergence,
                          device)
        meter.add(task, orth)
        pbar.update(1)
        if t % args.log_every == 0 or t == T:  # one log line every log_every steps
            pbar.write(meter.line(args, method, optimizer, t))
            divergence.check(t, optimizer, weights=False)

        stop = t == args.stop_after and t < T  # (a stop simulates an interruption)
        evaluate_now, checkpoint_now = t % eval_steps == 0 or t == T, t % ckpt_steps == 0 or stop
        if evaluate_now or checkpoint_now:
            # a diverged model is never evaluated, checkpointed or saved
            divergence.check(t, optimizer)
        if evaluate_now:  # every eval_every epochs and at the end
            tic = time.time()
            record, final = evaluation(evaluate, net, t, T, steps_per_epoch, divergence)
            evals.append(record)
            collapsed = final or collapsed  # (the checkpoint at T keeps it, for a --resume at T)
            meter.pause(time.time() - tic)
        if checkpoint_now:
            save_checkpoint(args, method, optimizer, scheduler, dict(
                step=t, evals=evals, initial_ranks=initial_ranks,
                elapsed=elapsed + time.time() - t0, logged=meter.logged(),
                collapsed=collapsed))
            divergence.last_ckpt = t
        if stop:
            pbar.close()
            print(f"stopped after step {t} (--stop_after); "
                  f"continue with --resume {args.output_dir}")
            return leave(None)
    pbar.close()
    elapsed += time.time() - t0
    if rank() > 0:
        return leave(None)  # rank 0 writes the outputs
    run = dict(source or {}, train_examples=len(train_set), processes=world(), **provenance())
    return leave(write_outputs(args, method, counts, evals, initial_ranks, T, elapsed, device,
                               score_key, run, processor, [collapsed] if collapsed else []))


# -----------------------------------------------------------------------------
# Outputs of a run: metrics, rank history, adapter, pictures


def write_outputs(args, method, counts, evals, initial_ranks, T, elapsed, device, score_key,
                  run=None, processor=None, warnings=()):
    """metrics.json, rank_history.json, the adapter (and merged/); the run's warnings, last."""
    best = max(evals, key=lambda e: e[score_key])
    warnings = list(warnings)
    if counts.get("planned_allocations") == 1:
        warnings.append(f"FlexLoRA's schedule planned a single rank allocation in these {T} steps "
                        f"(t_w {args.t_w}, t_f {args.t_f}, Δ {args.delta}, b0 {args.b0}): the "
                        f"ranks could hardly move; train longer, or lower --delta or --t_w")
    final_ranks = method.ranks()
    counts["final_total_rank"] = sum(final_ranks.values())
    stats = None
    if args.method == "flexlora":  # rank moves between matrices of different shapes: count again
        layers = flexlora.adapters(method.net).values()
        counts["final_adapter"] = sum(m.r * (m.P.shape[0] + m.Q.shape[1] + 1) for m in layers)
        h = method.history
        stats = dict(allocations=len(h), expanded=sum(len(r["expanded"]) for r in h),
                     pruned=sum(len(r["pruned"]) for r in h), **flexlora.churn(h))
    result = dict(config=vars(args), run=run, counts=counts, evals=evals, final=evals[-1],
                  best=best, allocation_stats=stats, wall_time_s=round(elapsed, 1), train_steps=T,
                  device=str(device), warnings=warnings)
    out = args.output_dir
    with cli.writing(args, os.path.join(out, "rank_history.json")):
        cli.write_json(os.path.join(out, "rank_history.json"), dict(
            method=args.method, initial=initial_ranks, history=method.history, final=final_ranks))
    with cli.writing(args, f"the adapter in {out}"):
        method.save(out)
    if args.save_merged:  # ΔW folded into W: a plain transformers model, for serving
        folder = os.path.join(out, "merged")
        with cli.writing(args, folder):
            method.merged().save_pretrained(folder)
            if processor is not None:
                processor.save_pretrained(folder)
    with cli.writing(args, os.path.join(out, "metrics.json")):
        cli.write_json(os.path.join(out, "metrics.json"), result)  # last: a finished run has it
    print("final: " + " | ".join(f"{k} {v:.4f}" for k, v in evals[-1].items()
                                 if k not in ("step", "epoch")))
    print(f"best (step {best['step']}): {score_key} {best[score_key]:.4f}; {elapsed:.0f} s; "
          f"outputs in {args.output_dir}")
    for w in warnings:  # (kept in metrics.json's "warnings")
        print(f"warning: {w}")
    return result


def provenance():
    """What ran this: library versions and the git commit of this code (None outside a checkout)."""
    import platform

    import transformers

    try:
        import peft
    except ImportError:
        peft = None
    here = os.path.dirname(os.path.abspath(flexlora.__file__))
    git = lambda *cmd: subprocess.run(["git", *cmd], cwd=here, capture_output=True, text=True,
                                      timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        commit = head.stdout.strip() if head.returncode == 0 else None
        dirty = (bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
                 if commit else None)
    except (OSError, subprocess.SubprocessError):  # no git
        commit = dirty = None
    return dict(versions=dict(python=platform.python_version(), torch=torch.__version__,
                              transformers=transformers.__version__, peft=peft and peft.__version__,
                              numpy=np.__version__), git_commit=commit, git_dirty=dirty)
