import torch
from torch.utils.data import DataLoader

from memcompile.data import CoresetConfig, CoresetSelector, causal_lm_labels, coreset_batches, weighted_causal_lm_loss

# Pool of 8: sizes 5, 2, 1 (mean 8/3): sources 1 and 2 are small. The Trainer shuffles rows across
# pools, so its test derives the small sources from each pool it saw.
POOL_SOURCES = [0, 0, 1, 0, 2, 0, 1, 0]


def _examples(n_pools, seq=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_pools):
        for s in POOL_SOURCES:
            ids = torch.randint(0, 64, (seq,), generator=g)
            mask = torch.ones(seq, dtype=torch.long)
            rows.append({"input_ids": ids, "attention_mask": mask, "labels": ids.clone(), "sources": s})
    return rows


def test_trainer_trains_on_the_coreset(make_llama, tmp_path):
    from transformers import TrainingArguments

    from memcompile.data import CoresetTrainer

    pools, seen = [], []

    class Spy(CoresetTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            pools.append(inputs["sources"].tolist())
            return super().training_step(model, inputs, num_items_in_batch)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            seen.append((inputs["input_ids"].shape[0], inputs["sources"].tolist(), inputs["coreset_weights"].tolist()))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    model = make_llama(dtype=torch.float32, lora=True)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        save_strategy="no",
        remove_unused_columns=False,
        dataloader_drop_last=True,
    )
    trainer = Spy(model=model, args=args, train_dataset=_examples(2), coreset=CoresetConfig(ratio=0.5))
    trainer.train()

    # The loss saw the coreset (4 rows), not the pool of 8 the dataloader produced.
    assert [len(p) for p in pools] == [8, 8]
    assert [size for size, _, _ in seen] == [4, 4]
    for pool, (_, sources, weights) in zip(pools, seen):
        counts = {s: pool.count(s) for s in set(pool)}
        small = [s for s, c in counts.items() if c < len(pool) / len(counts)]
        assert small and all(sources.count(s) == counts[s] for s in small), "small sources kept whole"
        assert weights == [1.0] * 4
    assert trainer.selector.history.step == 2
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, lora_before[n])]
    assert any("lora_B" in n for n in changed)


def test_plain_loop_with_weighted_loss(make_llama):
    model = make_llama(dtype=torch.float64, lora=True)
    selector = CoresetSelector(CoresetConfig(ratio=0.5, weighting="cluster"))
    loader = DataLoader(_examples(3, seed=1), batch_size=8)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    steps = 0
    for batch in coreset_batches(loader, selector, model):
        assert batch["input_ids"].shape[0] == 4
        assert sorted(batch["sources"].tolist()) == [0, 1, 1, 2]
        loss, _ = weighted_causal_lm_loss(model, batch)
        # Reference: each row's loss from the model's own loss, averaged with the weights.
        with torch.no_grad():
            labels = causal_lm_labels(batch)
            ids = batch["input_ids"]
            rows = torch.stack([model(input_ids=ids[i : i + 1], labels=labels[i : i + 1]).loss for i in range(4)])
            w = batch["coreset_weights"].double()
            torch.testing.assert_close(loss.detach(), (w * rows).sum() / w.sum())
        loss.backward()
        opt.step()
        opt.zero_grad()
        steps += 1
    assert steps == 3
