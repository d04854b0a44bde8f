"""Turn a ``Setup`` into something that trains: the model, its (compiled) forward, the optimizer and
one ``step`` (choice of the rows that train, forward, backward, optimizer step), on the device and dtype
of the run.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from memcompile.bench import models
from memcompile.bench.setups import Setup
from memcompile.config import LLAMA_LINEARS

LORA = dict(r=16, alpha=32, dropout=0.0)  # the anchors' adapters: r=16, alpha 32, no dropout, 7 linears
TRAIN_LR = 1e-4  # the anchors' learning rate
FIRA_UPDATE_PROJ_GAP = 200  # Fira and GaLore papers' defaults
FIRA_ALPHA = 0.25


class Unavailable(Exception):
    """The setup cannot run on this machine (reported as ``skipped: <reason>``, not as an error)."""


@dataclass
class Options:
    """What a setup's process needs to know about the run (sent to it as JSON)."""

    model: str
    seq: int
    batch: int
    compiler: str  # "inductor" or "aot_eager": how compiled setups run (see ``compile_forward``)
    budget: float = 0.3
    seed: int = 0
    threads: int | None = None  # torch CPU threads in the setup's process (None: torch's default)
    min_seq: int | None = None  # train: each step's length drawn from [min_seq, seq] (None: always seq)
    # memtrain options added to every memtrain setup (``--memory-target``: memory_target and plan; a
    # target replaces the setup's recompute_budget).
    memtrain: dict | None = None


def memtrain_extra(args) -> dict | None:
    """The memtrain options ``--memory-target``/``--fp8`` add to every memtrain setup."""
    if getattr(args, "memory_target", None) is None:
        if getattr(args, "fp8", False):
            raise SystemExit("--fp8 needs --memory-target")
        return None
    return {"memory_target": args.memory_target, "plan": {"fp8": bool(args.fp8)}}


@dataclass
class Built:
    """A setup ready to train; ``step`` is one full training step."""

    setup: Setup
    model: nn.Module
    forward: Callable
    optimizer: torch.optim.Optimizer
    params: list[torch.Tensor]
    compiler: str  # what runs the forward: "eager", "inductor", "aot_eager", ...
    context: contextlib.AbstractContextManager = field(default_factory=contextlib.nullcontext)
    before_step: Callable[[], Any] | None = None  # DyLoRA's rank draw, once per step outside the graph
    before_eval: Callable[[], Any] | None = None  # DyLoRA evaluates at its full rank
    selector: Any = None  # a memcompile.data.CoresetSelector for coreset setups
    generator: torch.Generator | None = None  # random-subset draws, apart from the data's generator
    pool_factor: int = 1  # rows drawn per step, as a multiple of the batch
    keep: int | None = None  # rows that train per step for coreset and random setups (the batch)
    last_rows: torch.Tensor | None = None  # pool rows the last step trained on, ascending (CPU)

    def step(self, ids: torch.Tensor, sources: torch.Tensor | None = None) -> torch.Tensor:
        """One training step on the pool ``ids`` (labels = inputs; ``sources``: a source index per row,
        used by coresets); returns the loss, detached."""
        if self.before_step is not None:
            self.before_step()
        loss = self.loss(ids, sources)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def loss(self, ids: torch.Tensor, sources: torch.Tensor | None = None) -> torch.Tensor:
        """The training loss on the rows of ``ids`` the setup trains on, with its graph; sets ``last_rows``."""
        selection = self.setup.selection
        if selection == "all":
            self.last_rows = torch.arange(len(ids))
            return self.forward(input_ids=ids, labels=ids).loss
        if selection == "random":
            rows = torch.randperm(len(ids), generator=self.generator)[:self.keep].sort().values
            self.last_rows = rows
            sub = ids[rows.to(ids.device)]
            return self.forward(input_ids=sub, labels=sub).loss
        return self._coreset_loss(ids, sources)

    def _coreset_loss(self, pool: torch.Tensor, sources: torch.Tensor | None) -> torch.Tensor:
        from memcompile.data import take_rows, weighted_causal_lm_loss

        if sources is None:  # unlabelled text (train mode's random tokens): one source
            sources = torch.zeros(len(pool), dtype=torch.long)
        batch = {"input_ids": pool, "labels": pool, "sources": sources.cpu()}
        chosen = self.selector.select_indices(self.model, batch)
        self.last_rows = chosen.indices.cpu()
        sub = take_rows(batch, chosen.indices, len(pool))
        sub["coreset_weights"] = chosen.weights.to(pool.device)
        loss, _ = weighted_causal_lm_loss(self.forward, sub)
        return loss


def activation_memory_budget(value: float) -> contextlib.AbstractContextManager:
    """A context in which AOTAutograd's min-cut partitioner keeps saved activations to ``value`` (0..1)
    of what it would save otherwise, recomputing the rest.

    Compiles happen at the first call, so the context must be held around the training loop.
    """
    from memcompile import _torch_compat

    return _torch_compat.activation_memory_budget(value)


def _peft_lora(model: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], task_type="CAUSAL_LM",
                     target_modules=list(LLAMA_LINEARS))
    return get_peft_model(model, cfg)


def _prepare(model: nn.Module, options: dict) -> tuple[nn.Module, Callable, Callable]:
    """``memcompile.prepare``'s NF4 + DyLoRA model, its per-step rank draw, and the full-rank switch."""
    import memcompile

    lora = {"r_max": LORA["r"], "alpha": float(LORA["alpha"]), "dropout": LORA["dropout"],
            "targets": LLAMA_LINEARS, "quant": "nf4", "double_quant": True, "dynamic": True}
    model = memcompile.prepare(model, {**options, "lora": {**lora, **options.get("lora", {})}})
    return model, memcompile.RankSampler(model).step, lambda: memcompile.set_rank(model, LORA["r"])


def _optimizer(setup: Setup, model: nn.Module, params: list, lr: float, device: torch.device):
    if setup.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, fused=device.type == "cuda")
    from memcompile.optim import Fira, fira_param_groups

    # A quarter of the width: the papers' rank for their 1B model (512 of 2048) and 60M model (128 of 512).
    rank = max(1, model.config.hidden_size // 4)
    extra = {} if setup.moment_transfer is None else {"moment_transfer": setup.moment_transfer}
    groups = fira_param_groups(model, rank=rank, update_proj_gap=FIRA_UPDATE_PROJ_GAP, alpha=FIRA_ALPHA,
                               residual=setup.optimizer == "fira", **extra)
    return Fira(groups, lr=lr)


def compile_forward(setup: Setup, model: nn.Module, compiler: str, budget: float = 0.3,
                    extra: dict | None = None) -> tuple[Callable, str, contextlib.AbstractContextManager]:
    """The forward the setup trains through, the name of what compiles it, and the context the training
    loop must hold (AOTAutograd's ``activation_memory_budget`` for setups with ``memory_budget``;
    compiles happen at the first call, inside it).

    ``compiler="aot_eager"`` (the CPU default, where Inductor's C++ compile of one step takes a minute)
    runs the graphs in Python: memtrain setups get ``compiler="aot_eager"`` (with its min-cut
    partitioner), and ``torch.compile`` setups the ``aot_eager_decomp_partition`` backend, which
    partitions with Inductor's decompositions and min-cut partitioner, so saved activations match
    Inductor's. ``compiler="aot_eager_decomp"`` (the estimate's) gives memtrain setups the same:
    Inductor's graphs and partition, and so Inductor's memory plan, run in Python.
    """
    if setup.compile == "none":
        return model, "eager", contextlib.nullcontext()
    if setup.compile == "memtrain":
        options = {**setup.memtrain, "compiler": compiler, **(extra or {})}
        if options.get("memory_target") is not None:
            options.pop("recompute_budget", None)
        name = f"memtrain/{compiler}"
        if options.get("recompute_budget") is not None:
            name += f", budget {options['recompute_budget']:g}"
        if options.get("memory_target") is not None:
            name += f", target {options['memory_target']}"
        if setup.regional:
            import memcompile

            # compile_blocks compiles the decoder layers (and the head with its loss) in place; the model's own forward
            # calls them, so the model is what trains.
            memcompile.compile_blocks(model, options=options)
            return model, name + ", regional", contextlib.nullcontext()
        return torch.compile(model, backend="memtrain", options=options), name, contextlib.nullcontext()
    backend = "inductor" if compiler == "inductor" else "aot_eager_decomp_partition"
    if setup.regional:
        import memcompile

        memcompile.compile_blocks(model, backend=backend)
        return model, backend + ", regional", contextlib.nullcontext()
    if setup.memory_budget:
        return torch.compile(model, backend=backend), f"{backend}, budget {budget:g}", activation_memory_budget(budget)
    return torch.compile(model, backend=backend), backend, contextlib.nullcontext()


def build(setup: Setup, opts: Options, device: torch.device, dtype: torch.dtype, lr: float) -> Built:
    """Load the model and apply ``setup``; raises ``Unavailable`` when it cannot run here."""
    if setup.quant:
        reason = models.bnb_4bit_unavailable(device, dtype)
        if reason:
            raise Unavailable(reason)
    model = models.load(opts.model, dtype, device, quant=setup.quant, seed=opts.seed)
    torch.manual_seed(opts.seed)  # adapters are initialised alike in every setup
    if setup.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if setup.adapter != "none":
            model.enable_input_require_grads()  # a frozen embedding gives the checkpoints no grad input
    before_step = before_eval = None
    if setup.adapter == "peft":
        model = _peft_lora(model)
    elif setup.adapter == "prepare":
        model, before_step, before_eval = _prepare(model, setup.memtrain)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(setup, model, params, lr, device)
    forward, compiler, context = compile_forward(setup, model, opts.compiler, opts.budget, opts.memtrain)
    built = Built(setup, model, forward, optimizer, params, compiler, context=context, before_step=before_step,
                  before_eval=before_eval)
    built.pool_factor = setup.pool_factor
    if setup.selection != "all":
        built.keep = opts.batch
    if setup.selection == "random":
        # Not opts.seed: the data's generator has that seed, and the same seed gives the same bits.
        built.generator = torch.Generator().manual_seed(opts.seed + 1)
    if setup.coreset:
        from memcompile.data import CoresetConfig, CoresetSelector

        built.selector = CoresetSelector(CoresetConfig(size=opts.batch, seed=opts.seed))
    return built
