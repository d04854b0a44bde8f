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


# The chapter of the Python documentation each help topic comes from, merged into seven sources of very
# different sizes (Python 3.8 to 3.13: about a half, a quarter and a tenth of the text, then four of 4 to 6 %;
# the largest is 12x the smallest). Real sources differ in style, not only in size: prose about the object
# model, statement grammar, a command reference (pdb), a format mini-language.
SOURCE_TOPICS: dict[str, tuple[str, ...]] = {
    # Reference "Data model" and Library "Built-in Types": the object model and the methods of the built-ins.
    "types": ("types", "objects", "specialnames", "customization", "attribute-access", "callable-types",
              "sequence-types", "numeric-types", "context-managers", "typesseq", "typesseq-mutable",
              "typesmapping", "typesfunctions", "typesmethods", "typesmodules", "string-methods",
              "bltin-code-objects", "bltin-ellipsis-object", "bltin-null-object", "bltin-type-objects",
              "specialattrs", "truth"),
    # Reference "Simple statements" and "Compound statements".
    "statements": ("assert", "assignment", "augassign", "pass", "del", "return", "yield", "raise", "break",
                   "continue", "import", "global", "nonlocal", "compound", "if", "else", "while", "for", "try",
                   "with", "function", "class", "async"),
    # Reference "Expressions".
    "expressions": ("atom-identifiers", "atom-literals", "lists", "dict", "attribute-references", "subscriptions",
                    "slicings", "calls", "await", "power", "unary", "binary", "bitwise", "shifting", "comparisons",
                    "booleans", "in", "lambda", "exprlists", "operator-summary", "conversions"),
    # Library "string": the format-specification mini-language.
    "formatstrings": ("formatstrings",),
    # Library "pdb": the debugger's command reference.
    "pdb": ("debugger",),
    # Reference "Lexical analysis": identifiers and literals.
    "lexical": ("identifiers", "id-classes", "strings", "integers", "floating", "imaginary", "numbers"),
    # Reference "Execution model": scopes, binding, exceptions.
    "execmodel": ("execmodel", "naming", "dynamic-features", "exceptions"),
}
# Topics a later Python adds join this source (the reference manual's statements are where new ones
# have appeared), so every topic is used and the seven names stay the same.
UNLISTED_SOURCE = "statements"


def sources() -> dict[str, torch.Tensor]:
    """The bundled text (``pydoc_data.topics``) as byte tokens per source, largest source first.

    Rule: each help topic goes to the source of ``SOURCE_TOPICS`` that lists it (topics not listed go to
    ``UNLISTED_SOURCE``); a source's text is its topics in sorted key order joined by blank lines, as in
    ``default_corpus``. Sizes span about 12x, so in a pool drawn in proportion to size the small sources
    have a row or none.
    """
    from pydoc_data.topics import topics

    where = {key: name for name, keys in SOURCE_TOPICS.items() for key in keys}
    texts: dict[str, list[str]] = {name: [] for name in SOURCE_TOPICS}
    for key in sorted(topics):
        texts[where.get(key, UNLISTED_SOURCE)].append(topics[key])
    tokens = {name: byte_tokens("\n\n".join(parts)) for name, parts in texts.items() if parts}
    return dict(sorted(tokens.items(), key=lambda item: -len(item[1])))


class SourceBatches:
    """Pools of windows of ``seq`` tokens with a source label per row, sources drawn in proportion to size.

    Each source is split like ``Batches``: its first 95 % is ``split="train"``, the rest ``"eval"``. A
    draw picks the source of each of the ``batch`` rows with probability proportional to the source's
    tokens in the split (so the pool mixes sources as the concatenated text would, and a small source
    is often absent), then a uniformly random window inside it. ``next`` returns ``(ids, labels)``:
    ``(batch, seq)`` tokens and ``(batch,)`` source indices into ``names``. Two instances with the same
    arguments yield the same pools.
    """

    def __init__(self, sources: dict[str, torch.Tensor], seq: int, batch: int, seed: int = 0,
                 split: str = "train"):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        self.names = list(sources)
        self.tokens = []
        for name, tokens in sources.items():
            cut = int(len(tokens) * 0.95)
            part = tokens[:cut] if split == "train" else tokens[cut:]
            if len(part) <= seq + 1:
                raise ValueError(f"source {name!r} too short for sequence length {seq}: {len(part)} tokens in "
                                 f"the {split} split")
            self.tokens.append(part)
        sizes = torch.tensor([len(t) for t in self.tokens], dtype=torch.float64)
        self.shares = {name: float(s) for name, s in zip(self.names, sizes / sizes.sum())}
        self._probs = sizes / sizes.sum()
        # Window starts per source; the last start leaves room for the window.
        self._starts = torch.tensor([len(t) - seq - 1 for t in self.tokens], dtype=torch.float64)
        self.seq, self.batch = seq, batch
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.multinomial(self._probs, self.batch, replacement=True, generator=self.gen)
        starts = (torch.rand(self.batch, generator=self.gen, dtype=torch.float64) * self._starts[labels]).long()
        ids = torch.stack([self.tokens[src][s:s + self.seq] for src, s in zip(labels.tolist(), starts.tolist())])
        return ids, labels

    def per_source(self, n: int) -> dict[str, torch.Tensor]:
        """``n`` windows of every source, ``(n, seq)`` each (fixed held-out sets: draw them once)."""
        out = {}
        for name, tokens, last in zip(self.names, self.tokens, self._starts.tolist()):
            starts = torch.randint(0, int(last), (n,), generator=self.gen)
            out[name] = torch.stack([tokens[s:s + self.seq] for s in starts.tolist()])
        return out
