"""Predicted Outputs (OpenAI's ``prediction`` field): drafts copied from text the caller expects back.

When a user edits a document, most of the answer is the document itself. The prediction's tokens become the
static corpus of a suffix automaton (:class:`SuffixAutomatonDrafter`), so wherever the output matches the
prediction, the rest of the prediction is drafted; after an edit the match is found again a few tokens later.
Verification keeps the output exactly the target model's, however wrong the prediction is.

Example: with the prediction ``[5, 6, 7, 8]`` and a context ending in ``[.., 5, 6]``, the draft is ``[7, 8]``:

>>> prediction_drafter([5, 6, 7, 8]).propose([1, 2, 5, 6], max_tokens=4).tokens
[7, 8]
"""
from __future__ import annotations

from typing import Sequence

from .base import Drafter
from .fallback import FallbackDrafter
from .suffix_automaton import SuffixAutomatonDrafter


def prediction_drafter(prediction_ids: Sequence[int], fallback: Drafter | None = None,
                       min_match_len: int = 2) -> Drafter:
    """A drafter that copies from ``prediction_ids`` (and from the context), else asks ``fallback``."""
    matcher = SuffixAutomatonDrafter(min_match_len=min_match_len, corpus_ids=list(prediction_ids))
    return matcher if fallback is None else FallbackDrafter([matcher, fallback])
