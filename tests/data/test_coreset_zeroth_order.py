import pytest
import torch

from memcompile.data import (
    DirectionSampler,
    ModelSplit,
    causal_lm_labels,
    default_block_name,
    exact_gradients,
    zeroth_order_gradients,
)

LORA_BLOCK = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"


def model_inputs(pool):
    return {k: pool[k] for k in ("input_ids", "attention_mask")}


def test_default_block_is_last_v_proj_lora_b(make_llama):
    assert default_block_name(make_llama(lora=True)) == LORA_BLOCK
    with pytest.raises(ValueError, match="param_name"):
        default_block_name(make_llama())


@pytest.mark.parametrize(
    "lora, name, start",
    [
        (True, LORA_BLOCK, 1),
        (False, "model.layers.1.self_attn.v_proj.weight", 1),
        (False, "model.layers.0.mlp.down_proj.weight", 0),  # two suffix layers
        (False, "lm_head.weight", 1),  # outside the layers: cut before the last one
    ],
)
def test_split_reproduces_logits_and_exact_gradients(make_llama, make_pool, reference_gradients, lora, name, start):
    model = make_llama(lora=lora).eval()
    pool = make_pool([0, 0, 1, 1, 2])
    split = ModelSplit(model, name)
    assert split.start == start
    with torch.no_grad():
        logits = split.run_suffix(split.run_prefix(model_inputs(pool)))
        torch.testing.assert_close(logits, model(**model_inputs(pool)).logits, rtol=0, atol=0)
    grads = exact_gradients(split, model_inputs(pool), causal_lm_labels(pool), chunk_size=2)
    # Llama's RMSNorm and rotary embedding compute in fp32 even in an fp64 model: fp32-level agreement.
    torch.testing.assert_close(grads, reference_gradients(model, split.param, pool), rtol=1e-5, atol=1e-7)


def test_split_rejects_prefix_parameters(make_llama):
    with pytest.raises(ValueError, match="not in the decoder layers"):
        ModelSplit(make_llama(), "model.embed_tokens.weight")
    with pytest.raises(KeyError):
        ModelSplit(make_llama(), "model.layers.9.nothing")


@pytest.mark.parametrize("lora, name", [(True, LORA_BLOCK), (False, "model.layers.0.mlp.down_proj.weight")])
def test_zeroth_order_converges_to_gradient_projection(make_llama, make_pool, reference_gradients, lora, name):
    model = make_llama(lora=lora).eval()
    pool = make_pool([0, 1, 2, 3])
    split = ModelSplit(model, name)
    labels = causal_lm_labels(pool)
    true = reference_gradients(model, split.param, pool)
    z = torch.randn(split.param.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    projection = (true @ z.reshape(-1))[:, None] * z.reshape(1, -1)  # (z . g_i) z
    errors = []
    for eps in (1e-1, 1e-2, 1e-3):
        est = zeroth_order_gradients(split, model_inputs(pool), labels, z, eps=eps)
        errors.append(((est - projection).norm() / projection.norm()).item())
    # Central differences: error O(eps^2), so at least 10x smaller per decade of eps.
    assert errors[1] < errors[0] / 10 and errors[2] < errors[1] / 10, errors
    assert errors[2] < 1e-3, errors


def test_zeroth_order_restores_block_bit_exactly(make_llama, make_pool):
    model = make_llama(dtype=torch.float32, lora=True).eval()
    pool = make_pool([0, 1, 2])
    split = ModelSplit(model, LORA_BLOCK)
    before = split.param.detach().clone()
    z = torch.randn_like(before)
    zeroth_order_gradients(split, model_inputs(pool), causal_lm_labels(pool), z, eps=1e-3)
    assert torch.equal(split.param.detach(), before)
    assert split.param.requires_grad


def test_directions_fresh_fixed_and_reproducible():
    like = torch.zeros(3, 4)
    fresh = DirectionSampler(seed=7)
    a, b = fresh(like), fresh(like)
    assert not torch.equal(a, b)
    again = DirectionSampler(seed=7)
    assert torch.equal(again(like), a) and torch.equal(again(like), b)
    fixed = DirectionSampler(seed=7, fixed=True)
    first = fixed(like)
    assert torch.equal(first, a) and torch.equal(fixed(like), first)
    resumed = DirectionSampler(seed=0)
    resumed.load_state_dict(fresh.state_dict())
    assert torch.equal(resumed(like), fresh(like))
