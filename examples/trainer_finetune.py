"""Fine-tune with Hugging Face's ``Trainer`` under backend="memtrain", checkpoints included.

The route: compile the model first (``memcompile.compile_blocks`` or ``model.compile(
backend="memtrain", options=...)``, which compiles in place), then hand it to the ``Trainer`` with ``torch_compile`` left off
(accelerate cannot take memtrain or its options), and add ``memcompile.trainer_callback()`` so the
compression state goes into every checkpoint and comes back on resume.

With no flags it needs no download: byte-level tokens of the help text that ships with Python and a
small random Llama. The same script runs on one CPU, on one GPU, and on several processes, where the
Trainer wraps the model in DDP (gloo on CPU, NCCL on GPUs)::

    python examples/trainer_finetune.py                                    # PEFT LoRA, VeLoRA, 40 steps
    python examples/trainer_finetune.py --lora qdylora --options '{"activation": "compact"}'
    python examples/trainer_finetune.py --lora none --optimizer fira      # full fine-tuning with Fira
    python examples/trainer_finetune.py --coreset                          # CoLM coresets (CoresetTrainer)
    python examples/trainer_finetune.py --resume                           # go on from the last checkpoint
    torchrun --nproc-per-node 2 examples/trainer_finetune.py               # DDP
"""
from __future__ import annotations

import argparse
import json

import torch

import memcompile
from memcompile import textdata
from memcompile.config import LLAMA_LINEARS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/trainer")
    p.add_argument("--options", default="{}", help="memtrain's options, JSON (e.g. '{\"activation\": \"compact\"}')")
    p.add_argument("--activation", default="velora", choices=["velora", "compact", "none"])
    p.add_argument("--compile", default="regional", choices=["regional", "whole"],
                   help="compile_blocks (one graph for every layer) or the whole model")
    p.add_argument("--lora", default="peft", choices=["peft", "qdylora", "none"],
                   help="PEFT LoRA, memcompile.prepare's NF4 base + dynamic-rank LoRA, or full fine-tuning")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "fira"])
    p.add_argument("--coreset", action="store_true", help="train on CoLM coresets of each batch (CoresetTrainer)")
    p.add_argument("--model-dir", help="a local Hugging Face causal LM (default: a small random Llama)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--batch", type=int, default=4, help="per device (the pool size with --coreset)")
    p.add_argument("--examples", type=int, default=512, help="training windows")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--save-steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", nargs="?", const=True, default=None,
                   help="resume from the last checkpoint in --output-dir, or from the folder given")
    return p.parse_args(argv)


class Windows(torch.utils.data.Dataset):
    """Fixed windows of ``seq`` byte tokens drawn once from the bundled text, each with its source."""

    def __init__(self, seq: int, n: int, seed: int, with_sources: bool):
        sources = textdata.sources()
        draw = textdata.SourceBatches(sources, seq, n, seed=seed)
        self.ids, self.sources = next(draw)
        self.with_sources = with_sources

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        row = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        if self.with_sources:
            row["sources"] = self.sources[i]
        return row


def small_llama(hidden: int, layers: int, seq: int, vocab: int = textdata.VOCAB, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, vocab_size=vocab,
                      max_position_embeddings=max(seq, 128), bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      use_cache=False)
    return LlamaForCausalLM(cfg)


def build_model(args, vocab: int = textdata.VOCAB):
    """The model, adapted as ``--lora`` says, compiled as ``--compile`` says; and the rank sampler."""
    if args.model_dir:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
        model.config.use_cache = False
    else:
        model = small_llama(args.hidden, args.layers, args.seq, vocab, args.seed)
    sampler = None
    torch.manual_seed(args.seed)
    if args.lora == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(LLAMA_LINEARS)))
    elif args.lora == "qdylora":
        quant = "nf4" if torch.cuda.is_available() or args.model_dir else "none"  # NF4 on CPU runs interpreted
        model = memcompile.prepare(model, {"lora": {"r_max": 8, "alpha": 16, "quant": quant,
                                                    "targets": LLAMA_LINEARS, "seed": args.seed}})
        sampler = memcompile.RankSampler(model)
    options = {"activation": args.activation}
    if args.optimizer == "fira":
        # Fira needs exact gradients for the weights it projects (the MLP's): compress the attention's inputs only.
        options["targets"] = ["self_attn"]
    options.update(json.loads(args.options))
    if args.compile == "regional":
        memcompile.compile_blocks(model, options)
    else:
        # in place: the Trainer still gets the model itself (torch.compile's wrapper breaks its checkpoints)
        model.compile(backend="memtrain", options=options)
    return model, sampler


def optimizer_for(args, model):
    if args.optimizer != "fira":
        return None  # the Trainer's AdamW
    from memcompile.optim import Fira, fira_param_groups

    return Fira(fira_param_groups(model, rank=max(4, args.hidden // 4), targets=("mlp",)), lr=args.lr)


def training_args(args, **overrides):
    from transformers import TrainingArguments

    kw = dict(output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch,
              learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=1, save_strategy="steps",
              save_steps=args.save_steps, seed=args.seed, report_to=[], remove_unused_columns=False,
              use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True)
    kw.update(overrides)
    return TrainingArguments(**kw)


def losses(trainer) -> dict[int, float]:
    """The logged training loss of every step, by step."""
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


def train_and_report(trainer, resume) -> dict[int, float]:
    """Train (from ``resume``, a checkpoint or None), print the first and last loss and memtrain's
    report on the main process, and return the losses by step."""
    trainer.train(resume_from_checkpoint=resume)
    history = losses(trainer)
    if trainer.is_world_process_zero():
        steps = sorted(history)
        print(f"loss: step {steps[0]} {history[steps[0]]:.4f} -> step {steps[-1]} {history[steps[-1]]:.4f}")
        print(memcompile.report())
    return history


def main(argv=None) -> dict[int, float]:
    from transformers import Trainer

    args = parse_args(argv)
    model, sampler = build_model(args)
    data = Windows(args.seq, args.examples, args.seed, with_sources=args.coreset)
    optimizer = optimizer_for(args, model)
    callbacks = [memcompile.trainer_callback(sampler=sampler)]
    common = dict(model=model, args=training_args(args), train_dataset=data, callbacks=callbacks,
                  optimizers=(optimizer, None))
    if args.coreset:
        from memcompile.data import CoresetConfig, CoresetTrainer

        # The selector's features are the gradients of the last layer's v_proj LoRA B (PEFT's names by default).
        names = [n for n, _ in model.named_parameters() if n.endswith("self_attn.v_proj.lora_B")]
        trainer = CoresetTrainer(**common, coreset=CoresetConfig(ratio=0.5, param_name=names[-1] if names else None))
    else:
        trainer = Trainer(**common)
    return train_and_report(trainer, args.resume)


if __name__ == "__main__":
    main()
