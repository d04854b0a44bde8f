"""CompAct: Gaussian random projection ``z = x P`` of a saved linear input, ``P`` never stored.

The forward saves ``z = x P`` (``N x r``) and the seed ``P`` was drawn from; the backward regenerates
``P`` from the seed and evaluates the weight gradient ``grad_W = grad_out^T @ x_hat`` with
``x_hat = z P^T`` in the projected space: ``grad_W = (grad_out^T z) P^T``.
"""
from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass

import torch

from memcompile import _options, activation_state

from .method import DEFAULT_EXCLUDE, Compression, CompressionMethod, Group, register

NAME = "compact"
# Every block linear but the attention output, whose input the attention backward saves anyway.
TARGETS = ("*",)
EXCLUDE = DEFAULT_EXCLUDE + ("o_proj", "attn.c_proj", "out_proj")


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
            _options.fail("compact.rank", r, "a float in (0, 1] (ratio) or an int >= 1 (width)")
        _options.int_at_least("compact.seed", self.seed, 0)
        _options.int_at_least("compact.refresh", self.refresh, 1)


# How many blocks have drawn a seed for each (name inside the block, base seed), when one compiled
# block serves them all and no block position is known (each layer compiled by hand).
_SEEDS_DRAWN: dict[tuple[str, int], int] = {}
# this layer's base seed (None until the first step), and its forward calls so far
activation_state.register_state({"compact_seed": None, "compact_calls": 0}, on_reset=_SEEDS_DRAWN.clear)


def split_layer(key: str) -> tuple[str, int | None]:
    """``"model.layers.3.mlp.down_proj"`` -> ``("mlp.down_proj", 3)``: the name inside a repeated block
    and the block's index (the first numeric segment); ``(key, None)`` without one."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[i + 1:]), int(part)
    return key, None


def layer_seed(name: str, base_seed: int, layer: int) -> int:
    """The base seed of layer group ``name`` (its name inside the block) in block ``layer``: stable
    across runs (crc32, not Python's salted hash), and the same whether the model is compiled whole or
    block by block."""
    return (zlib.crc32(name.encode()) + 1_000_003 * base_seed + 7_919 * layer) % (2**31 - 1)


@torch.library.custom_op("memtrain::compact_seed", mutates_args=())
def compact_seed(x: torch.Tensor, owner: torch.Tensor, name: str, layer: int, base_seed: int,
                 refresh: int) -> torch.Tensor:
    """CompAct's seed for the layer group whose first weight is ``owner``, at this step (0-d int64 on
    CPU); counts one step per call.

    ``name`` is the group's name inside its block and ``layer`` the block's index. One compiled block
    that serves every layer cannot know the index, and passes -1: the index is then the running block's
    position in its list (``compile_blocks`` says it), which is the index the whole-model compile reads
    from the names, so a model draws the same seeds however it is compiled and however many models
    the process compiled before. Layers compiled one by one without ``compile_blocks`` count in the
    order they first run instead. ``x`` only orders the call inside the forward. The seed is saved for
    the backward, so the backward regenerates the very ``P`` its forward used even if another forward
    ran in between.
    """
    with activation_state.LOCK:
        state = activation_state.state_of(owner)
        if state.compact_seed is None:
            if layer < 0:
                layer = activation_state.block_index()
            if layer is None:
                layer = _SEEDS_DRAWN.get((name, base_seed), 0)
                _SEEDS_DRAWN[(name, base_seed)] = layer + 1
            state.compact_seed = layer_seed(name, base_seed, layer)
        calls = state.compact_calls
        state.compact_calls = calls + 1
        seed = state.compact_seed
    return torch.tensor(seed + calls // refresh, dtype=torch.int64)


@compact_seed.register_fake
def _(x, owner, name, layer, base_seed, refresh):
    return torch.empty((), dtype=torch.int64)


def projected_width(config: CompActConfig, d: int) -> int:
    """The projected width for an input of width ``d``, before any clamping to ``d``."""
    return max(1, round(config.rank * d)) if isinstance(config.rank, float) else int(config.rank)


def check(config: CompActConfig, width: int) -> str | None:
    if projected_width(config, width) >= width:
        # z = x P would be as wide as x: the same memory, and an approximate gradient for nothing.
        return f"compact.rank {config.rank} leaves the input width {width} as it is"
    return None


def skip_warning(config: CompActConfig, layers: list[str]) -> str:
    return (f"memtrain: compact.rank={config.rank} does not narrow the input of "
            f"{', '.join(layers[:3])}{', ...' if len(layers) > 3 else ''}: projecting would save nothing, "
            "so those layers are left exact. Use a ratio below 1 (compact.rank=0.25) or a width below "
            "the layer's")


def project(x, owner, *, name: str, layer: int, config: CompActConfig, width: int, rank: int):
    """``(N, D) -> z = x P (N, r)`` and the seed ``P`` was drawn from."""
    seed = torch.ops.memtrain.compact_seed(x, owner, name, layer, config.seed, config.refresh)
    p = torch.ops.memtrain.gaussian_sketch(seed, width, rank, x.dtype, x.device, 0)
    return torch.mm(x, p), seed


def _cheaper_in_projected_space(n: int, o: int, d: int, r: int) -> bool:
    # (g^T z) P^T costs N*O*r + O*r*D, g^T (z P^T) N*r*D + N*O*D.
    return n * o * r + o * r * d <= n * r * d + n * o * d


def weight_grad(gt, z, seed, *, tokens: int, width: int, rank: int):
    """``(O, N), (N, r) -> (O, D)``: ``g^T x_hat`` for an ``nn.Linear``, in the cheaper order."""
    p = torch.ops.memtrain.gaussian_sketch(seed, width, rank, z.dtype, z.device, 1)
    if _cheaper_in_projected_space(tokens, gt.shape[0], width, rank):
        return torch.mm(torch.mm(gt, z), p.t())
    return torch.mm(gt, torch.mm(z, p.t()))


def weight_grad_conv1d(gr, z, seed, *, tokens: int, width: int, rank: int):
    """``(N, O), (N, r) -> (D, O)``: ``x_hat^T g`` for GPT-2's ``Conv1D``, in the cheaper order."""
    p = torch.ops.memtrain.gaussian_sketch(seed, width, rank, z.dtype, z.device, 1)
    if _cheaper_in_projected_space(tokens, gr.shape[1], width, rank):
        return torch.mm(p, torch.mm(z.t(), gr))
    return torch.mm(torch.mm(z, p.t()).t(), gr)


def plan(config: CompActConfig, group: Group) -> Compression:
    from memcompile.kernels import random_projection  # noqa: F401  defines memtrain::gaussian_sketch, used below

    # The seed depends on the group's name inside its block and the block's index, so a whole-model
    # and a block-by-block compile draw the same projections (see compact_seed).
    name, layer = (group.key, -1) if group.in_block else split_layer(group.key)
    layer = 0 if layer is None else layer
    r = min(projected_width(config, group.width), group.width)
    grad = {"tokens": group.tokens, "width": group.width, "rank": r}
    return Compression(
        project=functools.partial(project, name=name, layer=layer, config=config, width=group.width, rank=r),
        weight_grad=functools.partial(weight_grad, **grad),
        weight_grad_conv1d=functools.partial(weight_grad_conv1d, **grad),
        width=r, state_bytes=8)  # the int64 seed


METHOD = register(CompressionMethod(
    NAME, CompActConfig, TARGETS, EXCLUDE, check, plan, torch.ops.memtrain.compact_seed.default,
    skip_warning=skip_warning, cli=(("rank", "rank"),), module=__name__))
