"""Command line of the bench.

    python -m memcompile.bench train                        # every setup, defaults for this machine
    python -m memcompile.bench train --setups lora,memtrain_velora --baseline lora --json runs/train.jsonl
    python -m memcompile.bench converge --steps 200 --out runs/converge
    python -m memcompile.bench converge --setups full_batch,random_half,coreset --steps 200   # CoLM coresets
    python -m memcompile.bench kernels                       # needs CUDA; --allow-cpu: interpreter, tiny sizes
    python -m memcompile.bench estimate                      # CUDA peak memory at the anchors' shape, on any machine
    python -m memcompile.bench compile-time                  # first step: whole model vs one compiled block per layer
    python -m memcompile.bench max-context --model llama8b --gpu-memory 80GiB   # longest sequence that trains
    python -m memcompile.bench gpu                           # every GPU figure in one run (make gpu-check)
    python -m memcompile.bench gpu --dry-run                 # the same steps on CPU, tiny model, in seconds
    python -m memcompile.bench render-gpu runs/gpu-<date>    # docs/gpu/ and the README's GPU section from a run

Defaults on CUDA: the anchors' run (tinyllama, seq 2048, batch 4, 2 warm-up + 4 timed steps).
Defaults on CPU: the tiny model, seq 64, batch 2, 1 warm-up + 3 timed steps.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util

from memcompile.bench.setups import CONVERGE_DEFAULT, SETUPS, TRAIN_DEFAULT


def _model(name: str) -> str:
    """``--model``'s type: a shape of ``models.MODELS`` or a Hugging Face config's path, else argparse's error."""
    from memcompile.bench.models import model_name

    try:
        return model_name(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _model_help(default: str) -> str:
    from memcompile.bench.models import MODELS

    return (f"model shape: {', '.join(MODELS)}, or a Hugging Face config.json (or its folder) of a causal LM with "
            f"Llama's linear names (Mistral, Qwen2, ...), random weights at its sizes (default: {default})")


def _common(p: argparse.ArgumentParser, default_setups: tuple[str, ...]) -> None:
    p.add_argument("--model", type=_model, help=_model_help("tinyllama on CUDA, tiny on CPU"))
    p.add_argument("--seq", type=int, help="sequence length")
    p.add_argument("--batch", type=int, help="sequences per step")
    p.add_argument("--steps", type=int, help="timed (train) or total (converge) steps")
    p.add_argument("--setups", help=f"comma list (default: {','.join(default_setups)}; all: {','.join(SETUPS)})")
    p.add_argument("--compiler", default="auto", choices=["auto", "inductor", "aot_eager"],
                   help="how compiled setups run: inductor, or their graphs in Python (auto: inductor on CUDA, "
                        "aot_eager on CPU)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per setup before it is stopped")
    p.add_argument("--threads", type=int, help="torch CPU threads per setup (default: 1 on CPU, where the tiny "
                   "model's ops gain nothing from more and a busy machine makes spinning threads up to 100x "
                   "slower; torch's default on CUDA)")
    p.add_argument("--seed", type=int, default=0)


def _plan(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory-target", help="memtrain setups get this memory_target (e.g. 1.5GiB; replaces their "
                   "recompute_budget): the planner keeps what the step saves under it")
    p.add_argument("--fp8", action="store_true", help="with --memory-target: let the planner store saved "
                   "tensors in fp8 (lossy)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m memcompile.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)

    t = sub.add_parser("train", help="memory and speed of one fine-tuning step per setup")
    _common(t, TRAIN_DEFAULT)
    t.add_argument("--warmup", type=int, help="untimed steps first (the first one compiles)")
    t.add_argument("--baseline", default="lora_compile", help="setup the ratios compare against")
    t.add_argument("--budget", type=float, default=0.3, help="activation_memory_budget of lora_budget")
    t.add_argument("--json", help="write one JSON line per setup here")
    t.add_argument("--profile", metavar="DIR", help="profile one more step of each setup after the timed ones: "
                   "DIR/profile-<setup>.txt lists the ops taking the most device time (CPU time without a GPU); on a "
                   "GPU, DIR/peak-<setup>.txt what is allocated at one more step's peak, by allocation site")
    t.add_argument("--min-seq", type=int, help="draw each step's length from [min-seq, seq] (variable lengths; "
                   "the 'graphs' column counts Dynamo's compiles, recompiles included)")
    _plan(t)

    c = sub.add_parser("converge", help="loss curves of each setup on the bundled text")
    _common(c, CONVERGE_DEFAULT)
    c.add_argument("--out", default="runs/converge", help="directory for losses.csv and losses.png")
    c.add_argument("--lr", type=float, help="learning rate of every setup (default: each setup's own)")
    c.add_argument("--eval-every", type=int, help="steps between held-out evaluations (default: steps/10)")
    c.add_argument("--budget", type=float, default=0.3, help="activation_memory_budget of lora_budget")

    e = sub.add_parser("estimate", help="each setup's CUDA peak memory and saved activations, worked out on "
                       "the meta device (no GPU, nothing allocated), beside the anchors' H100 figures")
    _common(e, TRAIN_DEFAULT)
    e.add_argument("--budget", type=float, default=0.3, help="activation_memory_budget of lora_budget")
    e.add_argument("--json", help="write one JSON line per setup here")
    e.add_argument("--plot", help="write a bar chart of the estimates here (PNG; with --sweep, the sweep's curve)")
    _plan(e)
    e.add_argument("--sweep", help="comma list of memory targets in GiB: the planner's curve (predicted peak and "
                   "step-time overhead per target) on --setups (default memtrain_all), beside --fractions of "
                   "memtrain's recompute_budget and torch's activation_memory_budget")
    e.add_argument("--fractions", default="0.1,0.2,0.3,0.5", help="with --sweep: the budget fractions compared")

    ct = sub.add_parser("compile-time", help="time to the first step: the whole model compiled against one "
                        "compiled block reused for every layer (memcompile.compile_blocks)")
    ct.add_argument("--model", type=_model, default="tinyllama", help=_model_help("tinyllama"))
    ct.add_argument("--seq", type=int, default=128)
    ct.add_argument("--batch", type=int, default=1)
    ct.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ct.add_argument("--compiler", default="inductor", choices=["inductor", "aot_eager"])
    ct.add_argument("--activation", default="velora", choices=["none", "velora", "compact"])
    ct.add_argument("--variants", default="whole,regional", help="comma list: whole, regional")
    ct.add_argument("--threads", type=int)
    ct.add_argument("--warm", action="store_true", help="run each variant a second time with the caches the first "
                    "left, as a restarted run (rows with caches=warm)")
    ct.add_argument("--timeout", type=float, default=3600, help="seconds per variant")
    ct.add_argument("--json", help="append one JSON line per variant here")
    ct.add_argument("--profile", metavar="DIR", help="then run the regional variant once more, cold, under cProfile, "
                    "and write DIR/compile-time-profile-regional.txt (where its first step goes, by function); "
                    "that run's times are cProfile's, not a row")
    ct.add_argument("--variant", help=argparse.SUPPRESS)  # how the parent runs one variant in a child
    ct.add_argument("--profile-to", help=argparse.SUPPRESS)  # the child's: profile its first step into this file
    m = sub.add_parser("max-context", help="the longest sequence at batch 1 whose training step fits in "
                       "--gpu-memory, by bisection on the estimate (meta device); with CUDA, confirmed by real steps")
    m.add_argument("--model", type=_model, default="llama8b", help=_model_help("llama8b, Llama-3.1-8B"))
    m.add_argument("--gpu-memory", default="80GiB", help="memory the step must fit in: 80GiB, 80GB (10^9 bytes), ...")
    m.add_argument("--setups", help="comma list (default: lora_gc,nf4_gc,memtrain_all_budget)")
    m.add_argument("--batch", type=int, default=1)
    m.add_argument("--resolution", type=int, default=1024, help="tokens: lengths probed are multiples of this")
    m.add_argument("--start", type=int, default=16384, help="first length probed; doubled until it does not fit")
    m.add_argument("--longest", type=int, default=4 * 2**20, help="longest length probed")
    m.add_argument("--budget", type=float, default=0.3, help="activation_memory_budget of lora_budget")
    m.add_argument("--no-confirm", action="store_true", help="with CUDA, skip the real steps that confirm the estimate")
    m.add_argument("--timeout", type=float, default=None, help="seconds per setup before it is stopped")
    m.add_argument("--threads", type=int, help="torch CPU threads per setup (default 1)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--json", help="write one JSON line per setup here")

    g = sub.add_parser("gpu", help="every GPU figure in one run within --total seconds (make gpu-check): "
                       "pytest -m gpu, kernels, train at the anchors' setup, the estimate beside it, a header")
    g.add_argument("--dry-run", action="store_true", help="the same steps on CPU: tiny model, Triton interpreter, "
                   "no GPU needed (checks the plumbing; its figures mean nothing)")
    g.add_argument("--out", help="results folder (default: runs/gpu-<date>-<time>)")
    g.add_argument("--total", type=float, help="seconds for the whole run (default 480; a dry run 3x)")
    g.add_argument("--only", help="comma list of steps to run (default: all)")

    r = sub.add_parser("render-gpu", help="docs/gpu/ and the README's \"Performance (GPU)\" section from a gpu "
                       "run's folder")
    r.add_argument("run", nargs="?", help="the run's folder (default: re-render from docs/gpu/)")
    r.add_argument("--docs", default="docs/gpu", help="where the run's files are copied")
    r.add_argument("--readme", default="README.md", help="the README whose GPU section is replaced")

    k = sub.add_parser("kernels", help="each Triton kernel against torch and bitsandbytes")
    k.add_argument("--allow-cpu", action="store_true", help="without CUDA, run the kernels in Triton's "
                   "interpreter at tiny sizes (checks they run; the times mean nothing)")
    k.add_argument("--json", help="write one JSON line per kernel and implementation here")
    k.add_argument("--rows-to", help=argparse.SUPPRESS)  # how the interpreter's process hands back its rows
    for mode, mode_parser in sub.choices.items():  # ``<mode> --help`` explains the mode: its module's docstring
        mode_parser.description = _module_doc(MODES[mode])
        mode_parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return ap


def _module_doc(name: str) -> str | None:
    """The docstring of ``memcompile.bench.<name>``, read without importing it (it imports torch's heavy parts)."""
    spec = importlib.util.find_spec(f"memcompile.bench.{name}")
    with open(spec.origin) as f:
        return ast.get_docstring(ast.parse(f.read()))


# The module of memcompile.bench that runs each mode, imported on use (most import transformers or triton).
MODES = {"train": "train", "converge": "converge", "estimate": "estimate", "compile-time": "compile_time",
         "max-context": "max_context", "gpu": "gpu_check", "render-gpu": "gpu_report", "kernels": "kernels"}


def main(argv: list[str] | None = None):
    args = parser().parse_args(argv)
    return importlib.import_module(f"memcompile.bench.{MODES[args.mode]}").main(args)


if __name__ == "__main__":
    main()
