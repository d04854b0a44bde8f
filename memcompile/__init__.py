"""memcompile: train transformers in a fraction of the accelerator memory, through torch.compile.

    model = torch.compile(model, backend="memtrain", options={"activation": "velora"})
    ...
    print(memcompile.report())
"""
from memcompile.backend import memtrain
from memcompile.config import CompActConfig, LoRAConfig, MemtrainConfig, VeLoRAConfig
from memcompile.reporting import clear_reports, report, reports
from memcompile import activation_state

__all__ = [
    "CompActConfig",
    "LoRAConfig",
    "MemtrainConfig",
    "VeLoRAConfig",
    "activation_state",
    "clear_reports",
    "memtrain",
    "report",
    "reports",
]
__version__ = "0.1.0"
