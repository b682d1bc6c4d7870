"""PIE, positional integrity encoding (He et al., 2024): reuse a prompt's K/V after the prompt was edited.

Editing a few lines in the middle of a long prompt (a code file sent again with one change) shifts every later
token's position, which a prefix cache cannot survive: everything after the edit would be prefilled again.
PIE keeps those tokens' K/V and corrects only their rotary positions: a key rotated for position ``p`` becomes
the key for ``p + delta`` by one more rotation of ``delta`` (rotations compose), and only the edited tokens
(plus the last prompt token, whose logits start the answer) run through the model. The tokens after the edit
keep values and keys computed without the edit in view: that is PIE's approximation, measured as agreement
with full re-encoding (benchmarks/context_reuse.py); with no edit, or an edit only at the end, nothing is
approximated and the result is the cold prefill's, bit for bit on the C forward.

    result = pie_prefill(engine, old_ids, old_cache, new_ids)   # result.cache, result.logits [1, V]
"""
from __future__ import annotations

from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import Sequence

import torch
from torch import Tensor

from ..cache import KVCache
from ..errors import InvalidArgumentError
from ..generation import PREFILL_CHUNK
from ..models.llama import Rope, apply_rope, rope_frequencies


@dataclass
class PIEResult:
    cache: KVCache     # the new prompt's K/V, ready to decode from (length == len(new_ids))
    logits: Tensor     # [1, V] at the new prompt's last token
    reencoded: int     # tokens run through the model
    reused: int        # tokens whose K/V came from the old cache
    shifted: int       # of those, tokens whose keys were re-rotated to a new position


def rerotate(k: Tensor, rope: Rope, delta: int) -> Tensor:
    """Keys ``k`` [..., T, D] rotated for positions p, rotated to positions p + ``delta``."""
    head_dim, _, theta, scaling = rope.params
    angle = delta * rope_frequencies(head_dim, theta, scaling).to(k.device)
    angle = torch.cat([angle, angle])
    half = head_dim // 2
    sin = angle.sin()
    return apply_rope(k, angle.cos(), torch.cat([-sin[:half], sin[half:]]))


def reuse_plan(old_ids: Sequence[int], new_ids: Sequence[int]) -> list[int | None]:
    """For each new position, the old position whose K/V it reuses, or None where it must be encoded: runs
    of tokens the two prompts share (a token diff), except the new prompt's last token. The common head and
    tail are matched directly and only the stretch between them is diffed: difflib is quadratic on code's
    repetitive tokens (seconds for a 2k-token file), the head and tail are linear."""
    old_ids, new_ids = list(old_ids), list(new_ids)
    head = 0
    while head < min(len(old_ids), len(new_ids)) and old_ids[head] == new_ids[head]:
        head += 1
    tail = 0
    while (tail < min(len(old_ids), len(new_ids)) - head
           and old_ids[len(old_ids) - 1 - tail] == new_ids[len(new_ids) - 1 - tail]):
        tail += 1
    plan: list[int | None] = [None] * len(new_ids)
    plan[:head] = range(head)
    shift = len(old_ids) - len(new_ids)
    plan[len(new_ids) - tail:] = range(len(new_ids) - tail + shift, len(old_ids))
    old_mid, new_mid = old_ids[head:len(old_ids) - tail], new_ids[head:len(new_ids) - tail]
    for tag, i1, _, j1, j2 in SequenceMatcher(None, old_mid, new_mid, autojunk=False).get_opcodes():
        if tag == "equal":
            plan[head + j1:head + j2] = range(head + i1, head + i1 + j2 - j1)
    if plan:
        plan[-1] = None
    return plan


def pie_prefill(engine, old_ids: Sequence[int], old_cache: KVCache, new_ids: Sequence[int],
                capacity: int | None = None) -> PIEResult:
    """The K/V and first logits of ``new_ids`` from ``old_cache`` (holding ``old_ids``' K/V at slots 0..),
    encoding only what the edit changed (see the module docstring). ``capacity``: the new cache's slots
    (default: the prompt plus 256)."""
    new_ids = engine.check_prompt(new_ids)
    if old_cache.length < len(old_ids) or old_cache.compressed or old_cache.prefix is not None:
        raise InvalidArgumentError(f"the old cache must hold all {len(old_ids)} old tokens uncompressed "
                                   f"(it holds {old_cache.length})")
    model = engine.model
    cache = model.new_cache(capacity=capacity or engine.cache_capacity(len(new_ids), 256), fixed=True)
    ropes = model.layer_ropes()
    plan = reuse_plan(old_ids, new_ids)
    logits, reencoded, reused, shifted = None, 0, 0, 0
    at = 0
    while at < len(new_ids):
        end = at + 1   # a run: consecutive reused tokens with one shift, or consecutive tokens to encode
        if plan[at] is None:
            while end < len(new_ids) and plan[end] is None:
                end += 1
            with cache.plain_rows():
                for s in range(at, end, PREFILL_CHUNK):
                    chunk = list(new_ids[s:min(end, s + PREFILL_CHUNK)])
                    logits = model(torch.tensor([chunk], device=engine.device),
                                   torch.arange(s, s + len(chunk), device=engine.device), cache, last_only=True)[0]
            reencoded += end - at
        else:
            delta = at - plan[at]
            while end < len(new_ids) and plan[end] is not None and end - plan[end] == delta:
                end += 1
            old = slice(plan[at], plan[at] + end - at)
            for layer, rope in enumerate(ropes):
                k = old_cache.k[layer, :, :, old]
                cache.k[layer, :, :, at:end] = rerotate(k, rope, delta) if delta else k
            cache.v[:, :, :, at:end] = old_cache.v[:, :, :, old]
            cache.length = cache.position = end
            reused += end - at
            shifted += (end - at) if delta else 0
        at = end
    return PIEResult(cache, logits, reencoded, reused, shifted)
