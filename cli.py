"""What a command-line run of train_glue.py or train_vit.py promises its user, beside the
training itself (train_common.py). No torch here: --help and a command-line error are quick.

- A mistake in the command line or in the files it names ends the run before it touches
  --output_dir, with one line `error: ...` on stderr and exit code 2, as argparse does (die).
- Ctrl-C: one line saying how to continue the run, exit code 130 (resumable).
- One run at a time writes in a folder: it holds an flock on --output_dir while it runs (the
  kernel drops it when the process ends, killed too), and a second run there stops at once
  (OutputDir). A run that ends before writing anything (an early Ctrl-C, a divergence before its
  first checkpoint) removes the folder it created; a folder that was there before stays.
- --resume DIR continues a run with its saved settings (prepare_output_dir); --overwrite clears
  the old run's files only once the new one has loaded (OutputDir.start).
- Nothing is left half-written: a checkpoint is swapped in with two renames (recover_checkpoint),
  a JSON file is renamed into place (write_json), and a full disk is one line, exit code 1, with
  the last checkpoint kept (writing).
"""

import argparse
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager

# -----------------------------------------------------------------------------
# User errors: one line and exit code 2, never a stack trace


class UserError(SystemExit):
    """SystemExit with code 2 (argparse's, for a usage error) whose str() is the message."""

    def __init__(self, msg, code=2):
        super().__init__(code)
        self.msg = msg

    def __str__(self):
        return self.msg


def die(msg, code=2):
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank stops, rank 0 alone says why
        print(f"error: {msg}", file=sys.stderr, flush=True)
    raise UserError(msg, code)


@contextmanager
def user_errors():
    # the ValueErrors of flexlora.py and of the data readers name the bad input and say what to do
    try:
        yield
    except ValueError as e:
        die(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)


@contextmanager
def resumable(args):
    """Around all of a run but its argument parsing (main: launch, loading, training, outputs).
    Ctrl-C (KeyboardInterrupt): one line saying how to continue the run, exit 130. However the run
    ends: its lock on --output_dir is let go, and an --output_dir it created and left empty (an
    early Ctrl-C, a divergence before its first checkpoint) is removed. Yields the OutputDir."""
    out = OutputDir()
    try:
        yield out
    except KeyboardInterrupt:
        # nothing written yet: an --overwrite'n or --resume'd run is still whole
        if not out.started:
            kept = (f"--output_dir {args.output_dir} is as it was" if args.output_dir
                    else "nothing was written")
            die(f"interrupted before the run started: {kept}", code=130)
        ckpt = os.path.join(args.output_dir, "checkpoint")
        how = (f"continue from its last checkpoint with --resume {args.output_dir}"
               if os.path.isdir(ckpt) or os.path.isdir(ckpt + ".old") else
               "it had written no checkpoint yet (--ckpt_every sets how often it does)")
        die(f"interrupted: {how}", code=130)
    finally:
        made = out.started and out.created and os.path.isdir(args.output_dir)  # (locked: ours)
        if made and not os.listdir(args.output_dir):
            os.rmdir(args.output_dir)
        out.release()


# -----------------------------------------------------------------------------
# --help


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help: the docstring as written, and every flag's default, unless it has none (None, False)
    or its help says it in words already, "(default ...)"."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def explain_defaults(parser, **said):
    """Add to the help of the flags named (dest=words) what their default, None, means."""
    for action in parser._actions:
        if action.dest in said:
            action.help += f" (default: {said[action.dest]})".replace("%", "%%")  # (argparse's %)


# -----------------------------------------------------------------------------
# The run folder: one run at a time, --resume, --overwrite, atomic writes


# these may differ when a run is resumed; everything else comes from the saved run
RUN_CONTROL = ("resume", "stop_after", "num_workers", "overwrite")
# every file and folder a run writes in --output_dir: --overwrite removes these and nothing else
RUN_FILES = ("metrics.json", "rank_history.json", "adapter.safetensors", "adapter", "peft_adapter",
             "merged", "ranks.png", "rank_history.png", "checkpoint", "checkpoint.old",
             "checkpoint.tmp", "metrics.json.tmp", "rank_history.json.tmp")
# the settings a run's checkpoint/args.json must hold (a run saved before a flag existed lacks it)
SAVED = ("method", "r", "lr", "epochs", "batch_size", "seed")
# flags these scripts no longer have, and the value that ran as today's code runs: a saved run
# with it resumes, one with another value is refused
RETIRED = {"gamma_warmup": 0}


def recover_checkpoint(out_dir):
    """save_checkpoint swaps with two renames: a crash between them leaves checkpoint.old, the last
    complete checkpoint, and no checkpoint/. Put it back (never delete it)."""
    ckpt = os.path.join(out_dir, "checkpoint")
    if not os.path.exists(ckpt) and os.path.isdir(ckpt + ".old"):
        os.replace(ckpt + ".old", ckpt)
        print(f"note: recovered {ckpt} from {ckpt}.old (a run stopped while saving its checkpoint)")
    elif os.path.isdir(ckpt) and os.path.lexists(ckpt + ".old"):
        # stopped while removing the old one: checkpoint/ is complete (it was swapped in)
        shutil.rmtree(ckpt + ".old", ignore_errors=True)


class OutputDir:
    """--output_dir as this run holds it: its lock, and whether the run has touched the folder
    yet (started: before that, Ctrl-C leaves an old run whole) and created it (then resumable()
    removes it if the run left it empty)."""

    def __init__(self):
        self.started = self.created = False
        self.lock = None  # (folder, file descriptor)

    def hold(self, path):
        """One run at a time in a folder: hold an exclusive flock on `path` (a folder) until the
        run ends (resumable: release), or die() if another run holds it. The kernel lets go of a
        process's locks when it ends, killed too: a stale lock never blocks. (No fcntl: no lock.)"""
        if self.lock is not None and self.lock[0] == os.path.realpath(path):
            return
        self.release()
        try:
            import fcntl
        except ImportError:  # Windows
            return
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # a folder one may write in but not read: run without
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            die(f"--output_dir {path}: another run is writing there (it holds the folder's lock): "
                f"wait for it to end, or pick another --output_dir")
        except OSError:  # a file system without locks (some network ones): run without
            os.close(fd)
            return
        self.lock = (os.path.realpath(path), fd)

    def release(self):
        if self.lock is not None:
            os.close(self.lock[1])
            self.lock = None

    def start(self, args):
        """Once the run has loaded without an error: create and lock --output_dir, then clear
        (--overwrite) every file of the old run in it, so that nothing stale is mixed in. Other
        files stay."""
        created = not os.path.isdir(args.output_dir)
        os.makedirs(args.output_dir, exist_ok=True)
        self.hold(args.output_dir)  # another run may have started there since prepare_output_dir
        self.started, self.created = True, created
        if not args.resume:
            refuse_a_run_in(args)  # (one that has written there since)
            for f in RUN_FILES:
                path = os.path.join(args.output_dir, f)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                elif os.path.lexists(path):
                    os.remove(path)


def without_retired(config, where):
    """config without the retired flags; die() if the run used one at another value than the one
    that runs as today's code does."""
    used = " ".join(f"--{k} {config[k]}" for k, v in RETIRED.items() if config.get(k, v) != v)
    if used:
        die(f"{where}: that run was started with {used}, which these scripts no longer have; "
            f"finish it with the version that started it")
    return {k: v for k, v in config.items() if k not in RETIRED}


def prepare_output_dir(args, name, check, out=None):
    """Pick the run directory (--resume: and the run's own settings), check the arguments with
    check(args), and refuse to go near another run unless asked to; `out` (an OutputDir) locks
    it. Deletes nothing: OutputDir.start() clears an --overwrite'n run once the new one has
    loaded without an error."""
    out = out or OutputDir()
    if args.resume:
        if not os.path.isdir(args.resume):
            die(f"--resume {args.resume}: no such directory")
        out.hold(args.resume)  # before anything is read or renamed there
        if os.path.exists(os.path.join(args.resume, "metrics.json")):
            die(f"--resume {args.resume}: that run has finished (metrics.json is there): "
                f"nothing to continue; start a new run, or --overwrite it")
        recover_checkpoint(args.resume)
        saved = os.path.join(args.resume, "checkpoint", "args.json")
        if not os.path.exists(saved):
            die(f"--resume {args.resume}: no checkpoint there ({saved} is missing)")
        try:
            with open(saved) as f:
                config = json.load(f)
        except (OSError, ValueError) as e:  # ValueError: broken JSON or not UTF-8
            config = f"unreadable ({type(e).__name__}: {e})"
        if isinstance(config, dict):
            config = without_retired(config, f"--resume {args.resume}")
        if isinstance(config, dict) and set(config) - set(vars(args)):
            unknown = sorted(set(config) - set(vars(args)))[:3]
            config = f"settings {unknown} unknown to this script (a run of the other script?)"
        elif (not isinstance(config, (dict, str))
              or isinstance(config, dict) and not set(SAVED) <= set(config)):
            config = "not a run's settings"
        if isinstance(config, str):  # what is wrong with it
            die(f"--resume {args.resume}: {saved}: {config}; this run cannot continue: "
                f"start it again with --output_dir {args.resume} --overwrite")
        print(f"resuming {args.resume} with its saved settings (other flags are ignored)")
        config.update({k: getattr(args, k) for k in RUN_CONTROL})
        # may be added on resume
        config["save_merged"] = config.get("save_merged") or args.save_merged
        config["output_dir"] = args.resume
        vars(args).update(config)
        check(args)
        return args
    check(args)
    if args.output_dir is None:
        # to the microsecond and the process: two runs started at once never share it
        stamp = (time.strftime("%Y%m%d-%H%M%S")
                 + f"-{time.time_ns() // 1000 % 10 ** 6:06d}-{os.getpid()}")
        args.output_dir = os.path.join("runs", f"{name}-{args.method}-{stamp}")
    parent = os.path.abspath(args.output_dir)
    while not os.path.exists(parent):  # the folder, or the nearest one above it that exists
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        die(f"--output_dir {args.output_dir}: {parent} is "
            f"{'not writable' if os.path.isdir(parent) else 'a file'}")
    if os.path.isdir(args.output_dir):  # (a new folder is locked when out.start() creates it)
        out.hold(args.output_dir)
    refuse_a_run_in(args)
    return args


def refuse_a_run_in(args):
    held = [f for f in RUN_FILES if os.path.lexists(os.path.join(args.output_dir, f))]
    if held and not args.overwrite:
        die(f"--output_dir {args.output_dir} already holds a run ({', '.join(held)}): "
            f"pass --overwrite to replace it, or --resume {args.output_dir} to continue it")


def write_json(path, obj):
    try:
        with open(path + ".tmp", "w") as f:  # then renamed: a crash never leaves half a file
            json.dump(obj, f, indent=1)
        os.replace(path + ".tmp", path)
    finally:
        if os.path.exists(path + ".tmp"):  # (a full disk)
            os.remove(path + ".tmp")


@contextmanager
def writing(args, what):
    """A full disk (or another write error) while writing `what`, an output of a finished run: one
    line and exit 1. The checkpoint stays, from which --resume writes the outputs."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as e:  # (torch's and safetensors' writers)
        ckpt = os.path.join(args.output_dir, "checkpoint")
        then = (f"--resume {args.output_dir} writes the outputs from its last checkpoint"
                if os.path.isdir(ckpt) else "run it again")
        why = getattr(e, "strerror", None) or str(e).strip()[:200] or type(e).__name__
        die(f"could not write {what} ({why}): make room, then {then}", code=1)
