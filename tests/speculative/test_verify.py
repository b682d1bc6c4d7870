"""Verification: greedy acceptance tables, and statistical proof that speculative sampling is lossless.

The statistical tests use a tiny "model": a Markov chain over 4 tokens (``TARGET[a]`` = distribution of the next
token after ``a``). A speculative loop with some drafter generates 3 tokens many times; the empirical joint
distribution of the 3 tokens must match the chain's exact one (chi-square goodness of fit). The same test must
reject deliberately wrong verifiers, so it has the power to fail.
"""
from __future__ import annotations

import random
from typing import Callable

import pytest
import torch

from tachy.sampling import make_generator
from tachy.speculative.tree import DraftTree
from tachy.speculative.verify import verify_greedy, verify_sampling

# ---------------------------------------------------------------------------------------------- greedy


def logits_with_argmax(argmax: list[int], vocab: int = 10) -> torch.Tensor:
    logits = torch.randn(len(argmax), vocab, generator=torch.Generator().manual_seed(0))
    logits[torch.arange(len(argmax)), argmax] = 10.0
    return logits


@pytest.mark.parametrize("tree, argmax, expected", [
    (DraftTree.chain([2, 3, 1]), [2, 3, 1, 0], ([0, 1, 2], 0)),  # all accepted, bonus after the leaf
    (DraftTree.chain([2, 3, 1]), [2, 3, 0, 5], ([0, 1], 0)),  # recovered token replaces the third draft
    (DraftTree.chain([2, 3, 1]), [4, 3, 1, 0], ([], 4)),  # none accepted
    (DraftTree.empty(), [7], ([], 7)),  # plain decoding
    # root -> 0:1 -> 1:2 ; root -> 2:3 -> {3:4, 4:5}: the walk takes the second branch, then its second child
    (DraftTree.from_paths([[1, 2], [3, 4], [3, 5]]), [3, 0, 0, 5, 0, 7], ([2, 4], 7)),
    (DraftTree.from_paths([[1, 2], [3, 4], [3, 5]]), [1, 2, 9, 0, 0, 0], ([0, 1], 9)),
    (DraftTree.from_paths([[1, 2], [3, 4], [3, 5]]), [3, 0, 0, 6, 0, 0], ([2], 6)),
    (DraftTree([4, 4, 6], [-1, -1, 1]), [4, 6, 6, 0], ([0], 6)),  # duplicate siblings: the first one wins
])
def test_verify_greedy(tree, argmax, expected):
    assert verify_greedy(tree, logits_with_argmax(argmax)) == expected


def test_shapes_are_checked():
    tree = DraftTree.chain([1, 2])
    with pytest.raises(ValueError):
        verify_greedy(tree, torch.zeros(2, 5))
    with pytest.raises(ValueError):
        verify_sampling(tree, torch.full((2, 5), 0.2), make_generator(0))
    with pytest.raises(ValueError):
        verify_sampling(tree, torch.full((3, 5), 0.2), make_generator(0), draft_probs=torch.full((3, 5), 0.2))


def test_sampling_with_one_hot_probs_is_greedy():
    rng = random.Random(0)
    gen = make_generator(0)
    for _ in range(50):
        n = rng.randint(0, 8)
        tree = DraftTree([rng.randint(0, 3) for _ in range(n)], [rng.randint(-1, i - 1) for i in range(n)])
        logits = torch.randn(n + 1, 4, generator=gen)
        one_hot = torch.nn.functional.one_hot(logits.argmax(-1), 4).float()
        assert verify_sampling(tree, one_hot, gen) == verify_greedy(tree, logits)


def test_sampling_is_reproducible():
    tree = DraftTree.from_paths([[0, 1, 2], [1, 0], [2]])
    probs = torch.softmax(torch.randn(len(tree) + 1, 4, generator=torch.Generator().manual_seed(1)), -1)
    draft = torch.softmax(torch.randn(len(tree), 4, generator=torch.Generator().manual_seed(2)), -1)
    for dp in (None, draft):
        runs = [[verify_sampling(tree, probs, g, dp) for _ in range(20)] for g in (make_generator(5),
                                                                                  make_generator(5))]
        assert runs[0] == runs[1]


# ------------------------------------------------------------------------------------------ statistics

VOCAB, ROOT, LENGTH = 4, 0, 3
TARGET = torch.tensor([[0.40, 0.30, 0.20, 0.10],
                       [0.10, 0.20, 0.30, 0.40],
                       [0.25, 0.25, 0.40, 0.10],
                       [0.30, 0.10, 0.10, 0.50]])
DRAFT = [[0.10, 0.60, 0.20, 0.10],  # the draft model's chain: deliberately different from TARGET
         [0.40, 0.10, 0.10, 0.40],
         [0.25, 0.25, 0.25, 0.25],
         [0.70, 0.10, 0.10, 0.10]]
DRAFT_T = torch.tensor(DRAFT)

# A drafter maps (last committed token, rng) -> (tree, draft_probs or None)
Drafter = Callable[[int, random.Random], "tuple[DraftTree, torch.Tensor | None]"]
Verifier = Callable[..., "tuple[list[int], int]"]


def fixed_trees(last: int, rng: random.Random):
    """Point-mass trees mixing right and wrong guesses, tokens repeated across branches, duplicate siblings."""
    if rng.random() < 0.5:
        return DraftTree.from_paths([[last, (last + 1) % 4, 0], [(last + 2) % 4, last], [3]]), None
    return DraftTree([1, 1, 2, 0, 3], [-1, -1, -1, 1, 3]), None


def random_trees(last: int, rng: random.Random):
    """Random point-mass tries: 1-3 paths of length 1-3 (so 1-3 siblings at each level)."""
    paths = [[rng.randrange(4) for _ in range(rng.randint(1, 3))] for _ in range(rng.randint(1, 3))]
    return DraftTree.from_paths(paths), None


def draft_chain(last: int, rng: random.Random):
    """A draft model's chain of 3 tokens sampled from DRAFT."""
    tokens, rows = [], []
    for _ in range(3):
        rows.append(DRAFT[last])
        last = rng.choices(range(4), weights=DRAFT[last])[0]
        tokens.append(last)
    return DraftTree.chain(tokens), torch.tensor(rows)


def draft_tree_iid(last: int, rng: random.Random):
    """3 root children sampled i.i.d. from DRAFT[last] (duplicates possible), each with one sampled child."""
    tokens, parents, rows = [], [], []
    for _ in range(3):
        tok = rng.choices(range(4), weights=DRAFT[last])[0]
        tokens.append(tok), parents.append(-1), rows.append(DRAFT[last])
    for i in range(3):
        tokens.append(rng.choices(range(4), weights=DRAFT[tokens[i]])[0])
        parents.append(i), rows.append(DRAFT[tokens[i]])
    return DraftTree(tokens, parents), torch.tensor(rows)


def draft_tree_without_replacement(last: int, rng: random.Random):
    """2-3 distinct root children sampled without replacement; draft_probs = the renormalized rows used."""
    tokens, parents, rows = [], [], []
    q = list(DRAFT[last])
    for _ in range(rng.randint(2, 3)):
        total = sum(q)
        rows.append([x / total for x in q])
        tok = rng.choices(range(4), weights=q)[0]
        tokens.append(tok), parents.append(-1)
        q[tok] = 0.0
    for i in range(len(tokens)):
        tokens.append(rng.choices(range(4), weights=DRAFT[tokens[i]])[0])
        parents.append(i), rows.append(DRAFT[tokens[i]])
    return DraftTree(tokens, parents), torch.tensor(rows)


def naive_verify(tree: DraftTree, probs: torch.Tensor, generator: torch.Generator,
                 draft_probs: torch.Tensor | None = None, accept_all: bool = False) -> tuple[list[int], int]:
    """A WRONG verifier: tests each child against the unmodified target (no residual), and on rejection
    samples from the target instead of the residual; ``accept_all`` takes the first child blindly."""
    accepted, cur = [], -1
    while True:
        chosen = None
        for child in tree.children(cur):
            tok = tree.tokens[child]
            q = 1.0 if draft_probs is None else float(draft_probs[child, tok])
            if accept_all or torch.rand((), generator=generator).item() * q < float(probs[cur + 1, tok]):
                chosen = child
                break
        if chosen is None:
            return accepted, int(torch.multinomial(probs[cur + 1], 1, generator=generator))
        accepted.append(chosen)
        cur = chosen


def generate_counts(drafter: Drafter, verifier: Verifier, trials: int, seed: int = 0) -> torch.Tensor:
    """Histogram over the VOCAB**LENGTH sequences of the first LENGTH tokens of a speculative loop."""
    gen, rng = make_generator(seed), random.Random(seed)
    counts = [0] * VOCAB**LENGTH
    for _ in range(trials):
        seq: list[int] = []
        last = ROOT
        while len(seq) < LENGTH:
            tree, draft_probs = drafter(last, rng)
            probs = TARGET[[last] + tree.tokens]  # Markov: node i's next-token law depends on its token only
            accepted, bonus = verifier(tree, probs, gen, draft_probs)
            seq += [tree.tokens[i] for i in accepted] + [bonus]
            last = seq[-1]
        index = 0
        for tok in seq[:LENGTH]:
            index = index * VOCAB + tok
        counts[index] += 1
    return torch.tensor(counts, dtype=torch.float64)


def exact_joint() -> torch.Tensor:
    t = TARGET.double()
    return (t[ROOT][:, None, None] * t[:, :, None] * t[None, :, :]).reshape(-1)  # P(a) P(b|a) P(c|b)


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson goodness of fit (same as scipy.stats.chisquare): P(chi2_{k-1} >= statistic)."""
    expected = probs * counts.sum()
    assert expected.min() >= 5, "chi-square needs >= 5 expected counts per cell"
    statistic = ((counts - expected) ** 2 / expected).sum()
    dof = torch.tensor((counts.numel() - 1) / 2, dtype=torch.float64)
    return torch.special.gammaincc(dof, statistic / 2).item()


TRIALS = 10_000


@pytest.mark.parametrize("drafter", [fixed_trees, random_trees, draft_chain, draft_tree_iid,
                                     draft_tree_without_replacement])
def test_speculative_sampling_is_lossless(drafter):
    pvalue = chi_square_pvalue(generate_counts(drafter, verify_sampling, TRIALS), exact_joint())
    assert pvalue > 1e-3, f"{drafter.__name__}: generated text does not follow the target (p = {pvalue:.2e})"


def test_point_mass_drafts_of_a_draft_model_are_lossless_too():
    """Point-mass verification is lossless for any drafter, random ones included (only acceptance suffers)."""
    def as_point_mass(tree, probs, generator, draft_probs):
        return verify_sampling(tree, probs, generator)
    assert chi_square_pvalue(generate_counts(draft_tree_iid, as_point_mass, TRIALS // 2), exact_joint()) > 1e-3


@pytest.mark.parametrize("drafter, wrong", [
    (fixed_trees, lambda *a: naive_verify(*a, accept_all=True)),
    (fixed_trees, naive_verify),  # point-mass drafts without the residual
    (draft_chain, naive_verify),  # draft-model chain without the residual max(p - q, 0)
], ids=["accept-all", "no-residual-point-mass", "no-residual-draft-model"])
def test_wrong_verifiers_are_detected(drafter, wrong):
    """The goodness-of-fit test has power: plausible verifier bugs fail it at the same sample size."""
    assert chi_square_pvalue(generate_counts(drafter, wrong, TRIALS), exact_joint()) < 1e-6


def test_acceptance_is_better_than_nothing():
    """Sanity: drafting from a model close to the target gets tokens accepted."""
    gen, rng = make_generator(0), random.Random(0)
    accepted = 0
    for _ in range(200):
        tree, draft_probs = draft_chain(ROOT, rng)
        probs = TARGET[[ROOT] + tree.tokens]
        accepted += len(verify_sampling(tree, probs, gen, draft_probs)[0])
    assert accepted > 100
