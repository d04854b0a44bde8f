"""memcompile: train transformers in a fraction of the accelerator memory, through torch.compile.

    model = torch.compile(model, backend="memtrain", options={"activation": "velora"})
    ...
    print(memcompile.report())
"""
import importlib

# Public names and the module each comes from, imported on first use: ``import memcompile`` loads
# neither torch nor Triton until something is used (the backend itself is found through the
# ``torch_dynamo_backends`` entry point).
_EXPORTS = {
    "memtrain": "memcompile.backend",
    "LoRAConfig": "memcompile.config",
    "MemtrainConfig": "memcompile.config",
    "CompActConfig": "memcompile.passes.compression.compact",
    "VeLoRAConfig": "memcompile.passes.compression.velora",
    "LoRALinear": "memcompile.lora",
    "RankSampler": "memcompile.lora",
    "get_rank": "memcompile.lora",
    "set_rank": "memcompile.lora",
    "export_peft_adapter": "memcompile.adapt",
    "merge_lora": "memcompile.adapt",
    "prepare": "memcompile.adapt",
    "quantized_layers": "memcompile.adapt",
    "compile_blocks": "memcompile.regional",
    "clear_reports": "memcompile.reporting",
    "report": "memcompile.reporting",
    "reports": "memcompile.reporting",
}
_SUBMODULES = ("activation_state",)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"memcompile.{name}")
    else:
        raise AttributeError(f"module 'memcompile' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *__all__})


def trainer_callback(sampler=None, coreset=None, **kwargs):
    """The ``transformers.TrainerCallback`` for a ``Trainer``/``SFTTrainer`` on a model compiled with
    memtrain: keeps the compression state (and ``sampler``'s, ``coreset``'s) in the checkpoints and
    restores it on resume. See ``memcompile.trainer``."""
    from memcompile.trainer import trainer_callback as make

    return make(sampler, coreset, **kwargs)


__all__ = sorted([*_EXPORTS, *_SUBMODULES, "trainer_callback"])
__version__ = "0.1.0"
