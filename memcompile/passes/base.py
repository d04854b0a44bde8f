"""What every memtrain graph pass is: a name, a stage, a cache key, and a ``PassResult``.

A pass is built from the compile's ``MemtrainConfig`` and called on one graph::

    class MarkSomething(GraphPass):
        name, stage = "mark_something", "joint"

        def options(self):
            return (self.config.recompute_budget,)   # every option that changes what it does

        def __call__(self, gm, ctx):
            ...
            return PassResult(self.name, counters={"marked": n})

``memcompile.pipeline`` lists the passes of each stage in order and composes Inductor's cache key
from their ``uuid()``: a pass's key covers its own file, every memcompile module that file imports
(found by reading its imports, so a new helper is covered without a list to keep) and ``options()``.
"""
from __future__ import annotations

import ast
import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, Iterator, Protocol, Sequence

if TYPE_CHECKING:
    import torch.fx as fx

    from memcompile.config import MemtrainConfig

STAGES = ("pre_aot", "joint", "partitioned")
_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds the memcompile package


@dataclass
class PassResult(Mapping):
    """What one pass did to one graph; the report keeps one per pass name and renders it.

    It reads as the dict reports have always had (``report.passes["activation_compression"]["rewritten"]``):
    its keys are ``listed_as`` (``"rewritten"`` unless the pass names its records otherwise),
    ``"skipped"`` and ``"counters"``.
    """

    name: str
    rewritten: list[dict] = field(default_factory=list)  # one record per rewrite
    skipped: list[dict] = field(default_factory=list)  # {"layer", "reason"}
    counters: dict[str, int] = field(default_factory=dict)
    approximated: dict[str, str] = field(default_factory=dict)  # graph input -> method of its gradient

    listed_as: ClassVar[str] = "rewritten"

    def describe(self, record: dict) -> str:
        """One report line for one record of ``rewritten``."""
        return f"rewrote {record}"

    @property
    def predicted_saving(self) -> int:
        """Bytes of saved activations the rewrites should free, by the pass's own arithmetic."""
        return 0

    def wrap(self, compiled: Callable) -> Callable:
        """The graph's compiled callable as its caller must see it. A pre-AOT pass that changed the
        graph's outputs restores them here; other passes change nothing."""
        return compiled

    def render(self) -> list[str]:
        """The report's lines for this pass."""
        lines = [f"  pass {self.name}: {self.counters}"]
        lines.extend("    " + self.describe(r) for r in self.rewritten)
        by_reason: dict[str, list[str]] = {}
        for s in self.skipped:
            by_reason.setdefault(s["reason"], []).append(s["layer"])
        for reason, layers in by_reason.items():
            shown = ", ".join(layers[:4]) + (f", ... ({len(layers)} in all)" if len(layers) > 4 else "")
            lines.append(f"    skipped ({reason}): {shown}")
        return lines

    def merged(self, other: PassResult) -> PassResult:
        """Both results as one (two graphs of a step, or two stages of one pass): records joined,
        numeric counters summed."""
        counters = dict(self.counters)
        for k, v in other.counters.items():
            counters[k] = counters.get(k, 0) + v if isinstance(v, (int, float)) else v
        return type(self)(self.name, self.rewritten + other.rewritten, self.skipped + other.skipped,
                          counters, {**self.approximated, **other.approximated})

    def _keys(self) -> tuple[str, ...]:
        return (self.listed_as, "skipped", "counters")

    def __getitem__(self, key: str):
        if key not in self._keys():
            raise KeyError(key)
        return self.rewritten if key == self.listed_as else getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())


class PassContext(Protocol):
    """What a pass may read of the compile besides its options (``memcompile.pipeline.CompileContext``)."""

    input_names: list[str]  # dotted name of each graph input (parameter path, or the placeholder's name)
    inputs_held: list[bool]  # per input: whether the caller holds it anyway (``pipeline.held_inputs``)
    parameter_inputs: list[bool]  # per input: whether it is a parameter (alive the whole step)
    decompositions: dict | None  # Inductor's table, for code a joint pass inserts
    in_block: bool  # the graph is one block that serves several modules (names relative to it)
    served: Sequence[str]  # those modules (empty for a graph of its own)
    target_shares: int  # graph runs of a step that share memory_target (compile_blocks: its layers and head)


class GraphPass:
    """A pass: ``name`` (its key in the report), ``stage`` (one of ``STAGES``), ``enabled()``,
    ``options()`` (the option values it reads), ``uuid()`` and ``__call__(gm, ctx) -> PassResult``.

    One stage-half of a pass that works in two stages shares the pass's name; the report merges them.
    """

    name: ClassVar[str]
    stage: ClassVar[str]

    def __init__(self, config: MemtrainConfig):
        self.config = config

    def enabled(self) -> bool:
        return True

    def options(self) -> tuple:
        """Every option value that changes what the pass does, ``enabled()``'s included."""
        return ()

    def sources(self) -> tuple[Path, ...]:
        return module_sources(type(self).__module__)

    def uuid(self) -> str:
        h = hashlib.sha256(repr((self.name, self.stage, self.options())).encode())
        h.update(source_digest(self.sources()).encode())
        return h.hexdigest()

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError


def read_source(path: Path) -> bytes:
    return path.read_bytes()


def source_digest(paths: Sequence[Path]) -> str:
    """A hash of the files' contents (read anew each time: an edit must change it at once)."""
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(str(path.relative_to(_ROOT)).encode())
        h.update(read_source(path))
    return h.hexdigest()


def module_file(module: str) -> Path | None:
    """The file of a memcompile module (``memcompile.passes._graph``), or None for anything else."""
    if module.split(".")[0] != "memcompile":
        return None
    base = _ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@functools.cache
def imports_of(module: str) -> tuple[str, ...]:
    """The memcompile modules that ``module``'s file imports anywhere in it (top level or in a function).

    ``from memcompile import x`` counts as ``memcompile.x`` alone when ``x`` is a module: a package's
    ``__init__`` that only re-exports is not what the importing code runs.
    """
    path = module_file(module)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            base = ".".join(p for p in (base, node.module) if p)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if module_file(f"{base}.{alias.name}") else base)
    return tuple(sorted(m for m in found if module_file(m) is not None))


def module_sources(module: str) -> tuple[Path, ...]:
    """The files of ``module`` and of every memcompile module it imports, transitively."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(imports_of(m))
    return tuple(sorted(module_file(m) for m in seen))
