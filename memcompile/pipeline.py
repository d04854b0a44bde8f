"""The order of memtrain's passes, one list per stage, and the cache key they make together.
Nothing else decides pass order; adding a pass is its file and one line here.

    Dynamo graph ─ pre_aot ─▶ AOTAutograd joint graph ─ joint_passes ─▶ partition ─▶ forward / backward
                                                                   partitioned passes ┘ └ compile (Inductor or Python)

Ordering constraints, each stated where it binds:
* The "before" report copies the joint graph untouched (and partitions the copy when the report is
  first read), so the copy is taken before any joint pass changes the graph.
* Activation compression needs the forward and the backward of a layer in one graph (it rewrites the
  weight-gradient matmul of the backward to use what the forward saves), so it runs on the joint
  graph, before partitioning decides what is saved.
* It runs after Inductor's own joint-graph passes (we are called from inside its partitioner hook),
  so inserted nodes are traced with Inductor's decomposition table.
* Partitioning runs last on the joint graph: min-cut then sees the compressed tensors as the cheap
  thing to save and recomputes cheap pointwise ops around them.
* Returning the logits detached (no zero gradient for them in the backward) runs on Dynamo's graph,
  where the outputs are the model's, and first there: it matches the output projection's ``F.linear``,
  which the fused loss then takes over. Its result wraps the compiled callable, which restores the
  graph's outputs.
* The fused cross-entropy rewrite runs on Dynamo's graph, where the loss is still one
  ``F.cross_entropy`` call; in the joint graph it is a dozen decomposed ops, forward and backward.
  The "before" report therefore already includes it: its saving shows in the estimate's peak.
* Broadcast copies (grouped-query attention's repeated keys/values) are marked for recomputation
  after compression, whose checkpointing check reads the same recompute tags.
* The memory planner runs on the partitioned graphs, after everything else: it plans what is left
  saved, and there removing a saved tensor cannot make min-cut save another made from it.
* Block boundaries are marked after compression, so what is saved at a boundary is what compression
  left there; only under a recompute budget, the only case where min-cut recomputes across blocks.
"""
from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.fx as fx

from memcompile import _torch_compat as tc
from memcompile import quant, report_cache
from memcompile import reporting as report_mod
from memcompile.config import MemtrainConfig
from memcompile.marks import mark_grad_approximation
from memcompile.passes import (
    activation_compression,
    block_boundaries,
    broadcast_recompute,
    cross_entropy,
    memory_plan,
    returned_logits,
)
from memcompile.passes._graph import dump_graph, example_value
from memcompile.passes.base import GraphPass, PassResult, source_digest

log = logging.getLogger(__name__)

# Dynamo's graph: the loss is still one ``F.cross_entropy`` call here (a dozen aten ops in the joint).
PRE_AOT: tuple[type[GraphPass], ...] = (
    # Before the loss is fused: it matches the returned logits' F.linear, which the fusion replaces.
    returned_logits.ReturnedLogits,
    cross_entropy.FuseCrossEntropy,
)
JOINT: tuple[type[GraphPass], ...] = (
    activation_compression.CompressActivations,
    # After compression, which reads checkpointing's recompute tags and must not see these.
    broadcast_recompute.RecomputeBroadcasts,
    # After compression, so the compressed tensors, not the inputs they replace, are what is saved.
    block_boundaries.MarkBlockInputs,
    cross_entropy.KeepLossStatistics,
)
# The partitioner's forward and backward graphs, where what is saved is explicit.
PARTITIONED: tuple[type[GraphPass], ...] = (memory_plan.PlanMemory,)


class CompileContext:
    """What the stages of one graph's compile share: names of its inputs, the report, options."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence, config: MemtrainConfig,
                 served: Sequence[str] = (), region: str = "", shares: int = 1):
        self.config = config
        self.example_inputs = list(example_inputs)
        self.input_names = tc.dynamo_input_names(gm)
        from_frame = tc.dynamo_inputs_from_frame(gm)
        self.inputs_held = held_inputs(from_frame, self.example_inputs) if region else from_frame
        self.region = region
        # Parameters live the whole step whatever the graph saves: saving one for the backward is free.
        self.parameter_inputs = [isinstance(x, torch.nn.Parameter) for x in self.example_inputs]
        self.report = report_mod.new_report(compiler=config.compiler, partitioner=config.partitioner,
                                            activation=config.activation, frame_id=tc.current_frame_id())
        self.report.served, self.report.region = tuple(served), region
        self.report.unheld_inputs = tuple(i for i, (held, x) in enumerate(zip(self.inputs_held, self.example_inputs))
                                          if not held and isinstance(x, torch.Tensor))
        self.served = tuple(served)
        self.in_block = bool(served)
        self.target_shares = shares
        self.decompositions: dict | None = None  # Inductor's table, once Inductor partitions
        self.partitioned = False  # the partitioner ran (not served by AOTAutograd's cache)
        self.cache_key: str | None = None  # of the report's entry beside AOTAutograd's cache (Inductor only)
        self.dump_prefix = f"graph{self.report.graph_id}"
        self.pre_aot_results: list[PassResult] = []  # their ``wrap`` restores the graph's outputs

    def wrap(self, compiled: Callable) -> Callable:
        """The compiled graph, run and counted by the report, returning what the caller's graph returned."""
        compiled = report_mod.count_runs(compiled, self.report)
        for result in reversed(self.pre_aot_results):
            compiled = result.wrap(compiled)
        return compiled

    def partition_key(self) -> str:
        """``cache_key`` of this compile: what its partitioner hook makes of the joint graph."""
        return cache_key(self.config, self.input_names, len(self.served), self.region, self.target_shares)

    def dump(self, stage: str, gm) -> None:
        dump_graph(self.config.dump_dir, f"{self.dump_prefix}_{stage}", gm)


def held_inputs(from_frame: Sequence[bool], example_inputs: Sequence) -> list[bool]:
    """Per input of a region of a model's forward (``compile_blocks``: a block, the head), whether its
    caller holds it anyway, so that saving it costs nothing: one from the compiled frame (a parameter, a
    buffer, the batch), unless it requires grad without being a parameter. That is an activation the
    model made before the region (a block's hidden states, the final hidden states the head reads): only this graph's
    saving keeps it alive. In a frame the user compiles, an argument that requires grad is the user's."""
    return [held and not (isinstance(x, torch.Tensor) and x.requires_grad and not isinstance(x, torch.nn.Parameter))
            for held, x in zip(from_frame, example_inputs)]


def pre_aot(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Stage 1, on Dynamo's graph: records the NF4 layers for the report; with ``fused_cross_entropy``,
    the loss goes to memtrain's kernel (here, before AOTAutograd decomposes it into aten ops).

    Module-level swaps (NF4 weights, LoRA adapters) are done by ``memcompile.prepare`` before
    ``torch.compile`` instead: parameters created inside a backend would be invisible to the optimizer.
    """
    ctx.dump("dynamo", gm)
    with tc.compile_phase("memtrain.pre_aot"):
        ctx.report.quantized_layers = quantized_layers_in(gm, ctx.input_names)
        ctx.pre_aot_results = _run(PRE_AOT, gm, ctx)
    if ctx.pre_aot_results:
        ctx.dump("dynamo_after", gm)
    return gm


def _run(passes: Sequence[type[GraphPass]], gm: fx.GraphModule, ctx: CompileContext) -> list[PassResult]:
    """Run the enabled ``passes`` in order, each result into the report; returns their results."""
    results = []
    for cls in passes:
        p = cls(ctx.config)
        if p.enabled():
            results.append(p(gm, ctx))
            ctx.report.record(results[-1])
    return results


def quantized_layers_in(gm: fx.GraphModule, input_names: Sequence[str]) -> list[dict]:
    """Every quantised linear's op call (``memtrain::nf4_linear``): layer, weight shape, bytes dense (in the
    compute dtype) and quantised."""
    placeholders = {n: name for n, name in zip((n for n in gm.graph.nodes if n.op == "placeholder"), input_names)}
    layers = []
    for n in gm.graph.nodes:
        scheme = quant.for_op(n.target) if n.op == "call_function" else None
        if scheme is None:
            continue
        x, state, shape = scheme.call(n.args)
        vals = [example_value(a) for a in state if isinstance(a, fx.Node)]
        xval = example_value(x)
        dense_elem = xval.element_size() if isinstance(xval, torch.Tensor) else 2
        name = placeholders.get(state[0], str(state[0]))
        layers.append({"name": name.removesuffix(".weight"), "shape": tuple(shape),
                       "bytes_before": shape[0] * shape[1] * dense_elem,
                       "bytes_after": sum(v.numel() * v.element_size() for v in vals if isinstance(v, torch.Tensor))})
    return layers


def joint_passes(joint: fx.GraphModule, ctx: CompileContext) -> None:
    """Stage 2, on the joint forward+backward graph: ``JOINT`` in order; the parameters whose
    gradient a pass approximates are marked (Fira reads the marks)."""
    ctx.dump("joint_before", joint)
    _run(JOINT, joint, ctx)
    for result in ctx.report.passes.values():
        ctx.report.approximated.update(result.approximated)
    _mark_approximated(ctx)
    ctx.dump("joint_after", joint)


def _mark_approximated(ctx: CompileContext) -> None:
    """Mark the graph's parameters whose gradient a pass approximates (Fira reads the marks)."""
    by_name = dict(zip(ctx.input_names, ctx.example_inputs))
    for name, method in ctx.report.approximated.items():
        param = by_name.get(name)
        if isinstance(param, torch.Tensor):
            mark_grad_approximation(param, method)


def cache_key(config: MemtrainConfig, input_names: Sequence[str] = (), served: int = 0,
              region: str = "", shares: int = 1) -> str:
    """Inductor's key for what the partitioner hook makes of a joint graph: each pass that runs
    (its source and options), the partitioner's options, the layer names (targets match them), how
    many layers a compiled block serves (0: a graph of its own), whether it is a region of a model
    (what its inputs cost) and how many runs share ``memory_target`` (its plan's target)."""
    h = hashlib.sha256(source_digest((Path(__file__).resolve(),)).encode())
    for cls in (*PRE_AOT, *JOINT, *PARTITIONED):
        p = cls(config)
        if p.enabled():
            h.update(f"{p.name}/{p.stage}:{p.uuid()}".encode())
    h.update(repr((config.partitioner, config.recompute_budget, config.compiler)).encode())
    # A region's graph is planned for its share of the step's target: how many runs share it counts.
    h.update(repr((tuple(input_names), served, bool(region), shares)).encode())
    return h.hexdigest()


def _base_partition(config: MemtrainConfig) -> Callable:
    if config.partitioner == "default":
        return tc.default_partition
    if config.recompute_budget is None:
        return tc.min_cut_rematerialization_partition

    def budgeted(*args, **kwargs):
        # Set around our own partition calls only, so other compiles in the process keep their budget.
        with tc.activation_memory_budget(config.recompute_budget):
            return tc.min_cut_rematerialization_partition(*args, **kwargs)

    return budgeted


def partition(joint: fx.GraphModule, joint_inputs, ctx: CompileContext, *, num_fwd_outputs: int, **kw):
    """Stage 3: report "before", joint passes, then the configured partitioner."""
    base = _base_partition(ctx.config)
    kw.pop("compiler", None)
    ctx.partitioned = True
    if ctx.config.report:
        with tc.compile_phase("memtrain.report_copy"):
            ctx.report.defer_saved_before(_partition_later(joint, joint_inputs, base, ctx, num_fwd_outputs, kw))
    with tc.compile_phase("memtrain.joint_passes"):
        joint_passes(joint, ctx)
    with tc.compile_phase("memtrain.partition"):
        fw, bw = base(joint, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kw)
    with tc.compile_phase("memtrain.partitioned_passes"):
        _run(PARTITIONED, memory_plan.Partitioned(fw, bw, num_fwd_outputs), ctx)
    # What the step pays for what it does not keep, at the cost model's rates (report, estimate).
    ctx.report.overhead_seconds = (memory_plan.backward_recompute_seconds(bw, ctx.config.plan)
                                   + memory_plan.transfer_seconds(ctx.report.passes.get(memory_plan.NAME)))
    ctx.report.saved_after = report_mod.saved_tensors(fw, num_fwd_outputs, ctx.inputs_held)
    ctx.dump("forward", fw)
    ctx.dump("backward", bw)
    return fw, bw


def _partition_later(joint: fx.GraphModule, joint_inputs, base: Callable, ctx: CompileContext, num_fwd_outputs: int,
                     kw: dict) -> Callable[[], list]:
    """The report's "before": what ``base`` saves of the joint graph as it is now, untouched by the
    passes. Only the graph is copied here; the partition itself runs when the report is first read,
    under the fake mode and the partitioner's configs of this compile."""
    untouched = tc.copy_graph_module(joint)
    fake_mode, configs, inputs_held = tc.fake_mode_of(joint.graph), tc.partitioner_configs(), ctx.inputs_held
    # Not the context: the reports outlive the model, and its example inputs are the model's parameters.
    cache_key, report = ctx.cache_key, ctx.report

    def before() -> list:
        with tc.compile_phase("memtrain.report_before"), configs(), fake_mode:
            fw_before, _ = base(untouched, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kw)
        saved = report_mod.saved_tensors(fw_before, num_fwd_outputs, inputs_held)
        if cache_key is not None:  # for the compiles AOTAutograd's cache will serve
            report_cache.store_before(cache_key, report, saved)
        return saved

    return before


class _Partitioner(tc.CustomPartitionerFn):
    """Inductor's partitioner hook; ``uuid`` keys Inductor's caches on our source and options."""

    def __init__(self, ctx: CompileContext):
        self.ctx = ctx

    def __call__(self, joint, joint_inputs, **kw):
        return partition(joint, joint_inputs, self.ctx, **kw)

    def uuid(self):
        return self.ctx.partition_key()

    def __deepcopy__(self, memo):
        # Inductor deep-copies its config to build cache keys; a copy would duplicate the context,
        # whose example inputs are the model's real parameters (or FakeTensors, which cannot be
        # copied at all). The hook is keyed by ``uuid()``, so the same object serves as its copy.
        return self

    def __reduce__(self):
        # Inductor's FX-graph cache key pickles its config, this hook included: by value, that would
        # hash every parameter's values (the context's example inputs), and fail under FSDP2, whose
        # parameters' storage is freed when the backward compiles. The key needs only ``uuid()``.
        return str, (self.uuid(),)


def _python_compiler(kind: str, ctx: CompileContext) -> Callable:
    def compiler(gm: fx.GraphModule, example_inputs):
        if kind == "inference":
            ctx.report.inference = True
            ctx.dump("inference", gm)
        return tc.make_boxed_func(gm.forward)

    return compiler


def compile_graph(gm: fx.GraphModule, example_inputs: Sequence, config: MemtrainConfig,
                  served: Sequence[str] = (), region: str = "", shares: int = 1) -> Callable:
    """Run every stage on one Dynamo graph and return the compiled callable. ``served``: the modules
    the graph runs for, when one compiled block serves several (regional compilation). ``region``: which
    part of a model's forward the graph is (``compile_blocks``: a block, the head; the report says it),
    whose arguments that require grad are activations (``held_inputs``); empty for a frame the user
    compiles. ``shares``: how many graph runs of a step share ``memory_target`` (``compile_blocks``:
    every compiled layer and the head), each planned for its part."""
    if config.compiler == "inductor" and any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs):
        tc.warm_kernel_build_pool()
    ctx = CompileContext(gm, example_inputs, config, served, region, shares)
    try:
        gm = pre_aot(gm, ctx)
        if config.compiler == "inductor":
            return ctx.wrap(_compile_inductor(gm, example_inputs, ctx))
        extra = {}
        if config.compiler == "aot_eager_decomp":  # Inductor's graphs, run in Python
            ctx.decompositions = tc.inductor_decompositions()
            extra["decompositions"] = ctx.decompositions
            part = tc.inductor_partition(_Partitioner(ctx))
        else:
            part = lambda joint, ji, **kw: partition(joint, ji, ctx, **kw)  # noqa: E731
        backend = tc.aot_autograd(fw_compiler=_python_compiler("fw", ctx), bw_compiler=_python_compiler("bw", ctx),
                                  inference_compiler=_python_compiler("inference", ctx), partition_fn=part, **extra)
        return ctx.wrap(backend(gm, example_inputs))
    except BaseException:
        # Dynamo restarts a compile it abandons (with dynamic shapes, to turn a scalar into a tensor):
        # the abandoned attempt's report describes no graph that runs.
        report_mod.discard(ctx.report)
        raise
    finally:
        # The compiled function keeps the context (its backward's compiler, the partitioner hook), and
        # Dynamo keeps the function on the forward's code, which outlives the model: the example inputs
        # are the model's parameters, which would then never be freed. Nothing reads them past here.
        ctx.example_inputs = ()


def _compile_inductor(gm: fx.GraphModule, example_inputs: Sequence, ctx: CompileContext) -> Callable:
    ctx.decompositions = tc.inductor_decompositions()
    ctx.cache_key = report_cache.key(gm, ctx.partition_key())
    hits = tc.autograd_cache_hits()
    # dump_dir asks for the graphs each stage makes: a served compile would make none.
    compiled, caught = _inductor(gm, example_inputs, ctx, cache=ctx.config.dump_dir is None)
    if tc.autograd_cache_hits() > hits:
        # AOTAutograd's cache served the graphs, so nothing partitioned: the report (and the marks on
        # approximated gradients) come from the entry the compile that partitioned wrote.
        if report_cache.load(ctx.cache_key, ctx.report):
            _mark_approximated(ctx)
            return compiled
        log.info("memtrain: graph %d was served by AOTAutograd's cache without its report; compiling it again",
                 ctx.report.graph_id)
        compiled, caught = _inductor(gm, example_inputs, ctx, cache=False)
    if not ctx.partitioned:
        # No backward to partition: under no_grad, or no input requires grad (a sequence-to-sequence
        # model's label shift under compile_blocks), as AOTAutograd's inference compiler says elsewhere.
        ctx.report.inference = True
    report_cache.store(ctx.cache_key, ctx.report, caught)
    return compiled


def _inductor(gm: fx.GraphModule, example_inputs: Sequence, ctx: CompileContext, cache: bool = True):
    """Inductor's compile with memtrain's partitioner, and the warnings it gave (shown as they would have
    been, and kept for the compiles AOTAutograd's cache will serve)."""
    with warnings.catch_warnings(record=True) as caught, tc.autograd_cache_disabled(not cache):
        compiled = tc.compile_fx(gm, example_inputs, config_patches={"custom_partitioner_fn": _Partitioner(ctx)})
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
    return compiled, caught
