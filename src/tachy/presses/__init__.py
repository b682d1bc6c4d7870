"""KV-cache compression presses: one file per method on the shared base (base.py), found by name."""
from .base import PRESSES, Press, ScorerPress, available_presses, make_press
from .ems import EMSPress
from .gear import GEAR2Press, GEAR4Press
from .h2o import H2OPress
from .headkv import HeadKVPress
from .int4kv import Int4KVPress
from .kivi import KIVI2Press, KIVI4Press, KIVIPress
from .pyramidkv import PyramidKVPress
from .razor import RazorAttentionPress
from .scope import SCOPEPress
from .snapkv import SnapKVPress
from .streaming_llm import StreamingLLMPress
from .value_norm import ValueNormPress

__all__ = ["PRESSES", "Press", "ScorerPress", "available_presses", "make_press", "H2OPress", "PyramidKVPress",
           "SnapKVPress", "StreamingLLMPress", "ValueNormPress",
           "KIVIPress", "KIVI4Press", "KIVI2Press", "GEAR4Press", "GEAR2Press",
           "RazorAttentionPress", "SCOPEPress", "EMSPress", "Int4KVPress", "HeadKVPress"]
