"""FlexLoRA under the engines users train with, as docs/integration.md shows them: your own loop
under DDP, accelerate, the HF Trainer on 2 processes, torch.compile and FSDP2. The scripts of
docs/integration.md run as they stand, on 2 CPU processes (gloo), with checks appended.

    python -m pytest -q test_engines.py   (about a minute and a half on 2 CPU cores)
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import flexlora as fl

HERE = Path(__file__).parent


def doc_script(title):
    """The Python block of docs/integration.md's section `### title`."""
    sections = (HERE / "docs" / "integration.md").read_text().split("\n### ")[1:]
    blocks = {s.split("\n", 1)[0]: re.search(r"```python\n(.*?)```", s, re.S) for s in sections}
    return blocks[title].group(1)


def torchrun(script, cwd, nproc=2, args=()):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(script), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


# appended to a docs script: each process saves its model's state and the allocator's history
DUMP = """
torch.save(dict(state={k: v.detach().clone() for k, v in model.state_dict().items()},
                history=alloc.history), f"rank{dist.get_rank()}of{dist.get_world_size()}.pt")
"""


def load(folder, rank, world):
    return torch.load(folder / f"rank{rank}of{world}.pt", weights_only=False)


def decisions(history):
    return [(h["step"], h["pruned"], h["expanded"], h["ranks"]) for h in history]


def assert_states(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]) if atol == 0 else torch.allclose(a[k], b[k], atol=atol, rtol=0), k


def test_ddp_wrapped_once_two_processes_are_alike_and_equal_one(tmp_path):
    # DDP wrapped once, through every allocation: both processes bit for bit alike, and equal to one
    # process over the whole batch up to float rounding. In float32 Adam's steps on gradients near 0
    # (lr · sign(g)) blow the all-reduce's ~1e-7 re-association up to 1e-5..1e-4, by CPU; in float64
    # the same runs agree to 1e-6 (measured 6e-14; 6e-9 with warm_start=False), far inside the
    # issue's 1e-5, so a real difference cannot hide in the tolerance
    script = doc_script("Your own loop under DDP")
    f64 = script.replace("import flexlora as fl\n", "import flexlora as fl\n\n"
                         "torch.set_default_dtype(torch.float64)\n")
    assert f64 != script
    runs = (("float32", script, None), ("float64", f64, 1e-6),
            ("float64-cold", f64.replace("interval=4)", "interval=4, warm_start=False)"), 1e-6))
    for name, s, atol in runs:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "train.py").write_text(s + DUMP)
        for world in (1, 2):
            torchrun(folder / "train.py", folder, nproc=world)
        one, two = load(folder, 0, 1), load(folder, 0, 2)
        assert_states(two["state"], load(folder, 1, 2)["state"], atol=0)
        assert len(two["history"]) >= 5 and decisions(two["history"]) == decisions(one["history"])
        if atol is not None:
            assert_states(two["state"], one["state"], atol=atol)
        assert any(h["pruned"] for h in two["history"]) and sum(two["history"][-1]["ranks"].values()) == 12


FSDP_DUMP = """
from torch.distributed.tensor import DTensor
full = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
torch.save(dict(state={k: v.detach().clone() for k, v in full.items()}, history=alloc.history),
           f"rank{dist.get_rank()}of{dist.get_world_size()}.pt")
"""


def test_fsdp2_equals_one_process(tmp_path):
    # the docs' FSDP2 script, and the same without fully_shard on one process
    script = doc_script("FSDP2 (fully_shard)")
    (tmp_path / "fsdp.py").write_text(script + FSDP_DUMP)
    plain = script.replace("    fully_shard(layer)", "    pass").replace("fully_shard(model)\n", "")
    assert plain != script
    (tmp_path / "plain.py").write_text(plain + FSDP_DUMP)
    torchrun(tmp_path / "fsdp.py", tmp_path, nproc=2)
    fsdp = [load(tmp_path, r, 2) for r in (0, 1)]
    torchrun(tmp_path / "plain.py", tmp_path, nproc=1)
    one = load(tmp_path, 0, 1)
    assert_states(fsdp[0]["state"], fsdp[1]["state"], atol=0)
    assert len(one["history"]) >= 5 and decisions(fsdp[0]["history"]) == decisions(one["history"])
    # (FSDP2's reduce-scatter sums in another order than one process; Adam at lr 1e-2 makes those
    # ~1e-7 differences in the gradients ~3e-5 in the weights after 80 steps, ~5e-4 with the
    # warm start: a reborn slot's first steps, a fresh Adam's, are near lr · sign(g), where g ≈ 0
    # too. warm_start=False: 3e-5 again)
    assert_states(fsdp[0]["state"], one["state"], atol=1.5e-3)


ACCELERATE_DUMP = """
torch.save(dict(state={k: v.detach().clone() for k, v in model.state_dict().items()}, history=alloc.history),
           f"{NAME}{accelerator.process_index}.pt")
"""


def test_accelerate_two_processes_and_resume_from_save_state(tmp_path):
    script = doc_script("accelerate")
    (tmp_path / "full.py").write_text(script + ACCELERATE_DUMP.replace("{NAME}", "full"))
    # the same script, resumed: load_state at the start, then t = 41 .. 80
    resume = script.replace("for t in range(1, 81):", 'accelerator.load_state("checkpoint")\nfor t in range(41, 81):')
    resume = resume.replace("    if t == 40:", "    if False:")
    assert resume.count("range(41, 81)") == 1 and "if False" in resume
    (tmp_path / "resume.py").write_text(resume + ACCELERATE_DUMP.replace("{NAME}", "resumed"))
    out = torchrun(tmp_path / "full.py", tmp_path, nproc=2)
    full = [torch.load(tmp_path / f"full{r}.pt", weights_only=False) for r in (0, 1)]
    assert_states(full[0]["state"], full[1]["state"], atol=0)
    assert len(full[0]["history"]) >= 5 and out.startswith(str(len(full[0]["history"])))
    saved = torch.load(tmp_path / "checkpoint" / "custom_checkpoint_0.pkl", weights_only=False)  # the allocator
    assert saved["history"] == [h for h in full[0]["history"] if h["step"] <= 40] and saved["last_step"] == 40
    torchrun(tmp_path / "resume.py", tmp_path, nproc=2)
    resumed = torch.load(tmp_path / "resumed0.pt", weights_only=False)
    assert resumed["history"] == full[0]["history"]
    assert_states(resumed["state"], full[0]["state"], atol=1e-6)


TRAINER = """
import json, sys
import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
import flexlora as fl
from flexlora_hf import FlexLoRACallback

torch.manual_seed(0)
config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=32, max_position_embeddings=16, num_labels=3,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
model = BertForSequenceClassification(config)
fl.inject(model, ["query", "key", "value", "output.dense", "intermediate.dense"], r=3, alpha=6,
          trainable=["classifier"])
g = torch.Generator().manual_seed(1)
ids, labels = torch.randint(0, 64, (64, 6), generator=g), torch.randint(0, 3, (64,), generator=g)
data = [{"input_ids": ids[i], "labels": labels[i]} for i in range(64)]
callback = FlexLoRACallback(model, gamma=0.1, b0=2, t_warmup=1, t_final=1, interval=2, schedule="constant")
args = TrainingArguments(output_dir="out", max_steps=12, per_device_train_batch_size=4, learning_rate=1e-2,
                         report_to="none", use_cpu=True, save_strategy="no", logging_strategy="no",
                         disable_tqdm=True, ddp_backend="gloo", ddp_find_unused_parameters=False, seed=0)
trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
trainer.train()
json.dump(dict(world=trainer.args.world_size, history=callback.allocator.history,
               weights={n: p.tolist() for n, p in model.named_parameters() if p.requires_grad}),
          open(f"rank{trainer.args.process_index}.json", "w"))
"""


def test_trainer_on_two_processes_has_the_same_ranks_everywhere(tmp_path):
    (tmp_path / "trainer.py").write_text(TRAINER)
    torchrun(tmp_path / "trainer.py", tmp_path, nproc=2)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == 2 and len(r0["history"]) == 5 and r0["history"] == r1["history"]
    assert len(set(r0["history"][-1]["ranks"].values())) > 1  # the ranks moved, alike on both
    assert r0["weights"] == r1["weights"]


def compile_run(compiled, steps=60):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4))
    fl.inject(model, [r"0|2"], r=4, alpha=8, trainable=["4"], init="lora")
    x, y = torch.randn(256, 32), torch.randint(0, 4, (256,))
    ns = dict(torch=torch, model=model, x=x)
    exec(doc_script("torch.compile"), ns)  # compiled = torch.compile(model)
    net = ns["compiled"] if compiled else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    alloc = fl.RankAllocator(model, b0=2, t_warmup=5, t_final=10, total_steps=steps, interval=3,
                             schedule="constant")
    losses, graphs = [], []
    for t in range(1, steps + 1):
        loss = nn.functional.cross_entropy(net(x), y) + 0.05 * fl.orthogonal_regularizer(model)
        loss.backward()
        opt.step()
        alloc.step(t, opt)
        opt.zero_grad()
        losses.append(loss.item())
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    return np.array(losses), graphs, alloc.history


def test_compile_makes_no_new_graph_across_allocations():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager, _, history = compile_run(False)
    compiled, graphs, compiled_history = compile_run(True)
    assert len(history) == 15 and decisions(compiled_history) == decisions(history)
    assert graphs[0] >= 1 and graphs[-1] == graphs[1]  # nothing compiled after the first step
    np.testing.assert_allclose(compiled, eager, rtol=1e-4, atol=1e-5)  # inductor's float rounding
    torch._dynamo.reset()


GAIN = """
from flexlora_gain import GainAllocator
fl.RankAllocator = GainAllocator  # the docs script, with the gain rule
"""
FIRST_G = """
torch.save(dict(state={k: v.detach().clone() for k, v in model.state_dict().items()}, history=alloc.history,
                G=first), f"rank{dist.get_rank()}of{dist.get_world_size()}.pt")
"""


def test_the_gain_rule_under_ddp_reads_the_whole_batch_and_decides_alike(tmp_path):
    # G comes from activation hooks, local to each process: all-reduced, it is the one-process G of
    # the whole batch, and both processes take the same decisions (and stay bit for bit alike)
    script = doc_script("Your own loop under DDP").replace("import flexlora as fl\n", "import flexlora as fl\n" + GAIN)
    # keep the first anchor's G (step 10 = t_warmup), before the runs' decisions can part
    script = script.replace("    alloc.step(t, opt)  # on every process, with the same t\n",
                            "    alloc.step(t, opt)  # on every process, with the same t\n"
                            "    first = {n: g.clone() for n, (g, _) in alloc.anchor.items()} if t == 10 else first\n")
    script = script.replace("for t in range(1, 81):", "first = None\nfor t in range(1, 81):")
    (tmp_path / "train.py").write_text(script + FIRST_G)
    for world in (1, 2):
        torchrun(tmp_path / "train.py", tmp_path, nproc=world)
    one, two, other = load(tmp_path, 0, 1), load(tmp_path, 0, 2), load(tmp_path, 1, 2)
    assert_states(two["state"], other["state"], atol=0)
    assert decisions(two["history"]) == decisions(other["history"]) and two["history"]
    for name, G in one["G"].items():
        assert torch.allclose(two["G"][name], G, atol=1e-6) and G.abs().max() > 1e-4
