"""How sensitive demo.py's run is to float rounding: the same run twice, the second with its first
batch scaled by 1 + 1e-7 (a rounding-sized change), and how far their losses drift apart.

    python -m bench.rounding            # ~10 s: the drift at steps 100, 200 and 250 (before any allocation)

Any change of float summation order (here: the slotted adapter's r_max-wide matmuls) moves this
run by as much, which is why demo.py's final ranks are not the resizing adapter's to the last one.
"""

import numpy as np
import torch

import flexlora as fl
from demo import make_problem


def losses(scale, steps=250, planted=(0, 0, 1, 1, 2, 2, 4, 4, 8, 8)):
    """demo.train's loop, no allocation (its first one is at step 220 with t_warmup = 200)."""
    torch.manual_seed(0)
    teacher, student = make_problem(list(planted), 32, 0)
    fl.inject(student, r"mats\.\d+", r=3, alpha=3)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    out = []
    for t in range(steps):
        x = torch.randn(128, 32) * (scale if t == 0 else 1.0)
        mse = (student(x) - teacher(x)).pow(2).mean()
        (mse + 0.1 * fl.orthogonal_regularizer(student)).backward()
        opt.step()
        opt.zero_grad()
        out.append(mse.item())
    return np.array(out)


if __name__ == "__main__":
    torch.set_num_threads(1)
    a, b = losses(1.0), losses(1.0 + 1e-7)
    drift = np.abs(a - b) / a
    print("relative loss drift after the first batch is scaled by 1 + 1e-7: "
          + ", ".join(f"step {s}: {drift[:s].max():.1e}" for s in (100, 200, 250)))
