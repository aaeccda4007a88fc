"""Tests of bench_speed.py on the tiny model: structure and sanity, never timings.

    python -m pytest -q test_bench.py        # ~30 s on 2 CPU cores
"""

import json
import math

import pytest
import torch

import bench_speed as B
import flexlora

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
    assert len(flexlora.adapters(runs["flexlora"]["model"])) == 12
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
    total = sum(flexlora.rank_pattern(run["model"]).values())
    flags = [B.train_step(run, batch, CPU, amp=False)[1] for _ in range(4)]
    assert flags == [False, True, False, True]
    ranks = flexlora.rank_pattern(run["model"])
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
    assert set(res["targets_met"]) == {"step <= 1.10x LoRA", "step <= AdaLoRA",
                                       "peak memory <= 1.05x LoRA", "allocation < 1% of training"}


def test_main_rejects_unknown_model():
    with pytest.raises(SystemExit):
        B.main(["--models", "gpt5"])


# -----------------------------------------------------------------------------
# bench_quality.py: the commands it runs and the table it writes (no training here)

import bench_quality as Q


def test_quality_vision_command_points_at_shared_data():
    args = Q.get_args([])
    cmd = Q.command("cifar100", "flexlora-util", 1, "out/x", args)
    assert cmd[1] == "train_vit.py" and cmd[cmd.index("--seed") + 1] == "1"
    assert cmd[cmd.index("--data") + 1].endswith("shared/data/cifar100_1k.npz")
    assert cmd[cmd.index("--score") + 1] == "utilization" and "--epochs" in cmd
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
    monkeypatch.setenv("MINILM", "/from/env")  # how bench_speed.py --minilm reaches minilm()
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
