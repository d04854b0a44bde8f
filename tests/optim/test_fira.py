"""Fira against an independent fp64 transcription of the official update (xichen-fy/Fira fira_adamw.py)."""
from __future__ import annotations

import inspect
import io
import math

import pytest
import torch
from torch import nn

from memcompile.config import LLAMA_LINEARS
from memcompile.marks import mark_grad_approximation
from memcompile.optim import Fira, fira_param_groups

F64 = dict(dtype=torch.float64)
# Tests that leave the option out compare the default against the reference's transcription of it.
DEFAULT_TRANSFER = inspect.signature(Fira).parameters["moment_transfer"].default


def reference_fira(w0, grads, *, lr, rank, gap, alpha=0.25, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                   gamma=1.01, mode="code", residual=True, transfer=DEFAULT_TRANSFER):
    """Fira on one matrix, written from the formulas; returns the weights after each step and a log."""
    b1, b2 = betas
    w = w0.clone()
    m, n = w.shape
    r = min(rank, m, n)
    right = m >= n
    mom1 = mom2 = basis = prev = None
    weights, log = [], []
    for t, g in enumerate(grads):
        if t % gap == 0:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            new = vh[:r].T if right else u[:, :r]            # n x r  or  m x r: basis vectors are columns
            if mom1 is not None and transfer == "align":
                for j in range(r):
                    if new[:, j] @ basis[:, j] < 0:
                        new[:, j] = -new[:, j]
            if mom1 is not None and transfer == "rotate":
                c = basis.T @ new                            # c[i, j] = <old_i, new_j>
                # Coordinates along the rank dimension: columns of m x r moments, rows of r x n ones.
                old1, old2 = (mom1, mom2) if right else (mom1.T, mom2.T)
                new1, new2 = torch.zeros_like(old1), torch.zeros_like(old2)
                for j in range(r):
                    held = sum(c[i, j] ** 2 for i in range(r))
                    new1[:, j] = sum(c[i, j] * old1[:, i] for i in range(r))
                    new2[:, j] = sum(c[i, j] ** 2 * old2[:, i] for i in range(r)) + (1 - held) * old2.mean(1)
                mom1, mom2 = (new1, new2) if right else (new1.T, new2.T)
            basis = new
        lo = g @ basis if right else basis.T @ g
        back = (lambda x: x @ basis.T) if right else (lambda x: basis @ x)
        mom1 = (1 - b1) * lo if mom1 is None else b1 * mom1 + (1 - b1) * lo
        mom2 = (1 - b2) * lo * lo if mom2 is None else b2 * mom2 + (1 - b2) * lo * lo
        nrm = mom1 / (mom2.sqrt() + eps)
        k = t + 1
        step = lr * math.sqrt(1 - b2**k) / (1 - b1**k)
        entry = {"basis": basis, "limited": False}
        if not residual:
            upd = alpha * back(nrm)
        else:
            res = g - alpha * back(lo) if mode == "code" else g - back(lo)
            s = torch.empty_like(res)
            if right:   # one factor per row i of R (m x r)
                for i in range(m):
                    s[i] = res[i] * (nrm[i].norm() / (lo[i].norm() + 1e-8))
            else:       # one factor per column j of R (r x n)
                for j in range(n):
                    s[:, j] = res[:, j] * (nrm[:, j].norm() / (lo[:, j].norm() + 1e-8))
            if gamma is not None:
                if prev is not None:
                    ratio = s.norm() / (prev + 1e-8)
                    entry["ratio"] = float(ratio)
                    if ratio > gamma:
                        s = s * (gamma / ratio)
                        entry["limited"] = True
                prev = s.norm()
                entry["ref"] = float(prev)
            upd = alpha * back(nrm) + s if mode == "code" else alpha * (back(nrm) + s)
        w = w - step * upd
        w = w - lr * weight_decay * w
        weights.append(w.clone())
        log.append(entry)
    return weights, log


def run_fira(w0, grads, **group):
    p = nn.Parameter(w0.clone())
    opt = Fira([{"params": [p], **group}], lr=group.pop("lr"))
    out = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        out.append(p.detach().clone())
    return out, opt, p


def random_grads(shape, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen, **F64) for _ in range(steps)]


@pytest.mark.parametrize("shape", [(12, 7), (6, 10)], ids=["m>n-right", "m<n-left"])
@pytest.mark.parametrize("mode", ["code", "paper"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("transfer", ["official", "align", "rotate"])
def test_trajectory_matches_reference(shape, mode, weight_decay, transfer):
    # gap=2 refreshes the projector at t = 0, 2, 4 while the moments carry over.
    w0 = torch.randn(*shape, generator=torch.Generator().manual_seed(0), **F64)
    grads = random_grads(shape, 5, seed=1)
    kw = dict(lr=0.01, rank=3, alpha=0.25, weight_decay=weight_decay, gamma=1.01)
    expected, _ = reference_fira(w0, grads, gap=2, mode=mode, transfer=transfer, **kw)
    got, opt, p = run_fira(w0, grads, update_proj_gap=2, alpha_mode=mode, moment_transfer=transfer, **kw)
    for step, (e, g) in enumerate(zip(expected, got), start=1):
        torch.testing.assert_close(g, e, rtol=1e-11, atol=1e-13, msg=f"step {step}")
    assert opt.state[p]["step"] == 5


def test_alpha_modes_differ():
    w0 = torch.zeros(8, 5, **F64)
    grads = random_grads((8, 5), 1, seed=2)
    code, _, _ = run_fira(w0, grads, lr=0.01, rank=2, alpha_mode="code")
    paper, _, _ = run_fira(w0, grads, lr=0.01, rank=2, alpha_mode="paper")
    assert not torch.allclose(code[0], paper[0])


def _grads_with_growing_residual(shape, rank):
    """G1; G1 plus a large out-of-subspace part (S grows); G1 with its outside part cut to 30 % (S shrinks)."""
    gen = torch.Generator().manual_seed(3)
    g1 = torch.randn(*shape, generator=gen, **F64)
    _, _, vh = torch.linalg.svd(g1, full_matrices=False)
    q = vh[:rank].T
    noise = torch.randn(*shape, generator=gen, **F64)
    noise = noise - noise @ q @ q.T
    inside = g1 @ q @ q.T
    return [g1, g1 + 5 * noise, inside + 0.3 * (g1 - inside)]


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_limiter_first_step_sets_reference_second_limits(mode):
    shape, rank, gamma = (10, 6), 2, 1.01
    grads = _grads_with_growing_residual(shape, rank)
    w0 = torch.zeros(*shape, **F64)
    kw = dict(lr=0.01, rank=rank, gamma=gamma)
    expected, log = reference_fira(w0, grads, gap=100, mode=mode, **kw)
    assert "ratio" not in log[0] and not log[0]["limited"]
    assert log[1]["limited"] and log[1]["ratio"] > 2 * gamma     # the scenario really limits
    assert not log[2]["limited"] and log[2]["ratio"] < 1.0

    p = nn.Parameter(w0.clone())
    opt = Fira([{"params": [p], "update_proj_gap": 100, "alpha_mode": mode, **kw}], lr=kw["lr"])
    for i, g in enumerate(grads):
        p.grad = g.clone()
        opt.step()
        torch.testing.assert_close(p.detach(), expected[i], rtol=1e-11, atol=1e-13)
        torch.testing.assert_close(opt.state[p]["limiter_ref"].item(), log[i]["ref"], rtol=1e-12, atol=0)
        if i == 1:
            # Limited: the stored norm is gamma times the previous one.
            torch.testing.assert_close(opt.state[p]["limiter_ref"].item(), gamma * (log[0]["ref"] + 1e-8),
                                       rtol=1e-12, atol=0)


def test_limiter_disabled_with_gamma_none():
    shape, rank = (10, 6), 2
    grads = _grads_with_growing_residual(shape, rank)
    w0 = torch.zeros(*shape, **F64)
    expected, _ = reference_fira(w0, grads, lr=0.01, rank=rank, gap=100, gamma=None)
    limited, _ = reference_fira(w0, grads, lr=0.01, rank=rank, gap=100, gamma=1.01)
    got, opt, p = run_fira(w0, grads, lr=0.01, rank=rank, update_proj_gap=100, gamma=None)
    torch.testing.assert_close(got[-1], expected[-1], rtol=1e-11, atol=1e-13)
    assert not torch.allclose(got[1], limited[1])
    assert "limiter_ref" not in opt.state[p]


@pytest.mark.parametrize("shape", [(12, 7), (6, 10)])
def test_galore_mode_is_projection_only(shape):
    w0 = torch.randn(*shape, generator=torch.Generator().manual_seed(4), **F64)
    grads = random_grads(shape, 4, seed=5)
    expected, _ = reference_fira(w0, grads, lr=0.01, rank=3, gap=2, residual=False)
    got, opt, p = run_fira(w0, grads, lr=0.01, rank=3, update_proj_gap=2, residual=False)
    torch.testing.assert_close(got[-1], expected[-1], rtol=1e-11, atol=1e-13)
    # Every GaLore update lies in the row space (right) / column space (left) of the current basis.
    basis = opt.state[p]["projector"]
    delta = got[-1] - got[-2]
    in_space = delta @ basis.T @ basis if shape[0] >= shape[1] else basis @ basis.T @ delta
    torch.testing.assert_close(in_space, delta, rtol=1e-9, atol=1e-12)
    assert "limiter_ref" not in opt.state[p]


def test_projector_refreshes_every_gap_steps():
    shape, gap = (9, 5), 3
    grads = random_grads(shape, 7, seed=6)

    def right_basis(g):
        return torch.linalg.svd(g, full_matrices=False)[2][:2]

    p = nn.Parameter(torch.zeros(*shape, **F64))
    # "official" stores the SVD's basis as it comes ("align" may negate vectors of it).
    opt = Fira([{"params": [p], "rank": 2, "update_proj_gap": gap, "moment_transfer": "official"}], lr=0.01)
    source = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        basis = opt.state[p]["projector"]
        assert basis.shape == (2, 5)     # m >= n: Q = Vh[:r], r x n
        source.append(next(i for i, h in enumerate(grads) if torch.equal(basis, right_basis(h))))
    # t = 0, 3, 6 (counted before each step) take a fresh SVD of that step's gradient.
    assert source == [0, 0, 0, 3, 3, 3, 6]


def test_left_projection_uses_u():
    g = random_grads((4, 9), 1, seed=7)[0]
    _, opt, p = run_fira(torch.zeros(4, 9, **F64), [g], lr=0.01, rank=3)
    u = torch.linalg.svd(g, full_matrices=False)[0]
    assert torch.equal(opt.state[p]["projector"], u[:, :3])
    assert opt.state[p]["exp_avg"].shape == (3, 9)


def test_rank_is_validated_and_clamped():
    with pytest.raises(ValueError, match="rank"):
        Fira([{"params": [nn.Parameter(torch.zeros(4, 4))], "rank": 0}])
    with pytest.raises(ValueError, match="rank"):
        Fira([nn.Parameter(torch.zeros(4, 4))], rank=2.5)
    # rank > min(m, n): uses min(m, n) = 5 singular vectors.
    g = random_grads((8, 5), 1, seed=8)[0]
    _, opt, p = run_fira(torch.zeros(8, 5, **F64), [g], lr=0.01, rank=64)
    assert opt.state[p]["projector"].shape == (5, 5)
    assert opt.state[p]["exp_avg"].shape == (8, 5)


def test_non_matrix_param_in_fira_group_raises():
    with pytest.raises(ValueError, match=r"2-D.*\(7,\)"):
        Fira([{"params": [nn.Parameter(torch.zeros(7))], "rank": 4}])
    with pytest.raises(ValueError, match=r"'conv\.weight' of shape \(2, 3, 3, 3\)"):
        Fira([{"params": [("conv.weight", nn.Parameter(torch.zeros(2, 3, 3, 3)))], "rank": 4}])
    # The same parameter is fine in an AdamW group.
    Fira([{"params": [nn.Parameter(torch.zeros(7))]}])


def test_bad_options_raise():
    p = nn.Parameter(torch.zeros(4, 4))
    for bad in [dict(alpha_mode="both"), dict(update_proj_gap=0), dict(gamma=0.0), dict(proj_type="left"),
                dict(moment_transfer="reset")]:
        with pytest.raises(ValueError):
            Fira([{"params": [p], "rank": 2, **bad}])


def test_adamw_group_matches_torch_adamw_and_folds_bias_correction():
    # With eps = 0 the folded step size lr*sqrt(1-b2^t)/(1-b1^t) is exactly Adam's bias correction.
    w0 = torch.randn(5, 3, **F64)
    grads = random_grads((5, 3), 6, seed=9)
    ours = nn.Parameter(w0.clone())
    ref = nn.Parameter(w0.clone())
    opt = Fira([ours], lr=0.05, eps=0.0)
    ref_opt = torch.optim.AdamW([ref], lr=0.05, eps=0.0, weight_decay=0.0)
    for g in grads:
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-12, atol=1e-14)


def test_adamw_group_eps_and_weight_decay_as_official_code():
    w0 = torch.randn(5, 3, **F64)
    g = random_grads((5, 3), 1, seed=10)[0]
    lr, eps, wd = 0.05, 1e-2, 0.1
    p = nn.Parameter(w0.clone())
    opt = Fira([p], lr=lr, eps=eps, weight_decay=wd)
    p.grad = g.clone()
    opt.step()
    step = lr * math.sqrt(1 - 0.999) / (1 - 0.9)
    w1 = w0 - step * (0.1 * g) / ((0.001 * g * g).sqrt() + eps)   # eps not bias corrected
    w1 = w1 - lr * wd * w1                                        # decay after the update
    torch.testing.assert_close(p.detach(), w1, rtol=1e-13, atol=1e-15)


def test_correct_bias_false_uses_plain_lr():
    g = random_grads((6, 4), 1, seed=11)[0]
    got, _, _ = run_fira(torch.zeros(6, 4, **F64), [g], lr=0.01, rank=2, residual=False, correct_bias=False)
    basis = torch.linalg.svd(g, full_matrices=False)[2][:2]
    lo = g @ basis.T
    nrm = 0.1 * lo / ((0.001 * lo * lo).sqrt() + 1e-6)
    torch.testing.assert_close(got[0], -0.01 * 0.25 * nrm @ basis, rtol=1e-12, atol=1e-15)


def test_state_bytes_follow_low_rank_formula():
    right = nn.Parameter(torch.randn(12, 7))    # m >= n: moments m x r, projector r x n
    left = nn.Parameter(torch.randn(6, 10))     # m < n: moments r x n, projector m x r
    galore = nn.Parameter(torch.randn(9, 8))
    bias = nn.Parameter(torch.randn(5))
    r = 3
    opt = Fira([{"params": [right, left], "rank": r},
                {"params": [galore], "rank": r, "residual": False},
                {"params": [bias]}])
    for p in (right, left, galore, bias):
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state_bytes([right]) == 4 * (2 * 12 * r + r * 7 + 1)
    assert opt.state_bytes([left]) == 4 * (2 * r * 10 + 6 * r + 1)
    assert opt.state_bytes([galore]) == 4 * (2 * 9 * r + r * 8)
    assert opt.state_bytes([bias]) == 4 * 2 * 5
    assert opt.state_bytes() == sum(opt.state_bytes([p]) for p in (right, left, galore, bias))
    for p in (right, left, galore):
        assert opt.state_bytes([p]) < 4 * 2 * p.numel()   # AdamW: two fp32 moments of m x n


def test_bf16_params_keep_fp32_state_and_match_fp32_run():
    gen = torch.Generator().manual_seed(12)
    w0 = torch.randn(16, 8, generator=gen).to(torch.bfloat16)
    grads = [torch.randn(16, 8, generator=gen).to(torch.bfloat16) for _ in range(3)]
    p16 = nn.Parameter(w0.clone())
    p32 = nn.Parameter(w0.float())
    opt16 = Fira([{"params": [p16], "rank": 4, "update_proj_gap": 2}], lr=0.01)
    opt32 = Fira([{"params": [p32], "rank": 4, "update_proj_gap": 2}], lr=0.01)
    for g in grads:
        p16.grad, p32.grad = g.clone(), g.float()
        opt16.step()
        opt32.step()
        # bf16 grads are exact in fp32, so the fp32 update is the same; bf16 rounds it once per step.
        torch.testing.assert_close(p16.detach().float(), p32.detach(), rtol=0, atol=0.02)
        p32.data.copy_(p16.detach().float())
    for key in ("exp_avg", "exp_avg_sq", "projector", "limiter_ref"):
        assert opt16.state[p16][key].dtype == torch.float32, key


class TinyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.self_attn = nn.ModuleDict({"q_proj": nn.Linear(8, 8, bias=False), "o_proj": nn.Linear(8, 8)})
        self.mlp = nn.ModuleDict({"up_proj": nn.Linear(8, 12, bias=False), "down_proj": nn.Linear(12, 8)})
        self.norm = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 11, bias=False)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.self_attn["o_proj"](self.self_attn["q_proj"](h))
        h = h + self.mlp["down_proj"](torch.relu(self.mlp["up_proj"](h)))
        return self.lm_head(self.norm(h))


def _ids(params):
    return [id(p) for p in params]


def test_fira_param_groups_splits_like_divide_params():
    model = TinyBlock()
    groups = fira_param_groups(model, rank=4, alpha=0.5)
    adamw, fira = groups
    assert fira["rank"] == 4 and fira["alpha"] == 0.5 and adamw["rank"] is None
    assert _ids(fira["params"]) == _ids([model.self_attn["q_proj"].weight, model.self_attn["o_proj"].weight,
                                         model.mlp["up_proj"].weight, model.mlp["down_proj"].weight])
    assert _ids(adamw["params"]) == _ids([model.embed.weight, model.self_attn["o_proj"].bias,
                                          model.mlp["down_proj"].bias, model.norm.weight, model.norm.bias,
                                          model.lm_head.weight])
    only_mlp = fira_param_groups(model, rank=4, targets="mlp")[1]
    assert len(only_mlp["params"]) == 2


def test_fira_param_groups_on_hf_llama_targets_attention_and_mlp():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    adamw, fira = fira_param_groups(model, rank=4)
    names = {id(p): n for n, p in model.named_parameters()}
    fira_names = {names[id(p)].split(".")[-2] for p in fira["params"]}
    assert fira_names == set(LLAMA_LINEARS)
    assert len(fira["params"]) == 14
    assert sorted(names[id(p)] for p in adamw["params"]) == sorted(
        ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
        + [f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")])


def test_marked_gradient_approximation_is_refused():
    model = TinyBlock()
    opt = Fira(fira_param_groups(model, rank=4), lr=0.01)
    mark_grad_approximation(model.mlp["down_proj"].weight, "velora")
    model(torch.arange(6)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"(?s)exact weight gradient.*\(8, 12\).*'velora'.*activation"):
        opt.step()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))   # nothing half-updated


def test_marked_gradient_is_fine_outside_the_residual():
    model = TinyBlock()
    mark_grad_approximation(model.lm_head.weight, "compact")            # AdamW group
    galore = Fira(fira_param_groups(model, rank=4, residual=False), lr=0.01)
    mark_grad_approximation(model.mlp["down_proj"].weight, "compact")   # GaLore: projected gradient only
    model(torch.arange(6)).sum().backward()
    galore.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_is_bit_identical(dtype):
    torch.manual_seed(13)
    model = TinyBlock().to(dtype)
    batches = [torch.randint(0, 11, (6,)) for _ in range(7)]

    def train(m, opt, data):
        for ids in data:
            opt.zero_grad()
            m(ids).float().square().mean().backward()
            opt.step()

    def make(m):
        return Fira(fira_param_groups(m, rank=3, update_proj_gap=2), lr=0.01)

    opt = make(model)
    train(model, opt, batches[:3])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, batches[3:])          # step 5 (t = 4) refreshes the projector

    buf.seek(0)
    ckpt = torch.load(buf)
    resumed = TinyBlock().to(dtype)
    resumed.load_state_dict(ckpt["model"])
    opt2 = make(resumed)
    opt2.load_state_dict(ckpt["opt"])
    q = resumed.mlp["up_proj"].weight
    assert opt2.state[q]["exp_avg"].dtype == torch.float32
    assert opt2.state[q]["step"] == 3 and "limiter_ref" in opt2.state[q]
    train(resumed, opt2, batches[3:])
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    for p, p2 in zip(model.parameters(), resumed.parameters()):
        for key, value in opt.state[p].items():
            other = opt2.state[p2][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


@pytest.mark.parametrize("transfer", ["align", "rotate"])
def test_state_dict_round_trip_across_a_refresh_with_moment_transfer(transfer):
    w0 = torch.randn(12, 7, generator=torch.Generator().manual_seed(22), **F64)
    grads = random_grads((12, 7), 7, seed=23)
    kw = dict(lr=0.01, rank=3, update_proj_gap=2, moment_transfer=transfer)
    straight, _, _ = run_fira(w0, grads, **kw)
    first, opt, _ = run_fira(w0, grads[:3], **kw)
    p = nn.Parameter(first[-1].clone())
    resumed = Fira([{"params": [p], "rank": 3, "update_proj_gap": 2}], lr=0.01)   # option from the checkpoint
    resumed.load_state_dict(opt.state_dict())
    assert resumed.param_groups[0]["moment_transfer"] == transfer
    for g in grads[3:]:                     # t = 4 and 6 refresh
        p.grad = g.clone()
        resumed.step()
    assert torch.equal(p.detach(), straight[-1])


def test_checkpoint_without_moment_transfer_resumes_as_official():
    w0 = torch.randn(12, 7, generator=torch.Generator().manual_seed(24), **F64)
    grads = random_grads((12, 7), 5, seed=25)
    official, _, _ = run_fira(w0, grads, lr=0.01, rank=3, update_proj_gap=2, moment_transfer="official")
    first, opt, _ = run_fira(w0, grads[:1], lr=0.01, rank=3, update_proj_gap=2, moment_transfer="official")
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["moment_transfer"]        # as written before the option existed
    p = nn.Parameter(first[-1].clone())
    resumed = Fira([{"params": [p], "rank": 3, "update_proj_gap": 2, "moment_transfer": "rotate"}], lr=0.01)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["moment_transfer"] == "official"
    for g in grads[1:]:
        p.grad = g.clone()
        resumed.step()
    assert torch.equal(p.detach(), official[-1])


def test_closure_loss_is_returned():
    p = nn.Parameter(torch.ones(3, 2))
    opt = Fira([{"params": [p], "rank": 1}], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p * torch.arange(6.0).view(3, 2)).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == pytest.approx(15.0)


def _regress(optimizer_factory, steps=150):
    torch.manual_seed(0)
    x = torch.randn(128, 24)
    teacher = nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 12))
    with torch.no_grad():
        y = teacher(x)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 12))
    opt = optimizer_factory(model)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_fira_reduces_regression_loss():
    fira = _regress(lambda m: Fira(fira_param_groups(m, rank=4, targets=("0", "2"), update_proj_gap=50), lr=0.01))
    galore = _regress(lambda m: Fira(fira_param_groups(m, rank=4, targets=("0", "2"), update_proj_gap=50,
                                                       residual=False), lr=0.01))
    assert fira[-1] < 0.1 * fira[0]
    assert fira[-1] < galore[-1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_reference():
    shape = (24, 10)
    w0 = torch.randn(*shape, generator=torch.Generator().manual_seed(14), **F64)
    grads = random_grads(shape, 4, seed=15)
    expected, _ = reference_fira(w0, grads, lr=0.01, rank=4, gap=2)
    p = nn.Parameter(w0.float().cuda())
    opt = Fira([{"params": [p], "rank": 4, "update_proj_gap": 2}], lr=0.01)
    for g in grads:
        p.grad = g.float().cuda()
        opt.step()
    assert opt.state[p]["projector"].device.type == "cuda"
    torch.testing.assert_close(p.detach().cpu().double(), expected[-1], rtol=1e-4, atol=1e-5)


def _basis_with_other_signs(flips):
    """``orthogonal_basis`` as another SVD could return it: call ``k`` negates (and may reorder) the
    vectors as ``flips(k, r)`` says; ``None`` keeps the basis as it is."""
    from memcompile.optim.projection import orthogonal_basis, projects_right

    calls = []

    def basis(grad, rank):
        q = orthogonal_basis(grad, rank)
        right = projects_right(grad.shape)
        change = flips(len(calls), q.shape[0] if right else q.shape[1])
        calls.append(change)
        if change is None:
            return q
        order, signs = change
        return (q[order] * signs[:, None]) if right else (q[:, order] * signs)

    return basis, calls


def _grads_with_fixed_vectors(shape, steps, seed):
    """Gradients whose singular vectors on the projected side never change (the other side does):
    every refresh finds the same basis up to signs, however LAPACK picks them."""
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    k = min(m, n)
    fixed = torch.linalg.qr(torch.randn(k, k, generator=gen, **F64))[0]          # k x k orthogonal
    grads = []
    for _ in range(steps):
        moving = torch.linalg.qr(torch.randn(max(m, n), k, generator=gen, **F64))[0]
        # Well separated singular values, same order every step.
        s = torch.tensor([8.0, 5.0, 3.0] + [0.5 / (i + 1) for i in range(k - 3)], **F64)
        s = s * (1 + 0.05 * torch.rand(k, generator=gen, **F64))
        grads.append(moving @ torch.diag(s) @ fixed.T if m >= n else fixed @ torch.diag(s) @ moving.T)
    return grads


@pytest.mark.parametrize("shape", [(12, 7), (7, 12)], ids=["right", "left"])
@pytest.mark.parametrize("residual", [True, False], ids=["fira", "galore"])
@pytest.mark.parametrize("transfer,change", [
    ("official", "signs"), ("align", "signs"), ("rotate", "signs"), ("rotate", "signs+swap")])
def test_refresh_to_the_same_vectors_up_to_sign_is_no_refresh(monkeypatch, shape, residual, transfer, change):
    grads = _grads_with_fixed_vectors(shape, 8, seed=16)
    w0 = torch.randn(*shape, generator=torch.Generator().manual_seed(17), **F64)
    kw = dict(lr=0.01, rank=3, residual=residual, moment_transfer=transfer)
    unrefreshed, _, _ = run_fira(w0, grads, update_proj_gap=100, **kw)

    # Refreshes at t = 3 and 6 return the vectors with other signs (and, for "swap", the first two in
    # the other order, as near-equal singular values may come out).
    def flips(k, r):
        if k == 0:
            return None
        signs = torch.tensor([-1.0, 1.0, -1.0] if k == 1 else [1.0, -1.0, -1.0], **F64)
        order = torch.tensor([1, 0, 2] if change == "signs+swap" else [0, 1, 2])
        return order, signs

    basis, calls = _basis_with_other_signs(flips)
    monkeypatch.setattr("memcompile.optim.fira.orthogonal_basis", basis)
    refreshed, opt, p = run_fira(w0, grads, update_proj_gap=3, **kw)
    assert len(calls) == 3

    if transfer == "official":
        # The moments meet flipped vectors: the momentum is applied with the wrong sign.
        assert (refreshed[-1] - unrefreshed[-1]).norm() > 1e-3 * (unrefreshed[-1] - w0).norm()
        return
    for step, (a, b) in enumerate(zip(refreshed, unrefreshed), start=1):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=f"step {step}")


def _mlp_run(x, y, transfer, basis=None, monkeypatch=None, steps=24):
    """A 3-layer MLP regressed on (x, y) with Fira on every weight; the weights after training."""
    if basis is not None:
        monkeypatch.setattr("memcompile.optim.fira.orthogonal_basis", basis)
    torch.manual_seed(18)
    model = nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 12)).double()
    opt = Fira(fira_param_groups(model, rank=4, targets=("0", "2", "4"), update_proj_gap=5,
                                 moment_transfer=transfer), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
    if basis is not None:
        monkeypatch.undo()
    return torch.cat([q.detach().flatten() for q in model.parameters()])


@pytest.mark.parametrize("transfer", ["official", "align", "rotate"])
def test_round_off_and_svd_signs_do_not_steer_the_run(monkeypatch, transfer):
    # Two runs whose data differ by about one ulp, the second with an SVD that picks its own signs at
    # random (as another LAPACK, GPU or batch order may): 5 refreshes in 24 steps, 3 matrices each.
    gen = torch.Generator().manual_seed(19)
    x = torch.randn(64, 24, generator=gen, **F64)
    y = torch.randn(64, 12, generator=gen, **F64)
    x_other = x * (1 + 1e-15 * torch.randn(x.shape, generator=gen, **F64))
    w0 = _mlp_run(x, y, transfer, steps=0)
    first = _mlp_run(x, y, transfer)

    signs_gen = torch.Generator().manual_seed(20)

    def random_signs(k, r):
        return torch.arange(r), torch.where(torch.rand(r, generator=signs_gen) < 0.5, -1.0, 1.0).double()

    basis, calls = _basis_with_other_signs(random_signs)
    second = _mlp_run(x_other, y, transfer, basis, monkeypatch)
    assert len(calls) == 3 * 5 and any((signs < 0).any() for _, signs in calls[3:])
    drift = (second - first).norm() / (first - w0).norm()
    if transfer == "official":
        assert drift > 1e-4      # the signs, not the data, decide where the run goes
    else:
        assert drift < 1e-10


@pytest.mark.parametrize("transfer", ["align", "rotate"])
def test_moment_transfer_keeps_the_state_small(transfer):
    w0 = torch.zeros(12, 7, **F64)
    grads = random_grads((12, 7), 7, seed=21)
    _, official, p = run_fira(w0, grads, lr=0.01, rank=3, update_proj_gap=2)
    _, other, q = run_fira(w0, grads, lr=0.01, rank=3, update_proj_gap=2, moment_transfer=transfer)
    shapes = {k: (v.shape, v.dtype) if isinstance(v, torch.Tensor) else v for k, v in official.state[p].items()}
    assert {k: (v.shape, v.dtype) if isinstance(v, torch.Tensor) else v for k, v in other.state[q].items()} == shapes
    assert other.state_bytes() == official.state_bytes() == 8 * (2 * 12 * 3 + 3 * 7 + 1)   # fp64: moments, projector, limiter
