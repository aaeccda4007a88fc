"""The training scripts' failure modes: a user error is one line `error: ...` on stderr
and exit code 2, before --output_dir is touched; no run is lost (--overwrite, a crash mid-checkpoint);
a diverged run stops with exit code 1 and keeps its last good checkpoint; metrics.json says what ran.

Run: python -m pytest -q test_cli.py   (offline, tiny models, well under a minute on 2 CPU cores)
"""

import argparse
import json
import os
import re
import shutil
import time

import numpy as np
import pytest
import torch

import cli
import demo
import flexlora
import flexlora_io
import loading
import train_common as common
import train_glue
import train_vit
from test_train import GLUE_TINY, VIT_TINY, read, write_glue, write_npz


def user_error(main, argv, capsys, code=2):
    """Run main(argv), expecting an exit with `code` and one line `error: ...`; return the message."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == code, err
    msg = str(e.value)
    assert "\n" not in msg and err.endswith(f"error: {msg}\n") and "Traceback" not in err
    return msg


def stopped_run(tmp_path, name="part", step=9):
    """A GLUE smoke run interrupted after `step` steps: only its checkpoint/."""
    out = str(tmp_path / name)
    assert train_glue.main(GLUE_TINY + ["--output_dir", out, "--stop_after", str(step)]) is None
    return out


# -----------------------------------------------------------------------------
# Command-line errors: one line, exit 2, nothing written


@pytest.mark.parametrize("flags, says", [
    (["--batch_size", "0"], "--batch_size 0: must be an integer >= 1"),  # was ZeroDivisionError
    (["--max_train_samples", "0"], "--max_train_samples 0"),  # was IndexError
    (["--r", "0"], "--r 0"), (["--epochs", "0"], "--epochs 0"),  # were tracebacks
    (["--gamma", "nan"], "--gamma nan"),  # was blamed on the learning rate
    (["--warmup_ratio", "2"], "--warmup_ratio 2.0"),  # was accepted
    (["--lr", "inf"], "--lr inf"), (["--lora_dropout", "1"], "--lora_dropout 1.0"),
    (["--log_every", "0"], "--log_every 0"), (["--seed", "-1"], "--seed -1"),
    (["--r_max", "2"], "--r_max 2: must be >= --r (4)"), (["--target_modules", "a,,b"], "none empty"),
    (["--method", "adalora", "--target_r", "9"], "--target_r 9"),
    (["--model", "x"], "--smoke trains its own tiny model"),  # --smoke would ignore --model
    (["--target_modules", "query_proj,foo"], "matches foo;"),  # names the one that is wrong
    (["--holdout", "1000"], "--holdout 1000"),
])
def test_glue_flag_errors(tmp_path, capsys, flags, says):
    out = tmp_path / "run"
    assert says in user_error(train_glue.main, GLUE_TINY + flags + ["--output_dir", str(out)], capsys)
    assert not out.exists()


def test_vit_flag_errors(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert "--batch_size 0" in user_error(train_vit.main, VIT_TINY + ["--batch_size", "0", "--output_dir", out], capsys)
    assert "--max_train_samples 0" in user_error(train_vit.main, VIT_TINY + ["--max_train_samples", "0"], capsys)
    assert "drop --dataset" in user_error(train_vit.main, VIT_TINY + ["--dataset", "cifar10"], capsys)
    assert "1000 training images" in user_error(train_vit.main, VIT_TINY + ["--vtab1k", "--output_dir", out], capsys)
    assert not os.path.exists(out)


def test_wrong_kind_of_model_or_data(tmp_path, capsys):
    from transformers import ViTConfig, ViTForImageClassification

    vit = str(tmp_path / "vit")  # a ViT folder given to the GLUE script: not a 130-line list of configs
    ViTForImageClassification(ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=64)).save_pretrained(vit)
    glue = write_glue(tmp_path / "glue")
    msg = user_error(train_glue.main, ["--task", "rte", "--model", vit, "--data_dir", glue], capsys)
    assert msg.startswith(f"--model {vit}: AutoModelForSequenceClassification") and "ViTConfig" in msg
    assert len(msg) < 400
    # a .tsv as --data of the ViT script: not numpy's message about pickles
    msg = user_error(train_vit.main, VIT_TINY + ["--data", str(tmp_path / "glue" / "RTE" / "train.tsv")], capsys)
    assert "not a .npz archive" in msg and "pickle" not in msg
    with open(tmp_path / "cut.npz", "wb") as f:  # a truncated archive
        f.write(open(write_npz(tmp_path / "d.npz"), "rb").read()[:300])
    assert "cut.npz" in user_error(train_vit.main, VIT_TINY + ["--data", str(tmp_path / "cut.npz")], capsys)
    np.savez(tmp_path / "obj.npz", x_train=np.array([None]), y_train=np.zeros(1), x_test=np.zeros(1),
             y_test=np.zeros(1))
    assert "object arrays" in user_error(train_vit.main, VIT_TINY + ["--data", str(tmp_path / "obj.npz")], capsys)
    # an output directory that is a file
    (tmp_path / "f").write_text("")
    for out in (tmp_path / "f", tmp_path / "f" / "run"):
        assert "is a file" in user_error(train_glue.main, GLUE_TINY + ["--output_dir", str(out)], capsys)


def test_offline_hub_fails_fast(tmp_path, capsys, monkeypatch):
    # nothing answers at this endpoint (the test machines have no network to the Hub either)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    loading._probe.cache_clear()
    try:
        tic = time.time()
        msg = user_error(train_glue.main, ["--task", "rte", "--output_dir", str(tmp_path / "a")], capsys)
        assert "GLUE rte" in msg and "--data_dir" in msg and "HF_HUB_OFFLINE=1" in msg
        glue = write_glue(tmp_path / "glue")
        msg = user_error(train_glue.main, ["--task", "rte", "--data_dir", glue, "--output_dir", str(tmp_path / "b")],
                         capsys)
        assert msg.startswith("--model microsoft/deberta-v3-base") and "HF_HUB_OFFLINE=1" in msg
        msg = user_error(train_vit.main, ["--output_dir", str(tmp_path / "c")], capsys)
        assert "--dataset cifar100" in msg and "HF_HUB_OFFLINE=1" in msg
        assert time.time() - tic < 20  # the Hub client's retries took 23-46 s for each
    finally:
        loading._probe.cache_clear()


# -----------------------------------------------------------------------------
# No run lost: --overwrite validates first and clears the whole run; a crash mid-checkpoint


def fake_run(out):
    os.makedirs(out / "checkpoint.old")
    for f in ("metrics.json", "rank_history.json", "adapter.safetensors", "ranks.png", "rank_history.png"):
        (out / f).write_text("old")
    (out / "notes.txt").write_text("mine")  # not the run's: stays


def test_overwrite_validates_first_then_clears_the_whole_run(tmp_path, capsys):
    out = tmp_path / "run"
    fake_run(out)
    before = sorted(os.listdir(out))
    for bad in (["--r", "0"], ["--target_modules", "foo"], ["--model", str(tmp_path / "nope")]):
        argv = (GLUE_TINY if bad[0] != "--model" else ["--task", "rte", "--data_dir", write_glue(tmp_path / "g")])
        user_error(train_glue.main, argv + bad + ["--output_dir", str(out), "--overwrite"], capsys)
        assert sorted(os.listdir(out)) == before and (out / "metrics.json").read_text() == "old"
    # a valid run replaces all of the old one: a run stopped early has only its checkpoint
    train_glue.main(GLUE_TINY + ["--output_dir", str(out), "--overwrite", "--stop_after", "3"])
    assert sorted(os.listdir(out)) == ["checkpoint", "notes.txt"]


def test_crash_between_the_checkpoint_renames(tmp_path, capsys):
    part = stopped_run(tmp_path)
    # the crash state: the old checkpoint renamed away, the new one complete or not in checkpoint.tmp
    os.replace(os.path.join(part, "checkpoint"), os.path.join(part, "checkpoint.old"))
    os.makedirs(os.path.join(part, "checkpoint.tmp"))
    # a new run into the folder is refused (it would have deleted checkpoint.old at its first save)
    msg = user_error(train_glue.main, GLUE_TINY + ["--output_dir", part], capsys)
    assert "checkpoint.old" in msg and f"--resume {part}" in msg
    assert os.path.isdir(os.path.join(part, "checkpoint.old"))
    # --resume puts it back and finishes as the uninterrupted run
    train_glue.main(["--resume", part])
    assert "recovered" in capsys.readouterr().out
    full = str(tmp_path / "full")
    train_glue.main(GLUE_TINY + ["--output_dir", full])
    assert read(full, "rank_history.json")["final"] == read(part, "rank_history.json")["final"]
    assert sorted(os.listdir(part)) == sorted(os.listdir(full))  # no .old or .tmp left


def test_resume_from_damaged_checkpoints(tmp_path, capsys):
    part = stopped_run(tmp_path)
    ckpt = lambda d, f: os.path.join(d, "checkpoint", f)

    def damaged(name, f, data):
        d = str(tmp_path / name)
        shutil.copytree(part, d)
        with open(ckpt(d, f), "wb") as fh:
            fh.write(data)
        return user_error(train_glue.main, ["--resume", d], capsys), d

    adapter, state = (open(ckpt(part, f), "rb").read() for f in ("adapter.safetensors", "state.pt"))
    msg, d = damaged("a", "adapter.safetensors", adapter[:len(adapter) // 2])  # truncated
    assert ckpt(d, "adapter.safetensors") in msg and "--overwrite" in msg
    for name, data in (("b", state[:len(state) // 2]), ("c", os.urandom(4096)), ("d", b"\x80\x02}q\x00.")):
        msg, d = damaged(name, "state.pt", data)  # truncated, random bytes, a pickled empty dict
        assert ckpt(d, "state.pt") in msg and "weights_only" not in msg
    msg, d = damaged("e", "args.json", b'{"method": "flexlora", "r": ')
    assert ckpt(d, "args.json") in msg and "unreadable" in msg
    for name, data in (("f", b"[1, 2]"), ("g", b'{"method": "flexlora"}')):
        assert "not a run's settings" in damaged(name, "args.json", data)[0]
    lora = str(tmp_path / "lora")  # PEFT's adapter in the checkpoint, truncated
    train_glue.main(GLUE_TINY + ["--method", "lora", "--output_dir", lora, "--stop_after", "3"])
    with open(ckpt(lora, "adapter.safetensors"), "r+b") as fh:
        fh.truncate(100)
    assert ckpt(lora, "adapter.safetensors") in user_error(train_glue.main, ["--resume", lora], capsys)
    # a run saved with a flag since retired: at the value that runs as today's code it resumes
    old = read(part, "checkpoint/args.json")
    msg = damaged("h", "args.json", json.dumps(dict(old, gamma_warmup=100)).encode())[0]
    assert "--gamma_warmup 100, which these scripts no longer have" in msg
    d = str(tmp_path / "i")
    shutil.copytree(part, d)
    with open(ckpt(d, "args.json"), "w") as fh:
        json.dump(dict(old, gamma_warmup=0), fh)
    train_glue.main(["--resume", d])
    assert read(d, "rank_history.json")["final"]
    # a GLUE run resumed by the ViT script
    assert "unknown to this script" in user_error(train_vit.main, ["--resume", part], capsys)
    assert "no such directory" in user_error(train_glue.main, ["--resume", str(tmp_path / "nope")], capsys)
    # --stop_after at or below the checkpoint's step: was ignored, and the run went on to the end
    assert "at step 9 already" in user_error(train_glue.main, ["--resume", part, "--stop_after", "5"], capsys)
    assert not os.path.exists(os.path.join(part, "metrics.json"))


# -----------------------------------------------------------------------------
# Divergence: exit 1, nothing saved from the diverged model, the last good checkpoint kept


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = str(tmp_path / "run")  # outside the allocation window (b0 0), a checkpoint at every step
    msg = user_error(train_glue.main, GLUE_TINY + ["--lr", "1000", "--b0", "0", "--ckpt_every", "1",
                                                   "--output_dir", out], capsys, code=1)
    assert msg.startswith("training diverged") and "--lr" in msg
    bad = int(re.search(r"at step (\d+)", msg)[1])
    assert not any(os.path.exists(os.path.join(out, f)) for f in ("metrics.json", "adapter.safetensors"))
    state = torch.load(os.path.join(out, "checkpoint", "state.pt"), weights_only=True)
    assert state["step"] == bad - 1 and f"(step {bad - 1})" in msg
    args = train_glue.get_args(GLUE_TINY)
    model, _ = train_glue.load_model(args)
    flexlora.inject(model, train_glue.TARGETS[0], r=4, alpha=8, trainable=["classifier", "pooler"])
    # refuses non-finite values
    flexlora_io.load_adapter(model, os.path.join(out, "checkpoint", "adapter.safetensors"))
    # inside the window: the allocator's check of λ ends it the same way (and no checkpoint yet)
    msg = user_error(train_glue.main, GLUE_TINY + ["--lr", "1000", "--log_every", "100", "--output_dir",
                                                   str(tmp_path / "b")], capsys, code=1)
    assert "diverged" in msg and "no checkpoint" in msg


# -----------------------------------------------------------------------------
# A schedule that allows no allocation; metrics.json says what ran


def test_a_schedule_without_allocations_is_fixed_or_refused(capsys):
    # the ViT run: T 32, t_w 3, t_f 16, Δ 10: b(13) = round(4 (3/13)³) = 0, no allocation
    args = argparse.Namespace(t_w=3, t_f=16, delta=10, b0=4, schedule="cubic")
    assert common.allocation_steps(args, 32) == []
    common.fit_delta(args, 32)
    assert args.delta < 10 and common.allocation_steps(args, 32) and "Δ lowered" in capsys.readouterr().out
    # b0 1 in a 4-step window: b(t) is 0 everywhere whatever Δ: refused, unless --b0 0 says so
    with pytest.raises(SystemExit, match="no rank allocation.*--b0 0") as e:
        common.fit_delta(argparse.Namespace(t_w=2, t_f=2, delta=1, b0=1, schedule="cubic"), 8)
    assert e.value.code == 2
    common.fit_delta(argparse.Namespace(t_w=2, t_f=2, delta=1, b0=0, schedule="cubic"), 8)


def test_metrics_record_what_ran(tmp_path, monkeypatch):
    out = str(tmp_path / "vit")  # the window in a 32-step smoke run
    m = train_vit.main(VIT_TINY + ["--t_w", "3", "--t_f", "16", "--delta", "10", "--output_dir", out])
    assert m["config"]["delta"] < 10 and m["allocation_stats"]["allocations"] >= 1
    assert m["counts"]["planned_allocations"] >= m["allocation_stats"]["allocations"]
    run = read(out, "metrics.json")["run"]
    assert run["model"].startswith("smoke: a tiny random ViT") and run["data"].startswith("smoke")
    assert m["config"]["model"] is None and m["config"]["dataset"] is None  # not vit-base / cifar100
    assert run["train_examples"] == 256 and run["versions"]["torch"] == torch.__version__
    assert run["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", run["git_commit"])
    import peft
    import transformers

    assert run["versions"]["transformers"] == transformers.__version__ and run["versions"]["peft"] == peft.__version__
    monkeypatch.setenv("PATH", str(tmp_path))  # no git: None, never a failure
    assert common.provenance()["git_commit"] is None
    # GLUE, from local TSVs
    glue = write_glue(tmp_path / "glue", n=24)
    out = str(tmp_path / "glue_run")
    m = train_glue.main(["--smoke", "--task", "rte", "--data_dir", glue, "--epochs", "2", "--batch_size", "8",
                         "--t_w", "1", "--t_f", "2", "--delta", "1", "--output_dir", out])
    assert m["run"]["model"].startswith("smoke: a tiny random DeBERTa") and m["config"]["model"] is None
    assert m["run"]["data"] == f"GLUE TSVs in {os.path.abspath(glue)}"


# -----------------------------------------------------------------------------
# The second probe set: bad data, a finished run, a kill while a checkpoint was removed, a hand-set
# WORLD_SIZE, default folders of runs started at once


@pytest.mark.parametrize("split, score", [("train", "nan"), ("dev", "inf")])
def test_a_non_finite_stsb_score_is_a_data_error_naming_file_and_line(tmp_path, capsys, split, score):
    root = tmp_path / "glue"
    write_glue(root)
    path = root / "STS-B" / f"{split}.tsv"
    lines = path.read_text().splitlines(keepends=True)
    lines[3] = lines[3].rsplit("\t", 1)[0] + f"\t{score}\n"  # the third example
    path.write_text("".join(lines))
    msg = user_error(train_glue.main, GLUE_TINY + ["--task", "stsb", "--data_dir", str(root),
                                                    "--output_dir", str(tmp_path / "run")], capsys)
    assert f"{path} line 4: label '{score}' is not one of a finite score" in msg
    assert not (tmp_path / "run").exists()


def test_resume_of_a_finished_run_is_refused(tmp_path, capsys):
    out = str(tmp_path / "done")
    train_glue.main(GLUE_TINY + ["--output_dir", out])
    before = (tmp_path / "done" / "metrics.json").read_text()
    msg = user_error(train_glue.main, ["--resume", out], capsys)
    assert "has finished" in msg and (tmp_path / "done" / "metrics.json").read_text() == before


def test_resume_beside_a_leftover_checkpoint_old(tmp_path):
    # killed while save_checkpoint removed checkpoint.old: both are there, checkpoint/ complete
    out = stopped_run(tmp_path)
    shutil.copytree(os.path.join(out, "checkpoint"), os.path.join(out, "checkpoint.old"))
    assert train_glue.main(["--resume", out])["final"]
    assert not os.path.exists(os.path.join(out, "checkpoint.old"))


def test_world_size_set_by_hand_says_to_use_a_launcher(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    msg = user_error(train_glue.main, GLUE_TINY + ["--output_dir", str(tmp_path / "run")], capsys)
    assert "no launcher started this process: run it with torchrun" in msg


def test_default_folders_of_runs_started_in_one_second_differ(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    args = lambda: train_glue.get_args(["--smoke"])
    folders = {cli.prepare_output_dir(args(), "glue-cola", train_glue.check_args).output_dir
               for _ in range(3)}
    assert len(folders) == 3


# -----------------------------------------------------------------------------
# Issue 23, the rest: one run per folder, nothing deleted before the data is read, a full disk,
# a run that wrote nothing, Ctrl-C while loading


def other_run_holds(path):
    """The lock another run holds on its --output_dir while it writes there (an open descriptor)."""
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_one_run_at_a_time_in_an_output_dir(tmp_path, capsys, monkeypatch):
    import subprocess
    import sys

    part = stopped_run(tmp_path)
    state = (tmp_path / "part" / "checkpoint" / "state.pt").read_bytes()
    fd = other_run_holds(part)
    try:  # was: both ran, the last writer won
        for argv in (GLUE_TINY + ["--output_dir", part, "--overwrite"], ["--resume", part]):
            assert "another run is writing there" in user_error(train_glue.main, argv, capsys)
        assert (tmp_path / "part" / "checkpoint" / "state.pt").read_bytes() == state
    finally:
        os.close(fd)
    # two runs started at once into a new folder: the other one creates it while this one loads
    new, load, fds = str(tmp_path / "new"), train_glue.load_data, []

    def the_other_run_starts_meanwhile(args):
        os.makedirs(new)
        fds.append(other_run_holds(new))
        return load(args)

    monkeypatch.setattr(train_glue, "load_data", the_other_run_starts_meanwhile)
    try:
        msg = user_error(train_glue.main, GLUE_TINY + ["--output_dir", new], capsys)
        assert msg.startswith(f"--output_dir {new}: another run is writing there") and os.path.isdir(new)
    finally:
        os.close(fds[0])
    monkeypatch.setattr(train_glue, "load_data", load)
    # a run killed while it held the lock: the kernel let go of it, --resume continues
    hold = "import fcntl, os, sys, time; fcntl.flock(os.open(sys.argv[1], os.O_RDONLY), fcntl.LOCK_EX); " \
           "print('held', flush=True); time.sleep(60)"
    other = subprocess.Popen([sys.executable, "-c", hold, part], stdout=subprocess.PIPE, text=True)
    assert other.stdout.readline() == "held\n"
    other.kill()
    other.wait()
    assert train_glue.main(["--resume", part])["final"]
    cli.OutputDir().hold(part)  # and this process let go of it at the end of its run


def test_a_run_that_wrote_nothing_leaves_no_folder(tmp_path, capsys, monkeypatch):
    # diverged before its first checkpoint; Ctrl-C before it: the empty folder it made is removed
    out = str(tmp_path / "diverged")
    msg = user_error(train_glue.main, GLUE_TINY + ["--lr", "1000", "--log_every", "100",
                                                   "--output_dir", out], capsys, code=1)
    assert "no checkpoint had been written" in msg and not os.path.exists(out)
    monkeypatch.setattr(common, "save_checkpoint", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    out = tmp_path / "early"
    msg = user_error(train_glue.main, GLUE_TINY + ["--output_dir", str(out)], capsys, code=130)
    assert "no checkpoint yet" in msg and not out.exists()
    os.makedirs(out)  # a folder that was there before the run stays, even empty
    user_error(train_glue.main, GLUE_TINY + ["--output_dir", str(out)], capsys, code=130)
    assert out.is_dir() and not os.listdir(out)


@pytest.mark.parametrize("where", ["load_data", "load_model"])
def test_ctrl_c_while_an_overwrite_run_loads(tmp_path, capsys, monkeypatch, where):
    out = tmp_path / "run"
    fake_run(out)
    before = sorted(os.listdir(out))

    def interrupted(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_glue, where, interrupted)  # was a raw KeyboardInterrupt traceback
    msg = user_error(train_glue.main, GLUE_TINY + ["--output_dir", str(out), "--overwrite"], capsys, code=130)
    assert msg == f"interrupted before the run started: --output_dir {out} is as it was"
    assert sorted(os.listdir(out)) == before


def test_overwrite_reads_every_image_before_it_deletes(tmp_path, capsys):
    from PIL import Image

    for c, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        os.makedirs(tmp_path / "imgs" / c)
        for i in range(5):
            Image.new("RGB", (8, 8), colour).save(tmp_path / "imgs" / c / f"{i}.png")
    bad = tmp_path / "imgs" / "dog" / "3.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated: was found in training, the old run gone
    out = tmp_path / "run"
    fake_run(out)
    before = sorted(os.listdir(out))
    msg = user_error(train_vit.main, VIT_TINY + ["--data", str(tmp_path / "imgs"), "--batch_size", "4",
                                                 "--output_dir", str(out), "--overwrite"], capsys)
    assert f"{bad} is not a readable image" in msg
    assert sorted(os.listdir(out)) == before and (out / "metrics.json").read_text() == "old"


@pytest.mark.parametrize("failing", ["metrics.json", "adapter.safetensors"])
def test_a_full_disk_at_the_end_keeps_the_checkpoint(tmp_path, capsys, monkeypatch, failing):
    from safetensors import SafetensorError

    out = str(tmp_path / "run")
    path = os.path.join(out, failing)
    write_json, save_adapter = cli.write_json, flexlora_io.save_adapter

    def full_json(p, obj):
        if p == path:
            raise OSError(28, "No space left on device")
        write_json(p, obj)

    def full_adapter(model, p):
        if p == path:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        save_adapter(model, p)

    monkeypatch.setattr(cli, "write_json", full_json)  # was a raw OSError / SafetensorError
    monkeypatch.setattr(flexlora_io, "save_adapter", full_adapter)
    msg = user_error(train_glue.main, GLUE_TINY + ["--output_dir", out], capsys, code=1)
    what = path if failing == "metrics.json" else f"the adapter in {out}"
    assert msg.startswith(f"could not write {what} (") and "No space left on device" in msg
    assert msg.endswith(f"make room, then --resume {out} writes the outputs from its last checkpoint")
    assert "metrics.json" not in os.listdir(out) and os.path.isdir(os.path.join(out, "checkpoint"))
    monkeypatch.undo()
    assert train_glue.main(["--resume", out])["final"] and os.path.isfile(path)


def test_a_collapsed_run_and_a_single_allocation_are_warned_at_the_end(tmp_path, capsys):
    # was: MCC 0.0 and one planned allocation, without a word (planned_allocations in metrics.json)
    out = str(tmp_path / "run")
    m = train_glue.main(GLUE_TINY + ["--lr", "1e-6", "--delta", "2", "--output_dir", out])
    collapsed, single = m["warnings"]
    assert "all 32 examples predicted as class" in collapsed and m["final"]["mcc"] == 0.0
    assert single.startswith("FlexLoRA's schedule planned a single rank allocation in these 16 steps")
    assert capsys.readouterr().out.splitlines()[-2:] == [f"warning: {collapsed}", f"warning: {single}"]
    assert read(out, "metrics.json")["warnings"] == m["warnings"]


# -----------------------------------------------------------------------------
# What a newcomer trips on: a slow --help, its defaults, warnings at the end


def test_help_and_command_line_errors_import_no_hub_library():
    # --help and a bad flag took 8-29 s: peft and transformers were imported before the flags were read
    import subprocess
    import sys

    code = """if True:
        import runpy, sys
        for script, argv in (("train_glue", ["--help"]), ("train_glue", ["--smoke", "--r", "0"]),
                             ("train_vit", ["--help"]), ("train_vit", ["--smoke", "--batch_size", "0"]),
                             ("demo", ["--help"])):
            sys.argv = [script + ".py"] + argv
            try:
                runpy.run_path(script + ".py", run_name="__main__")
            except SystemExit as e:
                print("exit", e.code)
        heavy = {"transformers", "peft", "datasets", "sklearn", "scipy", "flexlora_hf"}
        print("imported", sorted(heavy & {m.split(".")[0] for m in sys.modules}))"""
    here = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=here, timeout=120)
    lines = [l for l in run.stdout.splitlines() if l.startswith(("exit", "imported"))]
    assert lines == ["exit 0", "exit 2", "exit 0", "exit 2", "exit 0", "imported []"], run.stdout + run.stderr


def test_help_shows_each_default_once_and_says_what_it_follows(capsys):
    def help_of(get_args, *argv):
        with pytest.raises(SystemExit) as e:
            get_args([*argv, "--help"])
        assert e.value.code == 0
        return " ".join(capsys.readouterr().out.split())  # unwrapped

    glue = help_of(train_glue.get_args, "--task", "rte")
    assert "(default: None)" not in glue and "(default: the Hub) (default" not in glue  # was doubled
    assert "peak learning rate of AdamW (default: 0.0012)" in glue and "those of --task rte:" in glue
    vit = help_of(train_vit.get_args)
    assert "(default: None)" not in vit and "shows the smoke run's" in vit
    assert "warm-up steps before the first allocation (default: 10% of the run's steps)" in vit
    assert "(default: 50% of the run's steps)" in vit and "between allocations (default: 10 steps)" in vit
    assert "before the first allocation (default: 8)" in help_of(train_vit.get_args, "--smoke")
    assert help_of(demo.get_args).count(" (default: ") == 8  # every flag: what it does, its default


def test_vit_window_flags_default_one_by_one():
    # was: --t_f alone replaced by 50% of the run, --t_w alone a TypeError
    args = argparse.Namespace(t_w=None, t_f=100, delta=None)
    train_vit.default_window(args, 1000)
    assert (args.t_w, args.t_f, args.delta) == (100, 100, 10)
    args = argparse.Namespace(t_w=7, t_f=None, delta=3)
    train_vit.default_window(args, 1000)
    assert (args.t_w, args.t_f, args.delta) == (7, 500, 3)


@pytest.mark.parametrize("after", [0.5, 2.0])  # (torch loading; then the script's own loading)
def test_ctrl_c_in_the_first_seconds_is_one_line(tmp_path, after):
    # was: a KeyboardInterrupt traceback, or an abort in torch's C++ ("terminate called ...")
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    fake_run(out)
    before = sorted(os.listdir(out))
    here = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.Popen([sys.executable, "train_glue.py", *GLUE_TINY, "--output_dir", str(out), "--overwrite"],
                           cwd=here, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
    time.sleep(after)
    run.send_signal(signal.SIGINT)
    err = run.communicate(timeout=60)[1]
    assert run.returncode == 130 and "Traceback" not in err and "terminate" not in err, err
    assert err.strip().splitlines()[-1].startswith("error: interrupted")
    assert sorted(os.listdir(out)) == before
