"""What a compile reported, kept beside AOTAutograd's compile cache for the compiles it serves.

A hit in AOTAutograd's cache (a later process, or the same graph compiled again) hands back the
compiled forward and backward without partitioning, so memtrain's passes do not run: nothing would
fill the report, mark the parameters whose gradient a pass approximates (Fira refuses those), or
repeat the passes' warnings. Each compile therefore writes what it reported into Inductor's cache
folder (``<cache>/memtrain_reports/<key>.pkl``), keyed by what decides it: the Dynamo graph's code,
its inputs' shapes, strides, dtypes and whether they require grad, grad mode and autocast, memtrain's
options and source (``pipeline.cache_key``), the partitioner's configs and torch's version. A hit
reads it back. A hit without an entry (a deleted file) compiles again without the cache, so no
compile goes unreported.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tempfile
import warnings
from typing import Sequence

import torch
import torch.fx as fx

from memcompile import _torch_compat as tc
from memcompile._warn import warn
from memcompile.reporting import GraphReport

log = logging.getLogger(__name__)
VERSION = 2  # of the entry's layout
FOLDER = "memtrain_reports"
# The report's fields a compile fills (the rest are runtime counts or filled before the compile).
FIELDS = ("saved_after", "passes", "approximated", "overhead_seconds", "inference")


def key(gm: fx.GraphModule, pipeline_key: str) -> str:
    """The entry's key for Dynamo's graph ``gm``, compiled with memtrain's ``pipeline_key``."""
    h = hashlib.sha256(f"{VERSION}/{torch.__version__}/{pipeline_key}".encode())
    # The same graph compiled under no_grad (an evaluation) is an inference graph, and under autocast
    # another joint graph: each gets its own entry.
    h.update(repr((torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
                   [(d, torch.is_autocast_enabled(d), str(torch.get_autocast_dtype(d))) for d in ("cpu", "cuda")])
                  ).encode())
    h.update(gm.code.encode())
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        val = n.meta.get("example_value")
        if isinstance(val, torch.Tensor):  # symbolic sizes print as their symbols, as the graph traced them
            h.update(repr((str(tuple(val.shape)), str(val.stride()), str(val.dtype), val.device.type,
                           val.requires_grad, isinstance(val, torch.nn.Parameter))).encode())
        else:
            h.update(repr(type(val).__name__).encode())
    h.update(tc.partitioner_config_digest().encode())
    return h.hexdigest()


def _path(k: str) -> str:
    return os.path.join(tc.inductor_cache_dir(), FOLDER, f"{k}.pkl")


def store(k: str, rep: GraphReport, caught: Sequence[warnings.WarningMessage] = ()) -> None:
    """Write ``rep``'s compile-time fields and the warnings its compile gave under ``k``, keeping the
    "before" an earlier compile of the same key may have recorded."""
    entry = {f: getattr(rep, f) for f in FIELDS}
    entry["warnings"] = [(str(w.message), w.category) for w in caught]
    old = _read(_path(k))
    if old is not None and "saved_before" in old:
        entry["saved_before"] = old["saved_before"]
    _write(k, entry, rep.graph_id)


def store_before(k: str, rep: GraphReport, saved_before: list) -> None:
    """Add the "before", computed when the report was first read, to the entry under ``k``."""
    entry = _read(_path(k))
    if entry is not None:
        entry["saved_before"] = saved_before
        _write(k, entry, rep.graph_id)


def _write(k: str, entry: dict, graph_id: int) -> None:
    # A failure to write costs a later hit a second compile: logged, not raised.
    path = _path(k)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            pickle.dump(entry, f)
        os.replace(tmp, path)  # readers see the old entry or the new one, never half of one
    except Exception as e:
        log.warning("memtrain: could not write the report of graph %d to %s (%s: %s)", graph_id, path,
                    type(e).__name__, e)


def _read(path: str) -> dict | None:
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except FileNotFoundError:
        return None
    except Exception as e:  # a damaged entry is a miss
        log.warning("memtrain: ignoring an unreadable report entry %s (%s: %s)", path, type(e).__name__, e)
        return None


def load(k: str, rep: GraphReport) -> bool:
    """Fill ``rep`` from the entry under ``k`` and give its warnings again; False when there is none."""
    entry = _read(_path(k))
    if entry is None:
        return False
    for f in FIELDS:
        setattr(rep, f, entry[f])
    rep.saved_before = entry.get("saved_before")  # None if the run that compiled it never read it
    rep.from_cache = True
    for message, category in entry["warnings"]:
        warn(message, category)
    return True
