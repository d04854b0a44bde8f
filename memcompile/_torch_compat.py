"""Every private torch API memcompile uses, in one place.

These hooks are not covered by torch's compatibility promise; keeping them here means a torch upgrade
touches one file. Checked on torch 2.11, 2.13 and 2.14 (``make test-torch``; see the design notes).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import types
from typing import Callable

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._functorch.partitioners import default_partition, min_cut_rematerialization_partition
from torch._inductor.compile_fx import compile_fx
from torch._inductor.custom_graph_pass import CustomPartitionerFn, get_hash_for_files
from torch._inductor.decomposition import select_decomp_table
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import CheckpointPolicy

__all__ = [
    "CustomPartitionerFn",
    "TorchDispatchMode",
    "FakeTensor",
    "FakeTensorMode",
    "LINEAR_FUNCTIONS",
    "aot_autograd",
    "compile_fx",
    "default_partition",
    "fake_mode_of",
    "foreach_copy_",
    "get_hash_for_files",
    "inductor_decompositions",
    "inductor_partition",
    "make_boxed_func",
    "make_fx",
    "memory_trace",
    "min_cut_rematerialization_partition",
    "must_recompute",
    "must_save",
    "partitioner_tag",
    "record_memory_history",
    "tree_leaves",
]

FORWARD_TAG = "is_forward"
BACKWARD_TAG = "is_backward"


def partitioner_tag(node: torch.fx.Node) -> str | None:
    """``"is_forward"``/``"is_backward"``: where AOTAutograd's joint graph places a node."""
    return node.meta.get("partitioner_tag")


# Every form a functional linear takes in the graphs memcompile reads: ``F.linear`` (the C function
# ``torch._C._nn.linear`` on current torch, named twice in case a release wraps it in Python again) in
# Dynamo's and ``torch.fx.symbolic_trace``'s graphs, ``aten.linear`` in ``torch.export``'s. Each takes
# ``(input, weight, bias=None)``; ``memcompile.passes._graph.linear_args`` reads them.
LINEAR_FUNCTIONS = (torch._C._nn.linear, torch.nn.functional.linear, torch.ops.aten.linear.default)


def foreach_copy_(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """``d.copy_(s)`` for each pair, as a few multi-tensor kernels instead of one launch per pair."""
    torch._foreach_copy_(dst, src)


def must_save(node: torch.fx.Node) -> None:
    """Tell the min-cut partitioner never to recompute ``node``: it is saved if the backward needs it
    (the tag ``torch.utils.checkpoint`` policies put on nodes)."""
    node.meta["recompute"] = CheckpointPolicy.MUST_SAVE


def must_recompute(node: torch.fx.Node) -> None:
    """Tell the min-cut partitioner to recompute ``node`` in the backward rather than save it."""
    node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE


def is_checkpointed(node: torch.fx.Node) -> bool:
    """Whether ``node`` lies in an activation-checkpointed region (``torch.utils.checkpoint``, which
    Hugging Face's gradient checkpointing uses): the partitioner recomputes it rather than saving it."""
    return node.meta.get("recompute") in (CheckpointPolicy.PREFER_RECOMPUTE, CheckpointPolicy.MUST_RECOMPUTE)


def fake_mode_of(graph: torch.fx.Graph) -> FakeTensorMode:
    for n in graph.nodes:
        val = n.meta.get("val")
        if isinstance(val, FakeTensor):
            return val.fake_mode
    raise ValueError("graph has no FakeTensor metadata; trace it with make_fx or AOTAutograd first")


def _partitioner_config_copies() -> tuple[dict, dict]:
    """Copies of the configs a partitioner reads: functorch's and Inductor's."""
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    return functorch_config.get_config_copy(), inductor_config.get_config_copy()


def partitioner_configs() -> Callable[[], contextlib.AbstractContextManager]:
    """The configs a partitioner reads (functorch's and Inductor's), as they are now: a context
    manager factory that restores them, for a partition run after the compile that set them, on one
    rank alone."""
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    saved = _partitioner_config_copies()
    # A later run happens on whichever ranks read it, not on all of them: a partitioner that agreed
    # its decisions across ranks would wait for the others forever.
    if "_sync_decision_cross_ranks" in saved[0]:
        saved[0]["_sync_decision_cross_ranks"] = False

    def restored() -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(functorch_config.patch(saved[0]))
        stack.enter_context(inductor_config.patch(saved[1]))
        return stack

    return restored


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` with its own graph, sharing its attributes (a deepcopy of the module fails on
    fake constants). Copying the graph copies its pytree specs, which makes torch 2.13 warn that
    ``isinstance(treespec, LeafSpec)`` is deprecated, from its own code, on every compile: silenced here."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        return torch.fx.GraphModule(gm, gm.graph.__deepcopy__())


def inductor_decompositions() -> dict:
    """Inductor's decomposition table: nodes we insert into its graphs must already be in this IR."""
    return select_decomp_table()




def dynamo_input_names(gm: torch.fx.GraphModule) -> list[str]:
    """Dotted names of a Dynamo graph's inputs (``model.layers.0.self_attn.q_proj.weight``).

    Dynamo records each input's source (``L['self']._modules['model']...._parameters['weight']``) in
    ``meta["grapharg"]``; inputs without one keep their placeholder name.
    """
    import re

    names = []
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        source = getattr(n.meta.get("grapharg"), "source", None)
        text = source.name if source is not None and hasattr(source, "name") else None
        if not isinstance(text, str):
            names.append(n.name)
            continue
        parts = re.findall(r"\[\s*'([^']*)'\s*\]|\[(\d+)\]|\.([A-Za-z_]\w*)", text)
        tokens = [a or b or c for a, b, c in parts]
        tokens = [t for t in tokens if t not in ("_modules", "_parameters", "_buffers", "__dict__")]
        # A decorated forward (``def wrapper(*args, **kwargs)``, transformers 5.24) receives the module
        # as ``L['args'][0]``: its attributes are the module's, named from the module as under ``L['self']``.
        if re.match(r"\w+\['args'\]\[\d+\]\.", text):
            tokens = tokens[1:]
        names.append(".".join(tokens[1:]) if len(tokens) > 1 else n.name)
    return names


def dynamo_inputs_from_frame(gm: torch.fx.GraphModule) -> list[bool]:
    """For each input of a Dynamo graph, whether it comes from the compiled frame (a parameter, a
    buffer, an argument: Dynamo records its source in ``meta["grapharg"]``), which its caller holds
    anyway. An input without a source is a value an earlier graph of the same frame produced: an
    activation, as where DDP's optimizer splits a frame's graph at its gradient buckets."""
    return [n.meta.get("grapharg") is not None for n in gm.graph.nodes if n.op == "placeholder"]


def autograd_cache_disabled(disabled: bool = True):
    """A context that turns AOTAutograd's compile cache off (a cache hit skips our partitioner)."""
    import contextlib

    import torch._functorch.config as functorch_config

    if not disabled:
        return contextlib.nullcontext()
    return functorch_config.patch(enable_autograd_cache=False)


def activation_memory_budget(value: float):
    """A context that sets AOTAutograd's ``activation_memory_budget``: the min-cut partitioner keeps
    saved activations to ``value`` of what it would save otherwise, recomputing the rest."""
    import torch._functorch.config as functorch_config

    return functorch_config.patch(activation_memory_budget=value)


def size_hint(s) -> int | None:
    """A size as an int: itself when static, the example value Dynamo traced with when symbolic."""
    if isinstance(s, int):
        return s
    from torch.fx.experimental import symbolic_shapes

    # torch 2.13 names them has_guarding_hint/guarding_hint_or_throw; 2.11 has_hint/hint_int.
    has = getattr(symbolic_shapes, "has_guarding_hint", None) or symbolic_shapes.has_hint
    hint = getattr(symbolic_shapes, "guarding_hint_or_throw", None) or symbolic_shapes.hint_int
    if not has(s):  # unbacked sizes have no hint
        return None
    return int(hint(s))


def size_bound(s) -> int | None:
    """A size's largest value: itself when static; when symbolic, the end of the range its graph
    accepts (``torch._dynamo.mark_dynamic(x, dim, max=N)``), ``None`` where that range has no end
    (Dynamo's automatic dynamic sizes)."""
    if isinstance(s, int):
        return s
    import sympy
    from torch.utils._sympy.numbers import int_oo

    upper = s.node.shape_env.bound_sympy(s.node.expr).upper
    return None if upper in (int_oo, sympy.oo) or not upper.is_integer else int(upper)


def option_error(message: str) -> ValueError:
    """A ``ValueError`` that Dynamo re-raises as it is, instead of inside ``BackendCompilerFailed``
    (whose message starts with Dynamo's line, not ours). Dynamo hands ``options`` to a backend only
    at the first compile, so that is where a bad option can be reported at all."""
    from torch._dynamo.exc import ShortenTraceback

    class MemtrainOptionError(ValueError, ShortenTraceback):
        def __init__(self, msg: str):
            ShortenTraceback.__init__(self, msg, first_useful_frame=None)

    MemtrainOptionError.__module__, MemtrainOptionError.__qualname__ = "memcompile", "MemtrainOptionError"
    return MemtrainOptionError(message)


def dynamo_graph_count() -> int:
    """How many graphs Dynamo has compiled in this process (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def current_frame_id() -> int | None:
    """Dynamo's id of the frame being compiled: a recompile of the same code keeps it, a graph break's
    resumed code gets its own."""
    from torch._guards import CompileContext

    compile_id = CompileContext.current_compile_id()
    return getattr(compile_id, "frame_id", None)


def record_memory_history(enabled: bool, max_entries: int = 500_000) -> None:
    """Start (with each allocation's Python stack) or stop the CUDA caching allocator's event history;
    starting clears what an earlier recording left."""
    if enabled:
        torch.cuda.memory._record_memory_history("all", context="alloc", stacks="python", max_entries=max_entries,
                                                 clear_history=True)
    else:
        torch.cuda.memory._record_memory_history(None)


def memory_trace(device: torch.device) -> list[dict]:
    """The allocator's recorded events on ``device`` (``alloc``, ``free_requested``, ...; each with
    ``addr``, ``size`` and ``frames``, innermost first)."""
    return torch.cuda.memory._snapshot()["device_traces"][device.index or 0]


def inductor_partition(partitioner: CustomPartitionerFn) -> Callable:
    """Inductor's partition step as ``compile_fx`` runs it (its joint-graph passes, then ``partitioner``
    as its ``custom_partitioner_fn``), for AOTAutograd's ``partition_fn``: the very forward and backward
    graphs Inductor would compile, without its code generation."""
    from torch._inductor import compile_fx as inductor_compile_fx
    from torch._inductor import config as inductor_config

    def partition(gm, joint_inputs, **kwargs):
        patches = {"custom_partitioner_fn": partitioner}
        if any(getattr(x, "device", None) == torch.device("meta") for x in tree_leaves(joint_inputs)):
            # Folding "uniform" values reads tensors' data, which meta tensors lack: it would replace
            # every computation with an empty tensor.
            patches["joint_graph_constant_folding"] = False
        with inductor_config.patch(patches):
            return inductor_compile_fx.partition_fn(gm, joint_inputs, **kwargs)

    return partition


def compile_phase(key: str):
    """Times a stage of memtrain's compile under ``key`` with Dynamo's own timers, so it shows in
    ``compile_phase_seconds()``, ``TORCH_LOGS`` compile-time summaries and chromium traces beside
    Dynamo's and Inductor's stages."""
    from torch._dynamo.utils import dynamo_timed

    return dynamo_timed(key)


def compile_phase_seconds() -> dict[str, float]:
    """Seconds spent so far in this process in each timed stage of compilation (Dynamo's, AOTAutograd's,
    Inductor's and memtrain's), summed over calls. Nested stages are inside their parents' sums."""
    from torch._dynamo.utils import compilation_time_metrics

    return {key: float(sum(times)) for key, times in compilation_time_metrics.items()}


def compile_phase_calls(key: str) -> list[float]:
    """Seconds of each call of one timed stage so far in this process, in the order they ran (for
    ``"compile_fx_inner"``: one per forward or backward graph Inductor compiled)."""
    from torch._dynamo.utils import compilation_time_metrics

    return [float(t) for t in compilation_time_metrics.get(key, ())]


def inductor_compile_threads() -> int:
    """How many processes Inductor builds kernels in (1: in this one)."""
    import torch._inductor.config as inductor_config

    return int(inductor_config.compile_threads)


def warm_kernel_build_pool() -> None:
    """Start Inductor's worker processes for Triton kernel builds now, as its own backend does when Dynamo
    calls it (memtrain calls Inductor below that), and ask whether they are ready, so the answer is in by
    the first kernel: until the pool says it is ready, Inductor builds each kernel in this process, one
    after another."""
    from torch._inductor.async_compile import AsyncCompile, maybe_warm_pool

    maybe_warm_pool()
    if hasattr(AsyncCompile, "use_process_pool"):
        AsyncCompile.use_process_pool()


def wait_kernel_build_pool(timeout: float = 120.0) -> None:
    """Block until Inductor's kernel-build workers are up (at once where it builds in this process)."""
    from torch._inductor.async_compile import AsyncCompile

    if hasattr(AsyncCompile, "wait_pool_ready"):
        AsyncCompile.wait_pool_ready(timeout)


def autograd_cache_hits() -> int:
    """How many compiles AOTAutograd's compile cache has served in this process."""
    from torch._dynamo.utils import counters

    return int(counters["aot_autograd"]["autograd_cache_hit"])


def inductor_cache_dir() -> str:
    """Inductor's on-disk cache folder (``TORCHINDUCTOR_CACHE_DIR``, or its default)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


def partitioner_config_digest() -> str:
    """The configs a partition reads (functorch's, Inductor's), as text that is the same in every
    process for the same settings: only plain values (objects' reprs carry addresses)."""

    def text(v) -> str | None:  # canonical text of a plain value (sets sorted), None for anything else
        if v is None or isinstance(v, (bool, int, float, str)):
            return repr(v)
        if isinstance(v, (list, tuple, set, frozenset)):
            parts = [text(x) for x in v]
            if None in parts:
                return None
            return type(v).__name__ + repr(sorted(parts) if isinstance(v, (set, frozenset)) else parts)
        if isinstance(v, dict):
            parts = [(text(k), text(x)) for k, x in v.items()]
            return None if any(None in p for p in parts) else "dict" + repr(sorted(parts))
        return None

    functorch_items, inductor_items = _partitioner_config_copies()
    items = [*functorch_items.items(), *inductor_items.items()]
    return repr(sorted((k, t) for k, v in items if (t := text(v)) is not None))


# Whether torch.compile can keep a compiled region's recompiles apart (torch 2.13 can).
ISOLATES = "isolate_recompiles" in inspect.signature(torch.compile).parameters
_REGIONS = itertools.count()


def compile_region(fn: Callable, backend, dynamic: bool | None, eager_decorators: bool = False) -> Callable:
    """``torch.compile(fn)`` whose frames, those Dynamo compiles inside its calls included, keep their
    compiled graphs and recompile count apart from every other ``torch.compile`` of the same code:
    ``isolate_recompiles`` where torch has it (2.13); before, a copy of ``fn`` whose code objects are its
    own (``_with_own_code``), since Dynamo keeps both on the code object.

    ``eager_decorators``: where ``fn`` is a decorator's wrapper, only the function it wraps is compiled
    and the wrappers run as they are. A graph break inside (the head's, at the eager decoder body) makes
    Dynamo trace each enclosing frame to the break, restart, and trace the next one in (transformers 5.24
    wraps a model's ``forward`` twice: 0.45 s by Dynamo's log on CPU)."""
    inner = _wrapped_function(fn)
    if eager_decorators and inner is not None:
        return _rewrapped(fn, inner, compile_region(inner, backend, dynamic, eager_decorators))
    if ISOLATES:
        return torch.compile(fn, backend=backend, dynamic=dynamic, isolate_recompiles=True)
    return torch.compile(_with_own_code(fn, f"memtrain region {next(_REGIONS)}"), backend=backend, dynamic=dynamic)


def _wrapped_function(fn: Callable) -> types.FunctionType | None:
    """The function a decorator's wrapper ``fn`` calls from its closure (``__wrapped__``), if any."""
    inner = getattr(fn, "__wrapped__", None)
    cells = getattr(fn, "__closure__", None) or ()
    return inner if isinstance(inner, types.FunctionType) and any(_holds(c, inner) for c in cells) else None


def _rewrapped(fn: types.FunctionType, inner: Callable, replacement: Callable, code=None) -> types.FunctionType:
    """A copy of ``fn`` (with ``code``, if given) whose closure calls ``replacement`` where it called
    ``inner``. Other closure cells stay as they are (a wrapper may compare itself with the class's
    ``forward``)."""
    cells = fn.__closure__ and tuple(types.CellType(replacement) if _holds(c, inner) else c for c in fn.__closure__)
    own = types.FunctionType(code or fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, cells)
    own.__kwdefaults__ = fn.__kwdefaults__
    return functools.update_wrapper(own, fn)


def _with_own_code(fn: types.FunctionType, tag: str) -> types.FunctionType:
    """A copy of ``fn`` with a new code object, and so for the function it wraps (``__wrapped__``, which a
    decorator's wrapper calls from its closure: a graph break inside makes that a frame of its own).
    ``tag``, an unused constant, makes the copies' code unequal to the original's, as Dynamo finds the
    functions that resume after a graph break by code equality."""
    inner = _wrapped_function(fn)
    code = fn.__code__.replace(co_consts=(*fn.__code__.co_consts, tag))
    return _rewrapped(fn, inner, _with_own_code(inner, tag) if inner is not None else None, code)


def _holds(cell, value) -> bool:
    try:
        return cell.cell_contents is value
    except ValueError:  # an empty cell
        return False
