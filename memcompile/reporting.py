"""What each compile did: saved tensors before/after the passes, per-pass rewrites and skips.

``memcompile.report()`` returns what a training step's graphs did together (every graph of a model
split by graph breaks, each as many times as it runs in a step; a compiled block once per layer it
serves); ``memcompile.reports()`` every graph's own report. ``str(report)`` is a table for people;
the fields are for code.
"""
from __future__ import annotations

import itertools
import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.fx as fx

from memcompile.passes.base import PassResult

log = logging.getLogger(__name__)
_BEFORE_LOCK = threading.RLock()


@dataclass(frozen=True)
class SavedTensor:
    """One tensor the forward keeps for the backward."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int
    is_input: bool  # an input the caller holds anyway (parameter, buffer, batch): costs nothing extra
    alias_of: str | None = None  # a view of another saved tensor: shares its storage, costs nothing extra
    on_host: bool = False  # offloaded (``memtrain::offload``): in pinned host memory, not on the device
    # The graph input it is (or views) where the caller does not hold that input: an activation made
    # before the graph, which another graph's run may save too (``StepReport`` counts it once).
    input_index: int | None = None


@dataclass
class GraphReport:
    graph_id: int
    compiler: str
    partitioner: str
    activation: str
    saved_after: list[SavedTensor] = field(default_factory=list)
    passes: dict[str, PassResult] = field(default_factory=dict)  # by pass name, in the order they ran
    quantized_layers: list[dict] = field(default_factory=list)
    inference: bool = False  # no backward (under no_grad, or nothing requires grad): nothing saved
    num_tokens: int | None = None
    frame_id: int | None = None  # Dynamo's frame: a recompile replaces the graph of the same frame
    served: tuple[str, ...] = ()  # the modules one compiled block runs for (regional compilation)
    region: str = ""  # which part of a model's forward the graph is, under compile_blocks
    approximated: dict[str, str] = field(default_factory=dict)  # graph input name -> method of its gradient
    # Estimated time of what the backward reruns and copies instead of keeping (``PlanConfig``'s rates).
    overhead_seconds: float = 0.0
    # Runs of the compiled forward in step ``step`` (``count_runs``).
    step: int = 0
    step_runs: int = 0
    # The inputs the caller does not hold (``SavedTensor.input_index``), and for each run in ``step`` which
    # tensors they were, so that an input several runs save (the encoder output every decoder block of a
    # sequence-to-sequence model reads) counts once in the step.
    unheld_inputs: tuple[int, ...] = ()
    step_inputs: list[dict[int, tuple]] = field(default_factory=list, repr=False)
    from_cache: bool = False  # AOTAutograd's cache served the graphs; this is the report its compile wrote
    # What the same partitioner saves without the passes: computed when first read (``saved_before``).
    _saved_before: list[SavedTensor] | None = field(default=None, repr=False)
    _before_fn: Callable[[], list[SavedTensor]] | None = field(default=None, repr=False, compare=False)

    @property
    def saved_before(self) -> list[SavedTensor] | None:
        """What the forward would save without memtrain's passes (same partitioner, untouched graph);
        None with ``report=False``. Partitioned when first read, not during the compile: that second
        partition is a report's cost, and a user who never reads the report should not wait for it."""
        with _BEFORE_LOCK:  # two readers at once: one partitions, the other waits for its result
            fn, self._before_fn = self._before_fn, None
            if fn is not None:
                try:
                    self._saved_before = fn()
                except Exception as e:  # a report must not stop training; say why its "before" is missing
                    log.warning("memtrain: graph %d's report could not partition the graph without the passes "
                                "(%s: %s); its saved bytes before are unknown", self.graph_id, type(e).__name__, e)
            return self._saved_before

    @saved_before.setter
    def saved_before(self, value: list[SavedTensor] | None) -> None:
        self._saved_before, self._before_fn = value, None

    def defer_saved_before(self, fn: Callable[[], list[SavedTensor]]) -> None:
        """``saved_before`` will be ``fn()``, run when first read."""
        self._saved_before, self._before_fn = None, fn

    @property
    def has_saved_before(self) -> bool:
        return self._saved_before is not None or self._before_fn is not None

    @property
    def calls_per_step(self) -> int:
        return max(1, len(self.served))

    @staticmethod
    def activation_bytes(saved: Sequence[SavedTensor] | None) -> int | None:
        if saved is None:
            return None
        return sum(t.bytes for t in saved if not t.is_input and t.alias_of is None and not t.on_host)

    @property
    def bytes_before(self) -> int | None:
        return self.activation_bytes(self.saved_before)

    @property
    def bytes_after(self) -> int:
        return self.activation_bytes(self.saved_after)

    @property
    def predicted_saving(self) -> int:
        """Bytes the passes should free by their own arithmetic (``PassResult.predicted_saving``)."""
        return sum(r.predicted_saving for r in self.passes.values())

    def record(self, result: PassResult) -> None:
        """Keep a pass's result; the halves of a pass that works in two stages become one."""
        done = self.passes.get(result.name)
        self.passes[result.name] = result if done is None else done.merged(result)

    def __str__(self) -> str:
        lines = [f"memtrain graph {self.graph_id}: compiler={self.compiler} partitioner={self.partitioner} "
                 f"activation={self.activation}"]
        if self.served:
            lines.append(f"  one compiled block for {len(self.served)} modules: {_span(self.served)}"
                         " (its saved bytes count once per module in the step's totals)")
        elif self.region:
            lines.append(f"  {self.region}")
        if self.inference:
            lines.append("  inference graph (no_grad, or nothing in it requires grad): no backward, nothing saved, "
                         "passes not applied")
            return "\n".join(lines)
        if self.from_cache:
            lines.append("  served by AOTAutograd's compile cache: this report is what the compile that stored it"
                         " reported" + ("" if self.saved_before is not None else
                                        " (its bytes before the passes are unknown: that run never read them)"))
        before, after = self.bytes_before, self.bytes_after
        if before is not None:
            delta = 100.0 * (after - before) / before if before else 0.0
            lines.append(f"  saved activations: {fmt_bytes(before)} -> {fmt_bytes(after)} ({delta:+.1f}%)"
                         f"  [{len(self.saved_before)} -> {len(self.saved_after)} tensors];"
                         f" predicted saving {fmt_bytes(self.predicted_saving)}, measured {fmt_bytes(before - after)}")
        else:
            lines.append(f"  saved activations: {fmt_bytes(after)} [{len(self.saved_after)} tensors]")
        if self.overhead_seconds:
            lines.append(f"  forward ops rerun in the backward, host copies, fp8 conversions: ~"
                         f"{self.overhead_seconds * 1e3:.3f} ms a call at the cost model's rates (option plan)")
        for rec in self.passes.values():
            lines.extend(rec.render())
        for q in self.quantized_layers:
            lines.append(f"  quantized {q.get('name')}: {q.get('bytes_before')} B -> {q.get('bytes_after')} B")
        costly = [t for t in self.saved_after if not t.is_input and t.alias_of is None and not t.on_host]
        host = sum(t.bytes for t in self.saved_after if t.on_host and t.alias_of is None)
        if host:
            lines.append(f"  offloaded to host memory: {fmt_bytes(host)} (not counted above)")
        lines.append(f"  saved activations after, largest first ({len(costly)} storages; parameters, buffers and the batch not counted):")
        lines.extend("    " + _row(t) for t in sorted(costly, key=lambda t: -t.bytes)[:12])
        return "\n".join(lines)


def count_runs(compiled: Callable, rep: GraphReport) -> Callable:
    """``compiled``, counting its runs per step: a graph break inside a repeated layer leaves a graph
    that runs once per layer (or one graph per layer), and the step's totals weigh each graph by its
    runs. A step is what runs between two backward passes: the first forward run after a backward
    starts the next one."""
    def run(*args):
        if _STEPS.backward_ran or _STEPS.step == 0:
            _STEPS.step += 1
            _STEPS.backward_ran = False
        if rep.step != _STEPS.step:
            rep.step, rep.step_runs, rep.step_inputs = _STEPS.step, 0, []
        rep.step_runs += 1
        if rep.unheld_inputs:
            rep.step_inputs.append({i: _tensor_key(args[i]) for i in rep.unheld_inputs if i < len(args)})
        out = compiled(*args)
        if not rep.inference:  # a step of inference graphs alone (an evaluation) is not a training step
            _STEPS.trained = _STEPS.step
            outs = out if isinstance(out, (list, tuple)) else (out,)
            grad_fn = next((t.grad_fn for t in outs if isinstance(t, torch.Tensor) and t.grad_fn is not None), None)
            if grad_fn is not None:
                grad_fn.register_prehook(_backward_ran)
        return out

    return run


def _tensor_key(t) -> tuple | None:
    # Which tensor: its memory and layout. Saved, it stays alive until the backward, so within a step's
    # forward no other tensor takes its address.
    try:
        return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
    except Exception:  # not a plain tensor (a symbolic size, a tensor subclass without storage)
        return None


def _backward_ran(grad_outputs):
    _STEPS.backward_ran = True


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def _span(names: Sequence[str]) -> str:
    return ", ".join(names) if len(names) <= 3 else f"{names[0]}, {names[1]}, ..., {names[-1]}"


def _row(t: SavedTensor) -> str:
    kind = "input" if t.is_input else (f"view of {t.alias_of}" if t.alias_of else "activation")
    return f"{t.name:<28} {str(t.shape):<22} {t.dtype:<9} {fmt_bytes(t.bytes):>11}  {kind}"


def saved_tensors(fw_module: fx.GraphModule, num_fwd_outputs: int,
                  caller_held: list[bool] | None = None) -> list[SavedTensor]:
    """The tensors a partitioned forward returns for its backward (outputs after the user outputs).
    ``caller_held[i]``: whether the caller holds input ``i`` anyway (None: every input); one it does
    not hold (an earlier graph's activation, where DDP splits a graph) costs what an activation does."""
    from memcompile._torch_compat import size_hint
    from memcompile.passes._graph import view_base

    out = next(n for n in fw_module.graph.nodes if n.op == "output").args[0]
    inputs = [n for n in fw_module.graph.nodes if n.op == "placeholder"]
    held = set(inputs) if caller_held is None or len(caller_held) != len(inputs) else \
        {n for n, h in zip(inputs, caller_held) if h}
    index = {n: i for i, n in enumerate(inputs)}
    saved, first_of_storage = [], {}
    for n in out[num_fwd_outputs:]:
        val = n.meta.get("val") if isinstance(n, fx.Node) else None
        if not isinstance(val, torch.Tensor):
            continue  # symints
        # symbolic sizes (dynamic shapes) are counted at the example size Dynamo traced with
        shape = tuple(size_hint(s) if size_hint(s) is not None else -1 for s in val.shape)
        nbytes = math.prod(shape) * val.element_size() if -1 not in shape else 0
        base = view_base(n)
        alias_of = first_of_storage.setdefault(base, n.name)
        saved.append(SavedTensor(n.name, shape,
                                 str(val.dtype).removeprefix("torch."), int(nbytes), base in held,
                                 None if alias_of == n.name else alias_of,
                                 on_host=str(base.target) == "memtrain.offload.default",
                                 input_index=None if base in held else index.get(base)))
    return saved


_LOCK = threading.Lock()
_REPORTS: list[GraphReport] = []
_IDS = itertools.count()


@dataclass
class _Steps:
    step: int = 0  # steps started since ``clear_reports()``
    trained: int = 0  # the latest step that ran a training graph
    backward_ran: bool = False  # since the step started: the next forward run starts another


_STEPS = _Steps()


def new_report(**kw) -> GraphReport:
    with _LOCK:
        rep = GraphReport(graph_id=next(_IDS), **kw)
        _REPORTS.append(rep)
        return rep


@dataclass
class StepReport:
    """What one training step's graphs did together (``report()``), each weighed by how many times it
    runs in the step. Same fields as a graph's report, summed."""

    graphs: list[GraphReport]
    # graph_id -> runs in the step, as measured (``count_runs``); a compiled block, absent here, counts
    # once per layer it serves (present: one of several graphs its layers run).
    runs_per_step: dict[int, int] = field(default_factory=dict)
    # the modules a compiled block serves -> its graphs' runs in the step, where fewer than the modules:
    # the other layers ran without a compiled graph (past Dynamo's recompile limit, say), uncompressed.
    short_blocks: dict[tuple[str, ...], int] = field(default_factory=dict)
    step: int = 0  # the step whose runs were counted (0: none has run)

    def runs(self, g: GraphReport) -> int:
        return self.runs_per_step.get(g.graph_id, g.calls_per_step)

    def _sum(self, attr: str) -> int | None:
        values = [(getattr(g, attr), self.runs(g)) for g in self.graphs if not g.inference]
        if any(v is None for v, _ in values):
            return None
        return sum(v * k for v, k in values)

    def repeated_input_bytes(self, which: str = "after", graphs: Sequence[GraphReport] | None = None) -> int:
        """Bytes the per-graph sums count more than once: an input that several runs in the step save
        (the encoder output each decoder block reads) is kept once. ``which``: "before" or "after";
        ``graphs``: among these of the step's (all of them by default)."""
        seen, repeated = set(), 0
        for g in self.graphs if graphs is None else graphs:
            saved = g.saved_before if which == "before" else g.saved_after
            if g.inference or g.step != self.step or saved is None:
                continue
            inputs = [t for t in saved if t.input_index is not None and t.alias_of is None and not t.on_host]
            for run in g.step_inputs if inputs else ():
                for t in inputs:
                    key = run.get(t.input_index)
                    if key in seen:
                        repeated += t.bytes
                    elif key is not None:
                        seen.add(key)
        return repeated

    @property
    def bytes_before(self) -> int | None:
        total = self._sum("bytes_before")
        return None if total is None else total - self.repeated_input_bytes("before")

    @property
    def bytes_after(self) -> int:
        return (self._sum("bytes_after") or 0) - self.repeated_input_bytes("after")

    @property
    def predicted_saving(self) -> int:
        return self._sum("predicted_saving") or 0

    @property
    def overhead_seconds(self) -> float:
        return sum(g.overhead_seconds * self.runs(g) for g in self.graphs if not g.inference)

    @property
    def inference(self) -> bool:
        return bool(self.graphs) and all(g.inference for g in self.graphs)

    @property
    def quantized_layers(self) -> list[dict]:
        return [q for g in self.graphs for q in g.quantized_layers]

    @property
    def passes(self) -> dict[str, PassResult]:
        """Each pass's results of every graph as one (once per graph)."""
        merged: dict[str, PassResult] = {}
        for g in self.graphs:
            for name, rec in g.passes.items():
                merged[name] = merged[name].merged(rec) if name in merged else rec
        return merged

    def __getattr__(self, name):
        # Fields that only make sense per graph (graph_id, compiler, ...) read from the single graph.
        if name.startswith("_") or len(self.graphs) != 1:
            raise AttributeError(name)
        return getattr(self.graphs[0], name)

    def __str__(self) -> str:
        if len(self.graphs) == 1 and not self.graphs[0].served:
            return str(self.graphs[0])
        lines = [f"memtrain step: {len(self.graphs)} graphs"]
        for served, ran in self.short_blocks.items():
            lines.append(f"  WARNING: the compiled block for {_span(served)} ran {ran} times for {len(served)} "
                         "layers: the others ran without it, eager and uncompressed, and are not counted here "
                         "(TORCH_LOGS=recompiles says why Dynamo gave up on them)")
        before, after = self.bytes_before, self.bytes_after
        if before is not None:
            lines.append(f"  saved activations per step: {fmt_bytes(before)} -> {fmt_bytes(after)}; predicted saving "
                         f"{fmt_bytes(self.predicted_saving)}, measured {fmt_bytes(before - after)}")
        shared = (self.repeated_input_bytes("before") if before is not None else 0, self.repeated_input_bytes("after"))
        if any(shared):
            lines.append(f"  inputs that several graph runs save (an encoder output every decoder block reads) count once:"
                         f" {fmt_bytes(shared[0])} before and {fmt_bytes(shared[1])} after, less than the graphs' sums")
        planned = [g for g in self.graphs if "memory_plan" in g.passes and not g.inference]
        if planned:
            target = max(g.passes["memory_plan"].counters.get("step_target", 0) for g in planned)
            kept = sum(g.bytes_after * self.runs(g) for g in planned) - self.repeated_input_bytes("after", planned)
            held = "within it" if kept <= target else "over it"
            alone = sum(not g.region for g in planned)
            how = (f"graph breaks split it into {alone} graphs, each planned against the whole target" if alone > 1
                   else "the compiled layers and the head share it" if alone < len(planned) else "one planned graph")
            rest = f"; the graphs not planned keep {fmt_bytes(after - kept)}" if after > kept else ""
            lines.append(f"  memory_target {fmt_bytes(target)}: the planned graphs keep {fmt_bytes(kept)}, {held};"
                         f" {how}{rest}")
        for g in self.graphs:
            lines.append("")
            lines.append(str(g))
            if not g.served and not g.inference and self.runs(g) > 1:
                lines.append(f"  runs {self.runs(g)} times a step (measured; a graph break inside a repeated "
                             "layer): its saved bytes count that many times in the step's totals")
        return "\n".join(lines)


def discard(rep: GraphReport) -> None:
    """Forget the report of a compile that did not finish."""
    with _LOCK:
        _REPORTS[:] = [r for r in _REPORTS if r is not rep]


def report() -> StepReport | None:
    """What memtrain did to the graphs of the latest training step (None before any compile), since
    ``clear_reports()``: every graph that ran in it (a graph break splits a model into several, and
    Dynamo may compile one per layer), each weighed by its runs in it; a compiled block counts once per
    layer it serves. An evaluation under ``no_grad`` does not count. Before a step has run: the latest
    graph of each compiled frame (a recompile for a new length replaces the graph it recompiled)."""
    with _LOCK:
        reps, step = list(_REPORTS), _STEPS.trained
    latest: dict = {}
    for rep in reps:
        latest[_frame(rep)] = rep
    if step == 0:
        return StepReport(sorted(latest.values(), key=lambda r: r.graph_id)) if latest else None
    compiled: dict = {}  # a block's training graphs (an evaluation compiles the block again)
    for rep in reps:
        if rep.served and not rep.inference:
            compiled.setdefault(_frame(rep), []).append(rep)
    # those that ran in the step, else the latest
    trained = {key: [g for g in gs if g.step == step] or gs[-1:] for key, gs in compiled.items()}
    blocks = {id(g) for gs in trained.values() for g in gs}
    graphs = [g for g in reps if id(g) in blocks or (not g.served and g.step == step)]
    runs = {g.graph_id: g.step_runs for g in graphs if not g.served}
    # A block whose layers differ (T5's first carries the position bias, Switch's alternate sparse and
    # dense) runs one graph for some layers and another for the rest: each counts the runs it made.
    runs.update({g.graph_id: min(g.step_runs, len(g.served)) for gs in trained.values() if len(gs) > 1 for g in gs})
    ran: dict = {}
    for gs in trained.values():
        for g in gs:
            if g.step == step:
                ran[g.served] = ran.get(g.served, 0) + g.step_runs
    return StepReport(graphs, runs, {served: n for served, n in ran.items() if n < len(served)}, step)


def _frame(rep: GraphReport):
    # Within a frame, what the graphs serve tells a recompile of one block from another block.
    return (rep.frame_id, rep.served) if rep.frame_id is not None else ("graph", rep.graph_id)


def report_of_last_compile() -> GraphReport | None:
    """The report of the graph compiled last (not the step's aggregate)."""
    with _LOCK:
        return _REPORTS[-1] if _REPORTS else None


def reports() -> list[GraphReport]:
    """Every memtrain graph report of this process, oldest first (one per compiled graph)."""
    with _LOCK:
        return list(_REPORTS)


def clear_reports() -> None:
    with _LOCK:
        _REPORTS.clear()
        _STEPS.step, _STEPS.trained, _STEPS.backward_ran = 0, 0, False
