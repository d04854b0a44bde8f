"""Real text that needs no download, as byte-level token batches.

The default corpus is the English help text that ships with every CPython (``pydoc_data.topics``,
about 0.8 MB): real prose, present wherever Python is, so examples and loss-parity runs work offline.
"""
from __future__ import annotations

import pathlib

import torch

VOCAB = 256  # byte-level tokens


def default_corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def load_text(path: str | None = None) -> str:
    if path is None:
        return default_corpus()
    text = pathlib.Path(path).read_text(encoding="utf-8", errors="replace")
    if not text:
        raise ValueError(f"{path} is empty")
    return text


def byte_tokens(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


class Batches:
    """Random windows of ``seq`` tokens from the first 95 % of the text (train) or the rest (eval)."""

    def __init__(self, tokens: torch.Tensor, seq: int, batch: int, seed: int = 0, split: str = "train"):
        cut = int(len(tokens) * 0.95)
        self.tokens = tokens[:cut] if split == "train" else tokens[cut:]
        if len(self.tokens) <= seq + 1:
            raise ValueError(f"text too short for sequence length {seq}: {len(self.tokens)} tokens in the {split} split")
        self.seq, self.batch = seq, batch
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        starts = torch.randint(0, len(self.tokens) - self.seq - 1, (self.batch,), generator=self.gen)
        return torch.stack([self.tokens[s:s + self.seq] for s in starts.tolist()])
