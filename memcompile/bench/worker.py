"""The process that runs one setup: ``python -m memcompile.bench.worker '<job json>'``.

Started by ``runner.run_isolated``; prints progress on stderr and one result line on stdout. Every
outcome is a result: "ok", "OOM", "skipped: <why>" or "error: <exception line>" (with the traceback
on stderr for whoever reads the log).
"""
from __future__ import annotations

import json
import sys
import traceback

from memcompile.bench.runner import PROGRESS_PREFIX, RESULT_PREFIX


def progress(message: str) -> None:
    print(PROGRESS_PREFIX + message, file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


def run(job: dict) -> dict:
    from memcompile.bench import measure
    from memcompile.bench.builders import Unavailable

    threads = job.get("options", {}).get("threads")
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        if job["mode"] == "train":
            from memcompile.bench.train import run_setup
        elif job["mode"] == "converge":
            from memcompile.bench.converge import run_setup
        elif job["mode"] == "estimate":
            from memcompile.bench.estimate import run_setup
        elif job["mode"] == "max-context":
            from memcompile.bench.max_context import run_setup
        else:
            raise ValueError(f"unknown mode {job['mode']!r}")
        return {"status": "ok", **run_setup(job, progress)}
    except Unavailable as e:
        return {"status": f"skipped: {e}"}
    except Exception as e:  # every failure becomes the setup's row
        traceback.print_exc()
        if measure.is_oom(e):
            return {"status": "OOM"}
        return {"status": f"error: {_one_line(e)}"}


def main(argv: list[str] | None = None) -> None:
    job = json.loads((argv if argv is not None else sys.argv[1:])[0])
    result = {"setup": job.get("setup"), **run(job)}
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
