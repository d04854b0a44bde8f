"""Dynamic-rank LoRA (DyLoRA) on a frozen base layer, with one rank per training step for the whole model.

Every ``LoRALinear`` holds adapters at the maximum rank, ``lora_A`` (``r_max x in``) and ``lora_B``
(``out x r_max``). At rank ``b`` it computes

    y = base(x) + (alpha / b) * B[:, :b] A[:b] dropout(x)

by multiplying the ``r_max`` intermediate features with a mask buffer that holds ``alpha / b`` on the
first ``b`` entries and 0 elsewhere. Shapes never change with the rank and the mask is updated in
place, so a compiled graph serves every rank without recompiling. Rows/columns past ``b`` get zero
gradients, which is DyLoRA's truncation. In frozen mode only row ``b`` of A and column ``b`` of B train:
the first ``b - 1`` features still contribute to the output but through ``detach()``.

The rank is drawn outside the compiled graph: ``RankSampler(model).step()`` once per training step (or
its ``trainer_callback()`` with a transformers ``Trainer``), and ``set_rank(model, b)`` for evaluation.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

COMPUTE_DTYPES = ("float32", "input")  # what the adapter's matmuls run in (LoRAConfig.compute_dtype)


def check_rank(b: object, r_max: int) -> int:
    """``b`` if it is a usable LoRA rank (an int in ``1..r_max``); otherwise ``ValueError``."""
    if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= r_max:
        raise ValueError(f"LoRA rank must be an int in 1..{r_max}, got {b!r}")
    return b


class LoRALinear(nn.Module):
    """A frozen ``base_layer`` (``NF4Linear`` or ``nn.Linear``) plus a DyLoRA adapter.

    Args:
        base_layer: the frozen layer; needs ``in_features`` and ``out_features``.
        r_max: adapter rank allocated (the largest rank that can be used).
        alpha: LoRA alpha; the update at rank ``b`` is scaled by ``alpha / b``.
        dropout: dropout probability on the adapter's input.
        frozen: DyLoRA's frozen mode (only the ``b``-th row of A and column of B train).
        dynamic: whether ``RankSampler`` draws a new rank for this layer each step.
        seed: seed of the ``RankSampler`` built on the model (``LoRAConfig.seed``).
        compute_dtype: ``"float32"`` (the input is cast to the adapters' dtype) or ``"input"`` (the
            adapters are cast to the input's dtype at each use; ``LoRAConfig.compute_dtype``).
    """

    def __init__(self, base_layer: nn.Module, r_max: int, alpha: float, dropout: float = 0.0,
                 frozen: bool = False, dynamic: bool = True, seed: int = 0, compute_dtype: str = "float32"):
        super().__init__()
        if not isinstance(r_max, int) or r_max < 1:
            raise ValueError(f"r_max must be an int >= 1, got {r_max!r}")
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype!r}")
        self.compute_dtype = compute_dtype
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r_max, self.alpha, self.frozen, self.dynamic = r_max, float(alpha), bool(frozen), bool(dynamic)
        self.seed = seed
        for p in base_layer.parameters():
            p.requires_grad_(False)
        device = _device_of(base_layer)
        # DyLoRA/PEFT initialisation: A as nn.Linear's default (Kaiming uniform, a=sqrt(5)), B zero, so the
        # adapted layer starts equal to the base at every rank.
        self.lora_A = nn.Parameter(torch.empty(r_max, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r_max, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("lora_rank", torch.tensor(r_max, dtype=torch.int64, device=device))
        # Scale per feature: alpha/b where the feature trains, 0 elsewhere ...
        self.register_buffer("lora_mask", torch.zeros(r_max, device=device))
        # ... and alpha/b where it contributes without training (frozen mode only).
        self.register_buffer("lora_mask_frozen", torch.zeros(r_max, device=device))
        self.set_rank(r_max)

    @property
    def rank(self) -> int:
        return int(self.lora_rank)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def set_rank(self, b: int) -> None:
        """Use the first ``b`` adapter features (``1 <= b <= r_max``); updates buffers in place."""
        _set_ranks([self], b)

    def _masks(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``lora_mask`` and ``lora_mask_frozen`` at rank ``b``."""
        idx = torch.arange(self.r_max, device=self.lora_mask.device)
        scale = self.alpha / b
        if self.frozen:
            return (idx == b - 1) * scale, (idx < b - 1) * scale
        return (idx < b) * scale, torch.zeros(self.r_max, device=idx.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        a, b = self.lora_A, self.lora_B
        if self.compute_dtype == "input":  # autocast's choice: the small adapters meet the input's dtype
            a, b = a.to(x.dtype), b.to(x.dtype)
        h = F.linear(self.lora_dropout(x).to(a.dtype), a)
        if self.frozen:
            h = h * self.lora_mask.to(h.dtype) + h.detach() * self.lora_mask_frozen.to(h.dtype)
            train = (self.lora_mask != 0).to(b.dtype)
            b = b.detach() + (b - b.detach()) * train  # same values; the gradient reaches column b only
        else:
            h = h * self.lora_mask.to(h.dtype)
        return y + F.linear(h, b).to(y.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The weight the layer applies: the base weight (dequantised when NF4) plus the adapter at the
        current rank, differentiable in the adapter exactly as ``forward`` is. For models that read
        ``.weight`` themselves (a router checking its dtype, Mamba's ``dt_proj.weight @ x``): without
        it they would fail, or, given the packed base, silently bypass the adapter. Adapter dropout does
        not apply to it; reading it builds the dense weight (under ``torch.compile`` only if used)."""
        base = self.base_layer
        w = base.dequantize() if hasattr(base, "dequantize") else base.weight
        a, b = self.lora_A, self.lora_B
        if self.frozen:
            train = (self.lora_mask != 0).to(b.dtype)
            b = b.detach() + (b - b.detach()) * train
            delta = (b * self.lora_mask.to(b.dtype)) @ a + (b * self.lora_mask_frozen.to(b.dtype)) @ a.detach()
        else:
            delta = (b * self.lora_mask.to(b.dtype)) @ a
        return w + delta.to(w.dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias (frozen; the adapter has none), for models that read ``.bias`` too."""
        return self.base_layer.bias

    def delta_weight(self, rank: int | None = None) -> torch.Tensor:
        """``(alpha / b) * B[:, :b] A[:b]`` (``out x in``, fp32): what merging at rank ``b`` adds."""
        b = check_rank(self.rank if rank is None else rank, self.r_max)
        return (self.alpha / b) * (self.lora_B[:, :b].float() @ self.lora_A[:b].float())

    def extra_repr(self) -> str:
        return (f"r_max={self.r_max}, rank={self.rank}, alpha={self.alpha:g}, frozen={self.frozen}, "
                f"dynamic={self.dynamic}, compute_dtype={self.compute_dtype}")


def _device_of(module: nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """``(name, layer)`` of every ``LoRALinear`` in ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def set_rank(model: nn.Module, b: int) -> None:
    """Set LoRA rank ``b`` on every adapted layer (e.g. to evaluate at a chosen rank)."""
    layers = [m for _, m in lora_layers(model)]
    if not layers:
        raise ValueError("the model has no memcompile LoRA layers; call memcompile.prepare first")
    _set_ranks(layers, b)


@torch.no_grad()
def _set_ranks(layers: list[LoRALinear], b: int) -> None:
    """Rank ``b`` on every layer: the masks are built once per kind of layer and copied into every
    layer's buffers with multi-tensor copies. Set layer by layer, a step of a 22-layer model launched
    about 900 tiny kernels before its forward, which a step that waits on the host pays for."""
    groups: dict[tuple, list[LoRALinear]] = {}
    for m in layers:
        check_rank(b, m.r_max)
        groups.setdefault((m.r_max, m.alpha, m.frozen, m.lora_mask.device, m.lora_mask.dtype), []).append(m)
    dst, src = [], []
    for ms in groups.values():
        # In the buffers' dtype (a model cast to bf16 casts them too), so the copies take the fast path.
        mask, frozen = (t.to(ms[0].lora_mask.dtype) for t in ms[0]._masks(b))
        rank = torch.tensor(b, dtype=torch.int64, device=mask.device)
        dst += [m.lora_mask for m in ms] + [m.lora_mask_frozen for m in ms] + [m.lora_rank for m in ms]
        src += [mask] * len(ms) + [frozen] * len(ms) + [rank] * len(ms)
    if len(layers) == 1:  # one layer (its constructor, or a caller's): plain copies, no compat import
        for d, s in zip(dst, src):
            d.copy_(s)
        return
    from memcompile import _torch_compat as tc

    tc.foreach_copy_(dst, src)


def get_rank(model: nn.Module) -> int:
    """The rank in use (the same on every layer)."""
    ranks = {m.rank for _, m in lora_layers(model)}
    if len(ranks) != 1:
        raise ValueError(f"expected one LoRA rank across layers, found {sorted(ranks)}")
    return ranks.pop()


class RankSampler:
    """Draws DyLoRA's rank ``b ~ Uniform{1..r_max}`` once per step and sets it on every layer.

    Call ``step()`` before each training step's forward (outside ``torch.compile``): the rank lives in
    buffers, so compiled graphs are reused. Layers prepared with ``dynamic=False`` keep ``r_max``.

    Example::

        sampler = memcompile.RankSampler(model)
        for batch in loader:
            sampler.step()
            loss = compiled(**batch).loss
            loss.backward(); opt.step(); opt.zero_grad()
        memcompile.set_rank(model, 4)   # evaluate at rank 4
    """

    def __init__(self, model: nn.Module, seed: int | None = None, distribution: str = "uniform"):
        self.layers = [m for _, m in lora_layers(model)]
        if not self.layers:
            raise ValueError("the model has no memcompile LoRA layers; call memcompile.prepare first")
        if distribution != "uniform":
            raise ValueError(f"rank distribution must be 'uniform', got {distribution!r}")
        self.r_max = min(m.r_max for m in self.layers)
        self.dynamic = all(m.dynamic for m in self.layers)
        seed = self.layers[0].seed if seed is None else seed
        self.generator = torch.Generator().manual_seed(int(seed))
        self.rank = self.layers[0].rank

    def sample(self) -> int:
        if not self.dynamic:
            return self.r_max
        return int(torch.randint(1, self.r_max + 1, (), generator=self.generator))

    def step(self) -> int:
        """Draw a rank, set it on every layer, return it."""
        self.rank = self.sample()
        _set_ranks(self.layers, self.rank)
        return self.rank

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "rank": self.rank}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.rank = state["rank"]
        _set_ranks(self.layers, self.rank)

    def trainer_callback(self):
        """A ``transformers.TrainerCallback`` that calls ``step()`` at the start of every optimizer step,
        so the micro-batches of one gradient-accumulation step share a rank (DyLoRA's GLUE script), and
        keeps the sampler's and the compression state in the trainer's checkpoints
        (``memcompile.trainer_callback(sampler=self)``)."""
        from memcompile.trainer import MemtrainCallback

        return MemtrainCallback(sampler=self)
