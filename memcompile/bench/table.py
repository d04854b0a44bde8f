"""Plain-text tables for the terminal, the number formats the modes share, and their JSON lines."""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

NA = "n/a"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return NA
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def fmt_num(x: float | None, digits: int = 2) -> str:
    return NA if x is None else f"{x:,.{digits}f}"


def fmt_ratio(x: float | None) -> str:
    return NA if x is None else f"{x:.2f}x"


Column = tuple[str, Callable[[dict], Any]]


def render(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    """A table with one row per dict; a cell is ``fn(row)`` as text. Numbers align right."""
    cells = [[str(fn(r)) for _, fn in columns] for r in rows]
    heads = [h for h, _ in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(heads)]

    def numeric(i: int) -> bool:
        filled = [c[i] for c in cells if c[i]]
        return i > 0 and bool(filled) and all(v[:1].isdigit() or v == NA or v[:1] == "-" for v in filled)

    right = [numeric(i) for i in range(len(heads))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)).rstrip()

    out = [line(heads), "  ".join("-" * w for w in widths)]
    out.extend(line(c) for c in cells)
    return "\n".join(out)


def status_notes(rows: Sequence[dict]) -> tuple[Callable[[dict], str], list[str]]:
    """A short status cell (``ok``, ``OOM``, ``error [1]``, ...) and the numbered notes that explain it,
    so one long reason does not widen the whole table."""
    notes: list[str] = []
    cell: dict[int, str] = {}
    for r in rows:
        kind, _, why = r["status"].partition(": ")
        if why:
            notes.append(f"[{len(notes) + 1}] {r['setup']}: {r['status']}")
            cell[id(r)] = f"{kind} [{len(notes)}]"
    return (lambda r: cell.get(id(r), r["status"])), notes


def write_jsonl(path: str, rows: list[dict]) -> None:
    """One JSON line per row at ``path`` (its directory created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
