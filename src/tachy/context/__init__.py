"""Context reuse beyond exact prefixes (tachy.prefix_cache keeps those): PIE for edited prompts, APE for
retrieved passages encoded one by one."""
from .ape import APEConfig, PassageStore, ape_generate, encode_passages
from .pie import PIEResult, pie_prefill, rerotate

__all__ = ["APEConfig", "PIEResult", "PassageStore", "ape_generate", "encode_passages", "pie_prefill", "rerotate"]
