"""``MemtrainConfig``: every option of the backend and of ``memcompile.prepare``, validated once.

Options arrive as a dict from ``torch.compile(..., options={...})`` or as a ``MemtrainConfig``.
A dict may nest the per-method sections (``{"velora": {"num_groups": 16}}``) or use dotted keys
(``{"velora.num_groups": 16}``). Unknown keys and bad values raise ``ValueError`` naming the key and
what is valid, because a typo that silently falls back to a default changes what gets trained.

Example::

    import memcompile, torch
    cfg = memcompile.MemtrainConfig(activation="compact", compact={"rank": 0.25, "refresh": 50})
    model = torch.compile(model, backend="memtrain", options=cfg)
    # the same as a plain dict:
    model = torch.compile(model, backend="memtrain",
                          options={"activation": "compact", "compact": {"rank": 0.25}})
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from memcompile import _options
from memcompile.lora import COMPUTE_DTYPES
from memcompile.passes.compression import DEFAULT_EXCLUDE, METHODS

COMPILERS = ("inductor", "aot_eager", "aot_eager_decomp")
PARTITIONERS = ("mincut", "default")
DEFAULT_ACTIVATION = "velora"
# Every registered compression method (memcompile/passes/compression/), the default first.
_METHODS = (METHODS[DEFAULT_ACTIVATION], *(METHODS[k] for k in sorted(METHODS) if k != DEFAULT_ACTIVATION))
ACTIVATION_METHODS = (*(m.name for m in _METHODS), "none")
# The default patterns under activation="none" (nothing is compressed then).
NO_METHOD_TARGETS = ("*",)
# The seven linears of a Llama-style decoder layer (Llama, Mistral, Qwen2, ...): lora.targets' default.
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoRAConfig:
    """Frozen-base LoRA used by ``memcompile.prepare`` (QDyLoRA when ``quant="nf4"`` and ``dynamic``).

    Args:
        r_max: maximum LoRA rank (adapters are allocated at this rank).
        alpha: LoRA alpha; the update is scaled by ``alpha / b`` at rank ``b``.
        dropout: dropout on the adapter input.
        targets: module-name patterns of the linears to adapt, read as ``targets`` is (``memcompile._targets``);
            a pattern naming a container (``"self_attn"``) adapts the linears inside it.
        quant: a scheme of ``memcompile.quant`` (``"nf4"``: frozen base in bitsandbytes NF4) or ``"none"``.
        double_quant: quantise the NF4 absmax to 8 bits in blocks of 256 (bitsandbytes layout).
        blocksize: NF4 block size.
        dynamic: sample one rank per training step (DyLoRA); otherwise always train at ``r_max``.
        rank_distribution: ``"uniform"`` over 1..r_max.
        frozen: DyLoRA's frozen mode: only the b-th row of A and column of B receive gradients.
        seed: seed of the rank sampler.
        compute_dtype: what the adapter's two matmuls run in. ``"float32"`` (default, as PEFT does):
            the input is cast to the adapters' fp32. ``"input"``: the adapters are cast to the input's
            dtype (bf16 in bf16 training) at each use, as autocast would, so the matmuls run on bf16
            tensor cores and no fp32 copy of the input or fp32 output is made; the parameters, their
            gradients and the optimizer stay fp32, and the gradients carry bf16 round-off.
    """

    r_max: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LLAMA_LINEARS
    quant: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    dynamic: bool = True
    rank_distribution: str = "uniform"
    frozen: bool = False
    seed: int = 0
    compute_dtype: str = "float32"

    def __post_init__(self):
        _options.int_at_least("lora.r_max", self.r_max, 1)
        _options.positive_float("lora.alpha", self.alpha)
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            _options.fail("lora.dropout", self.dropout, "a float in [0, 1)")
        object.__setattr__(self, "targets", _options.patterns("lora.targets", self.targets))
        _options.choice("lora.quant", self.quant, (*_quant_schemes(), "none"))
        _options.choice("lora.double_quant", self.double_quant, (True, False))
        _options.choice("lora.blocksize", self.blocksize, (32, 64, 128, 256, 512, 1024, 2048, 4096))
        _options.choice("lora.dynamic", self.dynamic, (True, False))
        _options.choice("lora.rank_distribution", self.rank_distribution, ("uniform",))
        _options.choice("lora.frozen", self.frozen, (True, False))
        _options.int_at_least("lora.seed", self.seed, 0)
        _options.choice("lora.compute_dtype", self.compute_dtype, COMPUTE_DTYPES)


@dataclass(frozen=True)
class PlanConfig:
    """How ``memory_target`` may be met, and the cost model that ranks the ways (``memcompile.passes.memory_plan``).

    Args:
        recompute: recompute a saved tensor in the backward from tensors that are saved anyway (exact).
        offload: copy a saved tensor to pinned host memory and back (exact). ``None``: on CUDA only
            (and on the meta device, which the estimate uses to model CUDA); ``True`` also on CPU, where
            host and device are one memory (for tests: the rewrite runs, nothing is freed).
        fp8: store a saved tensor in fp8 (e4m3) with a scale per row (lossy: relative error at most
            2^-4 per element; off unless asked for).
        flops_per_s, memory_bytes_per_s, host_bytes_per_s: the device's dense bf16 matmul rate, its
            memory bandwidth (bytes read plus written) and the host link's, measured on an H100 (798
            TFLOP/s, 3.0 TB/s, about 55 GB/s for pinned copies); override for another machine.
        op_seconds: the fixed cost of one inserted op (a kernel launch), so tiny tensors come last.
    """

    recompute: bool = True
    offload: bool | None = None
    fp8: bool = False
    flops_per_s: float = 7.5e14
    memory_bytes_per_s: float = 3.0e12
    host_bytes_per_s: float = 5.5e10
    op_seconds: float = 5e-6

    def __post_init__(self):
        _options.choice("plan.recompute", self.recompute, (True, False))
        _options.choice("plan.offload", self.offload, (None, True, False))
        _options.choice("plan.fp8", self.fp8, (True, False))
        for key in ("flops_per_s", "memory_bytes_per_s", "host_bytes_per_s", "op_seconds"):
            _options.positive_float("plan." + key, getattr(self, key))


def _quant_schemes() -> tuple[str, ...]:
    # Imported on use: the schemes register torch ops, and importing this module needs no torch.
    from memcompile import quant

    return quant.names()


_SECTIONS = {**{m.name: m.config for m in _METHODS}, "lora": LoRAConfig, "plan": PlanConfig}


def _method_sections(cls):
    """One field per compression method, after ``exclude``: its options, named after it."""
    annotations = {}
    for name, annotation in cls.__annotations__.items():
        annotations[name] = annotation
        if name == "exclude":
            for m in _METHODS:
                annotations[m.name] = m.config
                setattr(cls, m.name, field(default_factory=m.config))
    cls.__annotations__ = annotations
    return cls


@dataclass(frozen=True)
@_method_sections
class MemtrainConfig:
    """All options of ``backend="memtrain"`` and ``memcompile.prepare``.

    Args:
        activation: a compression method (``"velora"``, ``"compact"``: ``ACTIVATION_METHODS``, one file
            each in ``memcompile/passes/compression/``) or ``"none"``: how saved linear inputs are compressed.
        targets: module-name patterns of the linears whose input is compressed; ``None`` takes the
            method's default (VeLoRA: LoRA A inputs, ``v_proj``, ``down_proj``; CompAct: every
            linear). A pattern matches a module path by ``fnmatch``, as a suffix, or as path
            components (``"lora_A"`` matches ``...q_proj.lora_A.default``): ``memcompile._targets``, the one
            rule for ``targets``, ``exclude`` and ``lora.targets``.
        exclude: patterns never compressed (default: ``lm_head``, LoRA B, embeddings; CompAct also
            leaves the attention output projection alone, as its paper does). Layers whose input stays
            saved anyway for another backward op are skipped and reported whatever the patterns.
        velora, compact: each method's parameters, a section named after it (``VeLoRAConfig``,
            ``CompActConfig`` or a dict).
        lora: adapters and NF4 base for ``memcompile.prepare`` (``LoRAConfig`` or a dict).
        compiler: ``"inductor"`` (default), ``"aot_eager"`` (runs the rewritten graphs in Python;
            for debugging and fast tests) or ``"aot_eager_decomp"`` (runs in Python the graphs Inductor
            would compile: its decompositions and joint-graph passes, no code generation; what the
            estimate plans on the meta device, so its plan is the one a GPU runs).
        partitioner: ``"mincut"`` (default; recomputes cheap pointwise ops) or ``"default"``.
        memory_target: what each step's compiled graphs may keep for the backward, in bytes or as a
            string (``"4.5GiB"``): the planner (``memcompile.passes.memory_plan``) chooses, for every
            tensor the forward would save, to keep, recompute, offload or store it in fp8, whichever
            meets the target at the least estimated time (``plan``: what it may use and the cost model).
            Smaller targets never keep more; one that cannot be met is refused with the smallest
            reachable. Under ``compile_blocks`` every layer's run of a block's graph and the head's graph
            (projection and loss) get an equal share: the target / (layers + 1). Exclusive with
            ``recompute_budget``.
        plan: the planner's options (``PlanConfig`` or a dict).
        recompute_budget: with ``"mincut"``, keep the saved activations (after compression) to this
            fraction (0, 1] of what the partitioner would save, recomputing the rest in the backward
            (AOTAutograd's ``activation_memory_budget``, applied to memtrain's graphs only). ``None``:
            no budget. Recomputation is exact; it costs backward time.
        fused_cross_entropy: compute ``F.cross_entropy`` with memtrain's kernel on the logits in their
            own dtype: no fp32 copy of the logits, one fp32 number saved per token instead of
            ``log_softmax``'s (tokens x vocab) output. Exact up to fp32 round-off (the same formula,
            summed in another order), so off by default.
        report: compute the saved-tensor report, which partitions the graph once more without the
            passes to show the "before" figures.
        dump_dir: if set, each pass writes the graph before and after it there (also
            ``MEMTRAIN_DUMP_DIR``).

    Example::

        cfg = MemtrainConfig(activation="velora", velora={"num_groups": 32, "scale": 0.1})
        compiled = torch.compile(model, backend="memtrain", options=cfg)
    """

    activation: str = DEFAULT_ACTIVATION
    targets: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    # here, one section per compression method (``velora``, ``compact``), added by _method_sections
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    compiler: str = "inductor"
    partitioner: str = "mincut"
    memory_target: int | str | None = None
    plan: PlanConfig = field(default_factory=PlanConfig)
    recompute_budget: float | None = None
    fused_cross_entropy: bool = False
    report: bool = True
    dump_dir: str | None = None
    version: int = 1

    def __post_init__(self):
        _options.choice("activation", self.activation, ACTIVATION_METHODS)
        object.__setattr__(self, "targets", _options.patterns("targets", self.targets))
        object.__setattr__(self, "exclude", _options.patterns("exclude", self.exclude))
        for name, cls in _SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, _build(cls, value, prefix=name + "."))
            elif not isinstance(value, cls):
                _options.fail(name, value, f"a {cls.__name__} or a dict of its fields")
        _options.choice("compiler", self.compiler, COMPILERS)
        _options.choice("partitioner", self.partitioner, PARTITIONERS)
        b = self.recompute_budget
        if b is not None:
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b <= 1:
                _options.fail("recompute_budget", b, "a float in (0, 1] or None")
            if self.partitioner != "mincut":
                _options.fail("recompute_budget", b, "None unless partitioner='mincut' (only min-cut recomputes)")
        object.__setattr__(self, "memory_target", _options.byte_size("memory_target", self.memory_target))
        if self.memory_target is not None:
            if b is not None:
                _options.fail("memory_target", self.memory_target, "None when recompute_budget is set (the planner "
                              "recomputes what it chooses; use one of the two)")
            if self.partitioner != "mincut":
                _options.fail("memory_target", self.memory_target, "None unless partitioner='mincut'")
        _options.choice("fused_cross_entropy", self.fused_cross_entropy, (True, False))
        _options.choice("report", self.report, (True, False))
        if self.dump_dir is None and os.environ.get("MEMTRAIN_DUMP_DIR"):
            object.__setattr__(self, "dump_dir", os.environ["MEMTRAIN_DUMP_DIR"])
        if self.dump_dir is not None and not isinstance(self.dump_dir, str):
            _options.fail("dump_dir", self.dump_dir, "a directory path or None")

    @property
    def target_patterns(self) -> tuple[str, ...]:
        if self.targets is not None:
            return self.targets
        return METHODS[self.activation].targets if self.activation in METHODS else NO_METHOD_TARGETS

    @property
    def exclude_patterns(self) -> tuple[str, ...]:
        if self.exclude is not None:
            return self.exclude
        return METHODS[self.activation].exclude if self.activation in METHODS else DEFAULT_EXCLUDE

    def replace(self, **changes) -> "MemtrainConfig":
        return to_config({**as_dict(self), **changes})


def _build(cls, options: Mapping[str, Any], prefix: str = ""):
    valid = [f.name for f in fields(cls)]
    unknown = [k for k in options if k not in valid]
    if unknown:
        raise ValueError(f"unknown memtrain option {prefix + unknown[0]!r}; valid: "
                         + ", ".join(prefix + v for v in valid))
    return cls(**options)


def as_dict(cfg: MemtrainConfig) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}


def to_config(options: MemtrainConfig | Mapping[str, Any] | None) -> MemtrainConfig:
    """Turn ``options`` (None, a dict with nested or dotted keys, or a config) into a ``MemtrainConfig``."""
    if options is None:
        return MemtrainConfig()
    if isinstance(options, MemtrainConfig):
        return options
    if not isinstance(options, Mapping):
        raise ValueError(f"memtrain options must be a dict or a MemtrainConfig, got {type(options).__name__}")
    flat: dict[str, Any] = {}
    for key, value in options.items():
        if not isinstance(key, str):
            raise ValueError(f"memtrain option keys must be strings, got {key!r}")
        head, dot, rest = key.partition(".")
        if dot:
            if head not in _SECTIONS:
                raise ValueError(f"unknown memtrain option {key!r}; sections with dotted keys: "
                                 + ", ".join(_SECTIONS))
            section = flat.setdefault(head, {})
            if not isinstance(section, dict):
                section = flat[head] = dataclasses.asdict(section)
            section[rest] = value
        elif head in _SECTIONS and isinstance(value, Mapping):
            flat.setdefault(head, {}).update(value)
        else:
            flat[key] = value
    return _build(MemtrainConfig, flat)
