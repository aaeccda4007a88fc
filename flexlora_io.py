"""FlexLoRA adapters outside training: save and load them (safetensors, no pickle), merge ΔW
into the base weights, or unload the adapters for serving. Torch, safetensors and flexlora.py.

With its fixed slots a FlexLoRA model's state_dict() (all slots and the live masks) loads with
load_state_dict into a model injected with the same settings, as a Trainer checkpoint does;
save_adapter writes the live directions alone, with the settings a fresh model needs to take
them back at any r.
"""

import json
import os

import torch
import torch.nn as nn

from flexlora import (_RANK_DIM, INITS, FlexLoRALinear, _full, _int, _need, _positive,
                      adapters)

def save_adapter(model: nn.Module, path: str):
    """Save every trainable parameter (adapters and heads): of each adapter its live directions
    only, P (d_out, r), λ (r,), Q (r, d_in) in slot order, with its alpha, r_init, init, r_max
    and the slots they were in (so that a reload puts them back there, where an optimizer's state
    is)."""
    from safetensors.torch import save_file
    layers = adapters(model, required=True)
    tensors = {n: _full(p).detach().contiguous() for n, p in model.named_parameters()
               if p.requires_grad}
    bad = [n for n, t in tensors.items() if not torch.isfinite(t).all()]
    _need(not bad, f"{bad[:3]} hold non-finite values (training diverged): nothing was written")
    for name, layer in layers.items():  # even if the user froze some
        tensors |= {f"{name}.{f}": t.contiguous() for f, t in zip(_RANK_DIM, layer.live_factors())}
    config = {n: {"r": m.r, "r_init": m.r_init, "alpha": m.alpha, "init": m.init,
                  "r_max": m.r_max, "slots": m.live.nonzero().squeeze(1).tolist()}
              for n, m in layers.items()}
    # written beside the file, then renamed over it: a full disk never leaves half of one; a
    # symlink keeps pointing at its (new) target, and an existing file keeps its permissions
    path = os.path.realpath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata={"format": "flexlora", "adapters": json.dumps(config)})
        if os.path.exists(path):
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)  # the old file's permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_adapter(model: nn.Module, path: str):
    """Load a save_adapter() file into a model injected with the same target_modules (any r):
    the ranks, alpha, r_init, init, r_max and slots come from the file (older files: the model's
    r_max, or more if the file's rank needs them, and the first slots). The values are copied:
    the file can change afterwards. Build the optimizer after: where r_max differs from the
    model's, the parameters are new."""
    from safetensors import SafetensorError, safe_open
    layers = adapters(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    _need(not os.path.isdir(path),
          f"{path} is a directory: pass the file that save_adapter() wrote")
    _need(not any(p.is_meta for m in layers.values() for p in m.parameters()),
          "the model is on the meta device (no storage to load into): "
          "model.to_empty(device=...) first, then load_adapter()")
    try:  # read all of it (metadata and tensors in one read), then check all of it
        with safe_open(path, "pt") as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        _need(meta.get("format") == "flexlora" and "adapters" in meta,
              "not a flexlora_io.save_adapter() file")
        config = json.loads(meta["adapters"])  # {module name: {r, r_init, alpha, init, r_max}}
        _need(isinstance(config, dict) and all(isinstance(c, dict) for c in config.values()),
              "its 'adapters' metadata is not a {module name: {r, r_init, alpha, init}} object")
        extra, absent = sorted(set(config) - set(layers)), sorted(set(layers) - set(config))
        _need(not extra and not absent, f"adapters only in the file {extra}, only in the model "
                                        f"{absent}; inject the same target_modules as saved")
        own = [f"{n}.{f}" for n in layers for f in _RANK_DIM]
        _need(set(own) <= set(tensors),
              f"tensors {sorted(set(own) - set(tensors))[:3]} are missing")
        for name, layer in layers.items():
            # P: (d_out, r), λ: (r,), Q: (r, d_in)
            P, lam, Q = (tensors[f"{name}.{f}"] for f in _RANK_DIM)
            r, d_out, d_in = (lam.shape[0] if lam.dim() == 1 else 0, layer.P.shape[0],
                              layer.Q.shape[1])
            ok = r >= 1 and P.shape == (d_out, r) and Q.shape == (r, d_in)
            _need(ok, f"adapter {name}: P {tuple(P.shape)}, λ {tuple(lam.shape)}, "
                      f"Q {tuple(Q.shape)} make no ΔW of the model's shape ({d_out}, {d_in})")
        for name, value in tensors.items():
            have = (f"{tuple(params[name].shape)}" if name in params
                    else "no trainable parameter of that name")
            _need(name in own or have == f"{tuple(value.shape)}",
                  f"{name} of shape {tuple(value.shape)}: the model has {have}")
            _need(torch.isfinite(value).all(),
                  f"{name} holds non-finite values (saved from a diverged run?)")
        bad = [c.get("init") for c in config.values() if c.get("init", "gaussian") not in INITS]
        _need(not bad, f"init {bad[:1]} is none of {INITS}")
        settings = {}
        for n, c in config.items():  # (files from before init: gaussian; before r_max: the model's)
            r = tensors[f"{n}.Lambda"].shape[0]
            r_init, alpha = (_int(f"{n}: r_init", c.get("r_init"), 1),
                             _positive(f"{n}: alpha", c.get("alpha")))
            r_max = _int(f"{n}: r_max (at least its rank)",
                         c.get("r_max", max(r, layers[n].r_max)), r)
            slots = c.get("slots", list(range(r)))
            _need(isinstance(slots, list) and len(set(slots)) == len(slots) == r and
                  all(isinstance(j, int) and 0 <= j < r_max for j in slots),
                  f"{n}: slots {slots!r} are not {r} distinct slots of {r_max}")
            settings[n] = (r_init, alpha, c.get("init", "gaussian"), r_max,
                           alpha / r_init, slots)  # (may overflow)
    except (ValueError, OverflowError, RecursionError,  # JSONDecodeError is a ValueError
            SafetensorError) as e:
        why = (f"its 'adapters' metadata is broken JSON ({e})"
               if isinstance(e, json.JSONDecodeError) else e)
        raise ValueError(f"{path} cannot be loaded, nothing was changed: {why}") from None

    for name, layer in layers.items():  # then apply, knowing that all of it fits
        layer.unmerge()
        r_init, alpha, init, r_max, scaling, slots = settings[name]
        if r_max != layer.r_max:  # other slots: new parameters (zeros, filled below)
            for f, d in _RANK_DIM.items():
                old = getattr(layer, f)
                shape = list(old.shape)
                shape[d] = r_max
                setattr(layer, f, nn.Parameter(old.new_zeros(shape),
                                               requires_grad=old.requires_grad))
            layer.live = torch.zeros(r_max, dtype=torch.bool, device=layer.live.device)
        idx = torch.tensor(slots, dtype=torch.long, device=layer.live.device)
        with torch.no_grad():
            for f, d in _RANK_DIM.items():  # the saved slots live, the rest dead at zero
                param = getattr(layer, f)
                param.zero_().index_copy_(d, idx,
                                          tensors.pop(f"{name}.{f}").to(param.device, param.dtype))
            layer.live.zero_()[idx] = True
        layer.r_init, layer.alpha, layer.init, layer.scaling = r_init, alpha, init, scaling
    with torch.no_grad():
        for name, value in tensors.items():  # the other trainable parameters, e.g. the classifier
            params[name].copy_(value)


def _check_not_shared(model: nn.Module):
    # a base weight that another module also uses (a tied lm_head, a Linear in two places) would
    # carry ΔW there too
    layers, names = adapters(model), {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    shared = [names[id(m.base.weight)] for m in layers.values()
              if len(names[id(m.base.weight)]) > 1]
    if shared:
        raise ValueError(f"the weight of {shared[0][0]} is also {shared[0][1:]}: merging would "
                         f"change those too. Untie it (e.g. a tied lm_head: clone the weight), or "
                         f"keep the adapters unmerged")


def merge(model: nn.Module):
    """Fold every adapter into its base weight (W ← W + ΔW); unmerge(model) undoes it."""
    _check_not_shared(model)
    for layer in adapters(model).values():
        layer.merge()


def unmerge(model: nn.Module):
    """Undo merge()."""
    for layer in adapters(model).values():
        layer.unmerge()


def unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and put its nn.Linear back, in place, to save and serve the plain model
    (a bare FlexLoRALinear: its merged nn.Linear)."""
    if isinstance(model, FlexLoRALinear):
        model.merge()
        return model.base
    _check_not_shared(model)
    for name, layer in adapters(model).items():
        layer.merge()  # W ← W + ΔW
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base)
    return model
