"""Run a training script with a variant score of the allocation rule (bench/alloc.py's):

    python -m bench.variant utilization train_glue.py --task rte --model PATH --data_dir DIR

In this process only, flexlora.RankAllocator becomes alloc.VariantAllocator with that score;
everything else is the script's own. bench/quality.py runs "flexlora-util" this way.
"""

import functools
import runpy
import sys

import flexlora
from bench.alloc import SCORES, VariantAllocator

if __name__ == "__main__":
    score, script, *argv = sys.argv[1:]
    if score not in SCORES:
        sys.exit(f"unknown score {score!r}: choose from {', '.join(SCORES)}")
    flexlora.RankAllocator = functools.partial(VariantAllocator, score=score)
    sys.argv = [script] + argv
    runpy.run_path(script, run_name="__main__")
