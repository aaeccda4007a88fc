"""Tests of train_glue.py and train_vit.py: offline, tiny models, data written by the tests.

Run: python -m pytest -q test_train.py   (about a minute or two on 2 CPU cores)
"""

import argparse
import json
import os
import shutil
from collections import OrderedDict

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import cli
import flexlora
import flexlora_io
import train_common as common
import train_glue
import train_vit

# a smaller smoke run: 2 epochs of 8 steps, allocations at steps 4..11
GLUE_TINY = ["--smoke", "--max_train_samples", "128", "--max_eval_samples", "32", "--epochs", "2",
             "--t_w", "3", "--t_f", "5", "--delta", "1", "--log_every", "8"]
VIT_TINY = ["--smoke", "--epochs", "2", "--t_w", "4", "--t_f", "8", "--delta", "1", "--log_every", "16"]
OUTPUTS = ["metrics.json", "rank_history.json", "adapter.safetensors"]


def read(run_dir, name):
    with open(os.path.join(run_dir, name)) as f:
        return json.load(f)


# -----------------------------------------------------------------------------
# End to end: smoke runs of both scripts, and their adapters reloaded into fresh models


def test_glue_smoke_end_to_end_and_reload(tmp_path):
    out = str(tmp_path / "glue")
    result = train_glue.main(GLUE_TINY + ["--output_dir", out, "--save_merged"])
    for f in OUTPUTS:
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    metrics, ranks = read(out, "metrics.json"), read(out, "rank_history.json")
    assert metrics == json.loads(json.dumps(result))
    assert [e["step"] for e in metrics["evals"]] == [8, 16]
    assert -1 <= metrics["final"]["mcc"] <= 1 and metrics["final"]["score"] == metrics["final"]["mcc"]
    assert metrics["counts"]["trainable"] == metrics["counts"]["adapter"] + metrics["counts"]["head"] > 0
    # allocations happened and conserved the total rank
    assert ranks["history"] and metrics["allocation_stats"]["allocations"] == len(ranks["history"])
    total = sum(ranks["initial"].values())
    assert all(sum(h["ranks"].values()) == total for h in ranks["history"])
    assert ranks["final"] != ranks["initial"]
    assert metrics["config"]["target_modules"] == ",".join(train_glue.TARGETS[0])  # what was adapted

    # reload: a fresh tiny model (same seed, same base weights), injected, then load_adapter
    args = train_glue.get_args(GLUE_TINY)
    torch.manual_seed(args.seed)
    model, tokenizer = train_glue.load_model(args)
    flexlora.inject(model, train_glue.TARGETS[0], r=args.r, alpha=args.alpha, trainable=["classifier", "pooler"])
    flexlora_io.load_adapter(model, os.path.join(out, "adapter.safetensors"))
    assert flexlora.rank_pattern(model) == ranks["final"]
    dev = train_glue.encode(tokenizer, *train_glue.load_data(args)["dev"], args.max_length)
    from transformers import DataCollatorWithPadding

    logits, labels = common.predict(model, dev, DataCollatorWithPadding(tokenizer), args)
    assert train_glue.glue_metrics("cola", logits, labels)["mcc"] == pytest.approx(metrics["final"]["mcc"], abs=1e-9)

    # the exports give the same logits: peft_adapter/ on a fresh base model with PEFT, and merged/
    # (ΔW folded in) as a plain transformers model, with its tokenizer
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(args.seed)
    peft_model = PeftModel.from_pretrained(train_glue.load_model(args)[0], os.path.join(out, "peft_adapter"))
    assert peft_model.peft_config["default"].task_type == "SEQ_CLS"
    peft_logits, _ = common.predict(peft_model, dev, DataCollatorWithPadding(tokenizer), args)
    np.testing.assert_allclose(peft_logits, logits, rtol=1e-5, atol=1e-6)
    merged, info = AutoModelForSequenceClassification.from_pretrained(os.path.join(out, "merged"),
                                                                       output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert not flexlora.adapters(merged)
    merged_logits, _ = common.predict(merged, dev, DataCollatorWithPadding(tokenizer), args)
    np.testing.assert_allclose(merged_logits, logits, rtol=1e-5, atol=1e-6)
    text = "the cat sat on a good dog"
    assert AutoTokenizer.from_pretrained(os.path.join(out, "merged"))(text) == tokenizer(text)


def test_vit_smoke_end_to_end_and_reload(tmp_path):
    out = str(tmp_path / "vit")
    train_vit.main(VIT_TINY + ["--output_dir", out])
    for f in OUTPUTS:
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    metrics, ranks = read(out, "metrics.json"), read(out, "rank_history.json")
    assert 0 <= metrics["final"]["accuracy"] <= 1 and len(metrics["evals"]) == 2
    assert all(n.endswith(("mlp.fc1", "mlp.fc2")) for n in ranks["final"])  # MLP only, as the paper

    args = train_vit.get_args(VIT_TINY)
    torch.manual_seed(args.seed)
    data, n_classes = train_vit.load_data(args)
    model = train_vit.load_model(args, n_classes)
    flexlora.inject(model, train_vit.MLP, r=args.r, alpha=args.alpha, trainable=["classifier"])
    flexlora_io.load_adapter(model, os.path.join(out, "adapter.safetensors"))
    assert flexlora.rank_pattern(model) == ranks["final"]
    processor = train_vit.image_processor(args, model.config)
    x = processor(images=list(data["test"][0]), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        acc = (model(pixel_values=x).logits.argmax(-1).numpy() == data["test"][1]).mean()
    assert acc == pytest.approx(metrics["final"]["accuracy"], abs=1e-9)


# -----------------------------------------------------------------------------
# Resume: an interrupted run continued with --resume ends as the uninterrupted one


@pytest.mark.parametrize("init", ["lora", "gaussian"])  # a resumed run adds its new directions alike
def test_resume_gives_the_same_run(tmp_path, init):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train_glue.main(GLUE_TINY + ["--init", init, "--output_dir", full])
    assert train_glue.main(GLUE_TINY + ["--init", init, "--output_dir", part, "--stop_after", "9"]) is None
    assert os.path.exists(os.path.join(part, "checkpoint")) and not os.path.exists(os.path.join(part, "metrics.json"))
    train_glue.main(["--resume", part, "--save_merged"])  # (--save_merged may be added on resume)
    assert os.path.isfile(os.path.join(part, "merged", "config.json"))
    a, b = read(full, "rank_history.json"), read(part, "rank_history.json")
    assert a["final"] == b["final"] and a["history"] == b["history"]  # same allocations, same ranks
    ma, mb = read(full, "metrics.json"), read(part, "metrics.json")
    for ea, eb in zip(ma["evals"], mb["evals"], strict=True):
        assert ea == pytest.approx(eb, abs=1e-6)
    # the weights agree to float rounding: MKL's kernels depend on memory alignment, which a new
    # process changes (with MKL_CBWR=COMPATIBLE in the environment they are bit-identical)
    wa, wb = load_file(os.path.join(full, "adapter.safetensors")), load_file(os.path.join(part, "adapter.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


def test_the_first_log_line_after_a_resume_is_the_uninterrupted_runs(tmp_path, capsys):
    # log lines at steps 8 and 16; stopped at 9: the line at 16 averages steps 9-16 in both runs
    # (was: 10-16 after the resume)
    step16 = lambda out: [l for l in out.splitlines() if l.startswith("step 16 |")][0].split(" | ")[:3]
    train_glue.main(GLUE_TINY + ["--output_dir", str(tmp_path / "full")])
    full = step16(capsys.readouterr().out)
    part = str(tmp_path / "part")
    train_glue.main(GLUE_TINY + ["--output_dir", part, "--stop_after", "9"])
    train_glue.main(["--resume", part])
    assert step16(capsys.readouterr().out) == full  # step, loss and orth


def test_ctrl_c_says_how_to_continue(tmp_path, monkeypatch, capsys):
    save, calls = common.save_checkpoint, []

    def interrupted_at_the_second_checkpoint(*a):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        save(*a)

    monkeypatch.setattr(common, "save_checkpoint", interrupted_at_the_second_checkpoint)
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        train_glue.main(GLUE_TINY + ["--output_dir", out, "--ckpt_every", "4"])
    assert e.value.code == 130 and f"interrupted: continue from its last checkpoint with --resume {out}" in str(e.value)
    assert capsys.readouterr().err.strip().endswith(str(e.value))  # the one line it prints
    calls[:] = [1, 1]  # no more interruptions
    assert train_glue.main(["--resume", out])["final"]  # it continues from step 4 to the end
    calls[:] = [1]  # interrupted at the first checkpoint: nothing to continue from
    with pytest.raises(SystemExit, match="interrupted: it had written no checkpoint yet"):
        train_glue.main(GLUE_TINY + ["--output_dir", str(tmp_path / "early"), "--ckpt_every", "4"])


def test_ctrl_c_before_the_run_starts_leaves_the_old_run(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    train_glue.main(GLUE_TINY + ["--output_dir", out, "--stop_after", "4"])
    before = read(out, "checkpoint/args.json")

    def interrupted(self, args):
        raise KeyboardInterrupt

    # Ctrl-C while the new run is still loading
    monkeypatch.setattr(cli.OutputDir, "start", interrupted)
    with pytest.raises(SystemExit) as e:
        train_glue.main(GLUE_TINY + ["--output_dir", out, "--overwrite"])
    assert e.value.code == 130 and f"interrupted before the run started: --output_dir {out} is as it was" in str(e.value)
    assert read(out, "checkpoint/args.json") == before  # --resume out still continues the old run


@pytest.mark.parametrize("error, why", [
    (OSError(28, "No space left on device"), "No space left on device"),  # open(), safetensors
    (RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),  # torch.save's zip writer
     "PytorchStreamWriter failed writing file data/0: file write failed")])
def test_checkpoint_write_failure_keeps_the_last(tmp_path, monkeypatch, error, why):
    save, calls = torch.save, []

    def disk_full_at_the_second_checkpoint(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise error
        save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", disk_full_at_the_second_checkpoint)
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        train_glue.main(GLUE_TINY + ["--output_dir", out, "--ckpt_every", "4"])
    assert e.value.code == 1 and str(e.value) == (f"could not write a checkpoint in {out} ({why}): "
                                                  f"make room, then continue from its last checkpoint with --resume {out}")
    assert sorted(os.listdir(out)) == ["checkpoint"]  # no checkpoint.tmp left behind
    assert torch.load(os.path.join(out, "checkpoint", "state.pt"), weights_only=True)["step"] == 4
    monkeypatch.setattr(torch, "save", save)
    assert train_glue.main(["--resume", out])["final"]  # it continues from step 4 to the end


def test_resume_adalora(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    args = GLUE_TINY + ["--method", "adalora"]
    train_glue.main(args + ["--output_dir", full, "--save_merged"])
    train_glue.main(args + ["--output_dir", part, "--stop_after", "7", "--save_merged"])
    train_glue.main(["--resume", part])  # (keeps the saved --save_merged)
    assert os.path.isfile(os.path.join(part, "merged", "config.json"))
    a, b = read(full, "rank_history.json"), read(part, "rank_history.json")
    assert a["history"] and a["final"] == b["final"]
    assert sum(a["final"].values()) < sum(a["initial"].values())  # AdaLoRA masked down to target_r
    for ea, eb in zip(read(full, "metrics.json")["evals"], read(part, "metrics.json")["evals"], strict=True):
        assert ea == pytest.approx(eb, abs=1e-6)
    assert os.path.exists(os.path.join(full, "adapter", "adapter_model.safetensors"))

    # merged/ (PEFT's merge_and_unload) gives the logits of PEFT's adapter/ on a fresh base model
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

    a = train_glue.get_args(args)
    torch.manual_seed(a.seed)
    base, tokenizer = train_glue.load_model(a)
    dev = train_glue.encode(tokenizer, *train_glue.load_data(a)["dev"], a.max_length)
    collate = DataCollatorWithPadding(tokenizer)
    logits, _ = common.predict(PeftModel.from_pretrained(base, os.path.join(full, "adapter")), dev, collate, a)
    merged, info = AutoModelForSequenceClassification.from_pretrained(os.path.join(full, "merged"),
                                                                       output_loading_info=True)
    assert not any(info.values()), info
    np.testing.assert_allclose(common.predict(merged, dev, collate, a)[0], logits, rtol=1e-5, atol=1e-6)


# -----------------------------------------------------------------------------
# Baselines at a matched trainable-parameter budget; target modules for DeBERTa and BERT


def method_args(method, r=4):
    return argparse.Namespace(method=method, r=r, alpha=8.0, lora_dropout=0.0, b0=2, t_w=2, t_f=4, delta=1,
                              r_min=1, r_max=None, seed=0, schedule="cubic", gamma=0.05, target_r=None,
                              init="gaussian", lambda_lr_ratio=16.0, pq_lr_ratio=3.0)


@pytest.mark.parametrize("r", [4, 12])
def test_baselines_match_flexlora_budget(r):
    counts = {}
    for method in ("flexlora", "lora", "adalora"):
        torch.manual_seed(0)
        model = train_glue.smoke_model("rte", 40)
        m, c = common.setup_method(model, method_args(method, r), train_glue.TARGETS[0], ["classifier", "pooler"], 20)
        if method == "adalora":  # PEFT's penalty is a mean over the 2K factors, half of R: it gets 2γ
            assert m.net.peft_config["default"].orth_reg_weight == pytest.approx(2 * 0.05)
        counts[method] = c["trainable"]
        held = sum(p.numel() for p in model.parameters() if p.requires_grad)  # FlexLoRA: dead slots too
        assert c["trainable"] == held - c.get("adapter_slots", c["adapter"]) + c["adapter"]
        assert method != "flexlora" or c["adapter_slots"] == 2 * c["adapter"]  # r_max = 2r slots
    for method in ("lora", "adalora"):
        assert abs(counts[method] - counts["flexlora"]) / counts["flexlora"] < 0.03, counts
    assert counts["adalora"] == counts["flexlora"]  # the same P, Λ, Q shapes


def test_targets_found_for_deberta_and_bert():
    from transformers import BertConfig, BertForSequenceClassification

    deberta = train_glue.smoke_model("cola", 40)
    bert = BertForSequenceClassification(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64))
    assert common.find_targets(deberta, train_glue.TARGETS) == train_glue.TARGETS[0]
    assert common.find_targets(bert, train_glue.TARGETS) == train_glue.TARGETS[1]
    assert len(flexlora.inject(bert, train_glue.TARGETS[1], r=2, alpha=4)) == 12  # 6 per layer
    with pytest.raises(ValueError, match="--target_modules"):
        common.find_targets(bert, [["q_proj"]])


def test_glue_local_bert_checkpoint(tmp_path):
    # a local sequence-classification checkpoint (BERT layout, like MiniLM), saved in bf16 as the GPU
    # benchmark carries MiniLM, and local GLUE TSVs
    from transformers import BertConfig, BertForSequenceClassification

    tok = train_glue.smoke_tokenizer()
    folder = str(tmp_path / "bert")
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
    BertForSequenceClassification(config).to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    model, _ = train_glue.load_model(train_glue.get_args(["--task", "stsb", "--model", folder]))
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # fp32 master weights, not bf16
    glue = write_glue(tmp_path / "glue", n=24)
    out = str(tmp_path / "run")
    train_glue.main(["--task", "stsb", "--model", folder, "--data_dir", glue, "--epochs", "2", "--batch_size", "8",
                     "--method", "lora", "--output_dir", out, "--log_every", "3"])
    final = read(out, "metrics.json")["final"]
    assert set(final) == {"step", "epoch", "pearson", "spearman", "score"}
    assert final["score"] == pytest.approx((final["pearson"] + final["spearman"]) / 2)


# -----------------------------------------------------------------------------
# GLUE TSV readers, one per layout


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return str(path)


def write_glue(root, n=6):
    """Small files in the original GLUE layouts (CoLA: no header; MRPC: BOM; RTE; STS-B)."""
    for split in ("train", "dev"):
        write(root / "CoLA" / f"{split}.tsv", "".join(f"gj04\t{i % 2}\t{'' if i % 2 else '*'}\tthe cat sat {i} .\n"
                                                    for i in range(n)))
        write(root / "MRPC" / f"{split}.tsv", "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n" + "".join(
            f"{i % 2}\t{i}\t{i + 100}\ta \"dog ran {i}\tthe dog ran\n" for i in range(n)))
        write(root / "RTE" / f"{split}.tsv", "index\tsentence1\tsentence2\tlabel\n" + "".join(
            f"{i}\ta man sat\ta man\t{'entailment' if i % 2 else 'not_entailment'}\n" for i in range(n)))
        write(root / "STS-B" / f"{split}.tsv",
              "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n" + "".join(
                  f"{i}\tmain\tf\t2012\t{i}\tnone\tnone\tthe good cat\ta cat {'good ' * (i % 6)}\t{i % 6:.3f}\n"
                  for i in range(n)))
    return str(root)


def test_tsv_readers(tmp_path):
    root = tmp_path / "glue"
    write_glue(root)
    texts, labels = train_glue.read_tsv(str(root / "CoLA" / "train.tsv"), "cola")
    assert texts == [[f"the cat sat {i} ." for i in range(6)]] and labels == [0, 1, 0, 1, 0, 1]
    texts, labels = train_glue.read_tsv(str(root / "MRPC" / "train.tsv"), "mrpc")  # BOM before "Quality"
    assert texts[0][0] == 'a "dog ran 0' and texts[1][0] == "the dog ran" and labels[:2] == [0, 1]
    texts, labels = train_glue.read_tsv(str(root / "RTE" / "train.tsv"), "rte")
    assert labels[:2] == [1, 0]  # the Hub's order: entailment = 0, not_entailment = 1
    texts, labels = train_glue.read_tsv(str(root / "STS-B" / "dev.tsv"), "stsb")
    assert texts[1][2] == "a cat good good " and labels[:3] == [0.0, 1.0, 2.0]
    data = train_glue.load_tsv(str(root), "rte")
    assert set(data) == {"train", "dev"} and len(data["dev"][1]) == 6
    # CoLA without its trailing newline (as dev.tsv ships) still gives every row
    path = write(tmp_path / "cola.tsv", "a\t1\t\tx y\nb\t0\t*\tz")
    assert train_glue.read_tsv(path, "cola") == ([["x y", "z"]], [1, 0])


def test_tsv_wrong_columns(tmp_path):
    path = write(tmp_path / "rte.tsv", "index\tsentence\tlabel\n0\ta\tentailment\n")
    with pytest.raises(ValueError, match=r"lacks the columns \['sentence1', 'sentence2'\]"):
        train_glue.read_tsv(path, "rte")
    path = write(tmp_path / "cola.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\t1\n")  # a header
    with pytest.raises(ValueError, match="no header"):
        train_glue.read_tsv(path, "cola")
    path = write(tmp_path / "rte2.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tyes\n")
    with pytest.raises(ValueError, match="label 'yes'"):
        train_glue.read_tsv(path, "rte")
    with pytest.raises(SystemExit, match="--data_dir"):
        train_glue.load_tsv(str(tmp_path / "nowhere"), "mrpc")


# -----------------------------------------------------------------------------
# GLUE metrics against hand-computed values


def onehot(preds, C=2):
    return np.eye(C)[preds]


def test_glue_metrics_by_hand():
    labels, preds = np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0])  # TP 1, FN 1, TN 2, FP 0
    m = train_glue.glue_metrics("cola", onehot(preds), labels)
    assert m["mcc"] == pytest.approx((1 * 2 - 0 * 1) / np.sqrt(1 * 2 * 2 * 3))  # (TP·TN − FP·FN) / √(...)
    m = train_glue.glue_metrics("mrpc", onehot(preds), labels)
    assert m["f1"] == pytest.approx(2 / 3) and m["accuracy"] == 0.75  # precision 1, recall 1/2
    assert train_glue.glue_metrics("rte", onehot(preds), labels) == {"accuracy": 0.75}
    m = train_glue.glue_metrics("mnli", onehot(np.array([0, 1, 2, 2]), 3), np.array([0, 1, 2, 0]))
    assert m == {"accuracy": 0.75}
    # STS-B: x = (1, 2, 3), y = (1, 2, 4): r = 3 / (√2 · √(42)/3) = 9/√84; ranks agree: ρ = 1
    m = train_glue.glue_metrics("stsb", np.array([[1.0], [2.0], [3.0]]), np.array([1.0, 2.0, 4.0]))
    assert m["pearson"] == pytest.approx(9 / np.sqrt(84)) and m["spearman"] == pytest.approx(1.0)
    # a constant prediction: correlation 0, not NaN
    assert train_glue.glue_metrics("stsb", np.ones((3, 1)), np.array([1.0, 2.0, 4.0]))["pearson"] == 0.0


# -----------------------------------------------------------------------------
# Image data: .npz and folders, and their errors


def write_npz(path, n=24, size=8, classes=3, **override):
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                  y_train=np.arange(n) % classes, x_test=rng.integers(0, 256, (n // 2, size, size, 3), dtype=np.uint8),
                  y_test=np.arange(n // 2) % classes)
    np.savez(path, **(arrays | override))
    return str(path)


def test_vit_npz_with_a_local_checkpoint(tmp_path):
    # a tiny ViT saved with save_pretrained (10 labels, CIFAR-style mean/std in its config.json)
    from transformers import ViTConfig, ViTForImageClassification

    folder = str(tmp_path / "vit")
    config = ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=10, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.25, 0.3])
    ViTForImageClassification(config).to(torch.bfloat16).save_pretrained(folder)
    out = str(tmp_path / "run")
    train_vit.main(["--data", write_npz(tmp_path / "d.npz"), "--model", folder, "--epochs", "2", "--batch_size", "8",
                    "--r", "2", "--output_dir", out])
    metrics = read(out, "metrics.json")
    assert metrics["counts"]["head"] == 3 * 32 + 3  # a fresh 3-way classifier
    assert 0 <= metrics["final"]["accuracy"] <= 1
    model = train_vit.load_model(train_vit.get_args(["--model", folder]), 3)
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # fp32 master weights from a bf16 file
    processor = train_vit.image_processor(train_vit.get_args(["--model", folder]), model.config)
    assert list(processor.image_mean) == [0.4, 0.5, 0.6] and processor.size["height"] == 16


def test_image_folder(tmp_path):
    from PIL import Image

    for split, n in (("train", 6), ("test", 2)):
        for c, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            os.makedirs(tmp_path / "imgs" / split / c)
            for i in range(n):
                Image.new("RGB", (10, 12), colour).save(tmp_path / "imgs" / split / c / f"{i}.png")
    data = train_vit.load_folder(str(tmp_path / "imgs"), seed=0)
    assert len(data["train"][1]) == 12 and len(data["test"][1]) == 4
    assert sorted(set(data["train"][1])) == [0, 1]  # cat = 0, dog = 1
    x, y = train_vit.Images(*data["train"])[0]
    assert x.shape == (12, 10, 3) and x.dtype == np.uint8 and tuple(x[0, 0]) == (255, 0, 0) and y == 0
    # one folder of classes, or train/ alone: 20% held out
    shutil.copytree(tmp_path / "imgs" / "train", tmp_path / "only" / "train")
    for folder in (tmp_path / "imgs" / "train", tmp_path / "only"):
        single = train_vit.load_folder(str(folder), seed=0)
        assert len(single["train"][1]) == 10 and len(single["test"][1]) == 2
    out = str(tmp_path / "run")
    train_vit.main(VIT_TINY + ["--data", str(tmp_path / "imgs"), "--batch_size", "4", "--output_dir", out])
    assert read(out, "metrics.json")["final"]["accuracy"] >= 0
    with pytest.raises(ValueError, match="no class sub-folders"):
        train_vit.load_folder(str(tmp_path / "imgs" / "train" / "cat"), seed=0)


def test_image_errors(tmp_path):
    with pytest.raises(ValueError, match="channels last"):
        train_vit.load_npz(write_npz(tmp_path / "a.npz", x_train=np.zeros((24, 3, 8, 8), np.uint8)))
    with pytest.raises(ValueError, match="uint8"):
        train_vit.load_npz(write_npz(tmp_path / "b.npz", x_train=np.zeros((24, 8, 8, 3), np.float32)))
    with pytest.raises(ValueError, match="lacks the arrays"):
        np.savez(tmp_path / "c.npz", x=np.zeros(3))
        train_vit.load_npz(str(tmp_path / "c.npz"))
    base = VIT_TINY + ["--output_dir", str(tmp_path / "run"), "--overwrite"]  # the script: one line, exit 2
    with pytest.raises(SystemExit, match="test labels go up to 7"):
        train_vit.main(base + ["--data", write_npz(tmp_path / "d.npz", y_test=np.full(12, 7))])
    with pytest.raises(SystemExit, match=">= 0"):
        train_vit.main(base + ["--data", write_npz(tmp_path / "e.npz", y_train=np.arange(24) % 3 - 1)])
    with pytest.raises(SystemExit, match="one integer label per image"):
        train_vit.main(base + ["--data", write_npz(tmp_path / "f.npz", y_train=np.zeros(5, int))])


# -----------------------------------------------------------------------------
# Command-line errors: clear messages, nothing overwritten


def test_unknown_task(capsys):
    with pytest.raises(SystemExit):
        train_glue.get_args(["--task", "squad"])
    assert "unknown task 'squad'" in capsys.readouterr().err
    assert train_glue.get_args(["--task", "STS-B"]).task == "stsb"


def test_output_dir_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    write(out / "metrics.json", "{}")
    with pytest.raises(SystemExit, match="already holds a run.*--overwrite"):
        train_glue.main(GLUE_TINY + ["--output_dir", str(out)])
    assert (out / "metrics.json").read_text() == "{}"
    with pytest.raises(SystemExit, match="has finished"):  # a finished run (metrics.json): nothing to resume
        train_glue.main(["--resume", str(out)])
    (out / "metrics.json").unlink()
    with pytest.raises(SystemExit, match="no checkpoint"):
        train_glue.main(["--resume", str(out)])


def test_missing_local_model(tmp_path):
    glue = write_glue(tmp_path / "glue")
    with pytest.raises(SystemExit, match="--model .*no such local directory"):
        train_glue.main(["--task", "rte", "--model", str(tmp_path / "nope"), "--data_dir", glue,
                         "--output_dir", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="--model .*no such local directory"):
        train_vit.main(["--data", write_npz(tmp_path / "d.npz"), "--model", str(tmp_path / "nope"),
                        "--output_dir", str(tmp_path / "b")])


# -----------------------------------------------------------------------------
# Small helpers


def test_fit_window_scales_short_runs():
    args = argparse.Namespace(t_w=800, t_f=3500, delta=10)
    common.fit_window(args, 6700)  # fits: unchanged
    assert (args.t_w, args.t_f, args.delta) == (800, 3500, 10)
    common.fit_window(args, 200)  # CoLA's window in a 200-step run: 60% of it, in the ratio 800 : 3500; Δ kept
    assert (args.t_w, args.t_f, args.delta) == (22, 98, 10)
    args = argparse.Namespace(t_w=800, t_f=3500, delta=100)
    common.fit_window(args, 200)  # a Δ longer than what is left: lowered to leave room for one allocation
    assert (args.t_w, args.t_f, args.delta) == (22, 98, 80)
    with pytest.raises(ValueError, match="too few"):
        common.fit_window(argparse.Namespace(t_w=1, t_f=1, delta=1), 2)


def test_lr_scale_multiplies_the_tasks_learning_rate():
    net = torch.nn.Linear(2, 2)
    base = common.build_optimizer(net, train_glue.get_args(["--task", "rte"]))
    scaled = common.build_optimizer(net, train_glue.get_args(["--task", "rte", "--lr_scale", "3"]))
    assert base.param_groups[0]["lr"] == pytest.approx(1.2e-3)  # RTE's default (train_glue.TASKS)
    assert scaled.param_groups[0]["lr"] == pytest.approx(3 * 1.2e-3)
    given = common.build_optimizer(net, train_glue.get_args(["--task", "rte", "--lr", "1e-4", "--lr_scale", "2"]))
    assert given.param_groups[0]["lr"] == pytest.approx(2e-4)


def test_lambda_trains_at_its_ratio_of_the_learning_rate():
    def optimizer(*flags):
        net = torch.nn.Sequential(OrderedDict(fc=torch.nn.Linear(4, 4), norm=torch.nn.LayerNorm(4),
                                              head=torch.nn.Linear(4, 2)))
        flexlora.inject(net, ["fc"], r=2, alpha=4, trainable=["norm", "head"])
        args = train_glue.get_args(["--task", "rte", "--weight_decay", "0.1", *flags])
        groups = common.build_optimizer(net, args).param_groups
        lr_of = lambda p: [g["lr"] for g in groups if any(q is p for q in g["params"])]
        return {(g["lr"], g["weight_decay"]): len(g["params"]) for g in groups}, lr_of(net.fc.Lambda), lr_of(net.fc.P)
    lr, lam, pq = 1.2e-3, 16 * 1.2e-3, 3 * 1.2e-3  # RTE's lr
    groups, lam_lr, p_lr = optimizer("--lambda_lr_ratio", "16", "--pq_lr_ratio", "3")
    assert lam_lr == [pytest.approx(lam)] and p_lr == [pytest.approx(pq)]
    # P, Q and the head's weight decay; its bias and the norm's two parameters do not
    assert groups == {(pq, 0.1): 2, (lam, 0.1): 1, (lr, 0.1): 1, (lr, 0.0): 3}
    groups, lam_lr, _ = optimizer()  # the default, as the paper: one lr
    assert lam_lr == [pytest.approx(lr)] and groups == {(lr, 0.1): 4, (lr, 0.0): 3}


def test_adalora_factors_train_at_the_lr_ratios():
    # AdaLoRA's E, A, B (its λ, Q, P) take --lambda_lr_ratio and --pq_lr_ratio as FlexLoRA's do (they were
    # ignored: every factor at one lr); the defaults stay PEFT's and the paper's one lr
    def lrs(*flags):
        torch.manual_seed(0)
        args = train_glue.get_args(GLUE_TINY + ["--method", "adalora", *flags])
        m, _ = common.setup_method(train_glue.smoke_model("cola", 40), args, train_glue.TARGETS[0],
                                   ["classifier", "pooler"], 16)
        groups = common.build_optimizer(m.net, args).param_groups
        by = {}
        for n, p in m.net.named_parameters():
            if p.requires_grad:
                kind = next((k for k in ("lora_E", "lora_A", "lora_B") if f".{k}." in n), "head")
                by.setdefault(kind, set()).update(g["lr"] for g in groups if any(q is p for q in g["params"]))
        return by, args.lr

    by, lr = lrs("--lambda_lr_ratio", "16", "--pq_lr_ratio", "3")
    assert by == {"lora_E": {16 * lr}, "lora_A": {3 * lr}, "lora_B": {3 * lr}, "head": {lr}}
    by, lr = lrs()
    assert by == {"lora_E": {lr}, "lora_A": {lr}, "lora_B": {lr}, "head": {lr}}
    # LoRA has no λ: its A and B stay at the lr whatever the ratios
    args = train_glue.get_args(GLUE_TINY + ["--method", "lora", "--lambda_lr_ratio", "16", "--pq_lr_ratio", "3"])
    m, _ = common.setup_method(train_glue.smoke_model("cola", 40), args, train_glue.TARGETS[0], ["classifier"], 16)
    assert {g["lr"] for g in common.build_optimizer(m.net, args).param_groups} == {args.lr}


def test_holdout_is_kept_out_of_training_and_scored(tmp_path):
    out = str(tmp_path / "glue")
    metrics = train_glue.main(GLUE_TINY + ["--holdout", "32", "--output_dir", out])
    final = metrics["final"]
    assert {"mcc", "score", "holdout_mcc"} <= set(final) and final["score"] == final["mcc"]  # dev alone
    assert metrics["train_steps"] == 2 * 6  # 128 - 32 = 96 examples: 6 batches of 16 per epoch
    vit = train_vit.main(VIT_TINY + ["--holdout", "8", "--output_dir", str(tmp_path / "vit")])
    assert {"accuracy", "holdout_accuracy"} <= set(vit["final"])
    train_set, held = common.hold_out(list(range(10)), argparse.Namespace(holdout=3))
    assert sorted(train_set + held) == list(range(10)) and len(held) == 3
    assert common.hold_out(list(range(10)), argparse.Namespace(holdout=3))[1] == held  # whatever the seed


def test_init_flag_reaches_every_adapter_and_the_saved_file(tmp_path):
    # the scripts' defaults (README, Deviations): LoRA's start at one lr, where the library keeps the paper's
    for script in (train_glue, train_vit):
        args = script.get_args(["--smoke"])
        assert (args.init, args.lambda_lr_ratio, args.pq_lr_ratio) == ("lora", 1.0, 1.0)
    for init, expect in (("lora", "lora"), ("gaussian", "gaussian"), ("orthonormal", "gaussian")):
        args = train_glue.get_args(["--smoke", "--init", init])
        model = train_glue.smoke_model("cola", 40)
        common.FlexLoRA(model, args, ["query_proj", "value_proj"], ["classifier"], total_steps=100)
        layers = flexlora.adapters(model).values()
        assert {m.init for m in layers} == {expect}
        assert all(bool((m.P == 0).all()) == (init == "lora") for m in layers)  # P = 0 only under lora
    out = str(tmp_path / "lora")
    metrics = train_glue.main(GLUE_TINY + ["--init", "lora", "--output_dir", out])
    assert metrics["allocation_stats"]["expanded"] > 0  # it allocated
    from safetensors import safe_open
    with safe_open(os.path.join(out, "adapter.safetensors"), "pt") as f:
        assert {c["init"] for c in json.loads(f.metadata()["adapters"]).values()} == {"lora"}


def test_orthonormal_init():
    args = train_glue.get_args(["--smoke", "--init", "orthonormal"])
    model = train_glue.smoke_model("cola", 40)
    method = common.FlexLoRA(model, args, ["query_proj", "value_proj"], ["classifier"], total_steps=100)
    for m in flexlora.adapters(model).values():
        eye, P, Q = torch.eye(m.r), m.P[:, m.live], m.Q[m.live]
        assert torch.allclose(P.T @ P, eye, atol=1e-5) and torch.allclose(Q @ Q.T, eye, atol=1e-5)
    assert float(method.regularizer().detach()) < 1e-4
    assert not any(m.Lambda.any() for m in flexlora.adapters(model).values())


def test_the_lora_baseline_has_no_allocation_window_to_note(tmp_path, capsys):
    train_glue.main(GLUE_TINY + ["--method", "lora", "--t_w", "1000", "--output_dir", str(tmp_path / "lora")])
    assert "allocation window" not in capsys.readouterr().out


def test_rank_plots_show_every_module_type_and_integer_ranks():
    import matplotlib

    matplotlib.use("Agg")
    from bench import plots

    # 2 layers x 6 module types; q = k = v and fc1 = fc2 in total at every step: was 3 lines hidden
    types = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc1", "mlp.fc2"]
    initial = {f"enc.layer.{l}.{ty}": 12 for l in (0, 1) for ty in types}
    final = dict(initial, **{"enc.layer.0.attn.o": 11, "enc.layer.1.attn.o": 11,
                             "enc.layer.0.mlp.fc1": 13, "enc.layer.0.mlp.fc2": 13})
    history = [dict(step=50, ranks=final)]
    fig = plots.history_figure(final, initial, history, 100, "flexlora")
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert labels == ["attn.q = attn.k = attn.v", "attn.o", "mlp.fc1 = mlp.fc2"]
    fig = plots.ranks_figure(final, "flexlora")
    ticks = fig.axes[1].get_yticks()  # the colour bar's
    assert len(ticks) and all(float(t).is_integer() for t in ticks)  # was 11.25, 11.5, ...


def test_a_new_head_is_one_line_not_transformers_table(tmp_path, capfd):
    # the ViT stand-in (10 labels) on 100 classes printed transformers' MISMATCH table
    from transformers import BertConfig, BertModel, ViTConfig, ViTForImageClassification

    folder = str(tmp_path / "vit")
    ViTForImageClassification(ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=64, num_labels=10)
                              ).save_pretrained(folder)
    capfd.readouterr()
    model = train_vit.load_model(train_vit.get_args(["--model", folder]), 100)
    out, err = capfd.readouterr()
    assert model.classifier.out_features == 100
    assert "MISMATCH" not in out + err and "LOAD REPORT" not in out + err and "id2label" not in out + err
    assert f"note: --model {folder}: a new task head (classifier: of another size than the checkpoint's)" in out
    # a base model without a head (as deberta-v3-base): said the same way, no table either
    folder = str(tmp_path / "bert")
    BertModel(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(folder)
    train_glue.smoke_tokenizer().save_pretrained(folder)
    capfd.readouterr()
    train_glue.load_model(train_glue.get_args(["--task", "rte", "--model", folder]))
    out, err = capfd.readouterr()
    assert "MISSING" not in out + err and "a new task head (classifier: not in the checkpoint)" in out
