"""``prepare(model, config)``: NF4 frozen base + dynamic-rank LoRA (QDyLoRA), by module swap before compiling.

Each linear that ``config.lora.targets`` names (by path, dotted suffix or path component, as
``memcompile._targets`` says: ``"self_attn"`` names every linear inside the attention) becomes a
``LoRALinear`` around a frozen base:

* ``nn.Linear``: quantised to NF4 (``quant="nf4"``, bitsandbytes layout, bit-identical to
  ``bitsandbytes.functional.quantize_4bit``) or kept as it is, frozen (``quant="none"``);
* ``bitsandbytes.nn.Linear4bit`` (a model loaded with ``load_in_4bit=True``): its NF4 codes and
  quantisation state are taken over unchanged, so the dequantised weights stay exactly the same;
* a PEFT LoRA layer on either: its base is converted as above and its adapter is copied into the first
  ``r`` features of ``lora_A``/``lora_B`` (``r <= r_max``), with its alpha, so the prepared model at
  rank ``r`` computes what the PEFT model computed. A ``PeftModel`` is unwrapped to its base model.

Everything else is frozen: the trainable parameters are exactly the ``lora_A``/``lora_B`` pairs.
Quantisation happens layer by layer on the layer's device; the dense weight of a quantised layer is
dropped with the module it belonged to.

Example::

    model = memcompile.prepare(model, {"lora": {"r_max": 16, "alpha": 32, "quant": "nf4"}})
    sampler = memcompile.RankSampler(model)
    compiled = torch.compile(model, backend="memtrain")
    for batch in loader:
        sampler.step()                       # one rank for the whole model, outside the graph
        compiled(**batch).loss.backward()
"""
from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any, Mapping

import torch
import torch.nn as nn

from memcompile import quant
from memcompile._targets import matches
from memcompile.config import LoRAConfig, MemtrainConfig, to_config
from memcompile.lora import LoRALinear, check_rank, lora_layers

log = logging.getLogger(__name__)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def lora_config(config: MemtrainConfig | LoRAConfig | Mapping[str, Any] | None) -> LoRAConfig:
    """The ``LoRAConfig`` of ``config``: a ``MemtrainConfig``, its dict form, or a ``LoRAConfig``."""
    if isinstance(config, LoRAConfig):
        return config
    return to_config(config).lora


def _class_if_loaded(module: str, name: str):
    """``module.name`` if ``module`` was imported, else ``None``: a model cannot hold layers of a library
    that was never imported, and importing peft or bitsandbytes just to find out costs seconds."""
    return getattr(sys.modules.get(module), name, None)


SUPPORTED = ("nn.Linear, transformers' Conv1D (GPT-2) and FalconLinear, bitsandbytes Linear4bit, "
             "and PEFT LoRA layers on these")


def _as_linear(module: nn.Module) -> nn.Linear | None:
    """``module`` as an ``nn.Linear`` that computes the same, or ``None`` for any other class.

    GPT-2's ``Conv1D`` stores its weight as (in, out) and computes ``x W + b``: the ``nn.Linear`` with
    ``W^T``. Falcon's ``FalconLinear`` is an ``nn.Linear`` whose forward is ``x @ W.T + b``. Other
    subclasses (MultiheadAttention's out_proj, int8 layers) are read by their owner or hold other
    formats; swapping them would change what the model computes.
    """
    if type(module) is nn.Linear:
        return module
    falcon = _class_if_loaded("transformers.models.falcon.modeling_falcon", "FalconLinear")
    if falcon is not None and type(module) is falcon:
        return module
    conv1d = _class_if_loaded("transformers.pytorch_utils", "Conv1D")
    if conv1d is not None and type(module) is conv1d:
        w = module.weight
        linear = nn.Linear(w.shape[0], w.shape[1], bias=module.bias is not None, device="meta", dtype=w.dtype)
        linear.weight = nn.Parameter(w.detach().t().contiguous(), requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
        return linear
    return None


def convert_base(module: nn.Module, cfg: LoRAConfig, name: str = "") -> nn.Module | None:
    """The frozen base for ``module`` (a ``QuantizedLinear`` of the scheme ``cfg.quant`` names, or a dense
    ``nn.Linear``), or ``None`` if its class is not supported (see ``SUPPORTED``)."""
    for scheme in quant.schemes():
        base = scheme.adopt(module)  # already quantised (bitsandbytes 4-bit): keep its codes whatever cfg.quant says
        if base is not None:
            return base
    linear = _as_linear(module)
    if linear is None:
        return None
    if linear.weight.dtype not in _DTYPES:
        raise ValueError(f"{name}: weight dtype {linear.weight.dtype} is not supported (float32/16, bfloat16)")
    if linear.weight.device.type == "meta":
        raise ValueError(f"{name}: weight is on the meta device; load the weights before memcompile.prepare")
    if cfg.quant != "none":
        return quant.get(cfg.quant).from_linear(linear, cfg)
    return linear


def convert_layer(module: nn.Module, cfg: LoRAConfig, name: str = "") -> LoRALinear | None:
    """``LoRALinear`` replacing ``module`` (dense, bitsandbytes 4-bit or PEFT LoRA layer), or ``None``."""
    if isinstance(module, LoRALinear):
        return None
    lora_layer = _class_if_loaded("peft.tuners.lora", "LoraLayer")
    if lora_layer is not None and isinstance(module, lora_layer):
        return _from_peft(module, cfg, name)
    base = convert_base(module, cfg, name)
    if base is None:
        return None
    return LoRALinear(base, cfg.r_max, cfg.alpha, cfg.dropout, frozen=cfg.frozen, dynamic=cfg.dynamic, seed=cfg.seed,
                      compute_dtype=cfg.compute_dtype)


def _from_peft(module: nn.Module, cfg: LoRAConfig, name: str) -> LoRALinear:
    active = list(module.active_adapters)
    if len(active) != 1:
        raise ValueError(f"{name}: PEFT layer has active adapters {active}; exactly one is supported")
    adapter = active[0]
    if getattr(module, "merged", False):
        raise ValueError(f"{name}: PEFT adapter is merged into the base weight; unmerge it first")
    if module.use_dora.get(adapter, False):
        raise ValueError(f"{name}: DoRA adapters are not supported")
    if getattr(module, "lora_bias", {}).get(adapter, False):
        raise ValueError(f"{name}: LoRA bias is not supported")
    if adapter not in module.lora_A:
        raise ValueError(f"{name}: adapter {adapter!r} is not a linear LoRA adapter")
    r = module.r[adapter]
    if r > cfg.r_max:
        raise ValueError(f"{name}: PEFT adapter rank {r} exceeds lora.r_max={cfg.r_max}")
    base = convert_base(module.get_base_layer(), cfg, name)
    if base is None:
        raise ValueError(f"{name}: PEFT base layer {_qualname(module.get_base_layer())} is not supported; "
                         f"memcompile.prepare adapts {SUPPORTED}")
    # Keep PEFT's scale at rank r: alpha/r, or alpha/sqrt(r) with rsLoRA, which is (scaling*r)/r here.
    alpha = module.lora_alpha[adapter]
    if module.scaling[adapter] != alpha / r:
        alpha = module.scaling[adapter] * r
    dropout = module.lora_dropout[adapter]
    layer = LoRALinear(base, cfg.r_max, alpha, dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
                       frozen=cfg.frozen, dynamic=cfg.dynamic, seed=cfg.seed, compute_dtype=cfg.compute_dtype)
    a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    with torch.no_grad():
        layer.lora_A.data = layer.lora_A.data.to(a.dtype)
        layer.lora_B.data = layer.lora_B.data.to(b.dtype)
        layer.lora_A[:r].copy_(a)
        layer.lora_B[:, :r].copy_(b)
    layer.set_rank(r)
    return layer


def _qualname(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_not_prepared_otherwise(model: nn.Module, cfg: LoRAConfig) -> None:
    """A second ``prepare`` with other adapter settings would find its targets already swapped and
    change nothing: say so instead of training with the first call's settings."""
    for name, layer in lora_layers(model):
        # Not alpha or quant: an adapter taken from PEFT keeps its own alpha, a bitsandbytes base its NF4.
        had = {"r_max": layer.r_max, "frozen": layer.frozen, "dynamic": layer.dynamic}
        want = {"r_max": cfg.r_max, "frozen": cfg.frozen, "dynamic": cfg.dynamic}
        diff = {k: (had[k], want[k]) for k in had if had[k] != want[k]}
        if diff:
            changes = ", ".join(f"lora.{k}={w!r} (prepared with {h!r})" for k, (h, w) in diff.items())
            raise ValueError(f"the model is already prepared ({name}); a second memcompile.prepare would keep "
                             f"its adapters, not {changes}. Call prepare once, on the original model "
                             "(memcompile.set_rank changes the rank up to r_max)")


def prepare(model: nn.Module, config: MemtrainConfig | LoRAConfig | Mapping[str, Any] | None = None) -> nn.Module:
    """Swap the targeted linears of ``model`` for NF4/dense frozen bases with DyLoRA adapters.

    Args:
        model: any ``nn.Module``; a ``peft.PeftModel`` is unwrapped to its base model.
        config: a ``MemtrainConfig`` (its ``lora`` section is used), its dict form, or a ``LoRAConfig``.

    Returns the prepared model (the same object, or the unwrapped base of a ``PeftModel``). Every
    parameter except ``lora_A``/``lora_B`` is frozen. Raises ``ValueError`` when no layer matches.
    """
    cfg = lora_config(config)
    peft_model = _class_if_loaded("peft", "PeftModel")
    if peft_model is not None and isinstance(model, peft_model):
        model = model.get_base_model()
    _check_not_prepared_otherwise(model, cfg)
    done: list[str] = []
    unsupported: dict[str, list[str]] = {}
    # What lies inside an adapter (memcompile's or PEFT's) is never a target itself, though a pattern that
    # names the layer also matches the modules inside it (``"q_proj"`` matches ``q_proj.base_layer``).
    peft_layer = _class_if_loaded("peft.tuners.lora", "LoraLayer") or LoRALinear
    adapters = [n for n, m in model.named_modules() if isinstance(m, (LoRALinear, peft_layer))]
    # Names, not modules: holding every original module until the loop ends would keep every dense
    # weight alive next to its NF4 copy; this way each one is freed as soon as it is replaced.
    for name in [n for n, _ in model.named_modules()]:
        if not name or not matches(name, cfg.targets) or any(name.startswith(d + ".") for d in adapters + done):
            continue
        module = model.get_submodule(name)
        layer = convert_layer(module, cfg, name)
        if layer is None:
            if not isinstance(module, LoRALinear) and isinstance(getattr(module, "weight", None), torch.Tensor):
                unsupported.setdefault(_qualname(module), []).append(name)  # a layer, not a container
            continue
        model.set_submodule(name, layer)
        done.append(name)
    classes = "; ".join(f"{cls} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                        for cls, names in unsupported.items())
    if not done and not any(True for _ in lora_layers(model)):
        if unsupported:
            raise ValueError(f"the layers matching lora.targets={cfg.targets} are of classes memcompile.prepare "
                             f"does not adapt: {classes}; it adapts {SUPPORTED}")
        raise ValueError(f"no layer of the model matches lora.targets={cfg.targets}; module names look like "
                         f"{[n for n, _ in model.named_modules()][1:6]}")
    if unsupported:
        log.warning("memcompile.prepare: layers matching lora.targets skipped, their class is not "
                    "supported: %s; it adapts %s", classes, SUPPORTED)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(".lora_A") or name.endswith(".lora_B") or name in ("lora_A", "lora_B"))
    log.info("memcompile.prepare: %d layers adapted (quant=%s, r_max=%d)", len(done), cfg.quant, cfg.r_max)
    return model


def quantized_layers(model: nn.Module) -> list[dict]:
    """One entry per quantised layer: name, shape, dtype before quantisation, the format's own entries
    (NF4: format, blocksize), bytes before/after."""
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, quant.QuantizedLinear):
            continue
        before = m.out_features * m.in_features * m.weight_dtype.itemsize
        out.append({
            "name": name.removesuffix(".base_layer"),
            "shape": (m.out_features, m.in_features),
            "dtype": str(m.weight_dtype).removeprefix("torch."),
            **m.describe(),
            "bytes_before": before,
            "bytes_after": m.nbytes,
            "bits_per_weight": 8 * m.nbytes / (m.out_features * m.in_features),
        })
    return out


def merge_lora(model: nn.Module, rank: int | None = None) -> nn.Module:
    """Replace every ``LoRALinear`` by a dense ``nn.Linear`` holding ``W + (alpha/b) B[:, :b] A[:b]``.

    ``W`` is the dequantised weight of a quantised base (or the dense base); the result has the base's original
    dtype.
    Works in place and returns ``model``; its parameters stay frozen.
    """
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("the model has no memcompile LoRA layers")
    for name, layer in layers:
        base = layer.base_layer
        if isinstance(base, quant.QuantizedLinear):
            w, dtype = base.dequantize(torch.float32), base.weight_dtype
        else:
            w, dtype = base.weight.detach().float(), base.weight.dtype
        with torch.no_grad():
            merged = (w + layer.delta_weight(rank).to(w.device)).to(dtype)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None,
                           device=merged.device, dtype=dtype)
        linear.weight = nn.Parameter(merged, requires_grad=False)
        if base.bias is not None:
            linear.bias = nn.Parameter(base.bias.detach().to(dtype), requires_grad=False)
        model.set_submodule(name, linear)
    return model


def export_peft_adapter(model: nn.Module, path: str | os.PathLike, rank: int | None = None,
                        base_model_name_or_path: str | None = None) -> str:
    """Write the adapters truncated to ``rank`` (default: the current rank) as a PEFT LoRA checkpoint.

    ``peft.PeftModel.from_pretrained(base, path)`` on the unprepared base model then computes what the
    prepared model computes at that rank (PEFT's scale ``lora_alpha / r`` equals DyLoRA's ``alpha / b``).
    Returns ``path``.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("the model has no memcompile LoRA layers")
    r_max = min(m.r_max for _, m in layers)
    b = check_rank(layers[0][1].rank if rank is None else rank, r_max)
    alphas = {name: m.alpha for name, m in layers}
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    dropouts = {m.lora_dropout.p for _, m in layers if isinstance(m.lora_dropout, nn.Dropout)}
    config = LoraConfig(
        r=b, lora_alpha=alpha, target_modules=[name for name, _ in layers],
        lora_dropout=max(dropouts, default=0.0), bias="none",
        alpha_pattern={re.escape(name): a for name, a in alphas.items() if a != alpha},
        base_model_name_or_path=base_model_name_or_path,
    )
    tensors = {}
    for name, m in layers:
        tensors[f"base_model.model.{name}.lora_A.weight"] = m.lora_A[:b].detach().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = m.lora_B[:, :b].detach().cpu().contiguous()
    os.makedirs(path, exist_ok=True)
    config.save_pretrained(str(path))
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    return str(path)
