"""Pictures of where the rank went in a run of train_glue.py / train_vit.py, from its rank_history.json.

    python -m bench.plots RUN_DIR [RUN_DIR ...]    # writes RUN_DIR/ranks.png and RUN_DIR/rank_history.png

ranks.png: the final rank per layer x module type; rank_history.png: the total rank per module type
over training (AdaLoRA's: directions left unmasked).
"""

import argparse
import json
import os
import re

import numpy as np


def _layer_and_type(name):
    # "deberta.encoder.layer.3.attention.self.query_proj" -> (3, "attention.self.query_proj")
    m = re.search(r"\.(\d+)\.(.+)$", name)
    return (int(m[1]), m[2]) if m else (0, name)


def plot_ranks(final, initial, history, T, out_dir, method):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, fig in (("ranks.png", ranks_figure(final, method)),
                      ("rank_history.png", history_figure(final, initial, history, T, method))):
        fig.savefig(os.path.join(out_dir, name), dpi=120, bbox_inches="tight")
        plt.close(fig)


def ranks_figure(final, method):
    """The final rank per layer x module type, in colour (the colour bar's ticks: integers)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    parsed = {n: _layer_and_type(n) for n in final}
    layers = sorted({l for l, _ in parsed.values()})
    types = list(dict.fromkeys(ty for _, ty in parsed.values()))
    grid = np.full((len(types), len(layers)), np.nan)
    for n, (l, ty) in parsed.items():
        grid[types.index(ty), layers.index(l)] = final[n]
    fig, ax = plt.subplots(figsize=(1.5 + 0.5 * len(layers), 1 + 0.45 * len(types)))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    for (y, x), v in np.ndenumerate(grid):
        if not np.isnan(v):
            ax.text(x, y, int(v), ha="center", va="center", color="w", fontsize=8)
    ax.set(xticks=range(len(layers)), xticklabels=layers, yticks=range(len(types)), yticklabels=types,
           xlabel="layer", title=f"{method}: final rank (total {int(np.nansum(grid))})")
    fig.colorbar(im, ax=ax, ticks=MaxNLocator(integer=True))  # ranks are integers: no 11.25
    return fig


def history_figure(final, initial, history, T, method):
    """The total rank per module type over training. Module types whose totals are the same at
    every step share one line, labelled "a = b" (one drawn over the other hid it); the other lines
    differ in style where they overlap for a while."""
    import matplotlib.pyplot as plt

    types = list(dict.fromkeys(_layer_and_type(n)[1] for n in final))
    points = [(0, initial)] + [(h["step"], h["ranks"]) for h in history] + [(T, final)]
    lines = {}  # {the totals over training: the module types that have them}
    for ty in types:
        ys = tuple(sum(r for n, r in ranks.items() if _layer_and_type(n)[1] == ty)
                   for _, ranks in points)
        lines.setdefault(ys, []).append(ty)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (ys, same) in enumerate(lines.items()):
        ax.step([s for s, _ in points], ys, where="post", label=" = ".join(same),
                linestyle=("-", "--", "-.", ":")[i % 4], linewidth=1.5)
    ax.set(xlabel="step", ylabel="total rank", title=f"{method}: rank per module type")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


def plot_run(run_dir):
    with open(os.path.join(run_dir, "rank_history.json")) as f:
        h = json.load(f)
    with open(os.path.join(run_dir, "metrics.json")) as f:
        T = json.load(f)["train_steps"]
    plot_ranks(h["final"], h["initial"], h["history"], T, run_dir, h["method"])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories, each with rank_history.json and metrics.json")
    for run in ap.parse_args().runs:
        plot_run(run)
        print(f"wrote {run}/ranks.png and {run}/rank_history.png")
