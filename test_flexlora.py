"""Tests for flexlora.py: each behaviour of the core, computed two ways where possible.

    python -m pytest -q test_flexlora.py
"""

import copy
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import flexlora as fl
import flexlora_io as fio
from demo import Matrices, make_problem, train

# most tests allocate without an optimizer on purpose; the warning itself has its own test
pytestmark = pytest.mark.filterwarnings("ignore:RankAllocator.step.t. rewrote adapter slots with no optimizer")

# -----------------------------------------------------------------------------
# helpers


def set_lambda(layer, values):
    """Give an adapter exactly these λ in its first len(values) slots, with fresh random P and Q
    there; the other slots dead, at zero (in place: the parameters stay the same objects)."""
    values = torch.as_tensor(values, dtype=layer.P.dtype)
    r, (d_out, d_in), n = len(values), (layer.P.shape[0], layer.Q.shape[1]), layer.r_max
    assert r <= n, "more λ than slots"
    with torch.no_grad():
        layer.P.zero_()[:, :r] = torch.randn(d_out, r, dtype=layer.P.dtype) * 0.3
        layer.Q.zero_()[:r] = torch.randn(r, d_in, dtype=layer.Q.dtype) * 0.3
        layer.Lambda.zero_()[:r] = values
        layer.live.copy_(torch.arange(n) < r)


def matrices(n=4, d=8, r=3, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = Matrices(n, d).to(dtype)
    fl.inject(model, r"mats\.\d+", r=r, alpha=2 * r)
    return model


def allocator(model, b0=1, interval=1, **kw):
    """An allocator that allocates b0 at every step from t = 1 (constant schedule)."""
    return fl.RankAllocator(model, b0=b0, t_warmup=0, t_final=0, total_steps=10 ** 6,
                            interval=interval, schedule="constant", **kw)


FLAT, PEAKED = [1.0, 1.0, 1.0], [5.0, 0.01, 0.0]  # entropy 1 and ≈ 0


def same(a, b):
    """Equal nested dicts / lists / tensors (exact, shapes included)."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def snapshot(model, opt=None):
    """What a failing call must leave as it was: the modules, the parameter objects, their values
    and flags, and the optimizer (its state, and the parameter objects it holds)."""
    return (dict(model.named_modules()),
            {n: (p, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
            opt and copy.deepcopy(opt.state_dict()), opt and [list(g["params"]) for g in opt.param_groups])


def assert_unchanged(model, snap, opt=None):
    modules, params, opt_state, opt_params = snap
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(m is modules[n] for n, m in model.named_modules())
    now = dict(model.named_parameters())
    assert now.keys() == params.keys()
    for n, (p, value, flag) in params.items():
        assert now[n] is p and torch.equal(p, value) and p.requires_grad == flag, n
    if opt is not None:
        assert same(opt.state_dict(), opt_state)
        assert all(a is b for g, held in zip(opt.param_groups, opt_params) for a, b in zip(g["params"], held))

# -----------------------------------------------------------------------------
# 1. the adapter


def test_adapter_matches_dense_formula_in_float64():
    torch.manual_seed(0)
    base = nn.Linear(7, 5, dtype=torch.float64)
    layer = fl.FlexLoRALinear(base, r=3, alpha=6)
    with torch.no_grad():
        layer.Lambda.normal_()
    x = torch.randn(2, 4, 7, dtype=torch.float64)
    s = 6 / 3
    W = base.weight + s * layer.P @ torch.diag(layer.Lambda) @ layer.Q  # W + s·P diag(λ) Q
    expected = x @ W.T + base.bias
    assert torch.allclose(layer(x), expected, atol=1e-12)
    assert torch.allclose(layer.delta_weight(), s * layer.P @ torch.diag(layer.Lambda) @ layer.Q)


def test_delta_w_is_zero_at_init_and_base_gets_no_gradient():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    layer = fl.FlexLoRALinear(base, r=2, alpha=4)
    x = torch.randn(3, 6)
    assert torch.equal(layer.delta_weight(), torch.zeros(4, 6))
    assert torch.equal(layer(x), base(x))
    layer(x).pow(2).sum().backward()
    assert base.weight.grad is None and base.bias.grad is None
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.Lambda.grad is not None and layer.Lambda.grad.abs().sum() > 0
    assert layer.scaling == 2.0 and layer.r == 2


def test_lora_init_starts_p_at_zero_and_gives_it_a_gradient_at_once():
    # the paper's init: λ = 0, so P and Q get no gradient at step 1 (ΔW sits on a saddle); init="lora":
    # P = 0, λ = 1, and P's gradient is s·G Qᵀ diag(λ), as LoRA's B's is s·G Aᵀ
    torch.manual_seed(0)
    x = torch.randn(3, 6)
    for init in ("gaussian", "lora"):
        base = nn.Linear(6, 4)
        layer = fl.FlexLoRALinear(base, r=2, alpha=4, init=init, r_max=2)  # (no dead slot)
        assert torch.equal(layer.delta_weight(), torch.zeros(4, 6)) and torch.equal(layer(x), base(x))
        G = torch.randn(3, 4)  # ∂loss/∂y
        (layer(x) * G).sum().backward()
        expected_P = layer.scaling * (G.T @ x) @ layer.Q.T * layer.Lambda  # s · G Qᵀ diag(λ): (4, 6) x (6, 2)
        assert torch.allclose(layer.P.grad, expected_P.detach(), atol=1e-6)
        if init == "gaussian":
            assert torch.equal(layer.P.grad, torch.zeros(4, 2)) and torch.equal(layer.Q.grad, torch.zeros(2, 6))
        else:
            assert torch.equal(layer.P, torch.zeros(4, 2)) and torch.equal(layer.Lambda, torch.ones(2))
            assert layer.P.grad.abs().min() > 0 and layer.Q.std().item() == pytest.approx(fl.SIGMA_INIT, rel=0.5)
    with pytest.raises(ValueError, match="init must be 'gaussian'"):
        fl.inject(Matrices(2, 4), r"mats\.\d+", r=2, alpha=4, init="zeros")


def test_lora_init_scores_and_prunes_by_the_norm_of_each_term_and_grows_at_p_zero():
    # with P at 0 and λ near 1, λ says nothing: spectra() gives |λ_i|·‖p_i‖·‖q_i‖, the norm of each term
    torch.manual_seed(0)
    model = Matrices(3, 8)
    fl.inject(model, r"mats\.\d+", r=3, alpha=6, init="lora", r_max=4)
    layers = list(fl.adapters(model).values())
    with torch.no_grad():
        for m in layers:
            m.P[:, :3].normal_()  # the live slots
        layers[0].P[:, 1] *= 1e-3  # the weakest term of mats.0 (its λ is not the smallest)
        layers[0].Lambda[:3] = torch.tensor([0.5, 2.0, 1.0])
        layers[0].P[:, 0] *= 10  # one strong term: mats.0 is the most peaked
    strength = layers[0].Lambda.abs() * layers[0].P.norm(dim=0) * layers[0].Q.norm(dim=1)
    assert torch.allclose(allocator(model).spectra()["mats.0"], strength[:3].detach())  # live slots only
    x = torch.randn(5, 8)
    before = model(x)
    rec = allocator(model, b0=1).step(1)
    assert rec["pruned"] == ["mats.0"] and rec["removed"] == {"mats.0": 1}
    grown = fl.adapters(model)[rec["expanded"][0]]  # in its first dead slot, 3
    assert grown.live[3] and grown.P[:, 3].abs().sum() == 0 and grown.Lambda[3] == 1 and grown.Q[3].abs().sum() > 0
    k = int(rec["expanded"][0].split(".")[1])
    assert torch.allclose(model(x)[:, k], before[:, k], atol=1e-6)  # the new term adds nothing yet


# -----------------------------------------------------------------------------
# 2. spectral entropy


def test_spectral_entropy_values():
    assert fl.spectral_entropy(torch.ones(8)).item() == pytest.approx(1.0, abs=1e-6)
    assert fl.spectral_entropy(torch.tensor([0.0, 3.0, 0.0])).item() == pytest.approx(0.0, abs=1e-6)
    assert fl.spectral_entropy(torch.tensor([2.5])).item() == 0.0  # r = 1: our convention
    assert fl.spectral_entropy(torch.zeros(4)).item() == 0.0  # nothing learned yet
    # a two-direction spectrum with energies 0.8/0.2 by hand: −(0.8 ln 0.8 + 0.2 ln 0.2) / ln 2
    lam = torch.tensor([0.8, 0.2]).sqrt()
    expected = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2)) / math.log(2)
    assert fl.spectral_entropy(lam).item() == pytest.approx(expected, abs=1e-6)
    # idle directions barely lower it: 16 equal directions of 26 score log 16 / log 26 = 0.85
    assert fl.spectral_entropy(torch.tensor([1.0] * 16 + [0.0] * 10)).item() == pytest.approx(0.851, abs=1e-3)


def test_spectral_entropy_is_sign_and_scale_safe():
    torch.manual_seed(0)
    lam = torch.randn(6)
    ref = fl.spectral_entropy(lam)
    assert fl.spectral_entropy(-lam) == ref
    for scale in (1e-30, 1e30):
        v = fl.spectral_entropy(lam * scale)
        assert torch.isfinite(v) and v.item() == pytest.approx(ref.item(), abs=1e-6)
    assert fl.spectral_entropy(torch.full((5,), 1e-30)).item() == pytest.approx(1.0, abs=1e-6)
    assert fl.spectral_entropy(lam.bfloat16()).dtype == torch.float64  # computed wide
    for _ in range(200):
        v = fl.spectral_entropy(torch.randn(int(torch.randint(1, 20, ()))) ** 3).item()
        assert 0.0 <= v <= 1.0


def test_spectral_entropy_refuses_non_finite_and_takes_a_list():
    for bad in ([float("nan"), 1.0, 2.0], [float("inf"), 1.0]):  # not a silent NaN: diverged
        with pytest.raises(ValueError, match="non-finite λ"):
            fl.spectral_entropy(torch.tensor(bad))
    assert fl.spectral_entropy([1.0, 2.0]) == fl.spectral_entropy(torch.tensor([1.0, 2.0]))


# -----------------------------------------------------------------------------
# 3. budget schedule


def test_budget_window_and_cubic_decay():
    b0, tw, tf, T = 8, 100, 200, 1100
    bs = [fl.budget(t, b0, tw, tf, T) for t in range(0, T + 2)]
    assert all(b == 0 for b in bs[: tw + 1])  # warm-up, t ≤ t_w
    assert all(b == 0 for b in bs[T - tf + 1:])  # final phase, t > T − t_f
    assert bs[tw + 1] == b0  # b0 just after the warm-up
    assert all(x >= y for x, y in zip(bs, bs[1:]) if x > 0)  # never increasing in the window
    t = tw + 400  # p = 0.5: 8 · 0.5³ = 1
    assert fl.budget(t, b0, tw, tf, T) == round(b0 * (1 - 0.5) ** 3) == 1
    t = tw + 100  # p = 0.125: 8 · 0.875³ = 5.36
    assert fl.budget(t, b0, tw, tf, T) == 5


def test_budget_constant_schedule():
    assert [fl.budget(t, 3, 2, 2, 10, "constant") for t in range(12)] == [0, 0, 0] + [3] * 6 + [0, 0, 0]


@pytest.mark.parametrize("args, msg", [
    ((1, -1, 0, 0, 10), "b0"),
    ((1, 2, -1, 0, 10), "t_warmup"),
    ((1, 2, 0, -3, 10), "t_final"),
    ((1, 2, 5, 5, 10), "total_steps"),
    ((1, 2.5, 0, 0, 10), "b0"),
])
def test_budget_validates(args, msg):
    with pytest.raises(ValueError, match=msg):
        fl.budget(*args)
    with pytest.raises(ValueError, match="schedule"):
        fl.budget(1, 2, 0, 0, 10, schedule="linear")


@pytest.mark.parametrize("t", [float("nan"), "5", 5.0, True, -1, None])
def test_budget_wants_an_integer_step(t):
    with pytest.raises(ValueError, match="t must be an integer"):
        fl.budget(t, 2, 0, 0, 10)


# -----------------------------------------------------------------------------
# 4. orthogonal regulariser


def test_orthogonal_regularizer():
    model = matrices(n=2, d=8, r=3)
    with torch.no_grad():
        for layer in fl.adapters(model).values():  # orthonormal columns of P and rows of Q (live slots)
            layer.P[:, :3] = torch.linalg.qr(torch.randn(8, 3))[0]
            layer.Q[:3] = torch.linalg.qr(torch.randn(8, 3))[0].T
    R = fl.orthogonal_regularizer(model)
    assert R.dim() == 0 and R.item() < 1e-5
    R.backward()  # differentiable at the optimum: no NaN from the norm's gradient
    assert all(torch.isfinite(p.grad).all() for n, p in model.named_parameters() if n.endswith((".P", ".Q")))

    model = matrices(n=2, d=8, r=3)  # random init: by hand, mean over adapters
    eye = torch.eye(3)
    by_hand = sum(torch.linalg.norm(m.P[:, :3].T @ m.P[:, :3] - eye) + torch.linalg.norm(m.Q[:3] @ m.Q[:3].T - eye)
                  for m in fl.adapters(model).values()) / 2
    R = fl.orthogonal_regularizer(model)
    assert R.item() > 1 and R.item() == pytest.approx(by_hand.item(), rel=1e-6)
    R.backward()
    assert model.mats[0].P.grad.abs().sum() > 0 and model.mats[0].Lambda.grad is None
    with pytest.raises(ValueError, match="inject"):
        fl.orthogonal_regularizer(nn.Linear(2, 2))


def orthogonal_regularizer_plain(model):
    """R = mean over adapters of ‖PᵀP − I‖_F + ‖QQᵀ − I‖_F, as the paper writes it, one adapter at a time,
    P and Q cut to their live slots."""
    layers = fl.adapters(model).values()
    norm, eye, live = torch.linalg.matrix_norm, lambda m: torch.eye(m.r), lambda m: m.live.nonzero().squeeze(1)
    return sum(norm(m.P[:, live(m)].T @ m.P[:, live(m)] - eye(m)) + norm(m.Q[live(m)] @ m.Q[live(m)].T - eye(m))
               for m in layers) / len(layers)


def test_orthogonal_regularizer_batched_equals_plain():
    # adapters of several heights, widths and ranks, as after allocations: the block-diagonal
    # Gram computation gives the plain per-adapter definition's value and gradients
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.Linear(12, 8), nn.Linear(8, 8), nn.Linear(8, 12), nn.Linear(8, 8))
    fl.inject(model, ["0", "1", "2", "3", "4"], r=2, alpha=4)  # 4 slots each
    for layer, r in zip(fl.adapters(model).values(), [1, 3, 4, 2, 2]):
        set_lambda(layer, torch.zeros(r))
        with torch.no_grad():  # values in the dead slots too: the mask, not the zeros, keeps them out
            layer.P[:, r:].normal_(), layer.Q[r:].normal_()
    layers = list(fl.adapters(model).values())
    ref = orthogonal_regularizer_plain(model)
    ref.backward()
    ref_grads = [(m.P.grad.clone(), m.Q.grad.clone()) for m in layers]
    model.zero_grad()
    R = fl.orthogonal_regularizer(model)
    R.backward()
    assert R.item() == pytest.approx(ref.item(), rel=1e-6)
    for m, (gP, gQ) in zip(layers, ref_grads):
        torch.testing.assert_close(m.P.grad, gP, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(m.Q.grad, gQ, rtol=1e-5, atol=1e-7)
        assert not m.P.grad[:, ~m.live].any() and not m.Q.grad[~m.live].any()  # dead slots: exactly 0
    # and both are the definition, written out by hand for one adapter
    m = layers[1]
    P, Q = m.P[:, :3], m.Q[:3]
    by_hand = (torch.linalg.norm(P.T @ P - torch.eye(3)) + torch.linalg.norm(Q @ Q.T - torch.eye(3)))
    assert orthogonal_regularizer_plain(nn.Sequential(m)).item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_orthogonal_regularizer_stays_float32_under_autocast():
    model = matrices(n=2, d=8, r=3)
    ref = fl.orthogonal_regularizer(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the training scripts call it
        R = fl.orthogonal_regularizer(model)
    assert R.dtype == torch.float32 and R.item() == pytest.approx(ref.item(), rel=1e-6)


# -----------------------------------------------------------------------------
# 5. one allocation


def spectra_model():
    """6 adapters with chosen spectra, so that the entropy order is known:
    mats.0 and mats.1 are the most concentrated, mats.4 and mats.5 the flattest."""
    model = matrices(n=6, d=8)
    specs = [[1.0, -9.0, 0.01],  # lowest entropy; smallest |λ| is the last, −9 must survive
             [3.0, 0.05, 0.5],
             [3.0, 1.0, 0.5],
             [2.0, 1.5, 1.0],
             [1.0, 1.0, 0.9],
             [1.0, -1.0, 1.0]]  # the flattest, sign does not matter
    for layer, lam in zip(fl.adapters(model).values(), specs):
        set_lambda(layer, lam)
    return model


def test_allocation_prunes_lowest_and_expands_highest_entropy():
    model = spectra_model()
    scores = [fl.spectral_entropy(m.Lambda).item() for m in fl.adapters(model).values()]
    assert scores == sorted(scores)  # the spectra are in increasing entropy order
    before = {n: m.Lambda.detach().clone() for n, m in fl.adapters(model).items()}
    rec = allocator(model, b0=2).step(1)
    assert rec["pruned"] == ["mats.0", "mats.1"] and rec["expanded"] == ["mats.5", "mats.4"]
    assert rec["removed"] == {"mats.0": 2, "mats.1": 1}
    assert fl.rank_pattern(model) == {"mats.0": 2, "mats.1": 2, "mats.2": 3, "mats.3": 3,
                                      "mats.4": 4, "mats.5": 4}
    lam = lambda k: model.mats[k].live_factors()[1].tolist()  # the live λ, in slot order
    assert lam(0) == [1.0, -9.0] and model.mats[0].Lambda[2] == 0  # the large negative λ is kept
    assert lam(5) == before["mats.5"][:3].tolist() + [0.0]  # the new one in slot 3


def test_allocation_respects_r_min_and_r_max():
    model = spectra_model()
    set_lambda(model.mats[0], [7.0])  # at r_min = 1: cannot be pruned
    rec = allocator(model, b0=1, r_max=3).step(1)  # everyone else at r_max = 3 except mats.0
    assert rec["pruned"] == ["mats.1"] and rec["expanded"] == ["mats.0"]
    with pytest.raises(ValueError, match="no adapter can lose a direction"):  # nobody above r_min = 3
        allocator(spectra_model(), b0=2, r_min=3, r_max=4)


def test_allocation_with_fewer_matrices_than_b_moves_what_it_can():
    model = matrices(n=3, d=8)
    for layer, lam in zip(fl.adapters(model).values(), (PEAKED, [2.0, 1.0, 0.5], FLAT)):
        set_lambda(layer, lam)
    rec = allocator(model, b0=8).step(1)  # 3 matrices, b = 8: k = 1 on each side
    assert rec["b"] == 8 and rec["k"] == 1
    assert rec["pruned"] == ["mats.0"] and rec["expanded"] == ["mats.2"]


def test_ties_are_broken_by_name():
    model = matrices(n=4, d=8)  # all λ = 0: every score is 0
    rec = allocator(model, b0=1).step(1)
    assert rec["pruned"] == ["mats.0"] and rec["expanded"] == ["mats.1"]


def test_total_rank_is_conserved_over_hundreds_of_allocations():
    torch.manual_seed(0)
    model = matrices(n=7, d=8, r=3)
    alloc = allocator(model, b0=3, r_min=1, r_max=6)
    for t in range(1, 401):
        with torch.no_grad():  # a new random spectrum everywhere, as training would give
            for layer in fl.adapters(model).values():
                layer.Lambda[layer.live] = torch.randn(layer.r) ** 3
        rec = alloc.step(t)
        ranks = fl.rank_pattern(model).values()
        assert sum(ranks) == 21 and all(1 <= r <= 6 for r in ranks)
        for layer in fl.adapters(model).values():  # the dead slots: zeros
            dead = ~layer.live
            assert not (layer.P[:, dead].any() or layer.Lambda[dead].any() or layer.Q[dead].any())
        assert not set(rec["pruned"]) & set(rec["expanded"])
    assert len(alloc.history) == 400 and sum(h["k"] for h in alloc.history) > 400


def test_lambda_keeps_its_learning_rate_over_hundreds_of_resizes():
    torch.manual_seed(0)
    model = matrices(n=5, d=8, r=3)
    opt = torch.optim.AdamW(fl.param_groups(model, lr=1e-3, lambda_lr_ratio=16))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / 1000)  # both groups decay alike
    alloc = allocator(model, b0=2)
    for t in range(1, 301):
        loss = sum(m.delta_weight().square().sum() for m in fl.adapters(model).values()) \
            + sum(m.Lambda.sum() for m in fl.adapters(model).values())  # a gradient for every λ
        loss.backward()
        opt.step()
        sched.step()
        assert alloc.step(t, opt)["k"] > 0
        opt.zero_grad()
    others, lams = opt.param_groups
    assert lams["lr"] == pytest.approx(16 * others["lr"]) and others["lr"] == pytest.approx(1e-3 * 0.7)
    ids = lambda ps: {id(p) for p in ps}
    assert ids(lams["params"]) == ids(m.Lambda for m in fl.adapters(model).values())  # every λ, the new ones too
    assert ids(others["params"]) == ids(p for m in fl.adapters(model).values() for p in (m.P, m.Q))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert fl.param_groups(model, lr=1e-3) == [{"params": trainable, "lr": 1e-3}]  # the paper: one group
    three = fl.param_groups(model, lr=1e-3, lambda_lr_ratio=16, pq_lr_ratio=3)
    assert [(g["lr"], len(g["params"])) for g in three] == [(pytest.approx(3e-3), 10), (pytest.approx(16e-3), 5)]


@pytest.mark.parametrize("kw", [dict(lr=0), dict(lr=float("nan")), dict(lr=1e-3, lambda_lr_ratio=-1),
                                dict(lr=1e-3, pq_lr_ratio=float("inf"))])
def test_param_groups_validates(kw):
    with pytest.raises(ValueError, match="must be a finite number > 0"):
        fl.param_groups(matrices(), **kw)


@pytest.mark.parametrize("ts", [(10, 5), (5, 5), (5, 5, 5)])
def test_t_must_move_forward(ts):
    # step(10) then step(5), or step(5) again, used to allocate each time
    model = spectra_model()
    alloc = allocator(model)
    alloc.step(ts[0])
    ranks, history = fl.rank_pattern(model), list(alloc.history)
    with pytest.raises(ValueError, match=rf"step\({ts[1]}\) after step\({ts[0]}\).*must increase"):
        alloc.step(ts[1])
    assert fl.rank_pattern(model) == ranks and alloc.history == history
    assert alloc.step(ts[0] + 1) is not None  # the next step is fine


@pytest.mark.parametrize("t", ["5", 5.0, None, True, 0, float("nan")])
def test_step_wants_an_integer_step(t):
    with pytest.raises(ValueError, match="t must be an integer >= 1"):
        allocator(spectra_model()).step(t)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        allocator(spectra_model()).step(1, "adamw")


@pytest.mark.parametrize("kw", [dict(r_max=2), dict(r_min=4), dict(r_min=4, r_max=6)])
def test_rank_bounds_must_bracket_the_current_ranks(kw):
    # every adapter is at rank 3: with these bounds nothing could ever move
    with pytest.raises(ValueError, match="must bracket every adapter's current rank"):
        allocator(spectra_model(), **kw)


def test_allocation_schedule_follows_budget_and_interval():
    model = matrices(n=6, d=8)
    alloc = fl.RankAllocator(model, b0=4, t_warmup=10, t_final=20, total_steps=100, interval=5)
    steps = [t for t in range(1, 101) if alloc.step(t) is not None]
    expected = [t for t in range(11, 81) if (t - 10) % 5 == 0 and fl.budget(t, 4, 10, 20, 100) > 0]
    assert steps == expected and steps[0] == 15


# -----------------------------------------------------------------------------
# 6. zero impact of an expansion, exact effect of a prune


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_expansion_does_not_move_the_output(dtype):
    model = spectra_model().to(dtype)
    x = torch.randn(16, 8, dtype=dtype)
    before = model(x)
    rec = allocator(model, b0=2).step(1)
    after = model(x)
    assert after.dtype == before.dtype == dtype
    for name in rec["expanded"]:  # outputs of the expanded matrices are unchanged
        k = int(name.split(".")[1])
        assert torch.allclose(after[:, k], before[:, k], atol=1e-6, rtol=0)
        assert fl.adapters(model)[name].Lambda[3].item() == 0.0  # (its first dead slot)


def test_prune_removes_exactly_that_directions_contribution():
    model = spectra_model().double()
    x = torch.randn(16, 8, dtype=torch.float64)
    old = {n: (m.P.detach().clone(), m.Lambda.detach().clone(), m.Q.detach().clone(), m.scaling)
           for n, m in fl.adapters(model).items()}
    before = model(x)
    rec = allocator(model, b0=2).step(1)
    after = model(x)
    for name, i in rec["removed"].items():
        P, lam, Q, s = old[name]
        contribution = s * lam[i] * (x @ Q[i])[:, None] * P[:, i]  # s λ_i (qᵢ·x) p_i
        k = int(name.split(".")[1])
        assert torch.allclose(before[:, k] - after[:, k], contribution, atol=1e-12)
        assert contribution.abs().max() > 0  # the check is not vacuous


# -----------------------------------------------------------------------------
# 7. the optimizer keeps working without being rebuilt


def training_setup(optim="adamw"):
    torch.manual_seed(0)
    model = spectra_model()
    head = nn.Linear(8, 1)
    model.head = head  # a trainable non-adapter parameter, in its own param group
    adapter_params = [p for n, p in model.named_parameters() if n.startswith("mats") and p.requires_grad]
    groups = [{"params": adapter_params, "lr": 1e-2, "weight_decay": 0.01},
              {"params": list(head.parameters()), "lr": 3e-3, "weight_decay": 0.0}]
    if optim == "adamw":
        opt = torch.optim.AdamW(groups)
    else:
        opt = torch.optim.SGD(groups, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + 0.01 * t))
    return model, opt, sched


def loss_target(x):
    return x @ torch.randn(8, 6, generator=torch.Generator().manual_seed(5))  # learnable


def loss_fn(model, x, y):
    return (model.head(model(x)).squeeze(-1) - y).pow(2).mean()


@pytest.mark.parametrize("optim, keys", [("adamw", ("exp_avg", "exp_avg_sq")), ("sgd", ("momentum_buffer",))])
def test_optimizer_state_is_reset_in_the_rewritten_slots_only(optim, keys):
    model, opt, sched = training_setup(optim)
    torch.manual_seed(1)
    x, y = torch.randn(32, 8), torch.randn(32, 6)
    for _ in range(3):
        loss_fn(model, x, y).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    settings = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    params = dict(model.named_parameters())
    old_state = {n: {k: opt.state[p][k].clone() for k in keys} for n, p in params.items() if p.requires_grad}
    rec = allocator(model, b0=2).step(1, opt)
    assert all(p is params[n] for n, p in model.named_parameters())  # the same parameter objects
    pruned, i = rec["pruned"][0], rec["removed"][rec["pruned"][0]]
    grown, j = rec["expanded"][0], 3  # a new direction takes the first dead slot
    for name, slot in ((pruned, i), (grown, j)):
        for f, dim in (("P", 1), ("Lambda", 0), ("Q", 0)):
            for k in keys:
                old, new = old_state[f"{name}.{f}"][k], opt.state[params[f"{name}.{f}"]][k]
                others = [s for s in range(old.shape[dim]) if s != slot]
                assert torch.equal(new.index_select(dim, torch.tensor(others)),
                                   old.index_select(dim, torch.tensor(others)))
                assert not new.select(dim, slot).any() and old.select(dim, slot).any() == (name == pruned)
    # groups untouched, every live parameter is driven by the optimizer, nothing stale kept
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == settings
    live = {id(p) for p in model.parameters() if p.requires_grad}
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert live == held and set(map(id, opt.state)) <= live
    assert sched.optimizer is opt


def test_training_goes_on_after_allocations_with_the_previous_loss_alive():
    model, opt, sched = training_setup("adamw")
    alloc = allocator(model, b0=1, interval=5)
    torch.manual_seed(1)
    x = torch.randn(64, 8)
    y = loss_target(x)
    losses, loss = [], None
    for t in range(1, 61):
        loss = loss_fn(model, x, y)  # the previous step's `loss` (and its graph) was alive
        loss.backward()  # until here, across the allocation at the end of the last step
        opt.step()
        sched.step()
        alloc.step(t, opt)
        opt.zero_grad()
        losses.append(loss.item())
    assert len(alloc.history) == 12
    assert losses[-1] < 0.5 * losses[0]
    new = fl.adapters(model)[alloc.history[-2]["expanded"][0]].P  # a direction added late moves
    assert new.grad is None and opt.state[new]["step"] > 0


@pytest.mark.parametrize("init", fl.INITS)
def test_a_dead_slot_gets_exactly_zero_gradient_and_never_moves(init):
    # AdamW with weight decay, R and the task loss: a pruned slot stays at zero, whatever the live ones do
    torch.manual_seed(0)
    model = matrices(n=3, d=8, r=3)
    for layer in fl.adapters(model).values():
        layer.init = init
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(32, 8), torch.randn(32, 3, 8)
    alloc = allocator(model, b0=1, interval=4)
    for t in range(1, 41):
        ((model(x) - y).square().mean() + 0.1 * fl.orthogonal_regularizer(model)).backward()
        for m in fl.adapters(model).values():
            dead = ~m.live
            assert not (m.P.grad[:, dead].any() or m.Lambda.grad[dead].any() or m.Q.grad[dead].any())
        opt.step()
        alloc.step(t, opt)
        opt.zero_grad()
        for m in fl.adapters(model).values():
            dead = ~m.live
            assert not (m.P[:, dead].any() or m.Lambda[dead].any() or m.Q[dead].any())
    assert len(alloc.history) == 10 and sum(len(h["pruned"]) for h in alloc.history) == 10


def test_optimizer_missing_the_adapter_is_reported():
    model = spectra_model()
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match="optimizer does not hold"):
        allocator(model).step(1, opt)


def test_optimizer_missing_some_adapters_leaves_all_as_it_was():
    # the optimizer holds every adapter but mats.5, the one that grows: nothing may be resized
    # (P used to be, then it raised with Λ and Q at the old rank and the next forward failed)
    model, _, _ = training_setup()
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if p.requires_grad and "mats.5" not in n])
    x, y = torch.randn(32, 8), torch.randn(32, 6)
    loss_fn(model, x, y).backward()
    opt.step()
    snap, alloc = snapshot(model, opt), allocator(model, b0=2)
    with pytest.raises(ValueError, match="optimizer does not hold"):
        alloc.step(1, opt)
    assert_unchanged(model, snap, opt)
    assert alloc.history == [] and alloc.last_step == 0
    assert torch.isfinite(loss_fn(model, x, y))  # the adapters still fit together


def test_allocating_without_optimizer_warns_once_while_adapters_train():
    model = spectra_model()
    with pytest.warns(UserWarning, match=r"no optimizer.*stale; pass it: step\(t, optimizer\)") as caught:
        allocator(model, b0=2).step(1)  # 4 adapters rewritten, one warning
    assert len(caught) == 1 and caught[0].filename == __file__  # points at the caller's line
    frozen = spectra_model().requires_grad_(False)  # nothing trains: nothing to warn about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert allocator(frozen, b0=2).step(1)["k"] == 2


def test_step_between_backward_and_optimizer_step_warns_and_after_it_does_not():
    model, opt, _ = training_setup()
    alloc = allocator(model, b0=1, interval=2)
    x, y = torch.randn(32, 8), torch.randn(32, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the documented order, and zero_grad() before step()
        for t in range(1, 5):
            loss_fn(model, x, y).backward()
            opt.step()
            if t % 2:
                opt.zero_grad(set_to_none=False)  # (zeroes the gradient in place)
            alloc.step(t, opt)
            opt.zero_grad()
    loss_fn(model, x, y).backward()
    with pytest.warns(UserWarning, match=r"between backward\(\) and optimizer.step\(\)") as caught:
        alloc.step(5, opt)
    assert caught[0].filename == __file__  # points at the caller's line


def test_an_older_allocator_on_the_same_adapters_refuses_to_step():
    model = spectra_model()
    old, new = allocator(model), allocator(model)
    before = fl.rank_pattern(model)
    with pytest.raises(ValueError, match="another RankAllocator was made on these adapters"):
        old.step(1)
    assert fl.rank_pattern(model) == before and old.history == []
    assert new.step(1)["k"] == 1  # the newest drives them: b(t) once, not twice


def trained_with(make_opt, steps=3):
    """training_setup's model after a few steps of the optimizer make_opt(trainable params)."""
    model, _, _ = training_setup()
    opt = make_opt([p for p in model.parameters() if p.requires_grad])
    torch.manual_seed(1)
    x, y = torch.randn(32, 8), torch.randn(32, 6)
    closure = lambda: loss_fn(model, x, y)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step(closure) if isinstance(opt, torch.optim.LBFGS) else opt.step()
    return model, opt, (x, y)


@pytest.mark.parametrize("make_opt, first", [
    (lambda ps: torch.optim.Adagrad(ps, lr=0.05, initial_accumulator_value=0.1), {"sum": 0.1}),
    (lambda ps: torch.optim.Rprop(ps, lr=0.003), {"step_size": 0.003, "prev": 0.0}),
    (lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.9, centered=True),
     {"square_avg": 0.0, "momentum_buffer": 0.0, "grad_avg": 0.0}),
    (lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9), {"momentum_buffer": 0.0}),
    (lambda ps: torch.optim.Adam(ps, lr=1e-3, amsgrad=True), {"exp_avg": 0.0, "max_exp_avg_sq": 0.0}),
], ids=["adagrad", "rprop", "rmsprop", "sgd", "adam-amsgrad"])
def test_new_direction_state_starts_where_the_optimizer_starts_it(make_opt, first):
    # Adagrad's sum starts at initial_accumulator_value and Rprop's step size at lr, not at 0
    model, opt, (x, y) = trained_with(make_opt)
    old = {k: opt.state[model.mats[5].Q][k].clone() for k in first}
    rec = allocator(model, b0=2).step(1, opt)
    assert "mats.5" in rec["expanded"]
    Q = model.mats[5].Q
    others = torch.tensor([0, 1, 2, 4, 5])  # the new direction is in slot 3
    for k, value in first.items():
        assert torch.equal(opt.state[Q][k][others], old[k][others])  # the other slots keep theirs
        assert torch.equal(opt.state[Q][k][3], torch.full((8,), value))  # the new one starts fresh
    for _ in range(3):  # and training goes on, moving the new direction
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    assert torch.isfinite(loss_fn(model, x, y)) and model.mats[5].Lambda[3] != 0


class RowStats(torch.optim.Optimizer):
    """An optimizer whose state is not shaped like its parameter (a factored second moment)."""

    def __init__(self, params):
        super().__init__(params, dict(lr=1e-3))

    @torch.no_grad()
    def step(self):
        for p in (p for g in self.param_groups for p in g["params"] if p.grad is not None):
            rows = self.state[p].setdefault("rows", torch.zeros(p.shape[:1]))
            rows.add_(p.grad.reshape(len(p), -1).square().mean(1))
            p.sub_(1e-3 * p.grad / (rows.reshape(-1, *[1] * (p.dim() - 1)).sqrt() + 1e-8))


def transformers_adafactor(ps):
    from transformers.optimization import Adafactor
    return Adafactor(ps, lr=1e-3, relative_step=False, scale_parameter=False)


@pytest.mark.parametrize("make_opt, name", [
    (lambda ps: torch.optim.Adafactor(ps, lr=1e-2), "Adafactor"),
    (transformers_adafactor, "Adafactor"),
    (lambda ps: torch.optim.LBFGS(ps, lr=0.1), "LBFGS"),
    (RowStats, "RowStats"),
], ids=["torch-adafactor", "transformers-adafactor", "lbfgs", "custom"])
def test_optimizer_with_state_not_shaped_like_the_parameter_is_refused(make_opt, name):
    # its state cannot be sliced: refuse, naming it and what works, before anything changes
    model, opt, _ = trained_with(make_opt)
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match=f"{name} keeps state not shaped like each parameter.*use Adam, AdamW"):
        allocator(model, b0=2).step(1, opt)
    assert_unchanged(model, snap, opt)


def golden_run(init, r_max=None):
    """A demo-like problem, 8 matrices, 30 allocations of b = 2 (constant schedule): losses and decisions."""
    torch.manual_seed(0)
    teacher, student = make_problem([0, 1, 2, 4, 0, 3, 1, 6], d=16, seed=0)
    fl.inject(student, r"mats\.\d+", r=3, alpha=3, init=init, **({} if r_max is None else dict(r_max=r_max)))
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    alloc = fl.RankAllocator(student, b0=2, t_warmup=10, t_final=20, total_steps=150, interval=4, seed=0,
                             schedule="constant", warm_start=False)  # the resizing adapter's Adam
    losses, decisions = [], []
    for t in range(1, 151):
        x = torch.randn(64, 16)
        mse = (student(x) - teacher(x)).pow(2).mean()
        (mse + 0.1 * fl.orthogonal_regularizer(student)).backward()
        opt.step()
        rec = alloc.step(t, opt)
        opt.zero_grad()
        losses.append(mse.item())
        if rec:
            decisions.append([rec["step"], rec["pruned"], rec["expanded"], list(rec["ranks"].values())])
    return dict(losses=losses, decisions=decisions)


@pytest.mark.parametrize("init", fl.INITS)
def test_same_decisions_and_losses_as_the_resizing_adapter(init):
    # testdata/golden_allocations.json: golden_run() at commit f4610e5, whose allocations replaced P, Λ, Q by
    # new Parameters of the new rank. With slots to spare (ranks reach 10 of 16) the slotted adapter decides
    # the same at each of the 30 allocations, and its losses match up to float re-association
    gold = json.loads((Path(__file__).parent / "testdata" / "golden_allocations.json").read_text())[init]
    new = golden_run(init, r_max=16)
    assert new["decisions"] == gold["decisions"] and max(max(d[3]) for d in gold["decisions"]) in (9, 10)
    assert np.abs(np.array(new["losses"]) - gold["losses"]).max() < 1e-6
    capped = golden_run(init, r_max=6)  # where a matrix would pass its 6 slots, the decisions part
    assert max(max(d[3]) for d in capped["decisions"]) == 6 and capped["decisions"] != gold["decisions"]


def test_growth_stops_at_the_slots_and_r_max_cannot_exceed_them():
    class Favourite(fl.RankAllocator):  # mats.5 always scores highest, so it grows whenever it can
        def scores(self, lams):
            return {n: float(n == "mats.5") for n in lams}
    model = spectra_model()  # r = 3, 6 slots
    alloc = Favourite(model, b0=1, t_warmup=0, t_final=0, total_steps=100, interval=1, schedule="constant")
    for t in range(1, 6):
        assert (alloc.step(t)["expanded"] == ["mats.5"]) == (t <= 3)  # full after 3 allocations
    assert model.mats[5].r == 6 and sum(fl.rank_pattern(model).values()) == 18
    with pytest.raises(ValueError, match=r"r_max=7 is more than the slots.*inject\(\.\.\., r_max=7\)"):
        allocator(spectra_model(), r_max=7)
    with pytest.raises(ValueError, match=r"r_max \(the slots"):
        fl.inject(Matrices(2, 4), r"mats\.\d+", r=3, alpha=3, r_max=2)


def test_churn_by_hand():
    # step 10: a grows (a new direction in slot 3), b shrinks; step 20: a loses slot 3 again
    history = [dict(pruned=["b"], expanded=["a"], removed={"b": 0}, added={"a": 3}),
               dict(pruned=["a"], expanded=["b"], removed={"a": 3}, added={"b": 0})]
    assert fl.churn(history) == dict(added_with_a_next=1, added_removed_at_next=1, flips=2)
    # a direction counts only if removed at the very next allocation, and only the new one
    h = [dict(pruned=[], expanded=["a"], removed={}, added={"a": 2}),
         dict(pruned=["a"], expanded=["b"], removed={"a": 2}, added={"b": 2}),  # a's new one (slot 2)
         dict(pruned=["b"], expanded=[], removed={"b": 0}, added={})]  # not b's new one (slot 2)
    assert fl.churn(h) == dict(added_with_a_next=2, added_removed_at_next=1, flips=2)


@pytest.mark.parametrize("kw, msg", [
    (dict(interval=200), r"never allocates: at its first allocation step \(210"),  # past the window
    (dict(b0=1, schedule="cubic", t_warmup=0, t_final=0, total_steps=4, interval=3), "b\\(t\\) is 0"),
    (dict(r_min=3, r_max=3), "no adapter can lose a direction"),
    (dict(r_max=3), "no adapter can gain a direction"),
    (dict(seed=2 ** 70), "below 2\\*\\*63"),
])
def test_an_allocator_that_could_never_move_is_refused(kw, msg):
    args = dict(b0=2, t_warmup=10, t_final=10, total_steps=100, interval=5, schedule="constant") | kw
    with pytest.raises(ValueError, match=msg):
        fl.RankAllocator(matrices(n=3, r=3), **args)
    single = matrices(n=1)
    with pytest.raises(ValueError, match="one adapter"):
        fl.RankAllocator(single, b0=1, t_warmup=0, t_final=0, total_steps=10, interval=1)
    fl.RankAllocator(single, b0=0, t_warmup=0, t_final=0, total_steps=10, interval=1)  # b0 = 0: fixed rank, fine


def test_non_finite_factors_or_scores_never_allocate_and_are_never_saved(tmp_path):
    model = spectra_model()
    with torch.no_grad():
        model.mats[2].Q[0, 0] = float("nan")  # λ finite: only Q is wrong
    ranks, alloc = fl.rank_pattern(model), allocator(model, b0=2)
    with pytest.raises(ValueError, match=r"non-finite P, λ or Q in \['mats.2'\]"):
        alloc.step(1)
    assert fl.rank_pattern(model) == ranks and alloc.history == []
    with pytest.raises(ValueError, match="non-finite values.*nothing was written"):
        fio.save_adapter(model, str(tmp_path / "a.safetensors"))
    assert not (tmp_path / "a.safetensors").exists()

    class Broken(fl.RankAllocator):
        def scores(self, lams):
            return {n: float("nan") for n in lams}
    with pytest.raises(ValueError, match="finite number for every adapter"):
        Broken(spectra_model(), b0=2, t_warmup=0, t_final=0, total_steps=100, interval=1, schedule="constant").step(1)


@pytest.mark.parametrize("bad", ["abc", None, [[1.0, 2.0], [3.0]], torch.ones(2, 3)])
def test_spectral_entropy_takes_one_matrix_of_numbers(bad):
    with pytest.raises(ValueError, match="spectral_entropy takes the λ of one matrix"):
        fl.spectral_entropy(bad)


def test_r_above_the_matrix_rank_is_refused():
    with pytest.raises(ValueError, match=r"r=9 is more than the \(8, 8\) matrix's rank 8"):
        fl.FlexLoRALinear(nn.Linear(8, 8), r=9, alpha=1)
    with pytest.raises(ValueError, match="r_max=9 is more than"):
        fl.FlexLoRALinear(nn.Linear(8, 8), r=4, alpha=1, r_max=9)
    assert fl.FlexLoRALinear(nn.Linear(8, 8), r=6, alpha=1).r_max == 8  # 2 · r, capped at the rank


def test_inject_skips_what_it_cannot_replace_and_unload_takes_a_bare_adapter():
    mha = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8))  # out_proj: read, never called
    assert list(fl.inject(mha, ".*", r=2, alpha=2)) == ["1"]
    with pytest.raises(ValueError, match="match no nn.Linear"):
        fl.inject(nn.Linear(4, 4), ".*", r=1, alpha=1)  # the model itself: nothing to replace it in
    layer = fl.FlexLoRALinear(nn.Linear(4, 4), r=2, alpha=2)
    with torch.no_grad():
        layer.Lambda[:2] = 1.0
    x = torch.randn(3, 4)
    out = layer(x)
    plain = fio.unload(layer)
    assert type(plain) is nn.Linear and torch.allclose(plain(x), out, atol=1e-6)


def test_adapter_metadata_nested_too_deep_is_one_clear_error(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "deep.safetensors"
    save_file({"x": torch.zeros(1)}, path, metadata={"format": "flexlora", "adapters": "[" * 100000 + "]" * 100000})
    with pytest.raises(ValueError, match="cannot be loaded, nothing was changed"):
        fio.load_adapter(matrices(n=2), str(path))


# -----------------------------------------------------------------------------
# 8. determinism, our own generator, the adapter's dtype


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_same_seed_same_run_and_different_seed_different_run():
    kw = dict(planted=[0, 1, 2, 4], r0=2, steps=120, t_warmup=20, t_final=20, interval=5, d=16, b0=4)
    (m1, a1, _), (m2, a2, _) = train(**kw, seed=3), train(**kw, seed=3)
    assert a1.history == a2.history and len(a1.history) > 5
    s1, s2 = state(m1), state(m2)
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    _, a3, _ = train(**kw, seed=4)
    assert a3.history != a1.history


def test_new_directions_come_from_the_allocators_generator_in_the_adapters_dtype():
    model = spectra_model().to(torch.bfloat16)
    alloc = allocator(model, b0=2, seed=7)
    rng = torch.get_rng_state()
    rec = alloc.step(1)
    assert torch.equal(rng, torch.get_rng_state())  # the global RNG was not touched
    layer = fl.adapters(model)[rec["expanded"][0]]
    assert layer.P.dtype == layer.Q.dtype == layer.Lambda.dtype == torch.bfloat16
    assert layer.P.device == layer.base.weight.device
    assert 0.005 < layer.P[:, 3].float().std().item() < 0.05  # drawn like the init: σ = 0.02
    g = torch.Generator().manual_seed(7)  # the same draw by hand
    expected = (torch.randn(8, 1, generator=g) * fl.SIGMA_INIT).bfloat16()
    assert torch.equal(fl.adapters(model)["mats.5"].P[:, 3:4], expected)
    x = torch.randn(4, 8).bfloat16()
    assert torch.isfinite(model(x)).all()


def test_allocator_state_dict_resumes_the_same_draws():
    m1, m2 = spectra_model(), spectra_model()
    a1, a2 = allocator(m1, b0=2), allocator(m2, b0=2)
    a1.step(1)
    a2.step(1)
    sd = a1.state_dict()
    a3 = allocator(m2, b0=2)
    a3.load_state_dict(sd)
    a1.step(2)
    a3.step(2)
    assert a3.history == a1.history
    assert torch.equal(m1.mats[5].P, m2.mats[5].P)
    with pytest.raises(ValueError, match="same settings"):
        allocator(m2, b0=3).load_state_dict(sd)


def test_allocator_state_dict_carries_the_last_step():
    model = spectra_model()
    alloc = allocator(model, interval=5)
    for t in range(1, 8):
        alloc.step(t)
    again = allocator(model, interval=5)
    again.load_state_dict(alloc.state_dict())
    with pytest.raises(ValueError, match=r"step\(7\) after step\(7\)"):
        again.step(7)
    old = alloc.state_dict()
    del old["last_step"]  # a checkpoint written before last_step was kept: the last allocation's
    again = allocator(model, interval=5)
    again.load_state_dict(old)
    assert again.last_step == 5 and again.step(8) is None
    with pytest.raises(ValueError, match="what RankAllocator.state_dict"):
        again.load_state_dict({"allocator": alloc.state_dict()})  # the whole checkpoint by mistake


def test_allocator_state_must_fit_the_adapters():
    model = spectra_model()
    alloc = allocator(model, b0=2)
    alloc.step(1)
    with pytest.raises(ValueError, match="load_adapter"):  # ranks still the injected ones
        allocator(spectra_model(), b0=2).load_state_dict(alloc.state_dict())


def test_scores_is_the_hook_for_another_rule():
    class Reversed(fl.RankAllocator):  # a subclass overrides scores(); the rest is the paper's
        def scores(self, lams):
            assert all(lam.dtype == torch.float32 and lam.device.type == "cpu" for lam in lams.values())
            return {n: -s for n, s in super().scores(lams).items()}
    rec = Reversed(spectra_model(), b0=2, t_warmup=0, t_final=0, total_steps=100, interval=1,
                   schedule="constant").step(1)
    assert rec["pruned"] == ["mats.5", "mats.4"] and rec["expanded"] == ["mats.0", "mats.1"]
    assert rec["scores"]["mats.5"] < 0


# -----------------------------------------------------------------------------
# 9. merge and unmerge


def test_merge_unmerge_exact_and_idempotent():
    model = spectra_model()
    x = torch.randn(16, 8)
    w0 = {n: m.base.weight.detach().clone() for n, m in fl.adapters(model).items()}
    ref = model(x)
    fio.merge(model)
    fio.merge(model)  # a second merge does nothing
    assert torch.allclose(model(x), ref, atol=1e-6)
    for n, m in fl.adapters(model).items():
        assert m.merged and torch.allclose(m.base.weight, w0[n] + m.delta_weight(), atol=1e-6)
    with pytest.raises(ValueError, match="unmerge"):
        allocator(model).step(1)
    fio.unmerge(model)
    fio.unmerge(model)
    for n, m in fl.adapters(model).items():
        assert not m.merged and torch.allclose(m.base.weight, w0[n], atol=1e-6)
    assert torch.allclose(model(x), ref, atol=1e-6)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2 ** -8)])
def test_merge_unmerge_cycle_error_is_what_the_docstring_says(dtype, tol):
    # one merge/unmerge cycle rounds W: in bf16 by up to 2⁻⁸ of max|W + ΔW| (a large ΔW here)
    model = spectra_model()
    for m in fl.adapters(model).values():
        with torch.no_grad():
            m.Lambda.mul_(30)
    model = model.to(dtype)
    w0 = {n: m.base.weight.detach().clone() for n, m in fl.adapters(model).items()}
    peak = {n: (m.base.weight.float() + m.delta_weight().float()).abs().max() for n, m in fl.adapters(model).items()}
    fio.merge(model)
    fio.unmerge(model)
    errors = {n: (m.base.weight.float() - w0[n].float()).abs().max() / peak[n] for n, m in fl.adapters(model).items()}
    assert max(errors.values()) <= tol
    if dtype == torch.bfloat16:
        assert max(errors.values()) > 0  # the rounding is real: hence the docstring


# -----------------------------------------------------------------------------
# 10. save and load


def test_save_load_round_trip_restores_ranks_and_outputs(tmp_path):
    kw = dict(planted=[0, 1, 2, 4], r0=3, steps=100, t_warmup=10, t_final=10, interval=5, d=16)
    model, alloc, _ = train(**kw)
    ranks = fl.rank_pattern(model)
    assert len(set(ranks.values())) > 1  # ranks really moved
    path = tmp_path / "adapter.safetensors"
    fio.save_adapter(model, str(path))
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, no pickle
    _, fresh = make_problem(kw["planted"], d=16, seed=0)
    fl.inject(fresh, r"mats\.\d+", r=1, alpha=9.0)  # another r and alpha
    fio.load_adapter(fresh, str(path))
    assert fl.rank_pattern(fresh) == ranks
    assert all(m.scaling == 1.0 and m.r_init == 3 for m in fl.adapters(fresh).values())
    x = torch.randn(8, 16)
    assert torch.allclose(fresh(x), model(x), atol=1e-6)
    # the slots too (r_max came from the file: 16, not r = 1's 2): the state dict is the same, bit for bit
    assert same(fresh.state_dict(), model.state_dict())
    # the values were copied: rewriting the file afterwards changes nothing
    before = fresh(x)
    with torch.no_grad():
        model.mats[0].Lambda.mul_(2)
    fio.save_adapter(model, str(path))
    assert torch.equal(fresh(x), before)


def test_files_from_before_the_slots_load_into_the_first_slots(tmp_path):
    from safetensors.torch import save_file
    model = matrices(n=2, d=8, r=3)  # 6 slots
    P, lam, Q = torch.randn(8, 5), torch.randn(5), torch.randn(5, 8)  # rank 5, no r_max or slots
    tensors = {f"mats.{i}.{f}": t.clone() for i in range(2) for f, t in (("P", P), ("Lambda", lam), ("Q", Q))}
    config = {f"mats.{i}": {"r": 5, "r_init": 3, "alpha": 6.0} for i in range(2)}
    save_file(tensors, tmp_path / "old.safetensors", metadata={"format": "flexlora", "adapters": json.dumps(config)})
    fio.load_adapter(model, str(tmp_path / "old.safetensors"))
    m = model.mats[1]
    assert m.r == 5 and m.r_max == 6 and m.live.tolist() == [True] * 5 + [False]
    assert torch.equal(m.delta_weight(), 2.0 * P @ torch.diag(lam) @ Q)
    small = matrices(n=2, d=8, r=2)  # 4 slots, rank 5: room is made (new parameters)
    fio.load_adapter(small, str(tmp_path / "old.safetensors"))
    assert small.mats[0].r == small.mats[0].r_max == 5


def test_save_load_keeps_the_init(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    model = Matrices(2, 8)
    fl.inject(model, r"mats\.\d+", r=2, alpha=4, init="lora")
    path = str(tmp_path / "a.safetensors")
    fio.save_adapter(model, path)
    fresh = matrices(n=2)  # injected with the paper's init
    fio.load_adapter(fresh, path)
    assert {m.init for m in fl.adapters(fresh).values()} == {"lora"}
    with safe_open(path, "pt") as f:  # a file of before init: its adapters load as "gaussian"
        meta = f.metadata()
    for init, ok in ((None, True), ("zeros", False)):
        adapters = {n: {k: v for k, v in c.items() if k != "init"} | ({"init": init} if init else {})
                    for n, c in json.loads(meta["adapters"]).items()}
        save_file(load_file(path), path, metadata=meta | {"adapters": json.dumps(adapters)})
        other = Matrices(2, 8)
        fl.inject(other, r"mats\.\d+", r=2, alpha=4, init="lora")
        if ok:
            fio.load_adapter(other, path)
            assert {m.init for m in fl.adapters(other).values()} == {"gaussian"}
        else:
            with pytest.raises(ValueError, match="init .'zeros'. is none of"):
                fio.load_adapter(other, path)


def test_save_load_restores_trainable_head(tmp_path):
    model, opt, _ = training_setup()
    with torch.no_grad():
        model.head.weight.fill_(0.5)
    fio.save_adapter(model, str(tmp_path / "a.safetensors"))
    other, _, _ = training_setup()
    fio.load_adapter(other, str(tmp_path / "a.safetensors"))
    assert torch.equal(other.head.weight, model.head.weight)


def test_load_mismatch_names_the_module(tmp_path):
    model = matrices(n=3, d=8)
    path = str(tmp_path / "a.safetensors")
    fio.save_adapter(model, path)
    fewer = Matrices(3, 8)
    fl.inject(fewer, r"mats\.(0|1)", r=2, alpha=4)
    with pytest.raises(ValueError, match=r"mats\.2"):
        fio.load_adapter(fewer, path)
    wider = Matrices(3, 12)
    fl.inject(wider, r"mats\.\d+", r=2, alpha=4)
    with pytest.raises(ValueError, match=r"adapter mats\.0"):
        fio.load_adapter(wider, path)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a flexlora"):
        fio.load_adapter(model, str(tmp_path / "other.safetensors"))


def edit_config(edit):
    def corrupt(tensors, meta):
        config = json.loads(meta["adapters"])
        edit(config)
        meta["adapters"] = json.dumps(config)
    return corrupt


def put(name, value):
    return lambda tensors, meta: tensors.__setitem__(name, value)


CORRUPTIONS = {  # what a file can get wrong, each with the error it must give
    "head of another shape": (put("head.weight", torch.zeros(2, 6)), r"head\.weight of shape \(2, 6\)"),
    "unknown tensor": (put("tail.weight", torch.zeros(3)), r"tail\.weight of shape \(3,\): the model has no trainable"),
    "frozen base weight": (put("mats.0.base.weight", torch.zeros(8, 8)), r"mats\.0\.base\.weight of shape \(8, 8\): "
                                                                        r"the model has no trainable parameter"),
    "P of another height": (put("mats.5.P", torch.zeros(9, 4)), r"adapter mats\.5: P \(9, 4\)"),
    "λ longer than P is wide": (put("mats.5.Lambda", torch.zeros(5)), r"adapter mats\.5"),
    "λ not 1-D": (put("mats.5.Lambda", torch.zeros(4, 1)), r"adapter mats\.5"),
    "rank 0": (lambda T, m: T.update({"mats.5.P": torch.zeros(8, 0), "mats.5.Lambda": torch.zeros(0),
                                      "mats.5.Q": torch.zeros(0, 8)}), r"adapter mats\.5"),
    "missing tensor": (lambda T, m: T.pop("mats.5.Q"), r"\['mats\.5\.Q'\] are missing"),
    "non-finite λ": (put("mats.5.Lambda", torch.tensor([1.0, float("nan"), 0, 0])), "mats.5.Lambda holds non-finite"),
    "non-finite head": (put("head.bias", torch.tensor([float("inf")])), "head.bias holds non-finite"),
    "r_init = 0": (edit_config(lambda c: c["mats.5"].update(r_init=0)), "mats.5: r_init must be an integer >= 1"),
    "no r_init": (edit_config(lambda c: c["mats.5"].pop("r_init")), "mats.5: r_init must be"),
    "alpha = inf": (edit_config(lambda c: c["mats.5"].update(alpha=float("inf"))), "mats.5: alpha must be"),
    "alpha a string": (edit_config(lambda c: c["mats.5"].update(alpha="16")), "mats.5: alpha must be"),
    "config a list": (lambda T, m: m.update(adapters="[1, 2]"), "not a {module name"),
    "broken JSON": (lambda T, m: m.update(adapters="{'mats.0': "), "'adapters' metadata is broken JSON"),
    "no adapters": (lambda T, m: m.pop("adapters"), "not a flexlora_io.save_adapter"),
    "adapter only in the file": (edit_config(lambda c: c.update({"mats.9": c["mats.0"]})), r"only in the file \['mats\.9'\]"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_load_adapter_is_all_or_nothing(tmp_path, case):
    # a file that does not fit is refused whole: nothing loaded, not even the adapters before
    # the faulty tensor (mats.5 and head come last in the order load_adapter applies them)
    from safetensors import safe_open
    from safetensors.torch import save_file
    saved, opt, _ = training_setup()
    allocator(saved, b0=2).step(1, opt)  # other ranks than a fresh model's, so a half-load shows
    path = str(tmp_path / "a.safetensors")
    fio.save_adapter(saved, path)
    with safe_open(path, "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    corrupt, msg = CORRUPTIONS[case]
    corrupt(tensors, meta)
    save_file(tensors, path, metadata=meta)
    model, _, _ = training_setup()
    fio.merge(model)  # merged too: a half-load would have unmerged some
    snap, merged = snapshot(model), [m.merged for m in fl.adapters(model).values()]
    with pytest.raises(ValueError, match=msg) as e:
        fio.load_adapter(model, path)
    assert "nothing was changed" in str(e.value) and path in str(e.value)
    assert_unchanged(model, snap)
    assert [m.merged for m in fl.adapters(model).values()] == merged


def test_load_adapter_path_errors(tmp_path):
    model = matrices(n=2)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="is a directory: pass the file that save_adapter"):
        fio.load_adapter(model, str(tmp_path))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="junk.safetensors cannot be loaded"):
        fio.load_adapter(model, str(tmp_path / "junk.safetensors"))
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        fio.load_adapter(model, str(tmp_path / "nowhere.safetensors"))
    assert_unchanged(model, snap)


# -----------------------------------------------------------------------------
# 11. patching Hugging Face models built from a config (no download)

DEBERTA_TARGETS = ["query_proj", "key_proj", "value_proj", "attention.output.dense",
                   "intermediate.dense", "output.dense"]


def tiny_deberta():
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification
    torch.manual_seed(0)
    cfg = DebertaV2Config(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return DebertaV2ForSequenceClassification(cfg).eval()


def test_inject_deberta():
    model = tiny_deberta()
    ids = torch.randint(0, 100, (2, 10))
    ref = model(input_ids=ids).logits
    layers = fl.inject(model, DEBERTA_TARGETS, r=4, alpha=8, trainable=["classifier", "pooler"])
    assert len(layers) == 12  # 6 matrices × 2 layers
    assert not any("pooler" in n or "classifier" in n for n in layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias", "pooler.dense.weight", "pooler.dense.bias"} <= trainable
    assert all(n.endswith((".P", ".Lambda", ".Q")) or n.startswith(("classifier", "pooler")) for n in trainable)
    assert torch.allclose(model(input_ids=ids).logits, ref, atol=1e-6)  # ΔW = 0 at init
    assert sum(1 for n in layers if n.endswith("attention.output.dense")) == 2


def test_inject_vit():
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=32,
                                                num_hidden_layers=2, num_attention_heads=2,
                                                intermediate_size=64, num_labels=5)).eval()
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    mlp = [n for n in linear_names if n.endswith(("mlp.fc1", "mlp.fc2", "intermediate.dense", "output.dense"))
           and "attention" not in n]
    targets = sorted({n.split(".", 3)[-1] for n in mlp})  # the MLP names this transformers has
    layers = fl.inject(model, targets, r=2, alpha=4, trainable=["classifier"])
    assert len(layers) == 4 and "classifier" not in layers
    assert {n for n, p in model.named_parameters() if p.requires_grad and "classifier" in n} == \
        {"classifier.weight", "classifier.bias"}
    px = torch.randn(2, 3, 16, 16)
    assert model(pixel_values=px).logits.shape == (2, 5)


def test_target_matching_rules():
    model = tiny_deberta()
    layers = fl.inject(model, ["output.dense"], r=1, alpha=1)  # suffix on a dot boundary
    assert len(layers) == 4 and all(n.endswith("output.dense") for n in layers)
    assert "pooler.dense" not in layers
    model = tiny_deberta()
    layers = fl.inject(model, [r"deberta\.encoder\.layer\.(0)\.attention\.self\.\w+_proj"], r=1, alpha=1)
    assert sorted(layers) == [f"deberta.encoder.layer.0.attention.self.{k}_proj" for k in ("key", "query", "value")]
    with pytest.raises(ValueError, match=re.escape("['_proj']")) as e:
        fl.inject(tiny_deberta(), ["_proj"], r=1, alpha=1)
    assert "deberta.encoder.layer.N.attention.self.query_proj" in str(e.value)  # lists what exists
    assert fl.matches("encoder.layer.3.output.dense", "output.dense")
    assert not fl.matches("pooler.dense", "output.dense") and not fl.matches("a.b_proj", "_proj")
    with pytest.raises(ValueError, match="trainable"):
        fl.inject(tiny_deberta(), ["query_proj"], r=1, alpha=1, trainable=["clasifier"])
    model = tiny_deberta()
    fl.inject(model, ["query_proj"], r=1, alpha=1)
    with pytest.raises(ValueError, match="already"):
        fl.inject(model, ["key_proj"], r=1, alpha=1)


# -----------------------------------------------------------------------------
# 12. bad arguments


@pytest.mark.parametrize("kw, msg", [
    (dict(r=0), "r must"), (dict(r=2.5), "r must"), (dict(r=True), "r must"), (dict(r="4"), "r must"),
    (dict(alpha=0), "alpha"), (dict(alpha=-1), "alpha"), (dict(alpha=float("inf")), "alpha"),
    (dict(alpha=float("nan")), "alpha"), (dict(alpha="16"), "alpha"), (dict(dropout=1.0), "dropout"),
    (dict(dropout="0.1"), "dropout"),
])
def test_adapter_validates(kw, msg):
    args = dict(r=2, alpha=4.0) | kw
    with pytest.raises(ValueError, match=msg):
        fl.FlexLoRALinear(nn.Linear(4, 4), **args)
    with pytest.raises(ValueError, match="nn.Linear"):
        fl.FlexLoRALinear(nn.Conv1d(4, 4, 1), 2, 4.0)


@pytest.mark.parametrize("kw, msg", [
    (dict(interval=0), "interval"), (dict(b0=-1), "b0"), (dict(total_steps=30), "total_steps"),
    (dict(r_min=0), "r_min"), (dict(r_min=3, r_max=2), "r_max"), (dict(t_warmup=-5), "t_warmup"),
    (dict(schedule="exp"), "schedule"), (dict(seed=None), "seed"), (dict(b0=True), "b0"),
    (dict(interval=2.0), "interval"),
])
def test_allocator_validates(kw, msg):
    args = dict(b0=2, t_warmup=10, t_final=20, total_steps=100, interval=5) | kw
    with pytest.raises(ValueError, match=msg):
        fl.RankAllocator(matrices(n=2), **args)
    with pytest.raises(ValueError, match="inject"):
        fl.RankAllocator(nn.Linear(2, 2), b0=1, t_warmup=0, t_final=0, total_steps=10, interval=1)


@pytest.mark.parametrize("kw, msg", [
    (dict(r=0), "r must"), (dict(r=True), "r must"), (dict(alpha="16"), "alpha"),
    (dict(alpha=float("inf")), "alpha"), (dict(dropout=-0.1), "dropout"),
    (dict(target_modules=None), "target_modules must be"), (dict(target_modules=[]), "target_modules is empty"),
    (dict(target_modules=[3]), "target_modules must be"), (dict(trainable=None), "trainable must be"),
    (dict(trainable=["tail"]), r"trainable \['tail'\]"), (dict(target_modules="tail"), r"\['tail'\] match no"),
])
def test_inject_checks_everything_before_changing_the_model(kw, msg):
    # r = 0 used to raise after every parameter was frozen
    model = Matrices(3, 8)
    model.head = nn.Linear(8, 1)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=msg):
        fl.inject(model, **dict(target_modules=r"mats\.\d+", r=2, alpha=4, trainable=["head"]) | kw)
    assert_unchanged(model, snap)


def test_numpy_scalars_are_numbers(tmp_path):
    # a sweep's np.arange / np.float64 values: accepted, and kept as Python numbers (JSON-safe)
    model = Matrices(3, 8)
    fl.inject(model, r"mats\.\d+", r=np.int64(3), alpha=np.float32(6), dropout=np.float64(0.0))
    layer = fl.adapters(model)["mats.0"]
    assert (layer.r, layer.r_init, layer.scaling) == (3, 3, 2.0) and type(layer.r_init) is int
    groups = fl.param_groups(model, lr=np.float64(1e-3), lambda_lr_ratio=np.int64(16))
    assert sorted(g["lr"] for g in groups) == [1e-3, 16e-3] and all(type(g["lr"]) is float for g in groups)
    alloc = fl.RankAllocator(model, b0=np.int64(1), t_warmup=np.int64(2), t_final=np.int32(2),
                             total_steps=np.int64(20), interval=np.int64(2), seed=np.uint8(1))
    json.dumps(alloc.state_dict()["config"])  # a checkpoint's metadata
    fio.save_adapter(model, str(tmp_path / "a.safetensors"))
    with pytest.raises(ValueError, match="r must"):
        fl.inject(Matrices(3, 8), r"mats\.\d+", r=np.bool_(True), alpha=1)


def test_a_model_must_be_a_module():
    for call in (lambda: fl.inject({}, "x", r=1, alpha=1), lambda: fl.adapters(None),
                 lambda: fl.rank_pattern([]), lambda: fio.merge("model"),
                 lambda: fio.save_adapter({}, "a")):
        with pytest.raises(TypeError, match="expected a torch.nn.Module"):
            call()


def test_trainable_modules_are_trained_in_full_never_wrapped():
    # ".*" covers the head too: `trainable` wins, the head stays an nn.Linear and trains
    model = Matrices(3, 8)
    model.head = nn.Linear(8, 1)
    layers = fl.inject(model, ".*", r=2, alpha=4, trainable=["head"])
    assert sorted(layers) == ["mats.0", "mats.1", "mats.2"] and type(model.head) is nn.Linear
    assert model.head.weight.requires_grad and model.head.bias.requires_grad
    with pytest.raises(ValueError, match=r"\['head'\] match no nn.Linear of the model outside `trainable`"):
        other = Matrices(1, 8)
        other.head = nn.Linear(8, 1)
        fl.inject(other, "head", r=1, alpha=1, trainable=["head"])


def test_diverged_training_is_reported_not_scored_as_nan():
    model = spectra_model()
    with torch.no_grad():
        model.mats[3].Lambda[0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite P, λ or Q in \['mats.3'\]"):
        allocator(model).step(1)


# -----------------------------------------------------------------------------
# 13. end to end: a student learns planted low-rank updates through many allocations


def test_end_to_end_planted_teacher():
    planted = [0, 0, 1, 2, 4, 8]
    model, alloc, losses = train(planted, r0=3, steps=600, t_warmup=50, t_final=100, interval=10,
                                 b0=2, d=16, seed=0)
    assert len(alloc.history) >= 10 and sum(h["k"] for h in alloc.history) >= 10
    assert all(sum(h["ranks"].values()) == 18 for h in alloc.history)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-20:]) / 20 < 0.2 * losses[0]


# -----------------------------------------------------------------------------
# the README's usage snippet runs as written


def test_readme_snippet_runs_and_prints_what_it_says(tmp_path, monkeypatch, capsys):
    readme = Path(__file__).with_name("README.md").read_text(encoding="utf-8")
    code = re.search(r"<!-- usage -->\s*```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)  # the snippet saves adapter.safetensors
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    # a comment "# 8 7: why" claims the printed "8 7"; "# e.g. ..." claims nothing exact
    claimed = [line.split("  # ", 1)[1].split(":")[0] for line in code.splitlines()
               if line.startswith("print(") and "  # " in line]
    assert len(claimed) == len(printed) == 2
    assert all(c.startswith("e.g.") or c == p for c, p in zip(claimed, printed))
    assert (tmp_path / "adapter.safetensors").exists()


def test_a_merged_adapter_cannot_train_and_its_state_dict_holds_the_unmerged_weights():
    model = spectra_model()
    x = torch.randn(4, 8)
    ref = model(x).detach()
    fio.merge(model)
    assert not model(x).requires_grad  # P, Q, λ are out of a merged forward: no gradient moves them
    with pytest.raises(ValueError, match="merged: unmerge"):  # R would: refused
        fl.orthogonal_regularizer(model)
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-5)  # evaluation while merged is fine
    fresh = spectra_model()  # the same base weights, unmerged, other adapters
    fresh.load_state_dict(model.state_dict())  # ΔW counted once, not twice
    assert torch.allclose(fresh(x), ref, atol=1e-5) and not any(m.merged for m in fl.adapters(fresh).values())
    model.load_state_dict(fresh.state_dict())  # into a merged model: it unmerges first
    assert torch.allclose(model(x), ref, atol=1e-5)


def test_merging_a_shared_weight_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight  # tied, as an lm_head with the input embedding
    fl.inject(model, ["0"], r=2, alpha=2)
    with pytest.raises(ValueError, match=r"the weight of 0.base.weight is also \['1.weight'\]"):
        fio.merge(model)
    with pytest.raises(ValueError, match="Untie it"):
        fio.unload(model)
    assert not model[0].merged


def test_save_adapter_keeps_a_files_mode_and_a_symlink(tmp_path):
    model = spectra_model()
    target, link = tmp_path / "adapter.safetensors", tmp_path / "latest.safetensors"
    fio.save_adapter(model, str(target))
    target.chmod(0o644)
    link.symlink_to(target)
    fio.save_adapter(model, str(link))  # through the link: the target is rewritten, the link stays
    assert link.is_symlink() and (target.stat().st_mode & 0o777) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "latest.safetensors"]
    fresh = spectra_model()
    fio.load_adapter(fresh, str(link))
    assert same(fresh.state_dict(), model.state_dict())


def test_load_adapter_into_the_meta_device_says_to_materialize_first(tmp_path):
    fio.save_adapter(spectra_model(), str(tmp_path / "a.safetensors"))
    with torch.device("meta"):
        model = spectra_model()
    with pytest.raises(ValueError, match="meta device.*to_empty"):
        fio.load_adapter(model, str(tmp_path / "a.safetensors"))


# -----------------------------------------------------------------------------
# the optimizer warm start of a reborn slot (_own_count)


def reborn_slot_run(opt_class, warm_start=True, **opt_kw):
    """Train 2 adapters 100 steps; at step 60 mats.1 gains a direction (its slot 3). A fresh
    optimizer, given the same gradients, steps a copy of that slot alone. Returns both trajectories."""
    class Fixed(fl.RankAllocator):  # mats.0 always gives, mats.1 always takes
        def scores(self, lams):
            return {n: float(n == "mats.1") for n in lams}
    torch.manual_seed(0)
    model = Matrices(2, 8)
    fl.inject(model, r"mats\.\d+", r=3, alpha=3, r_max=4)
    layer = model.mats[1]
    opt = opt_class([p for p in model.parameters() if p.requires_grad], lr=1e-2, **opt_kw)
    # one allocation: the window (30, 61] holds only t = 60
    alloc = Fixed(model, b0=1, t_warmup=30, t_final=39, total_steps=100, interval=30,
                  schedule="constant", warm_start=warm_start)
    x, y = torch.randn(64, 8), torch.randn(64, 2, 8)
    ref = ref_opt = None
    ours, theirs = [], []
    for t in range(1, 101):
        ((model(x) - y) ** 2).mean().backward()
        if ref is not None:  # the fresh optimizer: the slot's own gradient
            for r, p, d in zip(ref, (layer.P, layer.Lambda, layer.Q), (1, 0, 0)):
                r.grad = p.grad.select(d, 3).clone()
            ref_opt.step()
        opt.step()
        rec = alloc.step(t, opt)
        opt.zero_grad()
        if rec:
            assert rec["added"] == {"mats.1": 3}
            ref = [p.detach().select(d, 3).clone().requires_grad_()
                   for p, d in zip((layer.P, layer.Lambda, layer.Q), (1, 0, 0))]
            ref_opt = opt_class(ref, lr=1e-2, **opt_kw)
        elif ref is not None:
            ours.append(torch.cat([layer.P[:, 3], layer.Lambda[3:4], layer.Q[3]]).detach().clone())
            theirs.append(torch.cat([r.detach().reshape(-1) for r in ref]))
    return torch.stack(ours), torch.stack(theirs)


@pytest.mark.parametrize("opt_class,kw", [(torch.optim.Adam, {}), (torch.optim.AdamW, dict(weight_decay=0.1)),
                                          (torch.optim.Adam, dict(weight_decay=0.01, amsgrad=True))])
def test_a_reborn_slot_steps_as_a_fresh_optimizer_on_it_alone(opt_class, kw):
    ours, theirs = reborn_slot_run(opt_class, **kw)
    assert len(ours) == 40 and (ours[-1] - ours[0]).abs().max() > 1e-2  # it moved
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    # with the tensor's own step count (warm_start=False: the earlier behaviour) it does not
    ours, theirs = reborn_slot_run(opt_class, warm_start=False, **kw)
    assert not torch.allclose(ours, theirs, rtol=1e-3, atol=1e-4)


def test_sgd_needs_no_count_and_the_birth_steps_are_saved():
    ours, theirs = reborn_slot_run(torch.optim.SGD, momentum=0.9)  # momentum restarts at 0: fresh as is
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    model = matrices(n=4)
    alloc = allocator(model)
    alloc.step(1)
    state = alloc.state_dict()
    assert state["born"][alloc.history[0]["expanded"][0]][3] == 1  # slot 3, born at t = 1
    again = allocator(copy.deepcopy(model))
    again.load_state_dict(state)
    assert again.born == alloc.born
    with pytest.raises(ValueError, match="warm_start must be True or False"):
        allocator(matrices(), warm_start="yes")
