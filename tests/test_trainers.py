"""memtrain under Hugging Face's Trainer and TRL's SFTTrainer: the examples run on a tiny model, the
loss falls, and resuming from a mid-run checkpoint gives the uninterrupted run's next losses exactly,
because the compression state (CompAct's step counters, VeLoRA's vectors), the rank sampler's and
the coreset selector's state travel in the trainer's own checkpoints."""
import importlib.util
import os

import pytest
import torch

import memcompile
from memcompile import activation_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, SAVE = 4, 2


def _example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fresh():
    """What a new process starts with: no compiled graphs, no compression state."""
    torch.compiler.reset()
    activation_state.reset()
    memcompile.clear_reports()


def _args(out, *extra, compact_refresh=1):
    # CompAct draws a new projection every step (refresh 1): a resume that lost its step counters would
    # use step 1's projection at step 3.
    options = ('{"compiler": "aot_eager", "compact": {"rank": 8, "refresh": %d}, "velora": {"num_groups": 8}}'
               % compact_refresh)
    return ["--output-dir", str(out), "--steps", str(STEPS), "--save-steps", str(SAVE), "--examples", "48",
            "--seq", "16", "--batch", "4", "--options", options, *extra]


def _run_and_resume(main, out, *extra):
    whole = main(_args(out, *extra))
    _fresh()
    resumed = main(_args(out, *extra, "--resume", str(out / f"checkpoint-{SAVE}")))
    return whole, resumed


def _assert_exact_resume(whole, resumed):
    assert sorted(whole) == sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(SAVE + 1, STEPS + 1):
        assert resumed[step] == whole[step], (step, whole, resumed)
    assert whole[STEPS] < whole[1], whole  # it trains


def test_trainer_peft_compact_resume_is_exact(tmp_path):
    """Trainer, PEFT LoRA, compile_blocks, CompAct: exact resume; without the saved state the resumed
    losses differ (so the state is what makes it exact), and strict mode says so."""
    main = _example("trainer_finetune").main
    whole, resumed = _run_and_resume(main, tmp_path, "--activation", "compact")
    _assert_exact_resume(whole, resumed)
    assert os.path.exists(tmp_path / f"checkpoint-{SAVE}" / "memtrain_state.pt")
    assert memcompile.report().passes["activation_compression"]["rewritten"]

    checkpoint = tmp_path / f"checkpoint-{SAVE}"
    os.remove(checkpoint / "memtrain_state.pt")
    _fresh()
    with pytest.raises(FileNotFoundError, match="strict=False"):
        main(_args(tmp_path, "--activation", "compact", "--resume", str(checkpoint)))

    # The control: the same resume with the compression state started afresh gives other losses.
    from transformers import Trainer

    ex = _example("trainer_finetune")
    _fresh()
    args = ex.parse_args(_args(tmp_path, "--activation", "compact"))
    model, _ = ex.build_model(args)
    trainer = Trainer(model=model, args=ex.training_args(args), train_dataset=ex.Windows(args.seq, args.examples,
                                                                                          args.seed, False),
                      callbacks=[memcompile.trainer_callback(strict=False)])
    trainer.train(resume_from_checkpoint=str(checkpoint))
    afresh = ex.losses(trainer)
    assert afresh[SAVE + 1] == whole[SAVE + 1]  # the forward is exact: the first loss after the checkpoint agrees
    assert afresh[STEPS] != whole[STEPS]  # the weight gradient of step 3 is not: the next one differs


def test_trainer_qdylora_velora_coreset_resume_is_exact(tmp_path):
    """CoresetTrainer on a memcompile.prepare'd model (dynamic-rank LoRA) with VeLoRA: the rank
    sampler's generator, the selector's history and VeLoRA's vectors all resume."""
    main = _example("trainer_finetune").main
    whole, resumed = _run_and_resume(main, tmp_path, "--lora", "qdylora", "--coreset", "--activation", "velora",
                                     "--batch", "8")
    _assert_exact_resume(whole, resumed)
    saved = torch.load(tmp_path / f"checkpoint-{SAVE}" / "memtrain_state.pt", weights_only=False)
    assert {"activation", "rank_sampler", "coreset"} <= set(saved)
    assert any(s["velora_v"] is not None for s in saved["activation"].values())


def test_sft_trainer_fira_resume_is_exact(tmp_path):
    """SFTTrainer, full fine-tuning with Fira, the whole model compiled in place, VeLoRA on the attention."""
    pytest.importorskip("trl")
    main = _example("trainer_sft").main
    whole, resumed = _run_and_resume(main, tmp_path, "--activation", "velora", "--compile", "whole",
                                     "--lora", "none", "--optimizer", "fira")
    _assert_exact_resume(whole, resumed)
    assert memcompile.report().passes["activation_compression"]["rewritten"]


def test_trainer_refuses_what_cannot_work(tmp_path):
    """accelerate's torch_compile_backend, torch_compile=True and gradient checkpointing: each error
    names the working route."""
    from transformers import Trainer, TrainingArguments

    from memcompile.data import CoresetTrainer
    from tests import models

    model = models.tiny_llama()
    common = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1)
    with pytest.raises(ValueError, match="compile_blocks"):
        CoresetTrainer(model=model, args=TrainingArguments(torch_compile=True, torch_compile_backend="memtrain",
                                                           **common))
    with pytest.raises(ValueError, match="torch_compile False"):
        Trainer(model=model, args=TrainingArguments(torch_compile=True, **common),
                callbacks=[memcompile.trainer_callback()])
    with pytest.raises(ValueError, match="gradient_checkpointing=False"):
        Trainer(model=model, args=TrainingArguments(gradient_checkpointing=True, **common),
                callbacks=[memcompile.trainer_callback()])
    with pytest.warns(UserWarning, match="in place"):
        Trainer(model=torch.compile(model, backend="memtrain"), args=TrainingArguments(**common),
                callbacks=[memcompile.trainer_callback()])
