"""``estimate`` mode: what each setup would hold on a CUDA GPU at the anchors' shape, worked out on any
machine, without a GPU and without allocating it.

The model lives on the meta device, where every op computes shapes and dtypes and allocates nothing.
One step is run to compile, then a second one is counted:

- saved activations: unique storages packed for backward (``measure.saved_bytes``, the counter of
  ``train`` mode);
- peak: the resident state (weights, buffers, AdamW's two moments) plus the most bytes the step's ops
  have live at once (``measure.LiveBytes``), gradients included.

What the meta device cannot know is modelled on CUDA and said here:
- attention runs as CUDA's fused SDPA kernel would (``aten._scaled_dot_product_flash_attention``:
  it saves q, k, v, the output and the log-sum-exp; SDPA on meta would take the math path and save the
  whole attention matrix). Eager keeps k and v at their KV heads (``enable_gqa``); compiled graphs
  repeat them to the query heads first, as the anchors' profile of Inductor shows;
- compiled setups run their graphs in Python (``aot_eager``; ``torch.compile`` setups get Inductor's
  decompositions and partitioner), so the saved tensors are Inductor's but temporaries are counted
  unfused, which overstates Inductor's temporaries (yet under an activation budget the estimate has
  come out below the anchors' measurement: it is not a bound);
- Hugging Face's causal-LM loss is computed by ``causal_lm_loss``: the same aten ops, in a form whose
  backward survives a compile on meta (tracing ``F.cross_entropy`` there loses it); a setup with
  memtrain's fused loss keeps Hugging Face's, which the fused loss replaces. A step that would still
  lose part of its backward there (another op without a formula on meta) fails, naming the op;
- bitsandbytes setups cannot be built on meta and are skipped (their measured anchors are listed);
  ``memcompile.prepare``'s NF4 model: its first decoder layer is quantised on the CPU from constant
  weights and moved to meta, and every other layer gets copies of those adapted linears (same shapes,
  same dtypes; quantising every layer of a 7B model took minutes and as much host memory as the model);
- no allocator: block rounding, fragmentation and library workspaces are not counted.

The table puts the anchors' measured H100 figures beside the estimates where the setup has them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings
from typing import Callable

import torch

from memcompile.bench import anchors, measure, models
from memcompile.bench.builders import LORA, Options, Unavailable, _peft_lora, _prepare, compile_forward, memtrain_extra
from memcompile.bench.runner import run_setups
from memcompile.bench.setups import SETUPS, TRAIN_DEFAULT, select
from memcompile.bench.table import NA, fmt_num, render, status_notes, write_jsonl

ATTENTION = "memcompile_cuda_fused_sdpa"
DEFAULTS = dict(model="tinyllama", seq=2048, batch=4)
GOAL_GIB = 4.5  # the project's memory goal at the anchors' TinyLlama setup (docs/estimate.md)
GIB = 2**30


def cuda_fused_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Causal attention through the op CUDA's SDPA dispatches to for training (see the module doc)."""
    if attention_mask is not None:
        raise ValueError("the estimate models unpadded causal batches; got an attention mask")
    if torch.compiler.is_compiling() and key.shape[1] != query.shape[1]:
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    out = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout, True, False,
                                                             scale=scaling)[0]
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    return None  # the kernel applies the causal mask itself


def causal_lm_loss(logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = -100,
                   shift_labels=None, **kwargs) -> torch.Tensor:
    """Hugging Face's causal-LM loss (``ForCausalLMLoss``) through the two aten ops ``F.cross_entropy``
    reaches on every device, ``_log_softmax`` and ``nll_loss_forward``: the same forward and backward
    ops, so the same saved tensors and temporaries. On meta, tracing ``F.cross_entropy`` for a compile
    loses the loss's backward (torch 2.13: a meta kernel registered for ``aten::nll_loss`` takes the
    place of its decomposition under the Python dispatcher, so autograd sees an op without a formula
    and passes no gradient; the graph then trains from a zero gradient of the logits)."""
    logits = logits.float()
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:].contiguous()
    logits, shift_labels = logits.view(-1, vocab_size), shift_labels.view(-1).to(logits.device)
    reduction = 1 if num_items_in_batch is None else 2  # at::Reduction::Mean, Sum
    loss = torch.ops.aten.nll_loss_forward(logits.log_softmax(-1), shift_labels, None, reduction, ignore_index)[0]
    return loss if num_items_in_batch is None else loss / num_items_in_batch


def register_attention() -> None:
    """Make ``ATTENTION`` an ``attn_implementation`` (Hugging Face's registries for custom attention)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION, cuda_fused_attention)
    AttentionMaskInterface.register(ATTENTION, _no_mask)


def tensor_bytes(tensors) -> int:
    """Bytes of the unique storages of ``tensors``."""
    seen: dict[tuple, int] = {}
    for t in tensors:
        seen.setdefault(measure.storage_key(t), t.untyped_storage().nbytes())
    return sum(seen.values())


def prepare_on_meta(model, options: dict) -> None:
    """``memcompile.prepare``'s NF4 + DyLoRA model of ``model`` (on meta), in place, at DyLoRA's largest rank.

    prepare quantises real values, so the first decoder layer is allocated on the CPU with constant
    weights, prepared and moved back to meta; every other layer gets deep copies of its adapted
    linears, which is what preparing it would give (the same constant weights, the same shapes).
    """
    import copy

    import memcompile

    layers = model.get_decoder().layers
    first = layers[0].to_empty(device="cpu")
    with torch.no_grad():
        for t in (*first.parameters(), *first.buffers()):
            t.fill_(0.01)  # any finite non-zero value: quantisers divide by block maxima
    _prepare(first, options)
    first.to("meta")
    adapted = [name for name, m in first.named_modules() if isinstance(m, memcompile.LoRALinear)]
    for layer in list(layers)[1:]:
        for name in adapted:
            parent, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, attr, copy.deepcopy(first.get_submodule(name)))
    for name, p in model.named_parameters():  # prepare freezes all but the adapters of the whole model
        p.requires_grad_(name.endswith((".lora_A", ".lora_B")))
    memcompile.set_rank(model, LORA["r"])  # DyLoRA's largest rank: the most it ever holds


def build_meta(setup, opts: Options, dtype: torch.dtype):
    """``setup``'s model on the meta device and its forward; raises ``Unavailable`` where that cannot be."""
    if setup.quant:
        raise Unavailable("bitsandbytes 4-bit weights cannot be built on the meta device")
    if setup.optimizer != "adamw" or setup.selection != "all":
        raise Unavailable("the estimate covers AdamW fine-tuning on the whole batch")
    register_attention()
    model = models.meta_model(opts.model, dtype)
    fused = {**setup.memtrain, **(opts.memtrain or {})}.get("fused_cross_entropy", False)
    if not fused:  # the fused loss replaces F.cross_entropy with memtrain's op, which traces on meta
        model.loss_function = causal_lm_loss
    if setup.adapter == "prepare":
        prepare_on_meta(model, setup.memtrain)
    model.set_attn_implementation(ATTENTION)
    if setup.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if setup.adapter != "none":
            model.enable_input_require_grads()
    if setup.adapter == "peft":
        model = _peft_lora(model)
    # Inductor's graphs (its decompositions, joint passes and partition), run in Python: the saved
    # tensors and the memory plan are the ones a GPU's compile gets.
    forward, compiler, context = compile_forward(setup, model, "aot_eager_decomp", opts.budget, opts.memtrain)
    return model, forward, compiler, context


_NO_FORMULA = "an autograd kernel was not registered"


@contextlib.contextmanager
def whole_backward():
    """Make a step that would lose part of its backward on meta fail, naming the op: autograd passes no
    gradient through an op it has no formula for there (the one warning it gives, an error here), and
    the count would leave out everything before it in the backward (see ``causal_lm_loss``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=f".*{_NO_FORMULA}")
        try:
            yield
        except Exception as e:  # the warning itself, or the compile failure wrapping it
            if _NO_FORMULA not in str(e):
                raise
            op = re.search(r"(\w+::\w+(?:\.\w+)?): " + _NO_FORMULA, str(e))
            raise RuntimeError(f"on the meta device autograd has no formula for {op[1] if op else 'an op'} in this "
                               "step, so the count would leave out part of its backward") from e


def count_step(setup, model, forward, context, batch: int, seq: int) -> dict:
    """One step of ``batch`` x ``seq`` tokens on meta (after a compiling one for compiled setups), counted:
    saved activations, resident bytes and the step's peak. The model can be counted again at another
    length (``max-context`` does), after ``torch.compiler.reset()`` for compiled setups."""
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    # An all-ones mask: without one, Hugging Face checks the positions for packed sequences with a
    # host sync, which meta tensors cannot answer. The attention ignores it (``_no_mask``).
    mask = torch.ones_like(ids)
    params = [p for p in model.parameters() if p.requires_grad]
    held = [*model.parameters(), *model.buffers(), ids, mask]  # the caller's: not the step's memory

    def step():
        return forward(input_ids=ids, attention_mask=mask, labels=ids)

    with context, whole_backward():
        if setup.compiled:
            step().loss.backward()
            model.zero_grad(set_to_none=True)
        weights = tensor_bytes([*model.parameters(), *model.buffers()])
        # AdamW's exp_avg and exp_avg_sq, each like its parameter.
        optimizer = 2 * sum(p.numel() * p.element_size() for p in params)
        # Host tensors (offloaded by a memory plan) are not the GPU's memory.
        with measure.LiveBytes(existing=held, describe=True, device="meta") as live:
            saved = measure.saved_bytes(step, held, measure.checkpointed_layers(model),
                                        then=lambda out: out.loss.backward(), device="meta")
        model.zero_grad(set_to_none=True)
    resident = weights + optimizer
    plan = _plan_figures() if setup.compile == "memtrain" else {}
    return dict(saved_bytes=saved, weights_bytes=weights, optimizer_bytes=optimizer, step_peak_bytes=live.peak,
                peak_gib=round((resident + live.peak) / GIB, 3), saved_gib=round(saved / GIB, 3),
                trainable=sum(p.numel() for p in params), **plan,
                at_peak=[dict(op=op, shape=list(shape), dtype=dt, count=c, bytes=b)
                         for op, shape, dt, c, b in live.peak_breakdown()])


def _plan_figures() -> dict:
    """The step's estimated cost of what it recomputes and copies instead of keeping, and the memory
    plan's decisions, from memtrain's report."""
    import memcompile

    step = memcompile.report()
    if step is None or not step.graphs:
        return {}
    out = {"overhead_ms": round(step.overhead_seconds * 1e3, 2)}
    plan = step.passes.get("memory_plan")
    if plan is not None:
        out["plan"] = {k: plan.counters[k] for k in ("recompute", "offload", "fp8", "keep")}
    return out


def run_setup(job: dict, progress: Callable[[str], None]) -> dict:
    """In the setup's own process: a compiling step, then a counted one."""
    setup = SETUPS[job["setup"]]
    opts = Options(**job["options"])
    dtype = torch.bfloat16
    progress("building the model on the meta device")
    model, forward, compiler, context = build_meta(setup, opts, dtype)
    progress("compiling and counting" if setup.compiled else "counting")
    counted = count_step(setup, model, forward, context, opts.batch, opts.seq)
    return dict(device="meta", dtype="bfloat16", compiler=compiler, model=opts.model, seq=opts.seq,
                batch=opts.batch, **counted)


def add_anchors(rows: list[dict], model: str, seq: int, batch: int) -> None:
    """The anchors' measured peak and saved GiB beside each estimate, where the setup has one."""
    for r in rows:
        a = anchors.lookup(r["setup"], model, seq, batch)
        r["anchor_peak_gib"] = a.get("peak_gib") if a else None
        r["anchor_saved_gib"] = a.get("saved_gib") if a else None
        r["anchor_tok_per_s"] = a.get("tok_per_s") if a else None


def _gib(key: str):
    return lambda r: fmt_num(r.get(key)) if r.get(key) is not None else NA


def _error(est: str, ref: str):
    def fmt(r):
        if r.get(est) is None or not r.get(ref):
            return NA
        return f"{100 * (r[est] / r[ref] - 1):+.0f} %"
    return fmt


def peak_lines(rows: list[dict], top: int = 3) -> list[str]:
    lines = []
    for r in rows:
        if r["status"] != "ok":
            continue
        resident = (r["weights_bytes"] + r["optimizer_bytes"]) / GIB
        parts = [f"{g['count']} x {g['op'].removeprefix('aten::')} {tuple(g['shape'])} {g['dtype']} "
                 f"{g['bytes'] / GIB:.2f} GiB" for g in r["at_peak"][:top]]
        lines.append(f"  {r['setup']}: {r['peak_gib']:.2f} GiB = {resident:.2f} resident + "
                     f"{r['step_peak_bytes'] / GIB:.2f} step; " + "; ".join(parts))
    return lines


def plot(rows: list[dict], path: str, title: str, goal_gib: float | None = None) -> None:
    """Bars of each setup's estimated peak (saved activations darker), the anchors' measured peak as a
    mark where there is one, and ``goal_gib`` as a line."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(done) + 2), layout="constrained")
    y = range(len(done))[::-1]
    ax.barh(y, [r["peak_gib"] for r in done], color="#9ecae1", label="estimated peak")
    ax.barh(y, [r["saved_gib"] for r in done], color="#3182bd", height=0.45, label="of which saved activations")
    measured = [(yi, r["anchor_peak_gib"]) for yi, r in zip(y, done) if r.get("anchor_peak_gib")]
    if measured:
        ax.scatter([m for _, m in measured], [yi for yi, _ in measured], marker="|", s=400, color="black",
                   zorder=3, label="measured peak (H100 anchors)")
    if goal_gib is not None:
        ax.axvline(goal_gib, color="#d62728", linestyle="--", linewidth=1, label=f"goal {goal_gib:g} GiB")
    pad = 0.01 * max([r["peak_gib"] for r in done] + [goal_gib or 0])
    for yi, r in zip(y, done):
        ax.text(r["peak_gib"] + pad, yi, f"{r['peak_gib']:.2f}", va="center", fontsize=8)
    ax.set_yticks(list(y), [r["setup"] for r in done], fontsize=8)
    ax.set_xlabel("GiB")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def columns(status) -> list:
    ok = lambda fn: lambda r: fn(r) if r["status"] == "ok" else ""  # noqa: E731
    return [("setup", lambda r: r["setup"]), ("status", status), ("compiler", ok(lambda r: r["compiler"])),
            ("est. peak GiB", _gib("peak_gib")), ("est. saved GiB", _gib("saved_gib")),
            ("H100 peak GiB", _gib("anchor_peak_gib")), ("H100 saved GiB", _gib("anchor_saved_gib")),
            ("peak vs H100", _error("peak_gib", "anchor_peak_gib")),
            ("saved vs H100", _error("saved_gib", "anchor_saved_gib")),
            ("overhead ms", ok(lambda r: fmt_num(r["overhead_ms"]) if r.get("overhead_ms") is not None else NA))]


def main(args) -> list[dict]:
    for key, value in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if getattr(args, "sweep", None):
        return sweep(args)
    setups = select(args.setups, "train", TRAIN_DEFAULT)
    opts = _options(args, memtrain_extra(args))
    print(f"estimate: model={args.model} seq={args.seq} batch={args.batch} dtype=bfloat16, on the meta device "
          "(nothing allocated)" + (f"; memtrain setups: memory_target {args.memory_target}"
                                   if getattr(args, "memory_target", None) else ""), flush=True)
    rows = _run(setups, opts, args.timeout)
    add_anchors(rows, args.model, args.seq, args.batch)
    status, notes = status_notes(rows)
    print()
    print(render(rows, columns(status)))
    print("\n".join(["", *notes] if notes else []))
    print("\n".join(["", "where each peak is (resident = weights, buffers, AdamW moments; then the largest groups "
                      "of tensors live at the peak, by the op that made them):", *peak_lines(rows)]))
    print("\nest.: computed on the meta device as CUDA would run the step (python -m memcompile.bench estimate "
          "--help); H100: measured, " + anchors.SOURCE + "; overhead: estimated time of what the backward "
          "recomputes and copies (memtrain setups, the planner's cost model)")
    if args.json:
        write_jsonl(args.json, rows)
        print(f"wrote {args.json}")
    if args.plot:
        goal = GOAL_GIB if (args.model, args.seq, args.batch) == tuple(DEFAULTS.values()) else None
        plot(rows, args.plot, f"estimated peak memory per step: {args.model}, {args.batch} x {args.seq} tokens, "
                              "bf16, on the meta device", goal)
        print(f"wrote {args.plot}")
    return rows


def _options(args, memtrain: dict | None, budget: float | None = None) -> Options:
    return Options(model=args.model, seq=args.seq, batch=args.batch, compiler="aot_eager",
                   budget=args.budget if budget is None else budget, seed=args.seed, threads=args.threads or 1,
                   memtrain=memtrain)


def _run(setups, opts: Options, timeout) -> list[dict]:
    return run_setups(setups, lambda setup: {"mode": "estimate", "setup": setup.name,
                                             "options": dataclasses.asdict(opts)}, timeout=timeout)


SWEEP_SETUP = "memtrain_all"


def sweep(args) -> list[dict]:
    """The planner's curve: for each target, the predicted peak and step-time overhead; beside it, the
    same for memtrain's ``recompute_budget`` and the peak under torch's ``activation_memory_budget``
    (a plain ``torch.compile``, whose overhead the planner's model does not see)."""
    targets = [float(t) for t in args.sweep.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")]
    name = args.setups or SWEEP_SETUP
    setups = select(name, "train", TRAIN_DEFAULT)
    budget_setup = SETUPS[f"{name}_budget"] if f"{name}_budget" in SETUPS else None
    print(f"estimate --sweep: {name} at memory targets {targets} GiB; recompute_budget and "
          f"activation_memory_budget at {fractions}; model={args.model} seq={args.seq} batch={args.batch}, on the "
          "meta device", flush=True)
    rows = []
    for t in targets:
        extra = {"memory_target": f"{t}GiB", "plan": {"fp8": bool(args.fp8)}}
        for r in _run(setups, _options(args, extra), args.timeout):
            rows.append({**r, "knob": "memory_target", "value": t})
    for f in fractions:
        if budget_setup is not None:
            extra = {"recompute_budget": f}
            for r in _run([budget_setup], _options(args, extra), args.timeout):
                rows.append({**r, "knob": "recompute_budget", "value": f})
        for r in _run([SETUPS["lora_budget"]], _options(args, None, budget=f), args.timeout):
            rows.append({**r, "knob": "activation_memory_budget", "value": f})
    print()
    print(render(rows, [("knob", lambda r: r["knob"]), ("value", lambda r: f"{r['value']:g}"),
                        ("setup", lambda r: r["setup"]), ("status", lambda r: r["status"][:60]),
                        ("est. peak GiB", _gib("peak_gib")), ("est. saved GiB", _gib("saved_gib")),
                        ("overhead ms", lambda r: fmt_num(r.get("overhead_ms")) if r.get("overhead_ms") is not None
                         else NA),
                        ("plan", lambda r: " ".join(f"{k} {v}" for k, v in r.get("plan", {}).items()) or NA)]))
    print("\noverhead: estimated time a step spends rerunning forward ops in the backward and copying to and from "
          "host memory, at the cost model's rates (memtrain option plan: an H100's); torch's "
          "activation_memory_budget compiles without memtrain, so its overhead is not estimated")
    if args.json:
        write_jsonl(args.json, rows)
        print(f"wrote {args.json}")
    if args.plot:
        plot_sweep(rows, args.plot, f"{args.model}, {args.batch} x {args.seq} tokens, bf16, meta-device estimate")
        print(f"wrote {args.plot}")
    return rows


def plot_sweep(rows: list[dict], path: str, title: str) -> None:
    """Predicted peak against the knob's value (left) and step-time overhead against peak (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    styles = {"memory_target": ("#3182bd", "o"), "recompute_budget": ("#e6550d", "s"),
              "activation_memory_budget": ("#756bb1", "^")}
    for knob, (color, marker) in styles.items():
        done = sorted((r for r in rows if r["knob"] == knob and r["status"] == "ok"), key=lambda r: r["value"])
        if not done:
            continue
        axis = left
        label = {"memory_target": "memtrain memory_target (GiB, bottom axis)",
                 "recompute_budget": "memtrain recompute_budget (fraction x 10)",
                 "activation_memory_budget": "torch activation_memory_budget (fraction x 10)"}[knob]
        scale = 1 if knob == "memory_target" else 10
        axis.plot([r["value"] * scale for r in done], [r["peak_gib"] for r in done], color=color, marker=marker,
                  label=label)
        with_cost = [r for r in done if r.get("overhead_ms") is not None]
        if with_cost:
            right.plot([r["peak_gib"] for r in with_cost], [r["overhead_ms"] for r in with_cost], color=color,
                       marker=marker, label=knob)
    left.axhline(GOAL_GIB, color="#d62728", linestyle="--", linewidth=1, label=f"goal {GOAL_GIB:g} GiB")
    left.set_xlabel("memory_target GiB (budgets: fraction x 10)")
    left.set_ylabel("estimated peak GiB")
    left.set_title("peak against the knob: " + title, fontsize=9)
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    right.axvline(GOAL_GIB, color="#d62728", linestyle="--", linewidth=1)
    right.set_xlabel("estimated peak GiB")
    right.set_ylabel("estimated overhead ms per step")
    right.set_title("what each peak costs (lower left is better)", fontsize=9)
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    fig.savefig(path, dpi=120)
    plt.close(fig)
