"""Long-context sparse attention: one file per method on the shared base (base.py), found by name.

Decode-time methods (``GenerationConfig(attention=...)``, ``--attention NAME``) keep the whole KV cache and let
each query read a chosen part of it; MInference does so for the prompt's prefill. See docs/long_context.md."""
from .base import ATTENTIONS, DENSE, SELECT, SPARSE, SparseAttention, SparseState, available_attentions, \
    kv_read_per_token, make_attention
from .minference import MInferenceAttention
from .double_sparsity import DoubleSparsityAttention
from .quest import QuestAttention
from .tidal import TidalDecodeAttention

__all__ = ["ATTENTIONS", "DENSE", "SELECT", "SPARSE", "SparseAttention", "SparseState", "available_attentions",
           "kv_read_per_token", "make_attention", "DoubleSparsityAttention", "MInferenceAttention", "QuestAttention",
           "TidalDecodeAttention"]
