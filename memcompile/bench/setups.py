"""The setups the bench compares, as data: adding a setup is adding one entry to ``SETUPS``.

A setup says how the model is adapted (PEFT LoRA, ``memcompile.prepare``'s NF4 + DyLoRA, or none:
full-parameter training), whether the base is bitsandbytes NF4, whether gradient checkpointing is on,
how the forward is compiled, which optimizer trains it, and which rows of the drawn batch it trains on
(all, a CoLM coreset, or a random subset).
``builders.build`` turns an entry into a model, a step function and an optimizer.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Setup:
    """One way to train the model.

    Args:
        name: the name given to ``--setups``.
        description: one line for the table's legend.
        adapter: ``"peft"`` (PEFT LoRA), ``"prepare"`` (``memcompile.prepare``: NF4 base + DyLoRA) or
            ``"none"`` (every parameter trains).
        quant: load the base in bitsandbytes NF4 with double quantisation (QLoRA).
        checkpointing: Hugging Face gradient checkpointing, non-reentrant.
        compile: ``"none"`` (eager), ``"inductor"`` (``torch.compile`` defaults) or ``"memtrain"``.
        memory_budget: ``torch.compile`` under AOTAutograd's ``activation_memory_budget`` (``--budget``).
            memtrain setups put ``recompute_budget`` in their ``memtrain`` options instead.
        memtrain: ``backend="memtrain"`` options (the compiler is added by the bench).
        regional: compile each decoder layer on its own (``memcompile.compile_blocks``) rather than the
            whole model: the compile takes one layer's time, not all of them.
        optimizer: ``"adamw"``, ``"fira"`` or ``"galore"`` (``memcompile.optim.Fira`` without residual).
        moment_transfer: Fira's and GaLore's ``moment_transfer`` (``None``: the optimizer's default).
        selection: which rows of each drawn pool train: ``"all"``, ``"coreset"`` (the CoLM coreset of
            ``--batch`` rows, ``memcompile.data``) or ``"random"`` (``--batch`` rows uniformly at random).
        pool_factor: rows drawn per step, as a multiple of ``--batch``. With ``selection="all"`` every
            one of them trains, so ``full_batch`` trains on twice the batch.
        lr: learning rate in ``converge`` mode (``None``: the mode's default); ``train`` mode always
            uses the anchors' 1e-4.
        modes: the modes the setup runs in.
    """

    name: str
    description: str
    adapter: str = "peft"
    quant: bool = False
    checkpointing: bool = False
    compile: str = "none"
    memory_budget: bool = False
    memtrain: dict[str, Any] = field(default_factory=dict)
    regional: bool = False
    optimizer: str = "adamw"
    moment_transfer: str | None = None
    selection: str = "all"
    pool_factor: int = 1
    lr: float | None = None
    modes: tuple[str, ...] = ("train", "converge")

    @property
    def compiled(self) -> bool:
        return self.compile != "none"

    @property
    def coreset(self) -> bool:
        return self.selection == "coreset"

    def __post_init__(self):
        if self.memory_budget and self.compile != "inductor":
            raise ValueError(f"{self.name}: memory_budget is for torch.compile setups; memtrain setups set "
                             "recompute_budget in their memtrain options")
        if self.regional and not self.compiled:
            raise ValueError(f"{self.name}: regional compilation needs a compiler")
        if self.selection not in ("all", "coreset", "random"):
            raise ValueError(f"{self.name}: selection must be 'all', 'coreset' or 'random', got {self.selection!r}")
        if self.moment_transfer is not None and self.optimizer not in ("fira", "galore"):
            raise ValueError(f"{self.name}: moment_transfer is an option of Fira and GaLore, not {self.optimizer}")
        if self.pool_factor < 1 or (self.selection != "all" and self.pool_factor < 2):
            raise ValueError(f"{self.name}: pool_factor must be >= 1, and >= 2 for a selection "
                             f"(got {self.pool_factor})")


def _table(*setups: Setup) -> dict[str, Setup]:
    return {s.name: s for s in setups}


SETUPS: dict[str, Setup] = _table(
    Setup("lora", "PEFT LoRA, eager"),
    Setup("qlora", "PEFT LoRA on a bitsandbytes NF4 (double quant) base, eager", quant=True),
    Setup("qlora_gc", "QLoRA + gradient checkpointing (non-reentrant)", quant=True, checkpointing=True),
    Setup("lora_gc", "LoRA + gradient checkpointing (non-reentrant)", checkpointing=True),
    Setup("lora_compile", "LoRA + torch.compile (Inductor defaults)", compile="inductor"),
    Setup("qlora_compile", "QLoRA + torch.compile (Inductor defaults)", quant=True, compile="inductor"),
    Setup("lora_budget", "LoRA + torch.compile under AOTAutograd's activation_memory_budget",
          compile="inductor", memory_budget=True),
    Setup("memtrain_velora", "LoRA + backend=memtrain, VeLoRA", compile="memtrain",
          memtrain={"activation": "velora"}),
    Setup("memtrain_compact", "LoRA + backend=memtrain, CompAct", compile="memtrain",
          memtrain={"activation": "compact"}),
    Setup("memtrain_velora_loss", "LoRA + backend=memtrain, VeLoRA + fused loss", compile="memtrain",
          memtrain={"activation": "velora", "fused_cross_entropy": True}),
    Setup("memtrain_qdylora", "memcompile.prepare (NF4 + DyLoRA) + backend=memtrain, VeLoRA", adapter="prepare",
          compile="memtrain", memtrain={"activation": "velora"}),
    # Everything memtrain has for fine-tuning: the NF4 + DyLoRA model, VeLoRA on every linear input
    # saved only for a weight gradient rather than on the method's default layer list, and the loss on
    # the bf16 logits (no fp32 copy).
    Setup("memtrain_all", "memcompile.prepare (NF4 + DyLoRA) + memtrain VeLoRA on every linear + fused loss",
          adapter="prepare", compile="memtrain",
          memtrain={"activation": "velora", "targets": ("*",), "fused_cross_entropy": True}),
    # ... and recomputation of what compression leaves, within each layer. 0.2: the lowest estimated
    # peak of 0.1/0.2/0.3/0.5 (python -m memcompile.bench estimate --setups memtrain_all_budget).
    Setup("memtrain_all_budget", "memtrain_all + recompute_budget 0.2: the partitioner recomputes the rest",
          adapter="prepare", compile="memtrain",
          memtrain={"activation": "velora", "targets": ("*",), "fused_cross_entropy": True,
                    "recompute_budget": 0.2}),
    # ... or the planner at 2 GiB: estimated 4.54 GiB regional (what the GPU check measures) and 4.70 GiB
    # whole, at less overhead than budget 0.2 (python -m memcompile.bench estimate --sweep; 1.5 GiB gives
    # 4.23 GiB whole).
    Setup("memtrain_all_target", "memtrain_all + memory_target 2GiB: the planner recomputes or offloads the rest",
          adapter="prepare", compile="memtrain",
          memtrain={"activation": "velora", "targets": ("*",), "fused_cross_entropy": True,
                    "memory_target": "2GiB"}),
    # Regional compilation: the setups above, each decoder layer compiled on its own.
    Setup("lora_compile_regional", "lora_compile, each decoder layer compiled on its own (Inductor, no memtrain)",
          compile="inductor", regional=True, modes=("train",)),
    Setup("memtrain_all_budget_regional", "memtrain_all_budget, each decoder layer compiled on its own",
          adapter="prepare", compile="memtrain",
          memtrain={"activation": "velora", "targets": ("*",), "fused_cross_entropy": True,
                    "recompute_budget": 0.2}, regional=True, modes=("train",)),
    Setup("memtrain_all_target_regional", "memtrain_all_target, each decoder layer compiled on its own",
          adapter="prepare", compile="memtrain",
          memtrain={"activation": "velora", "targets": ("*",), "fused_cross_entropy": True,
                    "memory_target": "2GiB"}, regional=True, modes=("train",)),
    # The goal's configuration (<= 4.5 GiB at >= 40k tok/s on an H100): the adapters' matmuls in bf16
    # (lora.compute_dtype="input"; the fp32 ones took 36 of the 144 ms the GPU was busy in
    # memtrain_all_regional's step there) and a 2 GiB target. Each layer's incoming hidden states count
    # toward its share; the plan is the one measured on the GPU as "1.5GiB" before they did (the estimate:
    # the same four recomputes a layer, the same 3.82 GiB).
    Setup("memtrain_all_bf16_target_regional", "memtrain_all_regional, adapters' matmuls in bf16, memory_target "
          "2GiB", adapter="prepare", compile="memtrain",
          memtrain={"activation": "velora", "targets": ("*",), "fused_cross_entropy": True,
                    "memory_target": "2GiB", "lora": {"compute_dtype": "input"}}, regional=True, modes=("train",)),
    Setup("memtrain_velora_regional", "memtrain_velora, each decoder layer compiled on its own", compile="memtrain",
          memtrain={"activation": "velora"}, regional=True, modes=("train",)),
    Setup("memtrain_all_regional", "memtrain_all, each decoder layer compiled on its own", adapter="prepare",
          compile="memtrain", memtrain={"activation": "velora", "targets": ("*",), "fused_cross_entropy": True},
          regional=True, modes=("train",)),
    # QLoRA + checkpointing on memcompile's own NF4, eager: the bitsandbytes baseline's memory, in a form the
    # meta device can build (max-context's comparison with Hugging Face's QLoRA).
    Setup("nf4_gc", "memcompile.prepare (NF4 + DyLoRA) + gradient checkpointing (non-reentrant), eager",
          adapter="prepare", checkpointing=True, modes=("train",)),
    # Full-parameter pre-training with the optimizers of memcompile.optim, AdamW as their baseline.
    # 1.5e-3: the best of a sweep (7.5e-4, 1.5e-3, 3e-3, 6e-3) pre-training a 4-layer tiny Llama on bytes
    Setup("adamw", "full-parameter training, AdamW", adapter="none", lr=1.5e-3),
    Setup("galore", "full-parameter training, GaLore (memcompile.optim.Fira, residual=False)", adapter="none",
          optimizer="galore", lr=1e-2),
    Setup("fira", "full-parameter training, Fira (memcompile.optim.Fira)", adapter="none", optimizer="fira",
          lr=1e-2),
    # What the moments become at a projector refresh (Fira's moment_transfer), one setup per optimizer and mode:
    # galore_official, galore_align, galore_rotate, fira_official, fira_align, fira_rotate.
    *(Setup(f"{optimizer}_{mode}", f"{label}, moment_transfer={mode!r}", adapter="none", optimizer=optimizer,
            moment_transfer=mode, lr=1e-2, modes=("converge",))
      for optimizer, label in (("galore", "GaLore"), ("fira", "Fira")) for mode in ("official", "align", "rotate")),
    # One question, three answers on the same pools of 2x batch drawn in proportion to source size: train on
    # all of it, on a random half, or on the half CoLM picks (small sources kept whole, the rest by
    # facility location on zeroth-order gradients). Only the rows that train differ.
    Setup("full_batch", "PEFT LoRA on the whole pool of 2x batch", pool_factor=2, modes=("converge",)),
    Setup("random_half", "PEFT LoRA on a uniformly random half of the pool of 2x batch", selection="random",
          pool_factor=2, modes=("converge",)),
    Setup("coreset", "PEFT LoRA on the CoLM coreset: half of the pool of 2x batch (memcompile.data)",
          selection="coreset", pool_factor=2, modes=("converge",)),
)

TRAIN_DEFAULT = ("lora", "qlora", "qlora_gc", "lora_gc", "lora_compile", "qlora_compile", "lora_budget",
                 "memtrain_velora", "memtrain_compact", "memtrain_velora_loss", "memtrain_qdylora", "memtrain_all",
                 "memtrain_all_budget", "memtrain_all_target")
CONVERGE_DEFAULT = ("lora", "qlora", "memtrain_velora", "memtrain_compact", "memtrain_qdylora", "full_batch",
                    "random_half", "coreset", "adamw", "galore", "fira")
# GaLore and Fira in each moment_transfer mode: python -m memcompile.bench converge --setups
# galore_official,galore_align,galore_rotate,fira_official,fira_align,fira_rotate
MOMENT_TRANSFER_COMPARISON = ("galore_official", "galore_align", "galore_rotate", "fira_official", "fira_align",
                              "fira_rotate")
# The coreset comparison on its own: python -m memcompile.bench converge --setups full_batch,random_half,coreset
CORESET_COMPARISON = ("full_batch", "random_half", "coreset")


def select(names: str | None, mode: str, default: tuple[str, ...]) -> list[Setup]:
    """The setups named in a comma list (``None``: the mode's default), validated."""
    chosen = [n.strip() for n in names.split(",") if n.strip()] if names else list(default)
    unknown = [n for n in chosen if n not in SETUPS]
    if unknown:
        raise SystemExit(f"unknown setup {unknown[0]!r}; valid: {', '.join(SETUPS)}")
    wrong = [n for n in chosen if mode not in SETUPS[n].modes]
    if wrong:
        raise SystemExit(f"setup {wrong[0]!r} does not run in {mode} mode (it runs in: "
                         f"{', '.join(SETUPS[wrong[0]].modes)})")
    return [SETUPS[n] for n in chosen]


# Arguments the bench passes to memcompile.optim; checked against the installed signatures.
FIRA_GROUP_ARGS = ("rank", "update_proj_gap", "alpha", "residual")
FIRA_ARGS = ("lr",)
CORESET_API = ("CoresetConfig", "CoresetSelector", "take_rows", "weighted_causal_lm_loss")


def unavailable(setup: Setup) -> str | None:
    """Why ``setup`` cannot run with the memcompile in this tree (``None`` when it can).

    Checked before a process is started for it; features still being written show up here as
    "unavailable" rather than as errors.
    """
    import memcompile

    if setup.adapter == "prepare" and not callable(getattr(memcompile, "prepare", None)):
        return "memcompile.prepare is not exported by memcompile"
    if setup.optimizer in ("fira", "galore"):
        try:
            from memcompile.optim import Fira, fira_param_groups
        except ImportError as e:
            return f"memcompile.optim.Fira: {e}"
        for fn, names in ((fira_param_groups, FIRA_GROUP_ARGS), (Fira, FIRA_ARGS)):
            params = inspect.signature(fn).parameters
            takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
            missing = [n for n in names if n not in params and not takes_kwargs]
            if missing:
                return f"{fn.__name__} takes no {missing[0]!r} argument"
        if setup.moment_transfer is not None and "moment_transfer" not in inspect.signature(Fira).parameters:
            return "Fira takes no 'moment_transfer' argument"
    if setup.coreset:
        try:
            import memcompile.data as data
        except ImportError as e:
            return f"memcompile.data: {e}"
        missing = [n for n in CORESET_API if not hasattr(data, n)]
        if missing:
            return f"memcompile.data has no {missing[0]}"
    return None
