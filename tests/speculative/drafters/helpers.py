"""Shared test helpers: a fake greedy target that follows a token stream, and an engine-like loop."""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from tachy.speculative.drafters import Drafter
from tachy.speculative.tree import DraftTree
from tachy.speculative.verify import verify_greedy


def make_stream(n: int, vocab: int = 40, seed: int = 0, copy_prob: float = 0.6) -> list[int]:
    """Text-like token stream: random tokens interleaved with copies of earlier spans (repetition)."""
    rng = random.Random(seed)
    out = [rng.randrange(vocab) for _ in range(8)]
    while len(out) < n:
        if rng.random() < copy_prob:
            start = rng.randrange(len(out) - 4)
            out.extend(out[start:start + rng.randint(3, 12)])
        else:
            out.extend(rng.randrange(vocab) for _ in range(rng.randint(1, 4)))
    return out[:n]


def check_tree(tree: DraftTree, max_tokens: int, vocab: int | None = None) -> None:
    """A valid draft: a DraftTree within the node budget, parents before children, unique siblings."""
    assert isinstance(tree, DraftTree)
    assert len(tree) <= max(max_tokens, 0)
    assert len(tree.tokens) == len(tree.parents)
    for i, (tok, par) in enumerate(zip(tree.tokens, tree.parents)):
        assert -1 <= par < i
        assert isinstance(tok, int) and tok >= 0
        if vocab is not None:
            assert tok < vocab
    for i in range(-1, len(tree)):
        kids = [tree.tokens[c] for c in tree.children(i)]
        assert len(kids) == len(set(kids)), f"duplicate siblings under {i}: {tree}"


class FakeTarget:
    """A greedy 'model' whose argmax after any on-stream context is the next stream token; after an
    off-stream context it predicts ``(last * 7 + 3) % vocab``. Other logits are seeded noise."""

    def __init__(self, stream: list[int], vocab: int, seed: int = 0):
        self.stream, self.vocab = stream, vocab
        self.gen = torch.Generator().manual_seed(seed)

    def logits(self, ids: list[int], tree: DraftTree) -> torch.Tensor:
        n = len(ids)
        assert ids == self.stream[:n]
        rows = torch.randn(len(tree) + 1, self.vocab, generator=self.gen)
        on_stream = [True] + [False] * len(tree)
        for i, (tok, par) in enumerate(zip(tree.tokens, tree.parents)):
            depth = tree.depths[i]
            on_stream[i + 1] = on_stream[par + 1] and n + depth - 1 < len(self.stream) \
                and self.stream[n + depth - 1] == tok
        for r in range(len(tree) + 1):
            depth = 0 if r == 0 else tree.depths[r - 1]
            last = ids[-1] if r == 0 else tree.tokens[r - 1]
            if on_stream[r] and n + depth < len(self.stream):
                best = self.stream[n + depth]
            else:
                best = (last * 7 + 3) % self.vocab
            rows[r, best] = 10.0
        return rows


@dataclass
class RunStats:
    steps: int = 0
    drafted: int = 0
    accepted: int = 0


def run_engine(drafter: Drafter, stream: list[int], prompt_len: int, steps: int, max_tokens: int = 16,
               vocab: int = 40, check: bool = True) -> RunStats:
    """The engine's loop (reset, propose, greedy verify, commit, update) against a FakeTarget."""
    target = FakeTarget(stream, vocab)
    ids = list(stream[:prompt_len])
    drafter.reset(ids)
    root = stream[prompt_len]
    ids.append(root)
    stats = RunStats()
    for _ in range(steps):
        if len(ids) + max_tokens + 2 > len(stream):
            break
        tree = drafter.propose(ids, max_tokens)
        if check:
            check_tree(tree, max_tokens, vocab)
        logits = target.logits(ids, tree)
        accepted, bonus = verify_greedy(tree, logits)
        ids.extend([tree.tokens[j] for j in accepted] + [bonus])
        drafter.update(ids, len(accepted), logits if drafter.needs_logits else None, [root] + tree.tokens)
        root = bonus
        stats.steps += 1
        stats.drafted += len(tree)
        stats.accepted += len(accepted)
    return stats
