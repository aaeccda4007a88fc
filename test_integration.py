"""Tests for the paths users already train on: pip install, HF Trainer, PEFT export, serving,
and a decoder LLM. Tiny models built from configs (no Hub), each test a few seconds.

    python -m pytest -q test_integration.py
"""

import copy
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import (BertConfig, BertForSequenceClassification, DebertaV2Config,
                          DebertaV2ForSequenceClassification, LlamaConfig, LlamaForCausalLM,
                          Trainer, TrainerCallback, TrainerControl, TrainerState,
                          TrainingArguments, ViTConfig, ViTForImageClassification,
                          get_linear_schedule_with_warmup)

import flexlora as fl
import flexlora_io as fio
from flexlora_hf import FlexLoRACallback, export_peft

HERE = Path(__file__).parent
BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense",
                "output.dense"]

# -----------------------------------------------------------------------------
# helpers


def tiny_bert(layers=2, hidden=16, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden,
                        max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).to(dtype)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def unequal_ranks(model, steps=3, seed=0):
    """Random λ and heads, a few allocations, random λ again: adapters of unequal ranks whose
    every direction (the new ones too) and head differ from the base model's."""
    g = torch.Generator().manual_seed(seed)
    allocator = fl.RankAllocator(model, b0=3, t_warmup=0, t_final=0, total_steps=100,
                                 interval=1, schedule="constant")

    def randomize():  # (the live slots of the adapters: a dead one stays at zero)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * live.get(id(p), 1))

    layers = fl.adapters(model).values()
    live = {id(getattr(m, f)): m.live.view(shape) for m in layers for f, shape in
            (("P", (1, -1)), ("Lambda", (-1,)), ("Q", (-1, 1)))}

    for t in range(1, steps + 1):
        randomize()
        allocator.step(t)
    randomize()
    ranks = fl.rank_pattern(model)
    assert len(set(ranks.values())) > 1, ranks
    return ranks


def round_trip_peft(model, base, inputs, tmp_path, **config_kwargs):
    """export_peft, PeftModel.from_pretrained on the untouched base: same ranks, same outputs."""
    ranks = unequal_ranks(model)
    export_peft(model, tmp_path / "adapter", **config_kwargs)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    model.eval()
    loaded = {n: m.lora_A["default"].weight.shape[0]  # PEFT's rank of each adapted module
              for n, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert loaded == ranks  # every adapter, at its own rank
    with torch.no_grad():
        assert rel_err(peft_model(**inputs).logits, model(**inputs).logits) <= 1e-10


# -----------------------------------------------------------------------------
# Packaging


def test_pip_wheel_holds_the_modules(tmp_path):
    # offline: no build isolation, no index, no dependencies; built from a copy, so the
    # worktree gets no build/ or egg-info
    modules = ("flexlora.py", "flexlora_io.py", "flexlora_gain.py", "flexlora_hf.py")
    for f in ("pyproject.toml", "README.md") + modules:
        shutil.copy(HERE / f, tmp_path / f)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", "dist", "."], cwd=tmp_path, check=True)
    wheel, = (tmp_path / "dist").glob("flexlora-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert all(m in names for m in modules)
    metadata = next(n for n in names if n.endswith("METADATA"))
    requires = [l for l in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
                if l.startswith("Requires-Dist")]
    assert any(l.startswith("Requires-Dist: torch") for l in requires)


# -----------------------------------------------------------------------------
# PEFT export: any ranks, same outputs (float64)


def test_export_peft_bert_twelve_layers(tmp_path):
    # 12 layers: the pattern key of layer.1 must not also catch layer.11
    model = tiny_bert(layers=12, hidden=8)
    base = copy.deepcopy(model)
    fl.inject(model, BERT_TARGETS, r=3, alpha=6, trainable=("classifier", "pooler"))
    inputs = {"input_ids": torch.randint(0, 64, (2, 7)),
              "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    round_trip_peft(model, base, inputs, tmp_path)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and not config["use_rslora"]
    assert config["modules_to_save"] == ["bert.pooler.dense", "classifier"]
    ranks = config["rank_pattern"]
    pairs = [[re.escape(f"bert.encoder.layer.{i}.{t}") for i in (1, 11)] for t in
             ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
              "intermediate.dense", "output.dense")]
    assert any(ranks[one] != ranks[eleven] for one, eleven in pairs)  # and PEFT loaded each at its own rank


def test_export_peft_deberta_v2(tmp_path):
    torch.manual_seed(0)
    config = DebertaV2Config(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=32,
                             max_position_embeddings=16, relative_attention=True,
                             position_buckets=8, pos_att_type=["p2c", "c2p"], num_labels=3,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = DebertaV2ForSequenceClassification(config).double()
    base = copy.deepcopy(model)
    fl.inject(model, ["query_proj", "key_proj", "value_proj", "attention.output.dense",
                      "intermediate.dense", "output.dense"], r=3, alpha=8,
              trainable=("classifier", "pooler"))
    inputs = {"input_ids": torch.randint(0, 64, (2, 7))}
    round_trip_peft(model, base, inputs, tmp_path, task_type="SEQ_CLS")


def test_export_peft_vit(tmp_path):
    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=32, num_labels=3,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = ViTForImageClassification(config).double()
    base = copy.deepcopy(model)
    fl.inject(model, ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"], r=4, alpha=8,
              trainable=("classifier",))  # transformers 5 names
    inputs = {"pixel_values": torch.randn(2, 3, 8, 8, dtype=torch.float64)}
    round_trip_peft(model, base, inputs, tmp_path)


def test_export_peft_refuses_merged_and_stray_trainables(tmp_path):
    model = tiny_bert()
    fl.inject(model, ["query"], r=2, alpha=4)
    fio.merge(model)
    with pytest.raises(ValueError, match="merged"):
        export_peft(model, tmp_path)
    fio.unmerge(model)
    model.bert.encoder.layer[0].attention.self.query.base.bias.requires_grad_(True)
    with pytest.raises(ValueError, match="no place in a PEFT LoRA adapter"):
        export_peft(model, tmp_path)


# -----------------------------------------------------------------------------
# Serving: unload, then a plain save_pretrained / from_pretrained round trip


def test_unload_save_pretrained_round_trip(tmp_path):
    model = tiny_bert()
    fl.inject(model, BERT_TARGETS, r=3, alpha=6, trainable=("classifier", "pooler"))
    unequal_ranks(model)
    x = torch.randint(0, 64, (2, 7))
    model.eval()
    with torch.no_grad():
        before = model(x).logits
    assert fio.unload(model) is model and not fl.adapters(model)
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith("query"))
    model.save_pretrained(tmp_path)
    loaded, info = BertForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float64,
                                                                 output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    with torch.no_grad():
        assert rel_err(loaded.eval()(x).logits, before) <= 1e-10


# -----------------------------------------------------------------------------
# Hugging Face Trainer: the callback equals the plain loop, and resumes exactly

N, BATCH, T, LR, GAMMA = 32, 8, 8, 1e-2, 0.1
# allocations at t = 3, 5, 7
ALLOC = dict(b0=2, t_warmup=1, t_final=1, interval=2, schedule="constant")


def bert_for_trainer():
    model = tiny_bert()
    fl.inject(model, BERT_TARGETS, r=3, alpha=6, trainable=("classifier",))
    return model


def dataset():
    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(0, 64, (N, 6), generator=g), torch.randint(0, 3, (N,), generator=g)
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(N)]


def trainer(model, out, callbacks, accum=1, save_steps=None, sampling="sequential", **more):
    args = TrainingArguments(output_dir=str(out), max_steps=T,
                             per_device_train_batch_size=BATCH // accum,
                             gradient_accumulation_steps=accum, learning_rate=LR, warmup_steps=2,
                             lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=1.0,
                             optim="adamw_torch", logging_strategy="no", report_to="none",
                             save_strategy="steps" if save_steps else "no",
                             save_steps=save_steps or 500, use_cpu=True, seed=0, disable_tqdm=True,
                             train_sampling_strategy=sampling, **more)
    return Trainer(model=model, args=args, train_dataset=dataset(), callbacks=callbacks)


def plain_loop(model):
    """What the Trainer run should equal: batches in order, AdamW, linear warm-up and decay,
    loss + γ·R, clipping, then the allocation with t = optimizer steps taken."""
    data = dataset()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, 2, T)
    allocator = fl.RankAllocator(model, total_steps=T, **ALLOC)
    model.train()
    for t in range(1, T + 1):
        i = (t - 1) * BATCH % N
        batch = {k: torch.stack([d[k] for d in data[i:i + BATCH]]) for k in data[0]}
        loss = model(**batch).loss + GAMMA * fl.orthogonal_regularizer(model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        allocator.step(t, optimizer)
        optimizer.zero_grad()
    return allocator.history


def decisions(history):
    return [(r["step"], r["pruned"], r["expanded"]) for r in history]


def assert_same_weights(a, b, tol):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].shape == sb[k].shape, k
        if sa[k].dtype == torch.bool:  # the live masks: the same slots
            assert torch.equal(sa[k], sb[k]), k
            continue
        assert (sa[k] - sb[k]).abs().max() <= tol * max(sb[k].abs().max(), 1e-3), k


def test_callback_adds_gamma_R_to_the_training_loss(tmp_path):
    model = bert_for_trainer()
    callback = FlexLoRACallback(model, gamma=GAMMA, **ALLOC)
    assert model.accepts_loss_kwargs is False  # so the Trainer divides by the accumulation steps
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    batch = {k: torch.stack([d[k] for d in dataset()[:4]]) for k in ("input_ids", "labels")}
    model.train()
    task = model(**batch).loss
    R = fl.orthogonal_regularizer(model)
    callback.on_train_begin(args, TrainerState(max_steps=T), TrainerControl())
    assert (model(**batch).loss - (task + GAMMA * R)).abs() <= 1e-12
    assert (model(**batch, return_dict=False)[0] - (task + GAMMA * R)).abs() <= 1e-12
    with torch.no_grad():  # evaluation: the task loss alone
        assert model.eval()(**batch).loss == task
    callback.on_train_end(args, None, None)
    assert model.train()(**batch).loss == task  # the hook is gone after training


@pytest.mark.parametrize("accum", [1, 2])
def test_trainer_callback_equals_plain_loop(tmp_path, accum):
    reference = bert_for_trainer()
    model = copy.deepcopy(reference)
    history = plain_loop(reference)
    callback = FlexLoRACallback(model, gamma=GAMMA, **ALLOC)
    trainer(model, tmp_path, [callback], accum=accum).train()
    assert len(history) == 3 and decisions(callback.allocator.history) == decisions(history)
    assert fl.rank_pattern(model) == fl.rank_pattern(reference)
    assert set(fl.rank_pattern(model).values()) != {3}  # the ranks moved
    assert_same_weights(model, reference, 1e-10)


def test_trainer_built_before_callback_refuses_accumulation(tmp_path):
    model = bert_for_trainer()
    tr = trainer(model, tmp_path, [], accum=2)  # reads model.accepts_loss_kwargs = True now
    tr.add_callback(FlexLoRACallback(model, gamma=GAMMA, **ALLOC))
    with pytest.raises(RuntimeError, match="num_items_in_batch"):
        tr.train()


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_trainer_resume_equals_uninterrupted(tmp_path):
    whole = bert_for_trainer()
    callback = FlexLoRACallback(whole, gamma=GAMMA, **ALLOC)
    trainer(whole, tmp_path / "whole", [callback], sampling="random").train()

    # the same run stopped after step 4 (one allocation in), resumed with a fresh model and Trainer
    first = bert_for_trainer()
    trainer(first, tmp_path / "cut", [FlexLoRACallback(first, gamma=GAMMA, **ALLOC), StopAt(4)],
            save_steps=4, sampling="random").train()
    saved = json.loads((tmp_path / "cut" / "checkpoint-4" / "flexlora_allocator.json").read_text())
    assert saved["ranks"] == fl.rank_pattern(first) != fl.rank_pattern(bert_for_trainer())
    probe = bert_for_trainer()  # a checkpoint also loads outside the Trainer, with plain load_state_dict
    probe.load_state_dict(load_file(tmp_path / "cut" / "checkpoint-4" / "model.safetensors"))
    assert fl.rank_pattern(probe) == saved["ranks"]  # the live masks came with it
    assert_same_weights(probe, first, 0.0)
    second = bert_for_trainer()  # every adapter at r = 3 again
    resumed = FlexLoRACallback(second, gamma=GAMMA, **ALLOC)
    trainer(second, tmp_path / "cut", [resumed], save_steps=4, sampling="random").train(
        resume_from_checkpoint=True)
    assert decisions(resumed.allocator.history) == decisions(callback.allocator.history)
    assert len(callback.allocator.history) == 3
    assert_same_weights(second, whole, 1e-12)

    # from a checkpoint of another output_dir, the callback must be told where it is
    checkpoint = str(tmp_path / "cut" / "checkpoint-4")
    third = bert_for_trainer()
    tr = trainer(third, tmp_path / "elsewhere", [FlexLoRACallback(third, gamma=GAMMA, **ALLOC)],
                 sampling="random")
    with pytest.raises(FileNotFoundError, match="resume_from_checkpoint"):
        tr.train(resume_from_checkpoint=checkpoint)
    third = bert_for_trainer()
    trainer(third, tmp_path / "elsewhere", [FlexLoRACallback(third, gamma=GAMMA, **ALLOC)],
            sampling="random", resume_from_checkpoint=checkpoint).train(checkpoint)
    assert_same_weights(third, whole, 1e-12)


# -----------------------------------------------------------------------------
# A decoder LLM: tiny LLaMA, inject, train with allocations, export to PEFT, merge and serve


def test_llama_inject_allocate_export_merge(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = LlamaForCausalLM(config).double()
    base = copy.deepcopy(model)
    layers = fl.inject(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                               "down_proj"], r=4, alpha=8)
    assert len(layers) == 14

    # a few steps of causal-LM training with an allocation after each
    x = torch.randint(0, 64, (4, 12))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    allocator = fl.RankAllocator(model, b0=2, t_warmup=2, t_final=0, total_steps=6, interval=1,
                                 schedule="constant")
    for t in range(1, 7):
        loss = model(input_ids=x, labels=x).loss + 0.05 * fl.orthogonal_regularizer(model)
        loss.backward()
        optimizer.step()
        allocator.step(t, optimizer)
        optimizer.zero_grad()
    assert len(allocator.history) == 4 and len(set(fl.rank_pattern(model).values())) > 1

    model.eval()
    with torch.no_grad():
        logits = model(x).logits
    prompt = x[:1, :4]
    tokens = model.generate(prompt, max_new_tokens=5, do_sample=False)

    # PEFT export: same logits from PeftModel on the untouched base
    export_peft(model, tmp_path / "adapter", task_type="CAUSAL_LM")
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert rel_err(peft_model(input_ids=x).logits, logits) <= 1e-10

    # merge for serving: a plain LlamaForCausalLM folder, same logits and same greedy tokens
    fio.unload(model).save_pretrained(tmp_path / "merged")
    served, info = LlamaForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float64,
                                                    output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        assert rel_err(served.eval()(x).logits, logits) <= 1e-10
    assert torch.equal(served.generate(prompt, max_new_tokens=5, do_sample=False), tokens)


# -----------------------------------------------------------------------------
# docs/integration.md: every Python block runs, and does what its comments say


def doc_snippets():
    """{section title: its Python block}"""
    sections = (HERE / "docs" / "integration.md").read_text().split("\n## ")[1:]
    blocks = {s.split("\n", 1)[0]: re.search(r"```python\n(.*?)```", s, re.S) for s in sections}
    return {title: m.group(1) for title, m in blocks.items() if m}


def docs_namespace(model, out, data):
    args = TrainingArguments(output_dir=str(out), max_steps=T, per_device_train_batch_size=BATCH,
                             learning_rate=LR, logging_strategy="no", save_strategy="no",
                             report_to="none", use_cpu=True, disable_tqdm=True)
    return dict(model=model, base=copy.deepcopy(model), args=args, train_dataset=data)


def test_docs_snippets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    snippets = doc_snippets()
    x = torch.randint(0, 64, (2, 6))

    ns = docs_namespace(tiny_bert(), tmp_path / "run", dataset())
    exec(snippets["Hugging Face Trainer"], ns)
    model = ns["model"].eval()
    assert ns["callback"].allocator.history and len(set(fl.rank_pattern(model).values())) > 1
    with torch.no_grad():
        logits = model(x).logits
    exec(snippets["Export to PEFT"], ns)
    with torch.no_grad():
        assert rel_err(ns["peft_model"].eval()(x).logits, logits) <= 1e-10
    exec(snippets["Serving: merge and unload"], ns)
    with torch.no_grad():
        assert rel_err(ns["served"].eval()(x).logits, logits) <= 1e-10

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    text = [{"input_ids": d["input_ids"], "labels": d["input_ids"]} for d in dataset()]
    ns = docs_namespace(LlamaForCausalLM(config).double(), tmp_path / "llama-run", text)
    ns.update(FlexLoRACallback=FlexLoRACallback, Trainer=Trainer, export_peft=export_peft, fl=fl,
              fio=fio)
    exec(snippets["Decoder LLMs (LLaMA)"], ns)
    assert len(ns["callback"].allocator.history) > 0
    assert (tmp_path / "llama-adapter" / "adapter_model.safetensors").is_file()
    served = LlamaForCausalLM.from_pretrained(tmp_path / "llama-merged", dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(served.eval()(x).logits, ns["model"].eval()(x).logits) <= 1e-10



def test_trainer_with_flexlora_param_groups_keeps_the_lr_ratios(tmp_path):
    # the training-speed ratios (λ 16x, P and Q 3x the lr) through Trainer(optimizers=...)
    model = bert_for_trainer()
    callback = FlexLoRACallback(model, gamma=GAMMA, **ALLOC)
    optimizer = torch.optim.AdamW(fl.param_groups(model, lr=LR, lambda_lr_ratio=16, pq_lr_ratio=3))
    args = trainer(model, tmp_path / "ratios", []).args
    Trainer(model=model, args=args, train_dataset=dataset(), callbacks=[callback],
            optimizers=(optimizer, None)).train()
    assert callback.allocator.history  # allocations happened and re-pointed this optimizer
    peak = {id(p): g["initial_lr"] for g in optimizer.param_groups for p in g["params"]}
    assert peak[id(model.classifier.weight)] == LR
    for layer in fl.adapters(model).values():  # the new λ, P and Q too
        assert peak[id(layer.Lambda)] == pytest.approx(16 * LR) and peak[id(layer.P)] == pytest.approx(3 * LR)


def test_export_peft_into_nothing_or_a_file_is_one_clear_error(tmp_path):
    model = bert_for_trainer()
    (tmp_path / "a_file").write_text("x")
    for bad in ("", str(tmp_path / "a_file")):
        with pytest.raises(ValueError, match="export_peft writes a folder"):
            export_peft(model, bad)
    assert (tmp_path / "a_file").read_text() == "x"


@pytest.mark.parametrize("content", ['{"step": 4, "gen', "[1, 2]", '{"step": 4}'])
def test_a_damaged_allocator_file_on_resume_is_one_clear_error(tmp_path, content):
    model = bert_for_trainer()
    callback = FlexLoRACallback(model, gamma=GAMMA, **ALLOC)
    trainer(model, tmp_path / "run", [callback], save_steps=4).train()
    (tmp_path / "run" / "checkpoint-4" / "flexlora_allocator.json").write_text(content)
    again = bert_for_trainer()
    tr = trainer(again, tmp_path / "run", [FlexLoRACallback(again, gamma=GAMMA, **ALLOC)], save_steps=4)
    with pytest.raises(ValueError, match="flexlora_allocator.json is damaged"):
        tr.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))


def test_trainer_resume_into_another_alpha_is_refused(tmp_path):
    model = bert_for_trainer()
    trainer(model, tmp_path / "run", [FlexLoRACallback(model, gamma=GAMMA, **ALLOC)], save_steps=4).train()
    other = tiny_bert()
    fl.inject(other, BERT_TARGETS, r=3, alpha=12, trainable=("classifier",))  # s = 4, not 2
    tr = trainer(other, tmp_path / "run", [FlexLoRACallback(other, gamma=GAMMA, **ALLOC)], save_steps=4)
    with pytest.raises(ValueError, match=r"\[r_init, alpha, init\] \[3, 6.0, 'gaussian'\], the model's \[3, 12.0"):
        tr.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))


def test_export_peft_over_an_older_export_that_cannot_be_written_leaves_it_whole(tmp_path, monkeypatch):
    import flexlora_hf
    model = bert_for_trainer()
    export_peft(model, tmp_path / "adapter")
    before = {f.name: f.read_bytes() for f in (tmp_path / "adapter").iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(flexlora_hf, "save_file", full_disk, raising=False)
    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with torch.no_grad():
        next(iter(fl.adapters(model).values())).Lambda.add_(1.0)
    with pytest.raises(OSError):
        export_peft(model, tmp_path / "adapter")
    assert {f.name: f.read_bytes() for f in (tmp_path / "adapter").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary folder left
