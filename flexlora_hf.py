"""flexlora with Hugging Face: a Trainer callback, and export to a standard PEFT LoRA adapter.

    callback = FlexLoRACallback(model, gamma=0.1, b0=4, t_warmup=200, t_final=200, interval=10)
    Trainer(model, args, train_dataset=ds, callbacks=[callback]).train()
    export_peft(model, "adapter")  # then: PeftModel.from_pretrained(base, "adapter")
    flexlora_io.unload(model).save_pretrained("merged")  # a plain model again, for serving

Unlike flexlora.py this file imports transformers (and peft, inside export_peft).
"""

import json
import math
import numbers
import os
import re
import shutil

import torch
import torch.nn as nn
from transformers import TrainerCallback

import flexlora

ALLOCATOR_FILE = "flexlora_allocator.json"  # written into every Trainer checkpoint folder

# -----------------------------------------------------------------------------
# Hugging Face Trainer


class FlexLoRACallback(TrainerCallback):
    """FlexLoRA inside transformers.Trainer, added in one line: callbacks=[FlexLoRACallback(...)].

    model: the FlexLoRA-injected model given to the Trainer; build the callback before the
        Trainer (see gradient accumulation below).
    gamma: γ of the orthogonal regulariser, as in train_glue.py: the training loss becomes
        task loss + γ · R, the paper's loss (R = flexlora.orthogonal_regularizer).
    allocator_kwargs: flexlora.RankAllocator's arguments (b0, t_warmup, t_final, interval, ...);
        total_steps defaults to the Trainer's number of optimizer steps.

    What it does:
    - the regulariser: a forward hook on the model adds γ · R to the model's output loss in
      training mode (a callback cannot touch the loss; the hook lives from train begin to end).
    - allocation: RankAllocator.step(t, optimizer) in on_step_end, which the Trainer calls after
      optimizer.step(), the LR scheduler and zero_grad, with t = state.global_step = optimizer
      steps taken, the plain loop's t.
    - gradient accumulation: sets model.accepts_loss_kwargs = False, so the Trainer passes no
      num_items_in_batch and divides each micro-batch's loss (task mean + γ · R) by the
      accumulation steps, as a plain loop over the whole batch would. Otherwise the Trainer
      trusts the model to divide by num_items_in_batch, which most heads (BERT's classifier)
      ignore: with accumulation k their gradients come out k times too large. (Causal LMs then
      weigh each micro-batch's mean token loss equally, not each token.) A Trainer built
      before the callback still passes num_items_in_batch: with accumulation > 1 that raises.
    - checkpoints: on_save writes the allocator's state (generator, history, config), the
      rank pattern and each adapter's settings to <checkpoint>/flexlora_allocator.json. The
      adapters never change shape, so the Trainer's own load_state_dict restores their slots and
      live masks; the allocator's state is read in on_train_begin from
      <output_dir>/checkpoint-<step>, or from args.resume_from_checkpoint if set there, and must
      have the model's r_init and alpha.
    - several processes (torchrun, accelerate launch): the Trainer's DDP wraps the model once;
      every process takes the same decisions from the same all-reduced weights, and
      RankAllocator.step checks that their live slots agree after each allocation.
    """

    def __init__(self, model: nn.Module, gamma: float, **allocator_kwargs):
        flexlora.adapters(model, required=True)
        if not (isinstance(gamma, numbers.Real) and not isinstance(gamma, bool)
                and 0 <= gamma < math.inf):
            raise ValueError(f"gamma must be a finite number >= 0 (γ of the loss task + γ·R), "
                             f"got {gamma!r}")
        # a bad setting fails here, not at train begin (total_steps is not known before then)
        flexlora.RankAllocator(model, **{"total_steps": 10 ** 9, **allocator_kwargs})
        self.model, self.gamma, self.allocator_kwargs = model, float(gamma), allocator_kwargs
        self.allocator = None  # built in on_train_begin, once the Trainer knows its step count
        self.grad_accum = 1
        self._hooks = []
        model.accepts_loss_kwargs = False  # read by Trainer.__init__: see "gradient accumulation"

    def on_train_begin(self, args, state, control, **kwargs):
        settings = dict(self.allocator_kwargs)
        T = settings.pop("total_steps", state.max_steps)
        if T != state.max_steps:
            raise ValueError(f"total_steps={T} but the Trainer will take {state.max_steps} "
                             "optimizer steps: leave total_steps out to use the Trainer's")
        self.allocator = flexlora.RankAllocator(self.model, total_steps=T, **settings)
        if state.global_step > 0:  # resumed: the ranks came with the weights, now the allocator
            saved = _read_allocator(args, state.global_step)
            mine = _settings(self.model)
            if saved.get("adapters", mine) != mine:
                raise ValueError("the checkpoint's adapters were "
                                 f"{_first_difference(saved['adapters'], mine)}: "
                                 "inject the model with the r, alpha and init it was trained with")
            self.allocator.load_state_dict(saved)
        self.grad_accum = args.gradient_accumulation_steps
        self._remove_hooks()
        self._hooks = [self.model.register_forward_hook(self._add_regularizer, with_kwargs=True)]

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        # after optimizer.step(), the LR scheduler and zero_grad; global_step = steps taken
        # rewrites slots and their Adam state in place
        self.allocator.step(state.global_step, optimizer)

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:  # the main process writes
            return
        d = self.allocator.state_dict()
        d["generator"] = d["generator"].tolist()  # a uint8 tensor
        d["step"], d["ranks"] = state.global_step, flexlora.rank_pattern(self.model)
        d["adapters"] = _settings(self.model)
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, ALLOCATOR_FILE), "w") as f:
            json.dump(d, f)

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_hooks()

    def _remove_hooks(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _add_regularizer(self, module, args, kwargs, output):
        if not (module.training and torch.is_grad_enabled()):
            return None  # evaluation: the task loss alone
        if "num_items_in_batch" in kwargs and self.grad_accum > 1:
            raise RuntimeError("the Trainer passes num_items_in_batch and will not divide the "
                               "loss by the accumulation steps: build FlexLoRACallback before "
                               "the Trainer (it sets model.accepts_loss_kwargs = False)")
        if self.gamma == 0:
            return None
        if isinstance(output, dict):  # a ModelOutput, which leaves out a None loss
            loss = output.get("loss")
        else:  # a tuple (return_dict=False) starts with the loss only if there is one
            loss = output[0] if torch.is_tensor(output[0]) and output[0].ndim == 0 else None
        if loss is None:
            raise RuntimeError("the model returned no loss to add γ·R to (no labels, or a "
                               "Trainer compute_loss_func / label smoothing): pass gamma=0 and "
                               "add gamma * flexlora.orthogonal_regularizer(model) yourself")
        loss = loss + self.gamma * flexlora.orthogonal_regularizer(module)
        if isinstance(output, dict):
            output["loss"] = loss
            return output
        return (loss,) + tuple(output[1:])


def _settings(model) -> dict:
    # what a checkpoint's tensors do not say: each adapter's r_init, alpha (s = alpha / r_init)
    # and init
    return {n: [m.r_init, m.alpha, m.init] for n, m in flexlora.adapters(model).items()}


def _first_difference(saved: dict, mine: dict) -> str:
    name = next((n for n in sorted(set(saved) | set(mine)) if saved.get(n) != mine.get(n)), None)
    return f"{name}: [r_init, alpha, init] {saved.get(name)}, the model's {mine.get(name)}"


def _read_allocator(args, step: int) -> dict:
    folders = [os.path.join(args.output_dir, f"checkpoint-{step}")]
    if isinstance(args.resume_from_checkpoint, str):
        folders.insert(0, args.resume_from_checkpoint)
    for folder in folders:
        path = os.path.join(folder, ALLOCATOR_FILE)
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    d = json.load(f)
                ok = isinstance(d, dict) and isinstance(d.get("generator"), list)
            except ValueError:  # broken JSON, not UTF-8
                ok = False
            if not ok:
                raise ValueError(f"{path} is damaged (not the JSON object FlexLoRACallback "
                                 "writes): resume from an earlier checkpoint, or start again")
            if d.get("step") == step:
                d["generator"] = torch.tensor(d["generator"], dtype=torch.uint8)
                return d
    raise FileNotFoundError(f"resuming at step {step}, but no {ALLOCATOR_FILE} of that step in "
                            f"{folders}: resume from a checkpoint of this output_dir, or set "
                            "TrainingArguments(resume_from_checkpoint=...) to its folder too")


# -----------------------------------------------------------------------------
# Export to a standard PEFT LoRA adapter


def export_peft(model: nn.Module, out_dir: str, **config_kwargs):
    """Write a PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors) that
    PeftModel.from_pretrained(base, out_dir) loads into the same function, any ranks included.

    The mapping (exact up to rounding): lora_A = Q, lora_B = P diag(λ), r = the current rank,
    lora_alpha = s · r so that PEFT's scaling lora_alpha / r is FlexLoRA's s = alpha / r_init.
    Ranks and alphas go per module in rank_pattern / alpha_pattern, keyed by the escaped full
    module name (PEFT matches a key as the regex `(.*\\.)?key$`). Modules holding trainable
    parameters outside the adapters (the heads: classifier, pooler) go in modules_to_save.
    config_kwargs go to peft.LoraConfig (e.g. task_type, base_model_name_or_path). Returns
    the LoraConfig.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    layers = flexlora.adapters(model, required=True)
    if not str(out_dir) or os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"export_peft writes a folder: {str(out_dir)!r} is "
                         f"{'empty' if not str(out_dir) else 'a file'}")
    if any(m.merged for m in layers.values()):
        raise ValueError("an adapter is merged: call flexlora_io.unmerge(model) before export_peft")
    dropouts = {m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0 for m in layers.values()}
    if len(dropouts) > 1:
        raise ValueError(f"the adapters have different dropouts {sorted(dropouts)}: PEFT has one")

    # the heads: the modules that own a trainable parameter other than P, Λ, Q
    heads = set()
    for name, p in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if not p.requires_grad or (owner in layers and leaf in ("P", "Lambda", "Q")):
            continue
        if owner == "" or any(owner.startswith(a + ".") for a in layers):  # e.g. a base bias
            raise ValueError(f"trainable parameter {name} has no place in a PEFT LoRA adapter: "
                             "freeze it, or keep it in a module of its own")
        heads.add(owner)
    heads = sorted(heads)

    # PEFT finds a target by dotted suffix and a module to save by plain suffix: refuse a name
    # that would catch another module too (dotted: layer.1.x never catches layer.11.x)
    modules = [n for n, _ in model.named_modules()]
    for a in layers:
        if any(n.endswith("." + a) for n in modules):
            raise ValueError(f"adapter {a} ends another module's name: PEFT would adapt both")
    for h in heads:
        clash = [n for n in modules if n != h and n.endswith(h)]
        clash += [a for a in layers if a.startswith(h + ".")]  # PEFT adapts nothing inside it
        if clash:
            raise ValueError(f"head {h}: PEFT's modules_to_save would also take {clash[:3]}")

    first = next(iter(layers.values()))
    config = LoraConfig(
        r=first.r_init, lora_alpha=first.alpha, target_modules=list(layers),
        rank_pattern={re.escape(n): m.r for n, m in layers.items()},
        alpha_pattern={re.escape(n): m.scaling * m.r for n, m in layers.items()},  # alpha / r = s
        lora_dropout=dropouts.pop(), use_rslora=False, bias="none",
        modules_to_save=heads or None, **config_kwargs)
    tensors = {}
    for name, m in layers.items():
        P, lam, Q = m.live_factors()  # the live slots: (d_out, r), (r,), (r, d_in)
        tensors[f"base_model.model.{name}.lora_A.weight"] = Q.contiguous()  # (r, d_in)
        tensors[f"base_model.model.{name}.lora_B.weight"] = (P * lam).contiguous()  # (d_out, r)
    for h in heads:  # the whole module, as PEFT's ModulesToSaveWrapper saves it
        for k, v in model.get_submodule(h).state_dict().items():
            tensors[f"base_model.model.{h}.{k}"] = v.detach().contiguous()
    # written into a fresh folder beside out_dir, then moved in: a failed write (a full disk) leaves
    # an older export in out_dir whole, never a new config beside old weights
    tmp = f"{os.path.normpath(out_dir)}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        config.save_pretrained(tmp)
        save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        os.makedirs(out_dir, exist_ok=True)
        for f in ("adapter_model.safetensors", "adapter_config.json"):
            os.replace(os.path.join(tmp, f), os.path.join(out_dir, f))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return config
