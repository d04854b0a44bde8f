"""memcompile: train transformers in a fraction of the accelerator memory, through torch.compile.

    model = torch.compile(model, backend="memtrain", options={"activation": "velora"})
    ...
    print(memcompile.report())
"""
from memcompile.backend import memtrain
from memcompile.config import CompActConfig, LoRAConfig, MemtrainConfig, VeLoRAConfig
from memcompile.regional import compile_blocks
from memcompile.reporting import clear_reports, report, reports
from memcompile import activation_state
from memcompile.lora import LoRALinear, RankSampler, get_rank, set_rank
from memcompile.prepare import export_peft_adapter, merge_lora, prepare, quantized_layers

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
]
__version__ = "0.1.0"
