"""``"default"``: the engine's speculative configuration, picked per target model.

On a CPU target with float weights on the PyTorch forward (bf16 or fp32 where tachy's C forward does not run),
the target's own weights quantized to int4 draft: the
suffix automaton when the context holds a long match, else greedy chains from the int4 copy, which reads
the target's K/V cache instead of keeping one (:class:`QuantizedSelfDrafter`). That copy agrees with the
target on most tokens and costs about a third of a target step per token here, so it gave the best measured
speed (docs/benchmarks.md), at the price of the int4 copy's memory (84 MB for SmolLM2-135M; a bf16
embedding table is shared with the target, not copied).

On a GGUF target through the C forward (the embedded models) a step costs only 2-5 ms, and the suffix
automaton alone drafts (any repeated token starts a match; what it drafts is trimmed to what pays for its
verification, OPT-Tree against the measured forward costs, see speculative/drafters/base.py). Token
Recycling's drafts, the model-free drafter's fallback, rarely pay there and their Python time does not: on
the 30 dev prompts the suffix automaton alone gave 1.15x plain decoding against model-free's 1.06x (SmolLM2),
2.15x against 2.02x (Gemma 3), 1.10x against 1.03x on the 78 MT-Bench-style prompts (docs/benchmarks.md).

Elsewhere (bf16 weights through the C forward, where a step costs about what the int4 copy's does, ~17 ms,
and Token Recycling pays: 1.59x against the suffix automaton's 1.31x; int8/int4 targets, where a copy in int4
saves nothing; a GPU, where the int4 kernel is CPU-only) it is the model-free drafter: suffix automaton on a
match of 4+ tokens, else Token Recycling, likewise trimmed to what pays.
"""
from __future__ import annotations

from ...models.gguf_linear import GGUFLinear
from ...models.quant import is_float_linear
from ..tree import DraftTree
from .base import Drafter, Wrapper
from .draft_model import QuantizedSelfDrafter
from .fallback import ModelFreeDrafter
from .suffix_automaton import SuffixAutomatonDrafter


def sam_alone_pays(target) -> bool:
    """Whether ``target`` (an Engine) runs GGUF blocks through the C forward, where steps are cheap enough
    that Token Recycling's drafts cost more than they save (module docstring)."""
    model = target.model
    return model.cpu_forward is not None and isinstance(model.layers[0].mlp.down_proj, GGUFLinear)


def self_draft_pays(target) -> bool:
    """Whether an int4 copy of ``target`` (an Engine) would be cheaper per token than the target itself: a CPU
    target with float weights on the PyTorch forward. Through the C forward (models/cpu_forward.py) a bf16
    target's step costs about what the int4 copy's does (8-9 ms for SmolLM2-135M), so the copy's chains
    cost more than they save (measured 0.56x plain decoding)."""
    model = target.model
    return (model.device.type == "cpu" and is_float_linear(model.layers[0].mlp.down_proj)
            and model.cpu_forward is None)


class DefaultDrafter(Wrapper):
    """quantized-self (the target's own int4 copy) on a CPU float target, the suffix automaton alone on a
    GGUF target through the C forward, else model-free.

    ``model-free`` until the engine shows it the target (``check_target``); see the module docstring."""

    name = "default"

    def __init__(self, min_match_len: int | None = None):
        """min_match_len: the suffix automaton's shortest match; by default each inner drafter's own (4 for
        model-free, 8 for quantized-self)."""
        self.options = {} if min_match_len is None else {"min_match_len": min_match_len}
        self.inner: Drafter = ModelFreeDrafter(**self.options)
        self.last_tree = DraftTree.empty()

    def check_target(self, target) -> None:
        if self_draft_pays(target) and not isinstance(self.inner, QuantizedSelfDrafter):
            self.inner = QuantizedSelfDrafter(**self.options)
        elif sam_alone_pays(target) and not isinstance(self.inner, SuffixAutomatonDrafter):
            self.inner = SuffixAutomatonDrafter(**self.options)
        self.inner.check_target(target)
