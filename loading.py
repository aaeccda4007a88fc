"""Models from the Hugging Face Hub or local folders, with one clear line (cli.die) when the
path, the Hub or the checkpoint is not what is needed, and the loading report in a few lines."""

import functools
import os
from contextlib import contextmanager

import cli


def hub_unreachable():
    """None if the Hugging Face Hub answers within 5 s, else why not. (The Hub client would retry 5
    times, 23-46 s, before failing; with HF_HUB_OFFLINE=1 the libraries read their cache alone.)"""
    offline = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    if any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in offline):
        return None  # the libraries fail at once themselves if the cache lacks it
    return _probe(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


@functools.lru_cache(maxsize=None)  # once per process
def _probe(endpoint):
    import ssl
    import urllib.error
    import urllib.request

    try:  # (through the proxy of https_proxy, if one is set)
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=5).close()
    except urllib.error.HTTPError:
        pass  # it answered
    except (OSError, ValueError) as e:  # no network, no DNS, refused, timed out
        reason = getattr(e, "reason", e)
        # (a TLS problem: it answered; the Hub client decides)
        if not isinstance(reason, ssl.SSLError):
            return f"{endpoint} cannot be reached ({reason})"
    return None


def need_hub(what, instead):
    """cli.die() at once, saying what to do, when `what` must come from an unreachable Hub."""
    why = hub_unreachable()
    if why:
        cli.die(f"{what} is on the Hugging Face Hub, and {why}. {instead}; or, if it is in your "
                f"Hugging Face cache, set HF_HUB_OFFLINE=1 to load it from there")


def where(name):
    """A model or dataset as metrics.json records it: its absolute path, or its Hub name."""
    return os.path.abspath(name) if os.path.exists(name) else f"Hub: {name}"


def from_pretrained(cls, name, flag="--model", head=None, **kwargs):
    """cls.from_pretrained(name, ...), with one clear line when the path, the Hub or the checkpoint
    is not what is needed. head: the module names of a model's task head, new when fine-tuning: in
    place of transformers' table of the weights it did not load, a line (report_loading)."""
    if not os.path.exists(name) and (name.startswith(("/", ".", "~")) or name.count("/") > 1
                                     or "\\" in name):
        cli.die(f"{flag} {name}: no such local directory (a local checkpoint is a folder "
                f"with config.json and the weights, e.g. written by save_pretrained)")
    if not os.path.exists(name):
        need_hub(f"{flag} {name}",
                 f"Pass {flag} PATH to a local checkpoint, or --smoke for the built-in tiny model")
    try:
        if head is None:
            return cls.from_pretrained(name, **kwargs)
        with quiet_load_report():
            model, info = cls.from_pretrained(name, output_loading_info=True, **kwargs)
    except Exception as e:
        # OSError (missing files), ValueError (e.g. a ViT given to a text script), ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if os.path.exists(name):
            cli.die(f"{flag} {name}: {cls.__name__} could not load this local folder ({first})")
        cli.die(f"{flag} {name}: could not load this Hugging Face Hub model ({first}). "
                f"Pass {flag} PATH to a local checkpoint, or --smoke for the built-in tiny model")
    report_loading(f"{flag} {name}", info, head)
    return model


@contextmanager
def quiet_load_report():
    """Without transformers' LOAD REPORT table and its note that num_labels differs from the
    checkpoint's labels: report_loading() says what matters in a line."""
    import logging

    said = ("LOAD REPORT", "which is incompatible to the `id2label` map")
    drop = lambda record: not any(s in record.getMessage() for s in said)
    modules = ("modeling_utils", "configuration_utils")  # (where the two are logged)
    loggers = [logging.getLogger(f"transformers.{m}") for m in modules]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


def report_loading(what, info, head):
    """What from_pretrained's loading info says, a line each: a new task head (expected), other
    weights initialised at random (not expected), weights of the checkpoint left unused."""
    part_of = lambda key, module: key.startswith(module + ".") or f".{module}." in key
    in_head = lambda key: any(part_of(key, h) for h in head)
    reshaped = [key for key, _, _ in info["mismatched_keys"]]
    fresh = sorted(set(info["missing_keys"]) | set(reshaped))
    new = [h for h in head if any(part_of(k, h) for k in fresh)]
    if new:
        how = ("of another size than the checkpoint's" if any(in_head(k) for k in reshaped)
               else "not in the checkpoint")
        print(f"note: {what}: a new task head ({', '.join(new)}: {how}), initialised at random, "
              f"as expected when fine-tuning")
    others = [k for k in fresh if not in_head(k)]
    if others:
        more = ", ..." if len(others) > 3 else ""
        print(f"warning: {what}: {len(others)} weights are not in the checkpoint or of another "
              f"shape there, and start at random: {', '.join(others[:3])}{more}")
    unused = sorted(info["unexpected_keys"])
    if unused:
        print(f"note: {what}: {len(unused)} weights of the checkpoint are not used by this model "
              f"(e.g. {unused[0]}; a pre-training head, usually)")
