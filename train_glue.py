"""
Fine-tune a text classifier on a GLUE task with FlexLoRA, or with the LoRA / AdaLoRA baselines.

GPU box with internet (microsoft/deberta-v3-base and GLUE from the Hugging Face Hub):
$ python train_glue.py --task cola

Local checkpoint and the original GLUE TSV files (<DIR>/<TASK>/{train,dev}.tsv):
$ python train_glue.py --task rte --model PATH --data_dir ../shared/data/glue

Baselines from PEFT at FlexLoRA's trainable-parameter count:
$ python train_glue.py --task mrpc --method lora
$ python train_glue.py --task mrpc --method adalora

Multi-GPU, one process per GPU (--batch_size stays the global batch, split across them):
$ torchrun --standalone --nproc_per_node 4 train_glue.py --task mrpc

Also write merged/ (ΔW folded in, a plain transformers model for serving) beside the adapter:
$ python train_glue.py --task mrpc --save_merged

Offline smoke run (tiny DeBERTa, built-in data, < 1 min on CPU), and the same on 2 CPU processes:
$ python train_glue.py --smoke
$ torchrun --standalone --nproc_per_node 2 train_glue.py --smoke

Interrupted? Continue from the last checkpoint (under torchrun: the same torchrun line):
$ python train_glue.py --resume runs/glue-rte-flexlora-...
"""

import train_common as common  # first: Ctrl-C while it loads torch is one line (train_common)

import argparse
import csv
import math
import os
import textwrap
import warnings

import numpy as np
import torch

import cli
import loading

# -----------------------------------------------------------------------------
# The tasks

# The authors' per-task settings for DeBERTa-v3-base (their released GLUE scripts). Their r (2-3)
# is replaced by r = 12 for every task: the paper's GLUE budget of ~1.9M adapter parameters.
# γ is the paper's (loss = task + γ·R, R a mean over adapted matrices): their scripts' 0.1 / 0.3
# weigh an R averaged over the 2K factors, i.e. R/2, so the same loss is γ = 0.05 / 0.15 here.
HPARAMS = ("alpha", "lr", "epochs", "max_length", "weight_decay", "gamma", "t_w", "t_f", "delta")
TASKS = {
    "cola": (32, 8e-4, 25, 64, 0.0, 0.05, 800, 3500, 10),
    "sst2": (16, 8e-4, 24, 128, 0.01, 0.05, 6000, 22000, 100),
    "mrpc": (32, 1e-3, 30, 320, 0.01, 0.05, 600, 1800, 1),
    "qqp": (16, 8e-4, 5, 320, 0.01, 0.05, 8000, 25000, 100),
    "stsb": (32, 2.2e-3, 25, 128, 0.1, 0.15, 800, 2000, 10),
    "mnli": (16, 5e-4, 7, 256, 0.0, 0.05, 8000, 50000, 100),
    "qnli": (32, 5e-4, 5, 512, 0.01, 0.05, 2000, 8000, 100),
    "rte": (32, 1.2e-3, 50, 320, 0.01, 0.15, 600, 1800, 1),
}

# where the data sits: GLUE folder, the Hub's text columns, the TSV's text and label columns,
# and the label names of the TSV in the Hub's label order (None: the TSV holds 0/1 or a score)
DATA = {
    "cola": ("CoLA", ("sentence",), (3, 1), None),  # no header: columns by position
    "sst2": ("SST-2", ("sentence",), ("sentence", "label"), None),
    "mrpc": ("MRPC", ("sentence1", "sentence2"), ("#1 String", "#2 String", "Quality"), None),
    "qqp": ("QQP", ("question1", "question2"), ("question1", "question2", "is_duplicate"), None),
    "stsb": ("STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2", "score"), None),
    "mnli": ("MNLI", ("premise", "hypothesis"), ("sentence1", "sentence2", "gold_label"),
             ("entailment", "neutral", "contradiction")),
    "qnli": ("QNLI", ("question", "sentence"), ("question", "sentence", "label"),
             ("entailment", "not_entailment")),
    "rte": ("RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2", "label"),
            ("entailment", "not_entailment")),
}
# dev sets: MNLI has a matched and a mismatched one ({name: (TSV file, Hub split)})
DEV = {"mnli": {"": ("dev_matched", "validation_matched"),
                "_mm": ("dev_mismatched", "validation_mismatched")}}

# the six module types the authors adapt, as each architecture names them
FFN = ["attention.output.dense", "intermediate.dense", "output.dense"]
TARGETS = [["query_proj", "key_proj", "value_proj"] + FFN,  # DeBERTa
           ["query", "key", "value"] + FFN]  # BERT, RoBERTa, MiniLM

# --smoke: a tiny DeBERTa on built-in data, with allocations every other step
SMOKE = dict(r=4, alpha=8, lr=3e-2, epochs=3, max_length=32, batch_size=16, t_w=10, t_f=30, delta=2,
             b0=2, log_every=16, max_train_samples=512, max_eval_samples=128,
             model=None)  # its own model (metrics.json's run.model says which)


def num_labels(task):
    return 1 if task == "stsb" else len(DATA[task][3] or (0, 1))


def task_name(s):
    # argparse type: "CoLA", "sts-b", "SST2" ... -> "cola", "stsb", "sst2"
    t = s.lower().replace("-", "")
    if t not in TASKS:
        raise argparse.ArgumentTypeError(f"unknown task {s!r}: choose from {', '.join(TASKS)}")
    return t


# -----------------------------------------------------------------------------
# Data: the original GLUE TSV files, the Hub, or built-in smoke data


def read_tsv(path, task):
    """One GLUE TSV file -> (columns of text, labels). ValueError if it is not the task's layout."""
    folder, _, cols, names = DATA[task]
    # utf-8-sig drops MRPC's byte-order mark; quoting off, the text has unbalanced " (data README)
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if task == "cola":
        idx, body, start = cols, rows, 1  # no header line
    else:
        header, body, start = rows[0] if rows else [], rows[1:], 2
        missing = [c for c in cols if c not in header]
        if missing:
            raise ValueError(f"{path} is not a GLUE {folder} file: its header {header[:10]} "
                             f"lacks the columns {missing} (expected {list(cols)})")
        idx = [header.index(c) for c in cols]
    texts, labels, short = [[] for _ in idx[:-1]], [], 0
    for line, row in enumerate(body, start):
        if len(row) <= max(idx):
            short += 1  # a few malformed lines exist in some GLUE releases: skip them
            continue
        value = row[idx[-1]]
        try:
            if task == "stsb":
                labels.append(float(value))
                if not math.isfinite(labels[-1]):  # float() takes "nan" and "inf"
                    raise ValueError
            elif names:
                labels.append(names.index(value))
            else:
                labels.append(("0", "1").index(value))
        except ValueError:
            expect = "a finite score" if task == "stsb" else (names or ("0", "1"))
            hint = (" (CoLA's TSV has no header: source, label, mark, sentence)" if task == "cola"
                    else "")
            raise ValueError(f"{path} line {line}: label {value!r} is not one of {expect}: "
                             f"not a GLUE {folder} file{hint}") from None
        for col, i in zip(texts, idx[:-1]):
            col.append(row[i])
    if not labels or short > 0.01 * len(body):
        raise ValueError(f"{path}: {short} of {len(body)} lines have fewer than {max(idx) + 1} "
                         f"tab-separated columns: not a GLUE {folder} file")
    if short:
        print(f"note: {path}: skipped {short} malformed lines")
    return texts, labels


def load_tsv(data_dir, task):
    """{"train": (texts, labels), "dev" + suffix: ...} from <data_dir>/<TASK>/*.tsv"""
    folder = os.path.join(data_dir, DATA[task][0])
    files = {"train": "train"} | {"dev" + k: f
                                  for k, (f, _) in DEV.get(task, {"": ("dev", "")}).items()}
    out = {}
    for split, name in files.items():
        path = os.path.join(folder, name + ".tsv")
        if not os.path.exists(path):
            cli.die(f"--data_dir {data_dir}: {path} is missing (the original GLUE layout is "
                    f"<DIR>/{DATA[task][0]}/{{train,dev}}.tsv)")
        out[split] = read_tsv(path, task)
    return out


def load_hub(task):
    """The same from the Hub's nyu-mll/glue."""
    dev = DEV.get(task, {"": ("", "validation")})
    splits = {"train": "train"} | {"dev" + k: split for k, (_, split) in dev.items()}
    instead = (f"Pass --data_dir DIR with the GLUE TSVs (DIR/{DATA[task][0]}/train.tsv, dev.tsv), "
               f"or --smoke")
    loading.need_hub(f"GLUE {task} (nyu-mll/glue)", instead)
    try:
        import datasets

        ds = datasets.load_dataset("nyu-mll/glue", task)
    except Exception as e:  # no network, no cache: say what to do instead
        cli.die(f"could not load GLUE {task} from the Hugging Face Hub ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}). {instead}")
    return {k: ([ds[s][c] for c in DATA[task][1]], ds[s]["label"]) for k, s in splits.items()}


# built-in smoke data: random sentences whose label is told by marker words
WORDS = ("the a cat dog bird fish man woman sat ran saw ate "
         "big small red blue on under near with").split()
MARKERS = ["good", "bad", "maybe"]


def smoke_data(task, n, seed):
    rng = np.random.default_rng(seed)
    pair, C = len(DATA[task][1]) == 2, num_labels(task)
    sentence = lambda: list(rng.choice(WORDS, rng.integers(4, 9)))
    texts, labels = [[] for _ in range(1 + pair)], []
    for _ in range(n):
        words = sentence()
        if task == "stsb":  # the score counts the "good"s
            y = int(rng.integers(0, 6))
            words += ["good"] * y
        else:  # the class is the marker word
            y = int(rng.integers(0, C))
            words.insert(int(rng.integers(0, len(words))), MARKERS[y])
        if pair:
            texts[0].append(" ".join(sentence()))
        texts[-1].append(" ".join(rng.permutation(words)))
        labels.append(float(y) if task == "stsb" else y)
    return texts, labels


def smoke_tokenizer():
    # an offline word-level tokenizer over the smoke vocabulary
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(special + WORDS + MARKERS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(  # BERT's [CLS] a [SEP] b [SEP]
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def smoke_model(task, vocab_size):
    # a tiny DeBERTa-v3 (relative attention, p2c + c2p), randomly initialised
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    config = DebertaV2Config(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=64,
                             max_position_embeddings=64, relative_attention=True,
                             pos_att_type=["p2c", "c2p"], position_biased_input=False,
                             position_buckets=16, norm_rel_ebd="layer_norm", share_att_key=True,
                             type_vocab_size=0, num_labels=num_labels(task))
    return DebertaV2ForSequenceClassification(config)


def load_data(args):
    """{split: (texts, labels)} from --data_dir, the smoke generator, or the Hub; subsampled."""
    if args.data_dir:
        data = load_tsv(args.data_dir, args.task)
    elif args.smoke:
        data = {"train": smoke_data(args.task, args.max_train_samples, args.seed)}
        data |= {"dev" + k: smoke_data(args.task, args.max_eval_samples, args.seed + 1 + i)
                 for i, k in enumerate(DEV.get(args.task, {"": 0}))}
    else:
        data = load_hub(args.task)
    for split, (texts, labels) in data.items():  # a seeded random subset, kept in file order
        n = args.max_train_samples if split == "train" else args.max_eval_samples
        if n and n < len(labels):
            keep = np.sort(np.random.default_rng(args.seed).permutation(len(labels))[:n])
            data[split] = ([[col[i] for i in keep] for col in texts], [labels[i] for i in keep])
    return data


def encode(tokenizer, texts, labels, max_length):
    # a list of {"input_ids", "attention_mask", ..., "labels"}: DataCollatorWithPadding pads batches
    enc = tokenizer(*texts, truncation=True, max_length=max_length)
    return [{k: v[i] for k, v in enc.items()} | {"labels": labels[i]} for i in range(len(labels))]


def load_model(args):
    """(model, tokenizer): --smoke's tiny DeBERTa, or --model (a local path or a Hub name)."""
    if args.smoke:
        tokenizer = smoke_tokenizer()
        return smoke_model(args.task, len(tokenizer)), tokenizer
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    # dtype float32: transformers 5 would keep a bf16 checkpoint in bf16; we train fp32 master
    # weights (and on CUDA compute under bf16 autocast)
    model = loading.from_pretrained(
        AutoModelForSequenceClassification, args.model,
        num_labels=num_labels(args.task), dtype=torch.float32,
        ignore_mismatched_sizes=True, head=["classifier", "pooler"],  # a new head, the task's size
        problem_type="regression" if args.task == "stsb" else "single_label_classification")
    return model, loading.from_pretrained(AutoTokenizer, args.model)


# -----------------------------------------------------------------------------
# GLUE metrics, as the GLUE benchmark defines them


def glue_metrics(task, logits, labels):
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    if task == "stsb":
        preds = logits.reshape(-1)
        # constant predictions (early in training): NaN, counted as 0 below
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = dict(pearson=pearsonr(preds, labels)[0], spearman=spearmanr(preds, labels)[0])
    else:
        preds, labels = logits.argmax(-1), labels.astype(int)
        if task == "cola":
            m = dict(mcc=matthews_corrcoef(labels, preds))
        elif task in ("mrpc", "qqp"):
            m = dict(f1=f1_score(labels, preds), accuracy=accuracy_score(labels, preds))
        else:
            m = dict(accuracy=accuracy_score(labels, preds))
    # a constant prediction has no correlation: count it as 0 rather than NaN
    return {k: 0.0 if np.isnan(v) else float(v) for k, v in m.items()}


# -----------------------------------------------------------------------------


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    # data
    g = parser.add_argument_group("data")
    g.add_argument("--task", type=task_name, default="cola", help=", ".join(TASKS))
    g.add_argument("--data_dir",
                   help="GLUE TSVs as <DIR>/<TASK>/{train,dev}.tsv (default: the Hub)")
    g.add_argument("--max_length", type=int, help="tokens per example (truncated)")
    g.add_argument("--max_train_samples", type=int,
                   help="a seeded random subset of the training set (default: all of it)")
    g.add_argument("--max_eval_samples", type=int,
                   help="a subset of dev: no longer the official figure (default: all of it)")
    # model
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="microsoft/deberta-v3-base",
                   help="Hub name or local checkpoint")
    common.add_common_args(parser)
    # defaults: the task's (TASKS), then --smoke's, then whatever the command line says
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--task", type=task_name, default="cola")
    first.add_argument("--smoke", action="store_true")
    first = first.parse_known_args(argv)[0]
    parser.set_defaults(r=12, **dict(zip(HPARAMS, TASKS[first.task])))
    if first.smoke:
        parser.set_defaults(**SMOKE)
    parser.epilog = textwrap.fill(
        f"The defaults shown are those of --task {first.task}" + (" --smoke" if first.smoke else "")
        + f": each task has its own {', '.join(HPARAMS)} (TASKS in train_glue.py), and --smoke "
        f"its own; `--task rte --help` shows RTE's.", 79)
    args = parser.parse_args(argv)
    if args.smoke and args.model is not None:
        cli.die(f"--smoke trains its own tiny model: drop --model {args.model}, or --smoke")
    return args


def check_args(args):
    """The flags in range (train_common.check_args, then this script's), before anything is
    loaded."""
    common.check_args(args)
    if args.task not in TASKS:  # (a saved args.json)
        cli.die(f"--task {args.task!r}: must be one of {', '.join(TASKS)}")
    for flag in ("max_length", "max_train_samples", "max_eval_samples"):
        v = getattr(args, flag)
        if v is not None and not (isinstance(v, int) and v >= 1):
            cli.die(f"--{flag} {v!r}: must be an integer >= 1")


def main(argv=None):
    args = get_args(argv)
    # Ctrl-C: how to continue, not a traceback (from here to the end)
    with cli.resumable(args) as out:
        args = common.launch(args, f"glue-{args.task}", check_args, out)  # --resume: its settings
        return run(args, out)


def run(args, out):
    torch.manual_seed(args.seed)  # the head's initialisation (and the smoke model)
    with cli.user_errors():  # a file that is not what it should be: one line, exit 2
        data = load_data(args)
        model, tokenizer = load_model(args)
    train_set, held = common.hold_out(encode(tokenizer, *data["train"], args.max_length), args)
    dev_sets = {k[3:]: encode(tokenizer, *v, args.max_length) for k, v in data.items()
                if k.startswith("dev")}
    print(f"GLUE {args.task}: {len(train_set):,} train, "
          + ", ".join(f"{len(d):,} dev{k}" for k, d in dev_sets.items()))
    from transformers import DataCollatorWithPadding

    collate = DataCollatorWithPadding(tokenizer,
                                      pad_to_multiple_of=8 if torch.cuda.is_available() else None)

    def evaluate(net, notes):
        metrics = {}
        for suffix, dev in dev_sets.items():
            logits, labels = common.predict(net, dev, collate, args, notes)
            metrics |= {k + suffix: v for k, v in glue_metrics(args.task, logits, labels).items()}
        metrics["score"] = float(np.mean(list(metrics.values())))  # the GLUE task score
        if held:  # --holdout: the same metrics on training examples kept out of training
            logits, labels = common.predict(net, held, collate, args, notes)
            metrics |= {"holdout_" + k: v
                        for k, v in glue_metrics(args.task, logits, labels).items()}
        return metrics

    with cli.user_errors():
        targets = common.find_targets(model, TARGETS, args.target_modules)
    # the task head stays trainable (not adapted): the classifier, and the pooler where there is one
    names = [n for n, _ in model.named_modules()]
    heads = [h for h in ("classifier", "pooler")
             if any(n == h or n.endswith("." + h) for n in names)]
    source = dict(model=f"smoke: a tiny random DeBERTa-v2 ({model.config.num_hidden_layers} "
                        f"layers, hidden {model.config.hidden_size})" if args.smoke else
                        loading.where(args.model),
                  data=f"GLUE TSVs in {os.path.abspath(args.data_dir)}" if args.data_dir else
                  "smoke: built-in sentences with marker words" if args.smoke else
                  f"Hub: nyu-mll/glue {args.task}")
    return common.train(args, out, model, train_set, collate, evaluate, targets, heads,
                        source=source, processor=tokenizer)


if __name__ == "__main__":
    main()
