"""``gpu`` mode (``make gpu-check``): every GPU figure of the project from one command, in one folder.

    python -m memcompile.bench gpu                  # on a CUDA machine: at most 10 minutes
    python -m memcompile.bench gpu --dry-run        # the same steps on CPU: tiny model, Triton interpreter

Each step is a command run in its own process group with its own time limit; a step that fails, runs
out of memory or is stopped at its limit leaves the others' results. Everything lands in ``--out``
(default ``runs/gpu-<date>-<time>/``): ``header.json`` (machine and versions), ``steps.jsonl`` (one
line per step: command, limit, status, seconds), each step's log and its results (JSON lines, pytest's
JUnit XML). ``python -m memcompile.bench render-gpu <folder>`` turns the folder into ``docs/gpu/`` and
the README's "Performance (GPU)" section.

The whole run keeps to ``--total`` seconds (583): a step is given what is left when that is less than
its own limit, and is skipped when under ``MIN_STEP_S`` is left. The estimate needs no GPU and runs
beside the GPU steps, on the CPU. The plan (docs/gpu-check.md):

    step                               limit  what
    header                                30  GPU, driver, torch, triton, transformers, peft, bitsandbytes
    estimate (beside the others)         500  meta-device estimate of the train setups, on the CPU
    kernels                               55  python -m memcompile.bench kernels
    train-memtrain_velora_regional        62  VeLoRA, one compiled block for every layer
    train-memtrain_all_regional           62  everything on, one compiled block for every layer
    train-memtrain_all_target_regional    62  ... under memory_target 2GiB (the planner)
    train-memtrain_all_bf16_target_...    62  adapters' matmuls in bf16, memory_target 2GiB
    train-qlora_gc                        45  the anchor: QLoRA + checkpointing (5.10 GiB, 14.7k tok/s)
    pytest-gpu                           205  pytest -m gpu: every Triton kernel, the backend end to end

Order and limits come from the first two runs on an H100 (docs/gpu-check.md): on a fresh machine a
whole-model compile of the TinyLlama shape ran past 135 s and a regional memtrain compile took about
40 s, so memtrain's own setups go first, and the torch.compile baselines (whole-model 45.0k tok/s,
the anchors'; regional 54.0k, the second run's) are measured on their own: ``python -m
memcompile.bench train --setups lora_compile,lora_compile_regional``.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

TOTAL_S = 583.0  # with pip and tar, inside a device call's 600 s; a 35 s start leaves a second call 4 minutes
DRY_SCALE = 3.0  # a dry run's limits and total: a busy two-core CI machine imports torch slower than a GPU host
MIN_STEP_S = 10.0  # a step given less than this is skipped: none of them can do anything useful in it
KILL_GRACE_S = 5.0
NEEDS_GPU = ("gpu-check needs a CUDA GPU and none is visible here (torch {torch}, torch.cuda.is_available() is "
             "False). On a GPU machine: make gpu-check (docs/gpu-check.md). Here, "
             "`python -m memcompile.bench gpu --dry-run` runs the same steps on CPU (tiny model, Triton "
             "interpreter) to check the plumbing; its figures mean nothing.")
# The train setups of the check, and the estimate of the same setups (bitsandbytes ones are measured only).
TRAIN = ("memtrain_velora_regional", "memtrain_all_regional", "memtrain_all_target_regional",
         "memtrain_all_bf16_target_regional", "qlora_gc")
# The estimate of the same setups, regional ones included (their loss runs eager on meta unless fused).
ESTIMATE = ("memtrain_velora_regional", "memtrain_all_regional", "memtrain_all_target_regional",
            "memtrain_all_bf16_target_regional")


@dataclass
class Step:
    """One command of the check. ``argv`` may hold ``{out}`` (the results folder) and ``{py}`` (this Python)."""

    name: str
    argv: list[str]
    limit: float
    what: str
    background: bool = False  # runs beside the steps after it (CPU only), awaited at the end
    env: dict[str, str] = field(default_factory=dict)
    results: tuple[str, ...] = ()  # files it writes into the folder


def _bench(*args: str) -> list[str]:
    return ["{py}", "-m", "memcompile.bench", *args]


def train_step(setup: str, limit: float, what: str, dry: bool, profile: bool = False) -> Step:
    """``train`` mode for one setup; its own ``--timeout`` stops the setup's process a little before the
    step's limit, so the JSON line (a "timed out" row) is still written. ``profile``: one more step under
    the profiler, its top ops in ``profile-<setup>.txt`` (where the step's time goes)."""
    shape = ["--model", "tiny", "--seq", "64", "--batch", "2", "--warmup", "1", "--steps", "1",
             "--compiler", "aot_eager"] if dry else []
    return Step(f"train-{setup}", _bench("train", "--setups", setup, "--baseline", "lora_compile", *shape,
                                         "--timeout", f"{max(limit - 15, 5):.0f}",
                                         *(["--profile", "{out}"] if profile else []),
                                         "--json", f"{{out}}/train-{setup}.jsonl"),
                limit, what, results=(f"train-{setup}.jsonl", *((f"profile-{setup}.txt",) if profile else ())))


def steps(dry: bool = False) -> list[Step]:
    """The check, in order of what a short run must not miss. ``dry``: the same commands at CPU sizes,
    with ``DRY_SCALE`` times the limits."""
    plan = _steps(dry)
    if dry:
        for s in plan:
            s.limit *= DRY_SCALE
    return plan


def _steps(dry: bool) -> list[Step]:
    tiny = ["--model", "tiny", "--seq", "64", "--batch", "2"] if dry else []
    return [
        # A cold interpreter imports torch and asks nvidia-smi: 20 s was not enough on a fresh machine.
        Step("header", ["{py}", "-m", "memcompile.bench.gpu_check", "header", "{out}/header.json"], 30,
             "GPU, driver, torch, triton, transformers, peft, bitsandbytes", results=("header.json",)),
        # The estimate needs no GPU: on the CPU, beside the GPU steps, with the GPU hidden from it.
        Step("estimate", _bench("estimate", *tiny, "--setups", ",".join(ESTIMATE), "--json", "{out}/estimate.jsonl"),
             500, "meta-device estimate of the train setups, on the CPU", background=True,
             env={"CUDA_VISIBLE_DEVICES": ""}, results=("estimate.jsonl",)),
        Step("kernels", _bench("kernels", *(["--allow-cpu"] if dry else []), "--json", "{out}/kernels.jsonl"), 55,
             "python -m memcompile.bench kernels", results=("kernels.jsonl",)),
        # memtrain's setups first: one compiled block for every layer (memcompile.compile_blocks).
        # Profiled: "everything on" ran at 36.9k tok/s against VeLoRA's 55.9k on the first run.
        train_step("memtrain_velora_regional", 62, "VeLoRA, one compiled block for every layer", dry, profile=True),
        train_step("memtrain_all_regional", 62, "everything on, one compiled block for every layer", dry,
                   profile=True),
        train_step("memtrain_all_target_regional", 62, "everything on under memory_target 2GiB (the planner), "
                   "one compiled block for every layer", dry, profile=True),
        # The adapters' matmuls in bf16: the fp32 ones took a quarter of the busy time on the second run.
        train_step("memtrain_all_bf16_target_regional", 62, "the goal's configuration: adapters' matmuls in bf16 "
                   "(lora.compute_dtype=\"input\"), memory_target 2GiB", dry, profile=True),
        train_step("qlora_gc", 45, "the anchor: QLoRA + checkpointing (5.10 GiB, 14.7k tok/s)", dry),
        # -v: each test's result is in the log as it ends, should the step be stopped before the XML is written.
        Step("pytest-gpu", ["{py}", "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", "-rfEs",
                            "--junitxml={out}/pytest-gpu.xml", "tests"], 205,
             "pytest -m gpu: every Triton kernel, the backend end to end", results=("pytest-gpu.xml",)),
    ]


def plan_table(plan: list[Step]) -> str:
    """The plan as docs/gpu-check.md shows it."""
    rows = ["| step | limit (s) | what |", "| --- | --- | --- |"]
    for s in plan:
        rows.append(f"| {s.name}{' (beside the others)' if s.background else ''} | {s.limit:.0f} | {s.what} |")
    return "\n".join(rows)


# --- the header ---------------------------------------------------------------------------------------


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", "unknown"))
    except Exception as e:  # a missing or broken package is part of the header, not the end of it
        return f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def header() -> dict:
    """The machine and the versions a figure depends on."""
    import torch

    info: dict = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "python": platform.python_version(), "platform": platform.platform(),
                  "cpu_count": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 2),
                    multiprocessors=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            name, driver, memory = [x.strip() for x in out.stdout.splitlines()[0].split(",")]
            info.update(driver=driver, nvidia_smi_gpu=name, nvidia_smi_memory=memory)
    except (OSError, subprocess.SubprocessError, ValueError):
        info["driver"] = None
    for module in ("triton", "transformers", "peft", "bitsandbytes"):
        info[module] = _version(module)
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                        timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None  # the GPU machine gets a copy of the tree, not always its history
    return info


# --- running the steps --------------------------------------------------------------------------------


class Running:
    """A step's process group, its log, and its outcome."""

    def __init__(self, step: Step, out: str, limit: float, env: dict[str, str]):
        self.step, self.limit = step, limit
        self.argv = [a.replace("{out}", out).replace("{py}", sys.executable) for a in step.argv]
        self.log_path = os.path.join(out, f"{step.name}.log")
        self.log = open(self.log_path, "w")
        self.started = time.perf_counter()
        # A new session: the step's own children (the bench's setup processes, Inductor's compile workers)
        # are in its process group, so stopping it at its limit stops them all and frees the GPU.
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**env, **step.env}, start_new_session=True, bufsize=1)
        self.echo = not step.background
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()
            if self.echo:
                print(f"    | {line.rstrip()}", flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=KILL_GRACE_S)
                return
            except subprocess.TimeoutExpired:
                continue

    def wait(self) -> dict:
        """Until the step ends or reaches its limit; its record for ``steps.jsonl``."""
        timed_out = False
        try:
            self.proc.wait(timeout=max(self.limit - self.elapsed(), 0))
        except subprocess.TimeoutExpired:
            timed_out = True
        self.stop()  # also whatever the step left running in its group
        self.reader.join(timeout=5)
        self.log.close()
        rc = self.proc.returncode
        if timed_out:
            status = f"timed out after {self.limit:.0f} s"
        elif rc == 0:
            status = "ok"
        else:
            status = f"failed: exit code {rc}: {_last_error(self.log_path)}"
        return dict(step=self.step.name, status=status, rc=rc, seconds=round(self.elapsed(), 1),
                    limit=round(self.limit, 1), planned_limit=self.step.limit, argv=self.argv,
                    background=self.step.background, log=os.path.basename(self.log_path),
                    results=[r for r in self.step.results if os.path.exists(os.path.join(os.path.dirname(
                        self.log_path), r))])


def _last_error(path: str) -> str:
    with open(path, errors="replace") as f:
        lines = [ln.strip() for ln in f.read().splitlines()[-60:] if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln or "FAILED" in ln or "failed" in ln:
            return ln[:200]
    return lines[-1][:200] if lines else "no output"


def child_env(dry: bool) -> dict[str, str]:
    """The environment of every step: the repository importable (it need not be installed), output
    unbuffered; CPU and the Triton interpreter for a dry run, native Triton otherwise."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, entry_points_dir(), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    if dry:
        env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1", MEMTRAIN_TRITON_ON_CPU="1")
    else:
        env.pop("TRITON_INTERPRET", None)  # the interpreter on a GPU would time Python, not the kernels
        env.pop("MEMTRAIN_TRITON_ON_CPU", None)
    return env


def entry_points_dir() -> str | None:
    """``torch.compile(backend="memtrain")`` finds the backend through the package's entry point, which a
    tree run from ``PYTHONPATH`` (not installed, as on a bare GPU machine) lacks: the first run's backend
    tests failed with "Invalid backend". A minimal ``dist-info`` in a temporary folder declares it; None
    when the package is installed."""
    from importlib import metadata

    try:
        metadata.distribution("memcompile")
        return None
    except metadata.PackageNotFoundError:
        pass
    folder = tempfile.mkdtemp(prefix="memcompile-entry-points-")
    info = os.path.join(folder, "memcompile-0.0.0.dist-info")
    os.makedirs(info)
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\nName: memcompile\nVersion: 0.0.0\n")
    with open(os.path.join(info, "entry_points.txt"), "w") as f:
        f.write("[torch_dynamo_backends]\nmemtrain = memcompile.backend:memtrain\n")
    return folder


def default_out() -> str:
    return os.path.join("runs", "gpu-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))


def run(plan: list[Step], out: str, total: float, env: dict[str, str], meta: dict | None = None) -> list[dict]:
    """Run ``plan`` into ``out`` within ``total`` seconds; one record per step, also in ``steps.jsonl``."""
    os.makedirs(out, exist_ok=True)
    deadline = time.perf_counter() + total
    records: list[dict] = []
    background: list[Running] = []
    path = os.path.join(out, "steps.jsonl")
    with open(os.path.join(out, "plan.json"), "w") as f:
        json.dump({"total_s": total, **(meta or {}), "steps": [dict(name=s.name, limit=s.limit, what=s.what,
                   background=s.background, argv=s.argv) for s in plan]}, f, indent=1)

    def record(r: dict) -> None:
        records.append(r)
        with open(path, "a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"[gpu-check] {r['step']}: {r['status']} ({r['seconds']:.0f} s of {r['limit']:.0f})", flush=True)

    open(path, "w").close()
    for i, step in enumerate(plan, 1):
        left = deadline - time.perf_counter()
        if left < MIN_STEP_S:
            record(dict(step=step.name, status=f"skipped: {left:.0f} s left of the {total:.0f} s run", rc=None,
                        seconds=0.0, limit=0.0, planned_limit=step.limit, background=step.background,
                        argv=step.argv, log=None, results=[]))
            continue
        limit = min(step.limit, left)
        print(f"[gpu-check {i}/{len(plan)}] {step.name}: {step.what} (limit {limit:.0f} s"
              f"{', beside the next steps' if step.background else ''})", flush=True)
        running = Running(step, out, limit, env)
        if step.background:
            background.append(running)
        else:
            record(running.wait())
    for running in background:
        # Its limit was cut to the time left when it started, so it too ends by the deadline.
        print(f"[gpu-check] waiting for {running.step.name} (running {running.elapsed():.0f} s)", flush=True)
        record(running.wait())
    return records


def main(args) -> list[dict]:
    import torch

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print(NEEDS_GPU.format(torch=torch.__version__), file=sys.stderr)
        raise SystemExit(2)
    out = args.out or default_out()
    total = args.total if args.total is not None else TOTAL_S * (DRY_SCALE if dry else 1)
    plan = steps(dry)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in {s.name for s in plan}]
        if unknown:
            raise SystemExit(f"unknown step {unknown[0]!r}; valid: {', '.join(s.name for s in plan)}")
        plan = [s for s in plan if s.name in names]
    print(f"gpu-check{' (dry run: CPU, tiny model, Triton interpreter; figures mean nothing)' if dry else ''}: "
          f"{len(plan)} steps within {total:.0f} s into {out}", flush=True)
    started = time.perf_counter()
    records = run(plan, out, total, child_env(dry), meta={"dry_run": dry})
    failed = [r for r in records if r["status"] != "ok"]
    print(f"\ngpu-check: {len(records) - len(failed)} of {len(records)} steps ok in "
          f"{time.perf_counter() - started:.0f} s; results in {out}", flush=True)
    for r in failed:
        print(f"  {r['step']}: {r['status']}" + (f" (log: {os.path.join(out, r['log'])})" if r.get("log") else ""))
    print(f"render: python -m memcompile.bench render-gpu {out}")
    return records


if __name__ == "__main__":  # python -m memcompile.bench.gpu_check header PATH: the header step's process
    if sys.argv[1:2] != ["header"] or len(sys.argv) != 3:
        raise SystemExit("usage: python -m memcompile.bench.gpu_check header PATH")
    info = header()
    with open(sys.argv[2], "w") as f:
        json.dump(info, f, indent=1)
    print("\n".join(f"{k}: {v}" for k, v in info.items()))
