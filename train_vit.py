r"""
Fine-tune a ViT image classifier with FlexLoRA (or the LoRA / AdaLoRA baselines) on its MLP layers.

GPU box with internet (google/vit-base-patch16-224-in21k and the dataset from the Hugging Face Hub):
$ python train_vit.py --dataset cifar100 --epochs 10          # the full train/test split
$ python train_vit.py --dataset cifar100 --vtab1k              # VTAB-1k: 800 train / 200 val images

Local arrays (x_train, y_train, x_test, y_test: uint8 N x H x W x C, integer labels),
local checkpoint:
$ python train_vit.py --data ../shared/data/cifar100_1k.npz \
    --model ../shared/models/vit-tiny-cifar10

An image folder: one sub-folder of images per class (optionally inside train/ and test/):
$ python train_vit.py --data path/to/folder

Baselines at FlexLoRA's trainable-parameter count, attention adapted as well:
$ python train_vit.py --dataset cifar100 --vtab1k --method lora --attn

Multi-GPU, one process per GPU (--batch_size stays the global batch), and a merged/ model
for serving:
$ torchrun --standalone --nproc_per_node 4 train_vit.py --dataset cifar100 --vtab1k --save_merged

Offline smoke run (tiny ViT, built-in images, < 1 min on CPU), and the same on 2 CPU processes:
$ python train_vit.py --smoke
$ torchrun --standalone --nproc_per_node 2 train_vit.py --smoke
"""

import train_common as common  # first: Ctrl-C while it loads torch is one line (train_common)

import argparse
import os
import sys
import zipfile

import numpy as np
import torch

import cli
import loading

# -----------------------------------------------------------------------------
# Defaults: VTAB-1k conventions (AdamW, 100 epochs, batch 64, no augmentation); the paper's ViT
# budget is LoRA r = 14 on fc1 and fc2 of every block (1.29M parameters on ViT-B/16, its VTAB-1k
# runs); γ = 0.05 is the authors' usual 0.1 in the paper's normalisation (see train_glue.TASKS)
DEFAULTS = dict(r=14, alpha=16, lr=1e-3, weight_decay=1e-4, epochs=100, batch_size=64, gamma=0.05,
                warmup_ratio=0.1, eval_every=10, log_every=20)
# the window is not given by the paper for ViT: t_w 10% and t_f 50% of the run, Δ = 10 steps
WINDOW = (0.1, 0.5, 10)
MLP = ["fc1", "fc2"]  # transformers 5.x: vit.layers.N.mlp.fc1 / fc2
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]  # vit.layers.N.attention.*, with --attn
HUB = {"cifar100": ("uoft-cs/cifar100", "img", "fine_label"),
       "cifar10": ("uoft-cs/cifar10", "img", "label")}
SMOKE = dict(r=4, alpha=8, lr=1e-2, epochs=4, batch_size=16, t_w=8, t_f=24, delta=2, b0=2,
             eval_every=1, log_every=16, warmup_ratio=0.06,
             model=None, dataset=None)  # its own model and images (metrics.json's run says which)
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# -----------------------------------------------------------------------------
# Data: arrays, folders or the Hub, all as {split: (images, labels)}; images open lazily


class Images(torch.utils.data.Dataset):
    """(HxWx3 uint8 array, label) pairs from arrays, PIL images or file paths."""

    def __init__(self, images, labels):
        self.images, self.labels = images, np.asarray(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        x = self.images[i]
        if isinstance(x, str):
            x = Image.open(x)
        if isinstance(x, Image.Image):
            x = np.asarray(x.convert("RGB"))
        if x.shape[-1] == 1:  # grayscale arrays: three equal channels
            x = np.repeat(x, 3, axis=-1)
        return x, int(self.labels[i])


class HubColumn:
    # a lazy view of one column of a Hugging Face dataset: decodes an image only when asked
    def __init__(self, ds, column):
        self.ds, self.column = ds, column

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[int(i)][self.column]


def load_npz(path):
    if not os.path.isfile(path):
        cli.die(f"--data {path}: no such file or folder")
    if not zipfile.is_zipfile(path):  # np.load would try to unpickle it
        raise ValueError(f"--data {path}: not a .npz archive "
                         f"(np.savez of x_train, y_train, x_test, y_test) nor an image folder")
    try:
        with np.load(path) as f:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f]
            if missing:
                raise ValueError(f"{path} lacks the arrays {missing} (it holds {list(f.keys())})")
            data = {s: (f[f"x_{s}"], f[f"y_{s}"]) for s in ("train", "test")}
    except (OSError, EOFError, zipfile.BadZipFile) as e:  # truncated
        raise ValueError(f"--data {path}: a damaged .npz archive "
                         f"({type(e).__name__}: {e})") from None
    except ValueError as e:
        if "pickle" in str(e):  # object arrays: refused, as np.load refuses to unpickle
            raise ValueError(f"--data {path}: holds object arrays, "
                             f"not uint8 images and integer labels") from None
        raise
    for split, (x, y) in data.items():  # the arrays are checked here, before any training
        if x.ndim != 4 or x.shape[-1] not in (1, 3) or x.dtype != np.uint8:
            raise ValueError(f"{path}: x_{split} must be uint8 images of shape (N, H, W, C) "
                             f"with C = 1 or 3 (channels last), got {x.dtype} {x.shape}")
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{path}: y_{split} must hold one integer label per image, "
                             f"got {y.dtype} {y.shape} for {len(x)} images")
    return data


def load_folder(path, seed):
    """<path>/<class>/*.png, or <path>/{train,test}/<class>/*.png; without test/, 20% is held
    out."""
    def scan(root):
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        files = {c: sorted(os.path.join(root, c, f) for f in os.listdir(os.path.join(root, c))
                           if f.lower().endswith(IMAGE_EXT)) for c in classes}
        return {c: fs for c, fs in files.items() if fs}

    split = lambda s: os.path.join(path, s) if os.path.isdir(os.path.join(path, s)) else None
    train = scan(split("train") or path)
    test_dir = split("train") and (split("test") or split("val"))
    test = scan(test_dir) if test_dir else None  # None: a seeded random 80/20 split below
    if not train:
        raise ValueError(f"--data {path}: no class sub-folders with images "
                         f"({', '.join(IMAGE_EXT)}) found")
    classes = sorted(train)
    if test is not None and set(test) - set(classes):
        raise ValueError(f"--data {path}: the test classes {sorted(set(test) - set(classes))} "
                         f"have no training images")
    files = lambda d: [(f, classes.index(c)) for c in sorted(d) for f in d[c]]
    pairs = files(train)
    if test is None:
        rng = np.random.default_rng(seed).permutation(len(pairs))
        cut = len(pairs) - max(1, len(pairs) // 5)
        test, pairs = [pairs[i] for i in rng[cut:]], [pairs[i] for i in rng[:cut]]
    else:
        test = files(test)
    check_images([f for f, _ in pairs + test], path)
    print(f"image folder {path}: {len(classes)} classes: {', '.join(classes[:5])}"
          + (", ..." if len(classes) > 5 else ""))
    return {s: ([f for f, _ in p], np.array([y for _, y in p]))
            for s, p in (("train", pairs), ("test", test))}


def check_images(files, folder):
    """Decode every image once, before anything is written: a damaged file is a data error now,
    not a crash in the middle of the run (with an --overwrite'n run already gone)."""
    from PIL import Image

    for f in files:
        try:
            with Image.open(f) as image:
                image.load()
        except Exception as e:  # PIL: OSError, SyntaxError, ValueError, DecompressionBombError, ...
            why = f"{type(e).__name__}: {e}"
            raise ValueError(f"--data {folder}: {f} is not a readable image ({why})") from None


def load_hub(name):
    repo, image_col, label_col = HUB.get(name, (name, None, None))
    instead = ("Pass --data with a .npz (x_train, y_train, x_test, y_test) or an image folder, "
               "or --smoke")
    loading.need_hub(f"--dataset {name} ({repo})", instead)
    try:
        import datasets

        ds = datasets.load_dataset(repo)
    except Exception as e:  # no network, no cache: say what to do instead
        cli.die(f"could not load {repo!r} from the Hugging Face Hub ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}). {instead}")
    test = "test" if "test" in ds else "validation"
    features = ds["train"].features
    # other datasets: the first Image column and the first ClassLabel column
    image_col = image_col or next(k for k, f in features.items() if isinstance(f, datasets.Image))
    label_col = label_col or next(k for k, f in features.items()
                                  if isinstance(f, datasets.ClassLabel))
    return {s: (HubColumn(ds[split], image_col), np.array(ds[split][label_col]))
            for s, split in (("train", "train"), ("test", test))}


def smoke_images(n, seed, size=16, classes=4):
    # noise with a bright square at a random place, its colour (red, green, blue, white) the label
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 96, (n, size, size, 3), dtype=np.uint8)
    y = rng.integers(0, classes, n)
    h = size // 2
    for img, c in zip(x, y):
        i, j = rng.integers(0, size - h, 2)
        img[i:i + h, j:j + h, c if c < 3 else slice(None)] += 128
    return x, y


def take(images, labels, idx):
    # a subset of the images, still lazy where they were
    if isinstance(images, np.ndarray):
        return images[idx], labels[idx]
    if isinstance(images, HubColumn):
        return HubColumn(images.ds.select(idx), images.column), labels[idx]
    return [images[i] for i in idx], labels[idx]


def load_data(args):
    if args.data:
        data = (load_npz(args.data) if not os.path.isdir(args.data)
                else load_folder(args.data, args.seed))
    elif args.smoke:
        data = {"train": smoke_images(256, args.seed), "test": smoke_images(64, args.seed + 1)}
    else:
        data = load_hub(args.dataset)
    n_classes = int(np.max(data["train"][1])) + 1  # from the whole training set, before any subset
    if args.vtab1k:  # VTAB-1k: 1000 training images, 800 to train on, 200 to evaluate on
        if len(data["train"][1]) < 1000:
            raise ValueError(f"--vtab1k takes 1000 training images (800 to train on, 200 to "
                             f"evaluate on); this training set has {len(data['train'][1])}")
        order = np.random.default_rng(args.seed).permutation(len(data["train"][1]))[:1000]
        data = {"train": take(*data["train"], order[:800]),
                "test": take(*data["train"], order[800:])}
    if args.max_train_samples and args.max_train_samples < len(data["train"][1]):
        idx = (np.random.default_rng(args.seed).permutation(len(data["train"][1]))
               [:args.max_train_samples])
        data["train"] = take(*data["train"], np.sort(idx))
    # labels must be 0 .. n-1, the test set's within the training set's
    y_train, y_test = data["train"][1], data["test"][1]
    if len(y_train) == 0 or len(y_test) == 0:
        raise ValueError(f"no {'training' if len(y_train) == 0 else 'test'} images")
    if y_train.min() < 0 or y_test.min() < 0:
        raise ValueError("labels must be integers >= 0 (class indices)")
    if y_test.max() >= n_classes:
        raise ValueError(f"test labels go up to {int(y_test.max())}, "
                         f"training labels only to {n_classes - 1}: "
                         f"labels must be class indices 0 .. n-1 shared by both splits")
    return data, n_classes


def default_window(args, total_steps):
    """Each of --t_w, --t_f, --delta not given (None): its WINDOW default, a fraction of the run's
    steps for t_w and t_f. (One given alone was ignored, or crashed the run.)"""
    T = total_steps
    defaults = dict(t_w=round(WINDOW[0] * T), t_f=round(WINDOW[1] * T), delta=WINDOW[2])
    for flag, default in defaults.items():
        if getattr(args, flag) is None:
            setattr(args, flag, default)


# -----------------------------------------------------------------------------
# Model and preprocessing


def image_processor(args, config):
    """Resize and normalise as the model's own image processor says (no torchvision needed)."""
    try:
        from transformers import ViTImageProcessorPil as Processor  # transformers 5: PIL backend
    except ImportError:
        from transformers import ViTImageProcessor as Processor
    if not args.smoke:
        try:
            # preprocessor_config.json, if there is one
            return Processor.from_pretrained(args.model)
        except (OSError, ValueError):
            pass
    # otherwise the config's image_size and, where it carries them, image_mean / image_std
    size = config.image_size
    return Processor(size={"height": size, "width": size},
                     image_mean=getattr(config, "image_mean", [0.5] * 3),
                     image_std=getattr(config, "image_std", [0.5] * 3))


def load_model(args, n_classes):
    if args.smoke:  # a tiny ViT from a config, randomly initialised
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64, num_labels=n_classes,
                           image_mean=[0.5] * 3, image_std=[0.5] * 3)
        return ViTForImageClassification(config)
    from transformers import AutoModelForImageClassification

    # a fresh classifier of the right size (e.g. vit-tiny-cifar10 has 10 labels, CIFAR-100 needs
    # 100); float32 master weights even from a bf16 checkpoint (transformers 5 would keep its dtype)
    return loading.from_pretrained(AutoModelForImageClassification, args.model,
                                   num_labels=n_classes, ignore_mismatched_sizes=True,
                                   dtype=torch.float32, head=["classifier"])


# -----------------------------------------------------------------------------


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    # data
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="cifar100",
                   help="Hub dataset: cifar100, cifar10, or a repo name")
    g.add_argument("--data", help="a .npz (x_train, y_train, x_test, y_test) or an image folder "
                                  "(default: --dataset, from the Hub)")
    g.add_argument("--vtab1k", action="store_true",
                   help="1000 training images: 800 train, 200 evaluation")
    g.add_argument("--max_train_samples", type=int,
                   help="a seeded random subset of the training set (default: all of it)")
    # model
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="google/vit-base-patch16-224-in21k",
                   help="Hub name or local checkpoint")
    g.add_argument("--attn", action="store_true",
                   help="adapt the attention projections as well as fc1/fc2")
    common.add_common_args(parser)
    parser.set_defaults(**DEFAULTS)
    smoke = "--smoke" in (argv if argv is not None else sys.argv[1:])
    if smoke:
        parser.set_defaults(**SMOKE)
    else:  # the window's defaults are fractions of the run (default_window)
        cli.explain_defaults(parser, t_w=f"{WINDOW[0]:.0%} of the run's steps",
                             t_f=f"{WINDOW[1]:.0%} of the run's steps",
                             delta=f"{WINDOW[2]} steps")
    parser.epilog = ("The defaults shown are " + ("--smoke's" if smoke else "the full runs'; "
                                                  "`--smoke --help` shows the smoke run's") + ".")
    args = parser.parse_args(argv)
    for flag in ("model", "dataset"):
        if args.smoke and getattr(args, flag) is not None:
            cli.die(f"--smoke trains its own tiny model on its own images: "
                    f"drop --{flag}, or --smoke")
    return args


def check_args(args):
    """The flags in range (train_common.check_args, then this script's), before anything is
    loaded."""
    common.check_args(args)
    v = args.max_train_samples
    if v is not None and not (isinstance(v, int) and v >= 1):
        cli.die(f"--max_train_samples {v!r}: must be an integer >= 1")


def main(argv=None):
    args = get_args(argv)
    # Ctrl-C: how to continue, not a traceback (from here to the end)
    with cli.resumable(args) as out:
        args = common.launch(args, "vit-" + ("smoke" if args.smoke else os.path.basename(
            os.path.normpath(args.data)).split(".")[0] if args.data else args.dataset),
            check_args, out)
        return run(args, out)


def run(args, out):
    torch.manual_seed(args.seed)  # the new head's initialisation (and the smoke model)
    with cli.user_errors():  # a file that is not what it should be: one line, exit 2
        data, n_classes = load_data(args)
        model = load_model(args, n_classes)
    processor = image_processor(args, model.config)
    train_set, test_set = Images(*data["train"]), Images(*data["test"])
    train_set, held = common.hold_out(train_set, args)
    print(f"{len(train_set):,} training and {len(test_set):,} test images, {n_classes} classes; "
          f"resized to {model.config.image_size}, "
          f"mean {np.round(processor.image_mean, 3).tolist()}")
    default_window(args, args.epochs * -(-len(train_set) // args.batch_size))

    def collate(items):
        images, labels = zip(*items)
        pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]  # (B, 3, H, W)
        return {"pixel_values": pixels, "labels": torch.tensor(labels)}

    def evaluate(net, notes):
        top1 = lambda logits, labels: float((logits.argmax(-1) == labels).mean())
        metrics = {"accuracy": top1(*common.predict(net, test_set, collate, args, notes))}
        if held:  # --holdout: training images kept out of training
            metrics["holdout_accuracy"] = top1(*common.predict(net, held, collate, args, notes))
        return metrics

    with cli.user_errors():
        targets = common.find_targets(model, [MLP + ATTN if args.attn else MLP],
                                      args.target_modules)
    c = model.config
    source = dict(model=f"smoke: a tiny random ViT ({c.num_hidden_layers} layers, "
                        f"hidden {c.hidden_size}, {c.image_size}x{c.image_size} images)"
                        if args.smoke else loading.where(args.model),
                  data=os.path.abspath(args.data) if args.data else
                  "smoke: built-in coloured squares on noise" if args.smoke else
                  f"Hub: {HUB.get(args.dataset, (args.dataset,))[0]}")
    return common.train(args, out, model, train_set, collate, evaluate, targets, ["classifier"],
                        "accuracy", source, processor=processor)


if __name__ == "__main__":
    main()
