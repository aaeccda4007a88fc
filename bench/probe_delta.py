"""How far a finished PEFT run (train_glue.py --method lora | adalora) moved from its start.

    python -m bench.probe_delta runs/glue-cola-adalora-...     # prints one JSON line

Reloads the run's base model and saved `adapter/`, then reports the mean ‖ΔW‖_F over the adapted
matrices and its ratio to ‖W‖, AdaLoRA's |E| over the unmasked directions, and the dev score and
share of dev predicted as class 0, as trained and with ΔW switched off (lora_E, or LoRA's lora_B,
zeroed; the head kept): does the adapter carry the predictions? (bench/README.md, "The AdaLoRA
baseline").
"""

import json
import os
import sys

import numpy as np
import torch

import train_common as common
import train_glue


def deltas(net, adalora):
    """[(ΔW, W)] of every adapted matrix: AdaLoRA's B (A ⊙ E) s / ranknum, LoRA's B A s."""
    from peft.tuners.lora import LoraLayer
    out = []
    for m in net.modules():
        if isinstance(m, LoraLayer) and "default" in m.lora_A:
            if adalora:
                A, B, E = (getattr(m, k)["default"].float() for k in ("lora_A", "lora_B", "lora_E"))
                dw = B @ (A * E) * m.scaling["default"] / (m.ranknum["default"] + 1e-5)
            else:
                dw = m.lora_B["default"].weight @ m.lora_A["default"].weight * m.scaling["default"]
            out.append((m, dw, m.base_layer.weight))
    return out


def main(run):
    import peft
    from transformers import DataCollatorWithPadding

    cfg = json.load(open(os.path.join(run, "metrics.json")))["config"]
    args = train_glue.get_args(["--task", cfg["task"], "--model", cfg["model"], "--data_dir",
                                cfg["data_dir"], "--max_length", str(cfg["max_length"]),
                                "--method", cfg["method"]])
    torch.manual_seed(0)
    data = train_glue.load_data(args)
    model, tok = train_glue.load_model(args)
    net = peft.PeftModel.from_pretrained(model, os.path.join(run, "adapter")).eval()
    dev, collate = train_glue.encode(tok, *data["dev"], args.max_length), DataCollatorWithPadding(tok)

    def score():
        logits, labels = common.predict(net, dev, collate, args)
        metrics = train_glue.glue_metrics(cfg["task"], logits, labels)
        return metrics[next(iter(metrics))], float((np.argmax(np.asarray(logits), -1) == 0).mean())

    adalora = cfg["method"] == "adalora"
    with torch.no_grad():
        mats = deltas(net, adalora)
        out = dict(run=run, dW=float(np.mean([dw.norm().item() for _, dw, _ in mats])),
                   dW_over_W=float(np.mean([dw.norm().item() / w.norm().item() for _, dw, w in mats])))
        if adalora:
            E = torch.cat([m.lora_E["default"].flatten() for m, _, _ in mats]).abs()
            out.update(E_mean_live=float(E[E > 0].mean()), E_max=float(E.max()))
        out["score"], out["share_class_0"] = score()
        for m, _, _ in mats:
            (m.lora_E["default"] if adalora else m.lora_B["default"].weight).zero_()
        out["score_without_dW"], out["share_class_0_without_dW"] = score()
    print(json.dumps(out))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bench.probe_delta RUN_DIR")
    main(sys.argv[1])
