"""Every causal-LM architecture of the installed transformers, built tiny from its config class.

``build(model_type)`` returns a tiny random model or raises ``Skip`` with the reason it cannot be
swept (multimodal, needs inputs other than token ids, fails to build or to run eagerly at tiny size).
``python -m tests.architectures [--run]`` writes ``docs/architectures.md``: the skipped architectures
with their reasons, and with ``--run`` the sweep's result per architecture (slow: every architecture
is compiled three times).

This module is the catalogue and the doc writer, not a test (pytest does not collect it): the
assertions are in ``tests/test_architectures.py``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
import warnings

import torch

# A representative subset for the default test run, kept small for CI's CPU time: Llama-style (q/k/v/o +
# gated MLP), GPT-2's Conv1D, Falcon's Linear subclass and fused qkv, a MoE whose shared expert's gate and
# up projections and router read one 2-D input, MLA attention (DeepSeek V2: a LoRA-shaped q/kv with a
# norm between A and B), and a BERT-style decoder.
SUBSET = ("llama", "gpt2", "falcon", "qwen2_moe", "deepseek_v2", "bert", "mamba")

# Their backward fails under torch's own ``aot_eager`` with or without memtrain ("view size is not
# compatible", a view of ``softplus_backward``'s output whose real strides differ from what tracing
# assumed: pytorch/pytorch#120035); Inductor runs them, so they are swept under Inductor.
AOT_EAGER_FAILS = ("doge", "lara_mini", "olmo_hybrid", "qwen3_5_text", "qwen3_5_moe_text", "qwen3_next", "qwen4_exp_text")


def compiler(model_type: str) -> str:
    """The compiler the sweep uses for ``model_type``."""
    return "inductor" if model_type in AOT_EAGER_FAILS else "aot_eager"

VOCAB = 128
TOKENS = 16

# Generic tiny sizes, set where the config class has the key (directly or through its attribute_map).
_TINY = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 4, "head_dim": 16, "vocab_size": VOCAB, "max_position_embeddings": 128,
    "n_positions": 128, "n_ctx": 128, "max_seq_len": 128, "seq_length": 128,
    "n_inner": 128, "ffn_dim": 128, "ffn_hidden_size": 128, "d_ff": 128, "decoder_ffn_dim": 128,
    "decoder_layers": 2, "decoder_attention_heads": 4, "d_model": 64, "encoder_layers": 1,
    "encoder_attention_heads": 4, "encoder_ffn_dim": 128,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "n_shared_experts": 1,
    "moe_num_experts": 4, "moe_k": 2, "moe_topk": 2, "top_k": 2, "n_group": 1, "topk_group": 1,
    "first_k_dense_replace": 1, "num_shared_experts": 1,
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 16,
    "qk_head_dim": 32, "rotary_dim": 8,
    "state_size": 8, "mamba_d_state": 8, "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_n_groups": 1,
    "mamba_d_conv": 4, "mamba_expand": 2, "mamba_headdim": 16, "ssm_state_size": 8,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "sliding_window": 64, "attention_window_size": 64,
    "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "dropout": 0.0,
    "attention_dropout": 0.0, "hidden_dropout": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
    "attn_pdrop": 0.0, "activation_dropout": 0.0,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1,
    "is_decoder": True, "use_cache": False, "tie_word_embeddings": False,
}


class Skip(Exception):
    """This architecture cannot be swept; the message says why."""


def architectures() -> dict[str, str]:
    """``model_type -> class name`` of every causal LM in transformers' auto mapping."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def tiny_config(model_type: str):
    from transformers import CONFIG_MAPPING, AutoConfig

    try:
        cls = CONFIG_MAPPING[model_type]
    except Exception as e:  # noqa: BLE001 - the mapping imports the model's module lazily
        raise Skip(f"config class does not import: {_first_line(e)}") from None
    try:
        default = cls()
    except Exception as e:  # noqa: BLE001
        raise Skip(f"config class does not build with its defaults: {_first_line(e)}") from None
    known = set(default.to_dict()) | set(getattr(cls, "attribute_map", {}))
    subs = sorted(getattr(default, "sub_configs", None) or ())
    if any(k in subs for k in ("vision_config", "audio_config")):
        raise Skip("multimodal: its config has a vision or audio part")
    if subs:
        raise Skip(f"composite config ({', '.join(subs)}): the generic tiny sizes do not reach its parts")
    kwargs = {k: v for k, v in _TINY.items() if k in known}
    try:
        cfg = AutoConfig.for_model(model_type, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise Skip(f"config does not build at tiny size: {_first_line(e)}") from None
    cfg._attn_implementation = "eager"
    return cfg


def build(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A tiny fp32 model of ``model_type`` in eval mode (no dropout), or ``Skip``."""
    import transformers

    name = architectures()[model_type]
    if "ConditionalGeneration" in name:
        raise Skip(f"multimodal ({name}): needs image/audio inputs")
    cfg = tiny_config(model_type)
    try:
        cls = getattr(transformers, name)
    except Exception as e:  # noqa: BLE001
        raise Skip(f"model class does not import: {_first_line(e)}") from None
    try:
        with _quiet(), torch.device("meta"):  # count before allocating: some ignore the tiny sizes
            size = sum(p.numel() for p in cls(cfg).parameters())
    except Exception as e:  # noqa: BLE001
        raise Skip(f"does not build at tiny size: {_first_line(e)}") from None
    if size > 2_000_000:
        raise Skip(f"not tiny with the generic sizes ({size / 1e6:.0f}M parameters)")
    torch.manual_seed(seed)
    try:
        with _quiet():
            model = cls(cfg)
    except Exception as e:  # noqa: BLE001
        raise Skip(f"does not build at tiny size: {_first_line(e)}") from None
    model.eval()
    if getattr(model, "loss_type", "ForCausalLM") is None:
        model.loss_type = "ForCausalLM"  # loss_type=None warns on every call, which breaks the graph
    ids = batch()
    try:
        with _quiet():
            out = model(input_ids=ids, labels=ids)
    except Exception as e:  # noqa: BLE001
        raise Skip(f"eager forward with input_ids and labels fails: {_first_line(e)}") from None
    if getattr(out, "loss", None) is None or not torch.isfinite(out.loss):
        raise Skip("eager forward returns no finite loss from labels")
    return model


def batch(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (2, TOKENS), generator=g)


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def linear_names(model: torch.nn.Module) -> list[str]:
    """Leaf linear layers (``nn.Linear`` and subclasses, GPT-2's ``Conv1D``) except the output head."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head and "lm_head" not in n]


def train_regional(arch: str, options: dict, lengths=(12, 16, 20)):
    """``prepare`` (NF4 base, adapters' matmuls in bf16) on a bf16 model, ``compile_blocks`` under
    Inductor, one step per length (SGD between): each step's loss and gradients, and the report."""
    import memcompile

    torch.compiler.reset()
    memcompile.clear_reports()
    memcompile.activation_state.reset()
    model = build(arch).to(torch.bfloat16)
    names = sorted({n.rsplit(".", 1)[-1] for n in linear_names(model)})
    torch.manual_seed(0)
    model = memcompile.prepare(model, {"lora": {"r_max": 4, "targets": names, "compute_dtype": "input"}})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.05)
    memcompile.compile_blocks(model, options)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    steps = []
    for i, length in enumerate(lengths):
        ids = torch.randint(3, VOCAB, (2, length), generator=torch.Generator().manual_seed(i))
        opt.zero_grad(set_to_none=True)
        with _quiet():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        steps.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        opt.step()
    return steps, memcompile.report()


USERS_PATH_OPTIONS = {"activation": "velora", "targets": "*", "fused_cross_entropy": True}


def users_path(model_type: str) -> str:
    """One row of the users'-path sweep (``--users-path``): ``train_regional`` without a target, then
    with ``memory_target`` at half the saved bytes (offload allowed, on CPU plain copies) and at 0.92 of
    them (recompute only); each planned run's decisions and its largest difference from the unplanned
    run (loss, or a gradient's norm, relative), per step."""
    free, rep = train_regional(model_type, USERS_PATH_OPTIONS)
    before = rep.bytes_after
    cells = [f"{before / 1024:.1f} KiB"]
    for fraction, plan in ((0.5, {"offload": True}), (0.92, {"offload": False})):
        try:
            planned, rep_planned = train_regional(
                model_type, {**USERS_PATH_OPTIONS, "memory_target": int(before * fraction), "plan": plan})
        except Exception as e:  # noqa: BLE001
            reason = _first_line(e)
            cells.append("refused: " + reason[reason.find("smallest"):] if "cannot be met" in reason else f"error: {reason}")
            continue
        counters = rep_planned.passes["memory_plan"]["counters"]
        worst = []
        for (loss, grads), (loss_p, grads_p) in zip(free, planned):
            diffs = [(loss - loss_p).abs().item() / loss.abs().item()]
            diffs += [((grads[n].float() - grads_p[n].float()).norm() / grads[n].float().norm().clamp_min(1e-12)).item()
                      for n in grads]
            worst.append(f"{max(diffs):.2g}")
        cells.append(f"{rep_planned.bytes_after / 1024:.1f} KiB: recompute {counters['recompute']}, offload "
                     f"{counters['offload']}; {' / '.join(worst)}")
    return " | ".join(cells)


def write_doc(path: str, results: dict[str, str] | None = None, seconds: float | None = None,
              note: str | None = None) -> None:
    """``docs/architectures.md``: each architecture, swept or skipped and why."""
    rows, skipped = [], {}
    for model_type, cls in architectures().items():
        try:
            build(model_type)
        except Skip as e:
            skipped[model_type] = (cls, str(e))
            continue
        rows.append((model_type, cls, (results or {}).get(model_type, "not run")))
    lines = ["# Architectures swept", "",
             "Generated by `python -m tests.architectures --run` (do not edit): every causal-LM architecture",
             "of the installed transformers (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`), built from its config class",
             "at tiny size (hidden 64, 2 layers, 16 tokens) and trained one step under `backend=\"memtrain\"`",
             "(`aot_eager`) with VeLoRA and CompAct on every linear, and after `memcompile.prepare` (NF4 + LoRA):",
             "the loss equals the uncompiled model's, every gradient the report does not name as approximated",
             "equals eager's. Where torch's own compile (the same compiler without memtrain) already differs",
             "from eager by round-off, memtrain must equal that compile bit for bit and eager within fp32",
             "round-off. Architectures whose backward fails under torch's own `aot_eager`",
             f"(pytorch/pytorch#120035: {', '.join(AOT_EAGER_FAILS)}) are swept under Inductor, where",
             "memtrain's rewritten graph fuses otherwise than torch's: there both are within fp32 round-off.",
             "`tests/test_architectures.py` runs a subset by default and every architecture",
             "with `MEMTRAIN_SWEEP=all`.", ""]
    import transformers
    counts = {k: sum(1 for *_, r in rows if (r if r in ("pass", "not run") else "fail") == k)
              for k in ("pass", "fail", "not run")}
    lines.append(f"transformers {transformers.__version__}, torch {torch.__version__}: {len(rows)} build tiny "
                 f"({counts['pass']} pass, {counts['fail']} fail, {counts['not run']} not run in the sweep this "
                 f"file records), {len(skipped)} skipped"
                 + (f"; the sweep took {seconds / 60:.0f} min on CPU." if seconds else ".")
                 + (f" {note}" if note else ""))
    lines += ["", "## Swept", "", "| model_type | class | result |", "| --- | --- | --- |"]
    lines += [f"| {t} | {c} | {r} |" for t, c, r in rows]
    lines += ["", "## Skipped", "", "| model_type | class | reason |", "| --- | --- | --- |"]
    lines += [f"| {t} | {c} | {r.replace('|', '/')} |" for t, (c, r) in skipped.items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", action="store_true", help="run the sweep (pytest) and record its results")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "architectures.md"))
    parser.add_argument("--log", help="results of an earlier sweep (MEMTRAIN_SWEEP_LOG) instead of --run")
    parser.add_argument("--note", help="where the results come from, when not from one --run")
    parser.add_argument("--users-path", metavar="TYPES",
                        help="comma list: the path users run (prepare, bf16, compile_blocks, Inductor, changing "
                             "lengths) with and without memory_target; prints a table, writes nothing")
    args = parser.parse_args()
    if args.users_path:
        print("| model_type | saved, no target | 0.5 target, offload allowed (worst diff per step) | "
              "0.92 target, recompute only (worst diff per step) |")
        print("| --- | --- | --- | --- |")
        for model_type in args.users_path.split(","):
            start = time.time()
            try:
                row = users_path(model_type)
            except Skip as e:
                row = f"skipped: {e} | | "
            print(f"| {model_type} | {row} |", flush=True)
            print(f"  ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
        return
    results, seconds, log = None, None, args.log
    if args.run:
        import subprocess

        log = log or os.path.join(os.path.dirname(args.out), "architectures.jsonl")
        if os.path.exists(log):
            os.remove(log)
        start = time.time()
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        os.path.join(os.path.dirname(__file__), "test_architectures.py")],
                       env={**os.environ, "MEMTRAIN_SWEEP": "all", "MEMTRAIN_SWEEP_LOG": log})
        seconds = time.time() - start
    if log:
        results = read_log(log)
    write_doc(args.out, results, seconds, args.note)


def read_log(path: str) -> dict[str, str]:
    """``arch -> "pass"`` or the failures, from the lines ``test_architectures`` appends."""
    import json

    results: dict[str, list[str]] = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            results.setdefault(rec["arch"], [])
            if rec["result"] != "pass":
                results[rec["arch"]].append(rec["result"])
    return {arch: "; ".join(fails) if fails else "pass" for arch, fails in results.items()}


if __name__ == "__main__":
    main()
