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

ACTIVATION_METHODS = ("velora", "compact", "none")
COMPILERS = ("inductor", "aot_eager")
PARTITIONERS = ("mincut", "default")

# Layer selection by module-name pattern (see ``memcompile.passes.activation_compression.matches``).
# VeLoRA's papers compress the LoRA A inputs when adapters are present and the value and down
# projections in full training; CompAct compresses every block linear except the attention output,
# whose input the attention backward saves anyway.
VELORA_DEFAULT_TARGETS = ("lora_A", "v_proj", "down_proj", "mlp.c_proj", "fc2")
COMPACT_DEFAULT_TARGETS = ("*",)
DEFAULT_EXCLUDE = ("lm_head", "lora_B", "embed_tokens", "wte")
COMPACT_DEFAULT_EXCLUDE = DEFAULT_EXCLUDE + ("o_proj", "attn.c_proj", "out_proj")


def _fail(key: str, value: Any, valid: str) -> None:
    raise ValueError(f"memtrain option {key!r}: got {value!r}; valid: {valid}")


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        _fail(key, value, " | ".join(repr(c) for c in choices))


def _int_at_least(key: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(key, value, f"an int >= {low}")


def _patterns(key: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    value = tuple(value)
    if not value or not all(isinstance(v, str) and v for v in value):
        _fail(key, value, "a non-empty string or list of non-empty module-name patterns, or None")
    return value


@dataclass(frozen=True)
class VeLoRAConfig:
    """VeLoRA: rank-1 projection of each sub-token of a saved linear input.

    Args:
        num_groups: sub-tokens per token (the feature dim is cut into this many slices). The paper's
            scripts use 32 for Llama-7B; a width not divisible by it is zero-padded, as PEFT does.
        scale: multiplies the reconstructed input (``velora_scale``: 0.1 for Alpaca, 1.0 for C4).
        init: ``"batch_average_once"`` (the paper's code: v = normalised mean sub-token of the first
            training batch, then frozen) or ``"batch_average"`` (re-estimated every batch).
    """

    num_groups: int = 32
    scale: float = 1.0
    init: str = "batch_average_once"

    def __post_init__(self):
        _int_at_least("velora.num_groups", self.num_groups, 1)
        if not isinstance(self.scale, (int, float)) or isinstance(self.scale, bool) or not self.scale > 0:
            _fail("velora.scale", self.scale, "a float > 0")
        _choice("velora.init", self.init, ("batch_average_once", "batch_average"))


@dataclass(frozen=True)
class CompActConfig:
    """CompAct: Gaussian random projection ``z = x P`` of a saved linear input, ``P`` never stored.

    Args:
        rank: projected width; a float in (0, 1] is a ratio of the layer's input width, an int > 1
            an absolute width (the paper's pre-training default is 0.25).
        seed: base seed; each layer derives its own seed from it and its name.
        refresh: training steps (compiled forward calls) between new projections (paper: 50).
    """

    rank: float = 0.25
    seed: int = 0
    refresh: int = 50

    def __post_init__(self):
        r = self.rank
        ok = (isinstance(r, float) and 0 < r <= 1) or (isinstance(r, int) and not isinstance(r, bool) and r >= 1)
        if not ok:
            _fail("compact.rank", r, "a float in (0, 1] (ratio) or an int >= 1 (width)")
        _int_at_least("compact.seed", self.seed, 0)
        _int_at_least("compact.refresh", self.refresh, 1)


@dataclass(frozen=True)
class LoRAConfig:
    """Frozen-base LoRA used by ``memcompile.prepare`` (QDyLoRA when ``quant="nf4"`` and ``dynamic``).

    Args:
        r_max: maximum LoRA rank (adapters are allocated at this rank).
        alpha: LoRA alpha; the update is scaled by ``alpha / b`` at rank ``b``.
        dropout: dropout on the adapter input.
        targets: module-name patterns of the linears to adapt.
        quant: a scheme of ``memcompile.quant`` (``"nf4"``: frozen base in bitsandbytes NF4) or ``"none"``.
        double_quant: quantise the NF4 absmax to 8 bits in blocks of 256 (bitsandbytes layout).
        blocksize: NF4 block size.
        dynamic: sample one rank per training step (DyLoRA); otherwise always train at ``r_max``.
        rank_distribution: ``"uniform"`` over 1..r_max.
        frozen: DyLoRA's frozen mode: only the b-th row of A and column of B receive gradients.
        seed: seed of the rank sampler.
    """

    r_max: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    quant: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    dynamic: bool = True
    rank_distribution: str = "uniform"
    frozen: bool = False
    seed: int = 0

    def __post_init__(self):
        _int_at_least("lora.r_max", self.r_max, 1)
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not self.alpha > 0:
            _fail("lora.alpha", self.alpha, "a float > 0")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            _fail("lora.dropout", self.dropout, "a float in [0, 1)")
        object.__setattr__(self, "targets", _patterns("lora.targets", self.targets))
        _choice("lora.quant", self.quant, (*_quant_schemes(), "none"))
        _choice("lora.double_quant", self.double_quant, (True, False))
        _choice("lora.blocksize", self.blocksize, (32, 64, 128, 256, 512, 1024, 2048, 4096))
        _choice("lora.dynamic", self.dynamic, (True, False))
        _choice("lora.rank_distribution", self.rank_distribution, ("uniform",))
        _choice("lora.frozen", self.frozen, (True, False))
        _int_at_least("lora.seed", self.seed, 0)


def _quant_schemes() -> tuple[str, ...]:
    # Imported on use: the schemes register torch ops, and importing this module needs no torch.
    from memcompile import quant

    return quant.names()


_SECTIONS = {"velora": VeLoRAConfig, "compact": CompActConfig, "lora": LoRAConfig}


@dataclass(frozen=True)
class MemtrainConfig:
    """All options of ``backend="memtrain"`` and ``memcompile.prepare``.

    Args:
        activation: ``"velora"``, ``"compact"`` or ``"none"``: how saved linear inputs are compressed.
        targets: module-name patterns of the linears whose input is compressed; ``None`` takes the
            method's default (VeLoRA: LoRA A inputs, ``v_proj``, ``down_proj``; CompAct: every
            linear). A pattern matches a module path by ``fnmatch``, as a suffix, or as a path
            component (``"lora_A"`` matches ``...q_proj.lora_A.default``).
        exclude: patterns never compressed (default: ``lm_head``, LoRA B, embeddings; CompAct also
            leaves the attention output projection alone, as its paper does). Layers whose input stays
            saved anyway for another backward op are skipped and reported whatever the patterns.
        velora, compact: the method's parameters (``VeLoRAConfig``, ``CompActConfig`` or a dict).
        lora: adapters and NF4 base for ``memcompile.prepare`` (``LoRAConfig`` or a dict).
        compiler: ``"inductor"`` (default) or ``"aot_eager"`` (runs the rewritten graphs in Python;
            for debugging and fast tests).
        partitioner: ``"mincut"`` (default; recomputes cheap pointwise ops) or ``"default"``.
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

    activation: str = "velora"
    targets: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    velora: VeLoRAConfig = field(default_factory=VeLoRAConfig)
    compact: CompActConfig = field(default_factory=CompActConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    compiler: str = "inductor"
    partitioner: str = "mincut"
    recompute_budget: float | None = None
    fused_cross_entropy: bool = False
    report: bool = True
    dump_dir: str | None = None
    version: int = 1

    def __post_init__(self):
        _choice("activation", self.activation, ACTIVATION_METHODS)
        object.__setattr__(self, "targets", _patterns("targets", self.targets))
        object.__setattr__(self, "exclude", _patterns("exclude", self.exclude))
        for name, cls in _SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, _build(cls, value, prefix=name + "."))
            elif not isinstance(value, cls):
                _fail(name, value, f"a {cls.__name__} or a dict of its fields")
        _choice("compiler", self.compiler, COMPILERS)
        _choice("partitioner", self.partitioner, PARTITIONERS)
        b = self.recompute_budget
        if b is not None:
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b <= 1:
                _fail("recompute_budget", b, "a float in (0, 1] or None")
            if self.partitioner != "mincut":
                _fail("recompute_budget", b, "None unless partitioner='mincut' (only min-cut recomputes)")
        _choice("fused_cross_entropy", self.fused_cross_entropy, (True, False))
        _choice("report", self.report, (True, False))
        if self.dump_dir is None and os.environ.get("MEMTRAIN_DUMP_DIR"):
            object.__setattr__(self, "dump_dir", os.environ["MEMTRAIN_DUMP_DIR"])
        if self.dump_dir is not None and not isinstance(self.dump_dir, str):
            _fail("dump_dir", self.dump_dir, "a directory path or None")

    @property
    def target_patterns(self) -> tuple[str, ...]:
        if self.targets is not None:
            return self.targets
        return VELORA_DEFAULT_TARGETS if self.activation == "velora" else COMPACT_DEFAULT_TARGETS

    @property
    def exclude_patterns(self) -> tuple[str, ...]:
        if self.exclude is not None:
            return self.exclude
        return COMPACT_DEFAULT_EXCLUDE if self.activation == "compact" else DEFAULT_EXCLUDE

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
