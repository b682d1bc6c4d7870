"""Model-free drafters for speculative decoding, and their registry.

``DRAFTERS`` maps a name to a Drafter class; ``make_drafter(name, **kwargs)`` builds one. All drafters but
``draft-model`` and ``quantized-self`` are pure Python/numpy over token ids, cheap per step (a few hundred microseconds at most).

======================  ==========================================================================
name                    drafter
======================  ==========================================================================
``default``             :class:`DefaultDrafter`: ``quantized-self`` on a CPU float target, ``sam`` on GGUF
                        blocks through the C forward, else ``model-free``
``model-free``          :class:`ModelFreeDrafter`: suffix automaton, else Token Recycling
``gated``               :class:`GatedModelFreeDrafter`: ``model-free`` behind the never-slower gate
``pld``                 :class:`PromptLookupDrafter`: n-gram lookup in the context
``sam``                 :class:`SuffixAutomatonDrafter`: longest suffix match (SAM-Decoding)
``recycling``           :class:`TokenRecyclingDrafter`: top-k adjacency from verify logits
``trigram``             :class:`AdaptiveTrigramDrafter`: tri-gram statistics with adaptive beam (ADED)
``rest``                :class:`DatastoreDrafter`: suffix-array retrieval from a corpus (REST)
``lookahead``           :class:`LookaheadDrafter`: n-gram pool fed by the model's own predictions
``draft-model``         :class:`DraftModelDrafter`: greedy chains from a small model (``model=NAME_OR_PATH``)
``quantized-self``      :class:`QuantizedSelfDrafter`: suffix automaton, else the target's own int4 copy
======================  ==========================================================================

Wrappers: :class:`FallbackDrafter` (first non-empty draft), :class:`CombinedDrafter` (union of drafts),
:class:`AdaptiveLength` (draft budget follows acceptance).
"""
from __future__ import annotations

from ...errors import InvalidArgumentError, UnknownNameError
from ...spec import parse_spec
from .aded import AdaptiveTrigramDrafter, NgramTable
from .base import Drafter, overlap_copy
from .draft_model import DraftModelDrafter, QuantizedSelfDrafter
from .datastore import Datastore, DatastoreDrafter, build_datastore, build_suffix_array, frequency_tree
from .default import DefaultDrafter
from .fallback import AdaptiveLength, CombinedDrafter, FallbackDrafter, ModelFreeDrafter
from .gate import GatedModelFreeDrafter, SpeedGate
from .lookahead import LookaheadDrafter, NgramPool
from .prediction import prediction_drafter
from .prompt_lookup import PromptLookupDrafter, find_ngram_continuations
from .suffix_automaton import SuffixAutomaton, SuffixAutomatonDrafter, longest_previous_matches
from .token_recycling import TokenRecyclingDrafter, expand_template, make_template

DRAFTERS: dict[str, type[Drafter]] = {
    cls.name: cls for cls in (
        GatedModelFreeDrafter,
        DefaultDrafter,
        ModelFreeDrafter,
        PromptLookupDrafter,
        SuffixAutomatonDrafter,
        TokenRecyclingDrafter,
        AdaptiveTrigramDrafter,
        DatastoreDrafter,
        LookaheadDrafter,
        DraftModelDrafter,
        QuantizedSelfDrafter,
    )
}


def available_drafters(runnable_only: bool = False) -> list[str]:
    """Registered drafter names, sorted; ``runnable_only`` leaves out those that need options to run."""
    return sorted(n for n, cls in DRAFTERS.items() if not (runnable_only and getattr(cls, "requires_options", False)))


def make_drafter(name: str, **kwargs) -> Drafter:
    """A new drafter by registry name; ``kwargs`` are its constructor options. ``name`` may carry options
    as ``"name:key=value,..."`` (explicit ``kwargs`` win)."""
    if ":" in name:
        name, spec_kwargs = parse_spec(name)
        kwargs = {**spec_kwargs, **kwargs}
    cls = DRAFTERS.get(name)
    if cls is None:
        raise UnknownNameError(f"unknown drafter {name!r}; available: {', '.join(available_drafters())}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:   # an unknown option, or a value out of its range
        raise InvalidArgumentError(f"drafter {name!r}: {e}") from None


__all__ = [
    "DRAFTERS", "Drafter", "available_drafters", "make_drafter", "overlap_copy",
    "DefaultDrafter", "ModelFreeDrafter", "GatedModelFreeDrafter", "SpeedGate", "FallbackDrafter", "CombinedDrafter", "AdaptiveLength",
    "PromptLookupDrafter", "find_ngram_continuations", "prediction_drafter",
    "SuffixAutomatonDrafter", "SuffixAutomaton", "longest_previous_matches",
    "TokenRecyclingDrafter", "make_template", "expand_template",
    "AdaptiveTrigramDrafter", "NgramTable",
    "DatastoreDrafter", "Datastore", "build_datastore", "build_suffix_array", "frequency_tree",
    "LookaheadDrafter", "NgramPool", "DraftModelDrafter", "QuantizedSelfDrafter",
]
