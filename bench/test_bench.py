"""Tests of the benchmarks: bench/speed.py on the tiny model (structure and sanity, never
timings), bench/quality.py's commands and table (no training), bench/alloc.py's variants of
the allocation rule.

    python -m pytest -q bench        # ~30 s on 2 CPU cores
"""

import json
import math

import pytest
import torch
import torch.nn as nn

import bench.alloc as A
import bench.quality as Q
import bench.speed as B
import flexlora as fl

CPU = torch.device("cpu")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers, via peft


@pytest.fixture(scope="module")
def runs():
    return {m: B.build("tiny", m, CPU) for m in B.METHODS}


@pytest.fixture(scope="module")
def batch():
    return B.make_batch(B.MODELS["tiny"], 4, 16, CPU)


def test_matched_ranks():
    # DeBERTa-base: 48 attention (768, 768) and 24 FFN matrices; the λ's are 576 of 1.33M
    shapes = [(768, 768)] * 48 + [(3072, 768), (768, 3072)] * 12
    assert B.matched_ranks(shapes, 8) == dict(lora=8, flexlora=8, adalora=8, adalora_target=5)
    # 1×1 matrices: LoRA pays 2 per direction, the SVD form 3, so rank 6 ↔ rank 4
    assert B.matched_ranks([(1, 1)] * 4, 6)["flexlora"] == 4


def test_budgets_match(runs):
    lora = runs["lora"]["trainable"]
    for m in ("adalora", "flexlora"):
        assert abs(runs[m]["trainable"] - lora) / lora < 0.02, (m, runs[m]["trainable"], lora)
    # every method trains the same head, and the head-only floor trains nothing else
    heads = {m: r["head_params"] for m, r in runs.items()}
    assert len(set(heads.values())) == 1 and runs["head"]["trainable"] == heads["head"] > 0
    # the same 12 matrices (2 layers × 6 targets) are adapted by all three adapter methods
    assert len(fl.adapters(runs["flexlora"]["model"])) == 12
    for m in ("lora", "adalora"):
        names = {n for n, _ in runs[m]["model"].named_parameters() if ".lora_A." in n}
        assert len(names) == 12, (m, names)


def test_same_weights_and_outputs_at_start(batch):
    # same seed, same base weights; every adapter starts at ΔW = 0 (LoRA: B = 0, SVD: λ = 0)
    logits = {}
    for m in B.METHODS:
        run = B.build("tiny", m, CPU)
        run["model"].eval()
        with torch.no_grad():
            logits[m] = run["model"](**{k: v for k, v in batch.items() if k != "labels"}).logits
    for m in ("lora", "adalora", "flexlora"):
        torch.testing.assert_close(logits[m], logits["head"])


def test_every_method_steps(runs, batch):
    for m, run in runs.items():
        before = {n: p.detach().clone() for n, p in run["model"].named_parameters() if p.requires_grad}
        ms, allocated = B.train_step(run, batch, CPU, amp=False)
        assert set(ms) == {"forward", "backward", "optimizer", "hook", "step"}
        assert all(v > 0 for v in ms.values()) and not allocated
        after = dict(run["model"].named_parameters())
        assert any(not torch.equal(before[n], after[n]) for n in before), m  # something learned


def test_flexlora_allocates_and_conserves_rank(batch):
    run = B.build("tiny", "flexlora", CPU, interval=2)
    total = sum(fl.rank_pattern(run["model"]).values())
    flags = [B.train_step(run, batch, CPU, amp=False)[1] for _ in range(4)]
    assert flags == [False, True, False, True]
    ranks = fl.rank_pattern(run["model"])
    assert sum(ranks.values()) == total and len(set(ranks.values())) > 1  # rank moved
    ms, ops, k = B.allocation_cost(run, CPU, calls=3)
    assert ms > 0 and ops > 0 and k == B.B0


def test_adalora_loss_includes_orthogonal_regulariser(runs, batch):
    # PEFT adds it in AdaLoraModel.forward; a PeftModel without task_type skips that forward
    model = runs["adalora"]["model"]
    with torch.no_grad():
        with_reg = model.base_model(**batch).loss
        without = model(**batch).loss
    assert with_reg > without


def test_bf16_autocast_path(batch):
    # the CUDA path (bf16 autocast) runs on CPU too: every method, including an allocation
    for m in B.METHODS:
        run = B.build("tiny", m, CPU, interval=1)
        ms, allocated = B.train_step(run, batch, CPU, amp=True)
        assert allocated == (m in ("adalora", "flexlora"))
        assert all(math.isfinite(v) for v in ms.values())


def test_allocations_in_schedule():
    # CoLA: b(t) = round(4 (1 − p)³) > 0 while p ≤ 1/2, i.e. t in (800, 2000]: 120 allocations
    assert B.allocations_in_schedule(**B.COLA) == 120
    # 100 steps, Δ = 10: b > 0 up to t = 50, so t = 10, 20, 30, 40, 50
    assert B.allocations_in_schedule(total_steps=100, t_warmup=0, t_final=0, interval=10, b0=4) == 5


def test_memory_probe_subprocess():
    res = B.probe_memory_subprocess(model_name="tiny", method="flexlora", device="cpu",
                                    batch_size=4, seq=16, amp=False, steps=1, r_lora=None)
    assert res["peak_mb"] >= res["base_mb"] > 0


def test_main_writes_json_and_table(tmp_path):
    out = tmp_path / "bench"
    results = B.main(["--models", "tiny", "--rounds", "3", "--warmup", "1", "--batch", "4",
                      "--seq", "16", "--memory", "inprocess", "--memory-steps", "1",
                      "--out", str(out)])
    saved = json.loads((out / "speed_cpu.json").read_text())
    table = (out / "speed_cpu.md").read_text()
    assert saved["meta"]["device"] == "cpu" and saved["meta"]["torch"] == torch.__version__
    res = saved["models"]["tiny"]
    assert set(res["methods"]) == set(B.METHODS) == set(results["models"]["tiny"]["methods"])
    for m, r in res["methods"].items():
        assert r["ms_step"] > 0 and len(r["steps_ms"]) == 3 and r["peak_mb"] > 0
        assert r["trainable"] > 0 and "ratio_lora" in r and "mem_ratio_lora" in r
        assert r["ops_step"] > 0
        assert f"| tiny | {m} |" in table
    assert res["methods"]["lora"]["ratio_lora"] == 1.0
    assert res["methods"]["flexlora"]["reg_ops"] > 0
    a = res["allocation"]
    assert a["ms_per_call"] > 0 and a["b"] == a["k"] == B.B0 and a["schedule"]["allocations"] == 120
    assert set(res["targets_met"]) == {"eager step <= 1.03x LoRA", "ops/step <= 1.3x LoRA", "step <= AdaLoRA",
                                       "peak memory <= 1.05x LoRA", "allocation < 1% of training"}


def test_main_rejects_unknown_model():
    with pytest.raises(SystemExit):
        B.main(["--models", "gpt5"])


# -----------------------------------------------------------------------------
# bench/quality.py: the commands it runs and the table it writes (no training here)


def test_quality_vision_command_points_at_shared_data():
    args = Q.get_args([])
    cmd = Q.command("cifar100", "flexlora-util", 1, "out/x", args)
    assert cmd[1:5] == ["-m", "bench.variant", "utilization", "train_vit.py"]  # the variant's score
    assert cmd[cmd.index("--seed") + 1] == "1" and "--epochs" in cmd
    assert cmd[cmd.index("--data") + 1].endswith("shared/data/cifar100_1k.npz")
    assert Q.command("cifar100", "flexlora", 1, "out/x", args)[1] == "train_vit.py"
    assert "--epochs" not in Q.command("cifar100", "lora", 0, "out/x", Q.get_args(["--full"]))
    assert Q.command("cifar100", "lora", 0, "out/x", args)[-7:-5] == ["--method", "lora"]


def test_quality_takes_local_paths(monkeypatch):
    # a machine without network (the GPU box): every input from a path on the command line
    args = Q.get_args(["--minilm", "/m", "--glue", "/g", "--vit", "/v", "--cifar", "/c.npz"])
    text = Q.command("rte", "lora", 0, "out/x", args)
    assert text[text.index("--model") + 1] == "/m" and text[text.index("--data_dir") + 1] == "/g"
    vision = Q.command("cifar100", "lora", 0, "out/x", args)
    assert vision[vision.index("--model") + 1] == "/v" and vision[vision.index("--data") + 1] == "/c.npz"
    three = Q.command("rte", "lora", 0, "out/x", Q.get_args(["--minilm", "/m", "--full", "--epochs", "3"]))
    assert [three[i + 1] for i, a in enumerate(three) if a == "--epochs"] == ["3"]
    # CPU size: the size's --epochs 2, then ours; the last one wins
    short = Q.command("rte", "lora", 0, "out/x", Q.get_args(["--minilm", "/m", "--epochs", "3"]))
    assert [short[i + 1] for i, a in enumerate(short) if a == "--epochs"] == ["2", "3"]
    monkeypatch.setenv("MINILM", "/from/env")  # how bench/speed.py --minilm reaches minilm()
    assert Q.minilm_path() == "/from/env"


@pytest.mark.parametrize("jobs", [1, 3])
def test_quality_runs_every_job_and_gathers_by_task_and_method(tmp_path, monkeypatch, jobs):
    done = []

    def fake_run(task, method, seed, args):  # no training: a score from the seed
        done.append((task, method, seed))
        return None if method == "adalora" else {"final": {"f1": 0.5 + seed / 10}, "counts": {"trainable": 10},
                                                  "wall_time_s": 1.0, "config": {"seed": seed}}
    monkeypatch.setattr(Q, "run", fake_run)
    results = Q.main(["--tasks", "mrpc", "--methods", "lora", "adalora", "--seeds", "0", "1", "2",
                      "--jobs", str(jobs), "--out", str(tmp_path)])
    assert sorted(done) == sorted((("mrpc", m, s) for m in ("lora", "adalora") for s in (0, 1, 2)))
    assert sorted(r["final"]["f1"] for r in results["mrpc"]["lora"]) == [0.5, 0.6, 0.7]
    assert "adalora" not in results["mrpc"]  # a failed run is left out, not scored 0
    assert "| lora | 60.0 ± 10.0 |" in open(tmp_path / "results.md").read()
    with pytest.raises(SystemExit):
        Q.get_args(["--jobs", "0"])
    # a second call into the same --out keeps the earlier runs, and a redone seed replaces its run
    monkeypatch.setattr(Q, "run", lambda task, method, seed, args: fake_run(task, method, seed, args) | {
        "final": {"f1": 0.9, "accuracy": 0.9}})
    results = Q.main(["--tasks", "rte", "mrpc", "--methods", "lora", "--seeds", "2", "--out", str(tmp_path)])
    assert sorted(r["final"]["f1"] for r in results["mrpc"]["lora"]) == [0.5, 0.6, 0.9]
    assert [r["final"]["f1"] for r in results["rte"]["lora"]] == [0.9]
    assert Q.main(["--report", "--tasks", "mrpc", "--out", str(tmp_path)]) == results
    with pytest.raises(SystemExit, match="run the benchmark first"):
        Q.main(["--report", "--out", str(tmp_path / "empty")])


def test_quality_table_mean_and_std_over_seeds():
    def run(acc, wall):
        return {"final": {"accuracy": acc}, "counts": {"trainable": 1000}, "wall_time_s": wall}
    results = {"cifar100": {"lora": [run(0.10, 10), run(0.20, 30)]}}
    md = Q.table(results, ["cifar100"], ["lora", "adalora"])
    assert "| lora | 15.0 ± 7.1 | 1k | 20 s |" in md  # std of 10 and 20 is 7.07
    assert "| adalora | — | — | — |" in md


# -----------------------------------------------------------------------------
# bench/alloc.py: variants of the allocation rule (VariantAllocator; its defaults are the paper's)


from test_flexlora import set_lambda  # noqa: E402  (gives an adapter exactly these λ)


def matrices(n, d=8, r=3):
    torch.manual_seed(0)
    model = A.Matrices(n, d)
    fl.inject(model, r"mats\.\d+", r=r, alpha=2 * r, r_max=d)
    return model


def allocator(model, b0=1, interval=1, **kw):
    """A VariantAllocator that allocates b0 at every step from t = 1 (constant schedule)."""
    return A.VariantAllocator(model, b0=b0, t_warmup=0, t_final=0, total_steps=10 ** 6,
                              interval=interval, schedule="constant", **kw)


FLAT = [1.0, 1.0, 1.0]


def two_matrices(lam_a, lam_b):
    model = matrices(n=3 if len(lam_a) == 1 else 2, d=8)
    set_lambda(model.mats[0], lam_a)
    set_lambda(model.mats[1], lam_b)
    return model


def test_energy_score_does_not_let_a_tiny_flat_update_look_saturated():
    tiny_flat, big_peaked = [1e-3, 1e-3, 1e-3], [1.0, 0.5, 0.1]
    rec = allocator(two_matrices(tiny_flat, big_peaked)).step(1)  # the paper: entropy alone
    assert rec["pruned"] == ["mats.1"] and rec["expanded"] == ["mats.0"]
    rec = allocator(two_matrices(tiny_flat, big_peaked), score="energy").step(1)
    assert rec["pruned"] == ["mats.0"] and rec["expanded"] == ["mats.1"]
    # the score is I(Λ) · ‖ΔW‖_F / max ‖ΔW‖_F, with ‖ΔW‖_F of the real matrices
    model = two_matrices(tiny_flat, big_peaked)
    norms = {n: m.delta_weight().norm().item() for n, m in fl.adapters(model).items()}
    rec = allocator(model, score="energy").step(1)
    for n, lam in (("mats.0", tiny_flat), ("mats.1", big_peaked)):
        I = fl.spectral_entropy(torch.tensor(lam)).item()
        assert rec["scores"][n] == pytest.approx(I * norms[n] / max(norms.values()), rel=1e-5)


def test_rank1_score_decides_whether_a_single_direction_can_grow_back():
    def model():
        m = two_matrices([5.0], [1.0, 0.6, 0.3])
        set_lambda(m.mats[2], [1.0, 0.9, 0.8])
        return m
    rec = allocator(model()).step(1)  # the paper's limit: I = 0 at r = 1
    assert rec["scores"]["mats.0"] == 0 and rec["expanded"] == ["mats.2"]
    rec = allocator(model(), rank1_score=1).step(1)  # a single direction counts as saturated
    assert rec["scores"]["mats.0"] == 1 and rec["expanded"] == ["mats.0"] and rec["pruned"] == ["mats.1"]


def test_utilization_score_is_effective_rank_over_rank():
    half_used = [1.0] * 4 + [0.0] * 4  # 4 of 8 directions carry all the energy
    rec = allocator(two_matrices(half_used, FLAT), score="utilization").step(1)
    assert rec["scores"]["mats.0"] == pytest.approx(4 / 8, abs=1e-6)  # entropy gives log 4 / log 8
    assert fl.spectral_entropy(torch.tensor(half_used)).item() == pytest.approx(2 / 3, abs=1e-6)
    assert rec["scores"]["mats.1"] == pytest.approx(1.0, abs=1e-6)


def test_protect_keeps_a_new_direction_out_of_pruning_and_scoring():
    def run(protect):
        model = two_matrices([1.0, 1.0, 0.5], [3.0, 0.1, 0.1])
        alloc = allocator(model, b0=1, interval=5, protect=protect)
        alloc.step(5)  # mats.0 (flatter) grows a λ = 0 direction, mats.1 shrinks to 2
        model.mats[1].Lambda.data[model.mats[1].live] = 1.0  # now mats.1 is the flat one
        return alloc.step(10), alloc
    rec, _ = run(protect=0)  # the paper: the new λ = 0 lowers mats.0's entropy, and goes first
    assert rec["pruned"] == ["mats.0"] and rec["removed"] == {"mats.0": 3}
    assert rec["scores"]["mats.0"] == pytest.approx(fl.spectral_entropy(torch.tensor([1.0, 1, 0.5, 0])).item())
    rec, alloc = run(protect=5)  # 5 steps old at t = 10: still protected (age <= protect)
    assert rec["scores"]["mats.0"] == pytest.approx(fl.spectral_entropy(torch.tensor([1.0, 1, 0.5])).item())
    assert rec["pruned"] == ["mats.0"] and rec["removed"] == {"mats.0": 2}  # the weakest old one
    # born, by slot: mats.0 grew into slot 3 at t = 5 and lost slot 2; mats.1 lost slot 1, regrew it at 10
    assert alloc.born["mats.0"] == [0, 0, 0, 5] + [0] * 4  # (0: there from the start, or dead)
    assert alloc.born["mats.1"] == [0, 10] + [0] * 6
    assert allocator(two_matrices(FLAT, FLAT), protect=5).state_dict()["born"] == \
        {"mats.0": [0] * 8, "mats.1": [0] * 8}


def test_defaults_are_the_papers_rule():
    lams = [[1.0, 0.2, 0.1], [1.0, 1.0, 0.5], [2.0, 1.0, 0.9]]
    records = []
    for cls in (fl.RankAllocator, A.VariantAllocator):
        model = matrices(n=3)
        for layer, lam in zip(fl.adapters(model).values(), lams):
            set_lambda(layer, lam)
        records.append(cls(model, 1, 0, 0, 100, 1, schedule="constant").step(1))
    assert records[0] == records[1] and records[0]["pruned"] == ["mats.0"]


def test_protect_state_survives_a_resume():
    model = two_matrices([1.0, 1.0, 1.0], [3.0, 0.1, 0.1])
    alloc = allocator(model, b0=1, interval=5, protect=5)
    alloc.step(5)
    again = allocator(model, b0=1, interval=5, protect=5)
    again.load_state_dict(alloc.state_dict())
    assert again.born == alloc.born
    with pytest.raises(ValueError, match="load_adapter"):
        allocator(two_matrices(FLAT, FLAT), b0=1, interval=5, protect=5).load_state_dict(alloc.state_dict())


@pytest.mark.parametrize("kw, msg", [(dict(score="norm"), "score"), (dict(rank1_score=0.5), "rank1_score"),
                                     (dict(protect=-1), "protect")])
def test_variant_options_validate(kw, msg):
    with pytest.raises(ValueError, match=msg):
        allocator(matrices(n=2), **kw)


# -----------------------------------------------------------------------------
# bench/dynamics.py: ΔW read back from each method's factors


@pytest.mark.parametrize("method", ["flexlora", "lora", "adalora"])
def test_dynamics_delta_weights_are_what_the_forward_adds(method):
    import bench.dynamics as D

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    if method == "flexlora":
        net = base
        fl.inject(net, ["0", "2"], r=3, alpha=6)
    else:
        import peft

        kind = peft.LoraConfig if method == "lora" else lambda **kw: peft.AdaLoraConfig(total_step=10, **kw)
        net = peft.get_peft_model(base, kind(r=3, lora_alpha=6, target_modules=["0", "2"], init_lora_weights=False)
                                  if method == "lora" else kind(init_r=3, lora_alpha=6, target_modules=["0", "2"]))
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n.endswith((".Lambda", "lora_E.default")):
                p.normal_()  # λ = 0 at init would make every ΔW zero
    x = torch.randn(4, 6, dtype=torch.float64)
    got = D.delta_weights(net, method)
    assert len(got) == 2 and all(d.abs().sum() > 0 for d in got)
    # the first layer's output with the adapter minus without it is x ΔWᵀ
    first = fl.adapters(net)["0"] if method == "flexlora" else net.base_model.model[0]
    W = first.base.weight if method == "flexlora" else first.base_layer.weight
    assert torch.allclose(first(x) - x @ W.T - (first.base.bias if method == "flexlora" else first.base_layer.bias),
                          x @ got[0].double().T, atol=1e-5)


def test_quality_best_lr_is_chosen_on_the_holdout_not_on_dev(tmp_path, monkeypatch):
    args = Q.get_args(["--minilm", "/m", "--lr_scales", "0.33", "1", "3"])
    cmd = Q.command("stsb", "lora@3", 0, "out/x", args)
    assert cmd[cmd.index("--lr_scale") + 1] == "3" and cmd[cmd.index("--holdout") + 1] == "400"
    assert "--holdout" not in Q.command("stsb", "lora", 0, "out/x", args)  # the plain runs train on all
    vision = Q.command("cifar100", "flexlora-paper@0.33", 0, "out/x", args)
    assert vision[vision.index("--holdout") + 1] == "100" and vision[vision.index("--init") + 1] == "gaussian"

    def fake_run(task, method, seed, args):  # ×3 is best on dev, ×1 on the holdout
        dev, held = {"lora": (0.5, 0.5), "lora@0.33": (0.4, 0.4), "lora@1": (0.6, 0.7), "lora@3": (0.9, 0.6)}[method]
        return {"final": {"pearson": dev + seed / 100, "holdout_pearson": held}, "counts": {"trainable": 1},
                "wall_time_s": 1.0, "config": {"seed": seed}}
    monkeypatch.setattr(Q, "run", fake_run)
    Q.main(["--tasks", "stsb", "--methods", "lora", "--seeds", "0", "2", "--lr_scales", "0.33", "1", "3",
            "--out", str(tmp_path)])
    md = open(tmp_path / "results.md").read()
    assert "| lora | 51.0 ± 1.4 |" in md  # the task's lr, trained on every example
    assert "| lora | 61.0 ± 1.4 (lr ×1) |" in md  # chosen on the holdout: ×1, though ×3 has the best dev


def test_quality_methods_take_a_learning_rate_multiple():
    assert Q.get_args(["--methods", "lora@0.33", "flexlora"]).methods == ["lora@0.33", "flexlora"]
    for bad in ("bogus", "lora@x", "lora@0", "lora@-1"):
        with pytest.raises(SystemExit):
            Q.get_args(["--methods", bad])


def test_plots_draw_a_runs_rank_history(tmp_path):
    import bench.plots as plots
    history = [dict(step=5, ranks={"enc.layer.0.query": 4, "enc.layer.1.query": 2})]
    (tmp_path / "rank_history.json").write_text(json.dumps(dict(
        method="flexlora", initial={"enc.layer.0.query": 3, "enc.layer.1.query": 3}, history=history,
        final=history[-1]["ranks"])))
    (tmp_path / "metrics.json").write_text(json.dumps(dict(train_steps=10)))
    plots.plot_run(str(tmp_path))
    for f in ("ranks.png", "rank_history.png"):
        assert (tmp_path / f).read_bytes()[:4] == b"\x89PNG"
