"""Supervised fine-tuning with TRL's ``SFTTrainer`` under backend="memtrain", checkpoints included.

``SFTTrainer`` is a ``Trainer``: the route is the same as ``examples/trainer_finetune.py``. Adapt the
model (PEFT, or ``memcompile.prepare``) and compile it first, then hand it to the trainer without
``peft_config`` and with ``gradient_checkpointing=False`` (TRL turns it on by default; it would run
memtrain's compiled layers twice per step; memtrain's ``recompute_budget`` option recomputes inside
the compiled graph instead), and add ``memcompile.trainer_callback()``.

With no flags it needs no download: a byte-level tokenizer built here, the help text that ships with
Python cut into lines of a fixed length, and a small random Llama::

    python examples/trainer_sft.py
    python examples/trainer_sft.py --lora qdylora --options '{"activation": "compact"}' --resume
    torchrun --nproc-per-node 2 examples/trainer_sft.py

Needs ``pip install trl`` (the ``test`` extra installs it).
"""
from __future__ import annotations

import os
import sys

import torch

import memcompile
from memcompile import textdata

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trainer_finetune import build_model, optimizer_for, parse_args, train_and_report  # noqa: E402

PAD, EOS = "<pad>", "</s>"


def byte_tokenizer():
    """A byte-level tokenizer: token ``b`` is byte ``b`` (as ``memcompile.textdata``), then pad and eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's printable stand-ins for the 256 bytes, which byte-level pre-tokenization produces.
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    vocab = {chars[b]: b for b in range(256)} | {PAD: 256, EOS: 257}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS)


def lines(seq: int, n: int, seed: int):
    """``n`` pieces of ``seq`` ASCII characters of the bundled text: every example tokenizes to the same
    length, so one compiled graph serves every batch."""
    text = textdata.default_corpus().encode("ascii", "ignore").decode()
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(text) - seq, (n,), generator=g).tolist()
    return [text[s:s + seq] for s in starts]


def main(argv=None) -> dict[int, float]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = parse_args(argv)
    if args.coreset:
        raise SystemExit("--coreset: use examples/trainer_finetune.py (CoresetTrainer is a Trainer, not an SFTTrainer)")
    tokenizer = byte_tokenizer()
    model, sampler = build_model(args, vocab=len(tokenizer))
    data = Dataset.from_dict({"text": lines(args.seq - 1, args.examples, args.seed)})  # + eos = seq tokens
    config = SFTConfig(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=1, save_strategy="steps",
        save_steps=args.save_steps, seed=args.seed, report_to=[], use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, disable_tqdm=True, max_length=args.seq, packing=False,
        gradient_checkpointing=False)
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                         optimizers=(optimizer_for(args, model), None),
                         callbacks=[memcompile.trainer_callback(sampler=sampler)])
    return train_and_report(trainer, args.resume)


if __name__ == "__main__":
    main()
