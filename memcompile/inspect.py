"""``python -m memcompile.inspect``: compile one training step of an example model and print the report.

    python -m memcompile.inspect                                  # tiny Llama, LoRA on all 7 linears, VeLoRA
    python -m memcompile.inspect --training full --activation compact
    python -m memcompile.inspect --model gpt2 --dump-dir graphs/  # graphs before/after each pass
    python -m memcompile.inspect --model-dir path/to/hf-model --seq 512

The "before" column is the same partitioner without memtrain's passes, so the difference is what the
passes saved beyond what min-cut recomputation already saves.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from memcompile import reporting
from memcompile.config import ACTIVATION_METHODS, LLAMA_LINEARS
from memcompile.passes.compression import METHODS


def example_model(name: str, training: str, hidden: int, layers: int, lora_r: int, model_dir: str | None = None):
    """A small random model (or a local HF one), with LoRA on every linear unless ``training="full"``."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if model_dir:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    elif name == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                                             vocab_size=256, max_position_embeddings=4096,
                                             bos_token_id=1, eos_token_id=2, pad_token_id=0))
    elif name == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, vocab_size=256, n_positions=4096,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                           bos_token_id=1, eos_token_id=2))
        model.loss_type = "ForCausalLM"
    else:
        raise ValueError(f"unknown example model {name!r}; valid: llama, gpt2")
    model.config.use_cache = False
    if training == "lora":
        from peft import LoraConfig, get_peft_model

        targets = list(LLAMA_LINEARS) if name == "llama" or model_dir else ["c_attn", "c_proj", "c_fc"]
        model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0,
                                                 target_modules=targets))
    elif training != "full":
        raise ValueError(f"unknown training {training!r}; valid: lora, full")
    return model


def per_token_per_layer(rep: reporting.StepReport, tokens: int, layers: int) -> dict:
    """Saved-activation bytes per token per decoder layer, before and after the passes."""
    return {"before": rep.bytes_before / tokens / layers, "after": rep.bytes_after / tokens / layers,
            "predicted_saving": rep.predicted_saving / tokens / layers}


def main(argv=None) -> reporting.StepReport:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama", choices=["llama", "gpt2"])
    ap.add_argument("--model-dir", help="a local Hugging Face causal-LM directory instead of a random model")
    ap.add_argument("--training", default="lora", choices=["lora", "full"])
    ap.add_argument("--activation", default=ACTIVATION_METHODS[0], choices=ACTIVATION_METHODS)
    ap.add_argument("--compiler", default="aot_eager", choices=["aot_eager", "inductor"])
    ap.add_argument("--partitioner", default="mincut", choices=["mincut", "default"])
    for method in METHODS.values():  # --velora-groups, --compact-rank, ...
        defaults = {f.name: f.default for f in dataclasses.fields(method.config)}
        for flag, name in method.cli:
            ap.add_argument(f"--{method.name}-{flag}", type=type(defaults[name]), default=defaults[name])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--memory-target", help="the planner's memory_target (e.g. 2MiB): the report shows its plan")
    ap.add_argument("--offload", action="store_true", help="with --memory-target: allow offload on CPU too")
    ap.add_argument("--fp8", action="store_true", help="with --memory-target: allow fp8 storage")
    ap.add_argument("--dump-dir", help="write graphs before/after each pass here")
    ap.add_argument("--json", action="store_true", help="print the per-token figures as JSON too")
    args = ap.parse_args(argv)

    model = example_model(args.model, args.training, args.hidden, args.layers, args.lora_r, args.model_dir)
    options = {"activation": args.activation, "compiler": args.compiler, "partitioner": args.partitioner,
               "dump_dir": args.dump_dir}
    for method in METHODS.values():
        options[method.name] = {name: getattr(args, f"{method.name}_{flag}".replace("-", "_"))
                                for flag, name in method.cli}
    if args.training == "full" and args.activation != "none":
        options["targets"] = None
    if args.memory_target:
        options.update(memory_target=args.memory_target,
                       plan={"offload": True if args.offload else None, "fp8": args.fp8})
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(3, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend="memtrain", options=options)
    compiled(input_ids=ids, labels=ids).loss.backward()
    rep = reporting.report()
    print(rep)
    figures = per_token_per_layer(rep, args.batch * args.seq, model.config.num_hidden_layers)
    print(f"  per token per layer: {figures['before']:.0f} B -> {figures['after']:.0f} B"
          f" (predicted saving {figures['predicted_saving']:.0f} B)")
    if args.json:
        print(json.dumps({"model": args.model, "training": args.training, "activation": args.activation,
                          "bytes_before": rep.bytes_before, "bytes_after": rep.bytes_after, **figures}))
    return rep


if __name__ == "__main__":
    main()
