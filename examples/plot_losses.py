"""Plot loss curves written by ``examples/finetune.py --csv`` side by side.

    python examples/plot_losses.py runs/parity_none.csv runs/parity_velora.csv runs/parity_compact.csv \
        --out docs/parity.png --title "LoRA fine-tuning, 300 steps"

A file's name after its last underscore labels its curve (``parity_velora.csv`` -> ``velora``). The
held-out panel shows each run's final held-out loss when a ``.json`` summary sits beside the CSV.
"""
from __future__ import annotations

import argparse
import csv
import json
import os

from memcompile.bench.converge import plot


def load(path: str) -> dict:
    with open(path) as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    label = os.path.splitext(os.path.basename(path))[0].rsplit("_", 1)[-1]
    summary = os.path.splitext(path)[0] + ".json"
    evals = []
    if os.path.exists(summary):
        with open(summary) as f:
            evals = [(len(losses), json.load(f)["eval_loss"])]
    return {"setup": label, "status": "ok", "losses": losses, "evals": evals}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    plot([load(p) for p in args.csv], args.out, args.title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
