"""The decoding toolbox: strategies beyond greedy and sampling, structured output and watermarking.

``STRATEGIES`` maps a name to a Strategy class; ``make_strategy(name, **options)`` builds one (the
``GenerationConfig.strategy`` / ``strategy_options`` fields do it for you).

========================  =======================================================================
name                      method
========================  =======================================================================
``default``               greedy / sampling (with speculative drafts): the engine's own loop
``beam``                  beam search: length penalty, early stopping, patience
``diverse_beam``          diverse (group) beam search with a Hamming diversity penalty
``contrastive_search``    contrastive search (degeneration penalty from hidden-state similarity)
``contrastive_decoding``  contrastive decoding against an amateur (the target's first layers)
``context_aware``         context-aware decoding (contrast with and without the context)
``mirostat``              Mirostat 2.0 (target surprise)
``fsd``                   A Frustratingly Simple Decoding Method (n-gram anti-model penalty)
``mbr``                   minimum Bayes risk over N samples with a pluggable utility
========================  =======================================================================

Orthogonal to the strategy: ``GenerationConfig.response_format`` (JSON schema / regex, structured.py) and
``GenerationConfig.watermark`` (green-list watermark, watermark.py; ``detect`` scores a text).
"""
from __future__ import annotations

from .base import STRATEGIES, Strategy, available_strategies, make_strategy, register, row_contexts
from .config import GenerationConfig, check_config, logits_processor
from .beam import BeamSearch, DiverseBeamSearch
from .contrastive_decoding import ContextAwareDecoding, ContrastiveDecoding, truncated_model
from .contrastive_search import ContrastiveSearch, degeneration_scores
from .fsd import FSD, anti_ngram_probs
from .mbr import MBR, UTILITIES, ngram_f1
from .mirostat import Mirostat
from .structured import Constraint, response_format_regex, schema_regex, token_bytes
from .watermark import WatermarkConfig, WatermarkScore, detect

__all__ = [
    "STRATEGIES", "Strategy", "available_strategies", "make_strategy", "register", "GenerationConfig",
    "check_config", "logits_processor", "row_contexts",
    "BeamSearch", "DiverseBeamSearch", "ContrastiveSearch", "degeneration_scores", "ContrastiveDecoding",
    "ContextAwareDecoding", "truncated_model", "Mirostat", "FSD", "anti_ngram_probs", "MBR", "UTILITIES",
    "ngram_f1", "Constraint", "response_format_regex", "schema_regex", "token_bytes",
    "WatermarkConfig", "WatermarkScore", "detect",
]
