"""Tests of the training scripts under torchrun: 2 processes on CPU (gloo), tiny smoke runs.

Run: python -m pytest -q test_ddp.py   (under a minute and a half on 2 CPU cores)
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train_glue

HERE = os.path.dirname(os.path.abspath(__file__))
# 2 epochs of 8 steps (global batch 16: 8 examples per process; the last batch holds 1 example, so
# one process computes on none: a copy weighted 0), an allocation at every step 4..11
TINY = ["--smoke", "--max_train_samples", "113", "--max_eval_samples", "32", "--epochs", "2", "--t_w", "3",
        "--t_f", "5", "--delta", "1", "--schedule", "constant", "--log_every", "8"]
METHODS = ("flexlora", "adalora")  # AdaLoRA: its masks follow the (all-reduced) gradients
# the same 113 to train on, 16 scored apart (8 per process); a dev set of 1: one process predicts on none
HOLDOUT = ["--max_train_samples", "129", "--holdout", "16", "--max_eval_samples", "1"]

# train_glue.py ROOT [flags], once per method into ROOT/<method>, with the smoke model's dropout off
# (one process cannot draw the masks that two draw). After each run, on every rank: its trainable
# weights in rank<R>.safetensors; and for FlexLoRA, an allocation with rank 1's live mask changed by
# hand: the allocator's own check must stop both processes, its error in differ<R>.txt
LAUNCHER = """
import sys
import torch
from safetensors.torch import save_file
import flexlora, train_common, train_glue

make, train = train_glue.smoke_model, train_common.train

def smoke_model(*a):
    model = make(*a)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model

def train_and_check(args, out, model, *rest, **kw):
    result = train(args, out, model, *rest, **kw)
    rank, out = train_common.rank(), args.output_dir
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
              f"{out}/rank{rank}.safetensors")
    if args.method == "flexlora":
        if rank == 1:
            layer = next(iter(flexlora.adapters(model).values()))
            layer.live[:] = True  # as if this process had taken other decisions
        alloc = flexlora.RankAllocator(model, b0=1, t_warmup=0, t_final=0, total_steps=10, interval=1,
                                       schedule="constant")
        try:
            alloc.step(1)
        except RuntimeError as e:
            open(f"{out}/differ{rank}.txt", "w").write(str(e))
    return result

train_glue.smoke_model, train_common.train = smoke_model, train_and_check
for method in %r:
    train_glue.main(sys.argv[2:] + ["--method", method, "--output_dir", f"{sys.argv[1]}/{method}"])
""" % (METHODS,)


def torchrun(script, args, nproc=2, ok=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=HERE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           script] + args
    proc = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout if ok else proc.stderr


def read(run_dir, name):
    with open(os.path.join(run_dir, name)) as f:
        return json.load(f)


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def weights(run_dir):
    flexlora_file = os.path.join(run_dir, "adapter.safetensors")
    return load_file(flexlora_file if os.path.exists(flexlora_file)
                     else os.path.join(run_dir, "adapter", "adapter_model.safetensors"))  # PEFT's


def decisions(run_dir):
    """The run's allocations (FlexLoRA's scores, floats, aside) and final ranks."""
    h = read(run_dir, "rank_history.json")
    assert len(h["history"]) == 8 and h["final"] != h["initial"]
    return [{k: v for k, v in r.items() if k != "scores"} for r in h["history"]], h["final"]


def assert_same_run(a, b, atol, rtol):
    assert decisions(a) == decisions(b)  # every allocation decided alike
    for ea, eb in zip(read(a, "metrics.json")["evals"], read(b, "metrics.json")["evals"], strict=True):
        assert ea == pytest.approx(eb, abs=1e-6)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=rtol)


# -----------------------------------------------------------------------------


def test_two_processes_equal_one_over_the_same_global_batch(tmp_path, monkeypatch):
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    stdout = torchrun(str(launcher), [str(tmp_path / "two")] + TINY + HOLDOUT)
    assert "2 processes, 8 examples each" in stdout
    make = train_glue.smoke_model
    monkeypatch.setattr(train_glue, "smoke_model", lambda *a: no_dropout(make(*a)))
    for method in METHODS:
        one, two = str(tmp_path / "one" / method), str(tmp_path / "two" / method)
        # the two processes ended bit for bit alike
        r0, r1 = (load_file(os.path.join(two, f"rank{r}.safetensors")) for r in (0, 1))
        assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
        # one process, the whole batch: float rounding differs (each process pads and sums its own
        # part of the batch); after 16 Adam steps at the smoke run's lr 3e-2 (λ at 16x, P and Q at
        # 3x) that is up to ~1e-5 in a weight of size ~1
        train_glue.main(TINY + HOLDOUT + ["--method", method, "--output_dir", one])
        assert_same_run(one, two, atol=1e-4, rtol=1e-3)  # the holdout split too: seeded alike on every rank
        assert "holdout_mcc" in read(two, "metrics.json")["final"]
    # the allocator's check stops every process when their live slots differ
    for rank in (0, 1):
        assert "the processes' adapters differ" in (tmp_path / "two" / "flexlora" / f"differ{rank}.txt").read_text()
    # rank 0 wrote the outputs, the PEFT adapter among them
    assert os.path.isfile(os.path.join(tmp_path, "two", "flexlora", "peft_adapter", "adapter_model.safetensors"))


def test_resume_under_torchrun(tmp_path):
    # dropout on: each process's dropout stream must continue where it stopped
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    script = os.path.join(HERE, "train_glue.py")
    torchrun(script, TINY + ["--output_dir", full])
    torchrun(script, TINY + ["--output_dir", part, "--stop_after", "9"])
    assert not os.path.exists(os.path.join(part, "metrics.json"))
    state = torch.load(os.path.join(part, "checkpoint", "state.pt"), weights_only=True)
    assert len(state["rank_rng"]) == 2 and not torch.equal(state["rank_rng"][0][0], state["rank_rng"][1][0])
    torchrun(script, ["--resume", part])
    assert_same_run(full, part, atol=1e-5, rtol=1e-4)


# -----------------------------------------------------------------------------
# Errors under torchrun: every process stops, rank 0 alone says why, and none waits for ever


# rank 1's loss turns infinite at its 5th step; its gradients (and so every rank's weights) stay finite
DIVERGE = """
import sys
import train_common, train_glue

make = train_glue.smoke_model

def smoke_model(*a):
    model, steps = make(*a), []
    forward = model.forward
    def forward_inf(**batch):
        out = forward(**batch)
        if model.training and train_common.rank() == 1:
            steps.append(1)
            if len(steps) == 5:
                out.loss = out.loss + float("inf")
        return out
    model.forward = forward_inf
    return model

train_glue.smoke_model = smoke_model
train_glue.main(sys.argv[1:])
"""


def test_a_non_finite_loss_on_one_process_stops_them_all(tmp_path):
    launcher, out = tmp_path / "diverge.py", str(tmp_path / "run")
    launcher.write_text(DIVERGE)
    err = torchrun(str(launcher), TINY + ["--output_dir", out, "--ckpt_every", "1"], ok=False)
    # rank 0, whose own loss stayed finite, stopped at rank 1's step and said so, once
    assert err.count("error: training diverged: the loss became non-finite at step 5.") == 1, err[-3000:]
    assert "(step 4) is kept" in err
    assert torch.load(os.path.join(out, "checkpoint", "state.pt"), weights_only=True)["step"] == 4
    assert not os.path.exists(os.path.join(out, "metrics.json"))


def test_a_user_error_is_one_line_from_rank_0(tmp_path):
    script, out = os.path.join(HERE, "train_glue.py"), tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")  # another run's
    err = torchrun(script, TINY + ["--output_dir", str(out)], ok=False)
    assert err.count("error: ") == 1 and "already holds a run" in err, err[-3000:]
    err = torchrun(script, TINY + ["--output_dir", str(tmp_path / "new"), "--batch_size", "1"], ok=False)
    assert err.count("error: ") == 1 and "--batch_size 1 is the global batch" in err, err[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["run"] and os.listdir(out) == ["metrics.json"]  # untouched


# rank 0 cannot write the outputs (a full disk): every rank stops, and only rank 0 says why
FULL = """
import sys
import cli, train_common, train_glue

def full_disk(*a, **kw):
    cli.die("could not write the outputs (No space left on device)", code=1)

train_common.write_outputs = full_disk
train_glue.main(sys.argv[1:])
"""


def test_rank_0_failing_at_the_end_stops_every_rank_in_one_line(tmp_path):
    launcher, out = tmp_path / "full.py", str(tmp_path / "run")
    launcher.write_text(FULL)
    err = torchrun(str(launcher), TINY + ["--output_dir", out], ok=False)
    assert err.count("error: ") == 1 and "No space left on device" in err, err[-3000:]
    assert "DistBackendError" not in err and "Connection closed" not in err, err[-3000:]
    assert os.path.isdir(os.path.join(out, "checkpoint"))  # the last checkpoint is kept
