"""memcompile: train transformers in a fraction of the accelerator memory, through torch.compile.

    model = torch.compile(model, backend="memtrain", options={"activation": "velora"})
    ...
    print(memcompile.report())
"""
from memcompile.backend import memtrain
from memcompile.config import LoRAConfig, MemtrainConfig
from memcompile.passes.compression.compact import CompActConfig
from memcompile.passes.compression.velora import VeLoRAConfig
from memcompile.regional import compile_blocks
from memcompile.reporting import clear_reports, report, reports
from memcompile import activation_state
from memcompile.lora import LoRALinear, RankSampler, get_rank, set_rank
from memcompile.prepare import export_peft_adapter, merge_lora, prepare, quantized_layers


def trainer_callback(sampler=None, coreset=None, **kwargs):
    """The ``transformers.TrainerCallback`` for a ``Trainer``/``SFTTrainer`` on a model compiled with
    memtrain: keeps the compression state (and ``sampler``'s, ``coreset``'s) in the checkpoints and
    restores it on resume. See ``memcompile.trainer``."""
    from memcompile.trainer import trainer_callback as make

    return make(sampler, coreset, **kwargs)


__all__ = [
    "CompActConfig",
    "LoRAConfig",
    "LoRALinear",
    "RankSampler",
    "MemtrainConfig",
    "VeLoRAConfig",
    "activation_state",
    "clear_reports",
    "compile_blocks",
    "export_peft_adapter",
    "get_rank",
    "memtrain",
    "merge_lora",
    "prepare",
    "quantized_layers",
    "report",
    "reports",
    "set_rank",
    "trainer_callback",
]
__version__ = "0.1.0"
