"""memtrain under Hugging Face's ``Trainer`` and TRL's ``SFTTrainer`` (a ``Trainer``).

Compile the model before handing it to the trainer, with memtrain's options, and add the callback
that keeps memcompile's training state in the trainer's checkpoints::

    memcompile.compile_blocks(model, {"activation": "compact"})   # or model.compile(backend="memtrain", options=...)
    sampler = memcompile.RankSampler(model)                      # with a memcompile.prepare'd model
    trainer = Trainer(model=model, args=TrainingArguments(...),  # not torch_compile=True: see below
                      optimizers=(memcompile.optim.Fira(...), None),
                      callbacks=[memcompile.trainer_callback(sampler=sampler)])
    trainer.train()                                              # or .train(resume_from_checkpoint=True)

``TrainingArguments(torch_compile_backend="memtrain")`` does not work: accelerate accepts only the
backends of its own list (``'MEMTRAIN' is not a valid DynamoBackend``) and has no way to pass options.

The callback writes ``memtrain_state.pt`` (``memtrain_state-rank{N}.pt`` on each of several processes:
VeLoRA's vectors are estimated from each process's own batch) into every checkpoint folder: the
compression state of the model's layers (``memcompile.activation_state``), and the state of the rank
sampler and coreset selector it was given. Resuming restores it before the first step, so the losses
after a resume equal those of the run that was not interrupted.
"""
from __future__ import annotations

import os
import weakref
from typing import Any

import torch
from transformers import TrainerCallback

from memcompile import activation_state
from memcompile._warn import warn

STATE_FILE = "memtrain_state.pt"
CHECKPOINT_PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR

# The optimizer step at which each rank sampler last drew, so two callbacks holding one sampler draw once.
_DRAWN_AT: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()

ROUTE = ("compile the model before handing it to the Trainer: memcompile.compile_blocks(model, options) or "
         "model.compile(backend='memtrain', options=options) (in place), with torch_compile left False; "
         "add memcompile.trainer_callback() to the callbacks to keep the compression state in checkpoints")


def check_training_args(args: Any) -> None:
    """Raise the error that names the working route when ``args`` asks accelerate to compile with memtrain."""
    backend = getattr(args, "torch_compile_backend", None)
    if isinstance(backend, str) and backend.lower() == "memtrain":
        raise ValueError("TrainingArguments(torch_compile_backend='memtrain') cannot work: accelerate accepts only "
                         "the backends of its own list and passes no options. Instead, " + ROUTE)


def _is_wrapper(model) -> bool:
    from accelerate.utils import is_compiled_module

    return model is not None and is_compiled_module(model)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model under DDP/FSDP wrappers and a whole-model ``torch.compile``: the one whose parameter
    names key the compression state."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_torch_compile=False)


def state_file(checkpoint_dir: str, args: Any = None) -> str:
    world = getattr(args, "world_size", 1) or 1
    name = STATE_FILE if world <= 1 else STATE_FILE.replace(".pt", f"-rank{args.process_index}.pt")
    return os.path.join(checkpoint_dir, name)


class MemtrainCallback(TrainerCallback):
    """Keeps memcompile's training state in the ``Trainer``'s checkpoints and draws the LoRA rank.

    Args:
        sampler: a ``memcompile.RankSampler``: drawn at the start of every optimizer step (so the
            micro-batches of one gradient-accumulation step share a rank) and checkpointed.
        coreset: a ``memcompile.data.CoresetSelector`` to checkpoint (``CoresetTrainer`` adds one itself).
        resume_from: the checkpoint folder to restore from when the trainer resumes from a folder
            outside ``output_dir`` (by default: ``TrainingArguments.resume_from_checkpoint``, then
            ``output_dir/checkpoint-<step>``).
        strict: resuming from a checkpoint without memtrain's state is an error; with False the
            compression state starts afresh there (VeLoRA's vectors re-estimated, CompAct re-seeded).
    """

    def __init__(self, sampler=None, coreset=None, *, resume_from: str | None = None, strict: bool = True):
        self.sampler, self.coreset, self.resume_from, self.strict = sampler, coreset, resume_from, strict

    def on_init_end(self, args, state, control, model=None, **kwargs):
        check_training_args(args)
        if _is_wrapper(model):
            warn("memtrain: the Trainer got the wrapper torch.compile returns; its checkpoints name every "
                 "weight '_orig_mod.*' and a PEFT model's adapter is not saved as one. Compile in place "
                 "instead: model.compile(backend='memtrain', options=...) or "
                 "memcompile.compile_blocks(model, options)")
        if getattr(args, "torch_compile", False):
            raise ValueError("TrainingArguments(torch_compile=True) compiles the model again, with accelerate's "
                             "backend, around memtrain's graphs. Leave torch_compile False and " + ROUTE)
        if getattr(args, "gradient_checkpointing", False):
            raise ValueError("gradient_checkpointing=True (TRL's SFTConfig turns it on by default) runs memtrain's "
                             "compiled layers, compression ops included, a second time in the backward (a "
                             "CompAct layer would count the step twice). Set "
                             "gradient_checkpointing=False; memtrain's option recompute_budget (e.g. 0.2) "
                             "recomputes inside the compiled graph instead")

    def on_step_begin(self, args, state, control, **kwargs):
        if self.sampler is None:
            return
        step = getattr(state, "global_step", None)
        if step is None or _DRAWN_AT.get(self.sampler) != step:
            if step is not None:
                _DRAWN_AT[self.sampler] = step
            self.sampler.step()

    def on_save(self, args, state, control, model=None, **kwargs):
        folder = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}-{state.global_step}")
        os.makedirs(folder, exist_ok=True)  # every process writes its own file, maybe before rank 0's folder exists
        path = state_file(folder, args)
        payload = {"global_step": state.global_step}
        if os.path.exists(path):  # another MemtrainCallback wrote its part of this step's state
            previous = torch.load(path, weights_only=False)
            if previous.get("global_step") == state.global_step:
                payload = previous
        payload["activation"] = activation_state.state_dict(unwrap(model))
        if self.sampler is not None:
            payload["rank_sampler"] = self.sampler.state_dict()
        if self.coreset is not None:
            payload["coreset"] = self.coreset.state_dict()
        torch.save(payload, path)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not state.global_step:
            return  # a fresh run
        folder = self._checkpoint(args, state)
        path = state_file(folder, args) if folder else None
        if path is None or not os.path.exists(path):
            if not self.strict:
                return
            where = path or os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}-{state.global_step}")
            raise FileNotFoundError(
                f"memtrain: resuming at step {state.global_step}, but {where} does not exist, so the compression "
                "state (VeLoRA's vectors, CompAct's seeds and step counters) cannot be restored. Resume from a "
                "checkpoint written with memcompile.trainer_callback() among the callbacks; pass "
                "memcompile.trainer_callback(resume_from=<checkpoint folder>) if it is outside output_dir; or "
                "memcompile.trainer_callback(strict=False) to start the compression state afresh")
        payload = torch.load(path, weights_only=False)
        activation_state.load_state_dict(unwrap(model), payload["activation"])
        if self.sampler is not None:
            if "rank_sampler" not in payload:
                raise KeyError(f"memtrain: {path} holds no rank sampler state; it was saved without "
                               "memcompile.trainer_callback(sampler=...)")
            self.sampler.load_state_dict(payload["rank_sampler"])
            _DRAWN_AT.pop(self.sampler, None)
        if self.coreset is not None:
            if "coreset" not in payload:
                raise KeyError(f"memtrain: {path} holds no coreset selector state; it was saved without "
                               "memcompile.trainer_callback(coreset=...) or CoresetTrainer")
            self.coreset.load_state_dict(payload["coreset"], device=args.device)

    def _checkpoint(self, args, state) -> str | None:
        candidates = [self.resume_from, getattr(args, "resume_from_checkpoint", None),
                      os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}-{state.global_step}")]
        for folder in candidates:
            if isinstance(folder, str) and os.path.isdir(folder):
                return folder
        return None


def trainer_callback(sampler=None, coreset=None, *, resume_from: str | None = None,
                     strict: bool = True) -> MemtrainCallback:
    """The ``transformers.TrainerCallback`` for training under memtrain: checkpoints the compression
    state (and ``sampler``'s, ``coreset``'s), restores it on resume, draws ``sampler``'s rank each
    step. See ``MemtrainCallback``."""
    return MemtrainCallback(sampler, coreset, resume_from=resume_from, strict=strict)
