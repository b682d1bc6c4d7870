"""Shared fixtures: tiny random models for fast tests, the embedded model for integration tests."""
from __future__ import annotations

import os

import pytest
import torch

from pathlib import Path

from tachy.config import ModelConfig

# Each pytest-xdist worker gets its share of the cores. PyTorch's default (every core per process) put two
# workers' OpenMP pools on the same two cores: each spun waiting on threads the other worker held, and a test of
# tiny models took 151 s in CI instead of 3 s alone (tests/decoding/test_beam.py, on an Intel Xeon). Tests that
# need more threads ask for them (the two_torch_threads fixture).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // _WORKERS))

# The development data lives in shared/ beside the checkout (as in CI's fresh clone).
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# tests that read it skip with this where a checkout has no shared/ beside it
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"development data not available ({DATA})")


@pytest.fixture(params=["fma", "amx"])
def attention_path(request):
    """A test runs once with the C kernels' AVX-512 path and once, where the CPU has it, with AMX
    (kernels.use_amx; skipped without AMX); the setting before is restored after. Yields "fma" or "amx"."""
    from tachy import kernels

    before = kernels.amx_used()
    if request.param == "amx" and not kernels.use_amx(True):
        pytest.skip("no AMX on this CPU")
    kernels.use_amx(request.param == "amx")
    yield request.param
    kernels.use_amx(before)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Real-model tests run on one thread: on a shared 2-core machine two threads spin against each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def two_torch_threads():
    """PyTorch on two threads for the test (restored after): what thread-guard tests need to see a difference."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def tiny_config(arch: str, **overrides) -> ModelConfig:
    """Small configs exercising every architectural feature (GQA, tied embeddings, sliding window...)."""
    if arch == "llama":
        base = dict(arch="llama", vocab_size=101, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                    head_dim=16, intermediate_size=96, max_seq_len=128, rope_theta=10000.0, tie_embeddings=True)
    elif arch == "qwen2":
        base = dict(arch="llama", vocab_size=101, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=1,
                    head_dim=16, intermediate_size=96, max_seq_len=128, rope_theta=1e6, qkv_bias=True)
    elif arch == "llama3":
        base = dict(arch="llama", vocab_size=101, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=16, intermediate_size=96, max_seq_len=128, rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    elif arch == "gemma3":
        base = dict(arch="gemma3", vocab_size=101, hidden_size=64, num_layers=6, num_heads=4, num_kv_heads=1,
                    head_dim=32, intermediate_size=96, max_seq_len=128, rope_theta=1e6, qk_norm=True,
                    hidden_act="gelu_pytorch_tanh", sliding_window=8, layer_types=["sliding"] * 5 + ["full"],
                    query_pre_attn_scalar=32, embed_scale=8.0, tie_embeddings=True)
    else:
        raise ValueError(arch)
    base.update(overrides)
    return ModelConfig(**base)


def hf_twin(cfg: ModelConfig, seed: int = 0):
    """A transformers model with random weights for ``cfg`` and its state dict (the parity oracle)."""
    import transformers

    torch.manual_seed(seed)
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
    hf_cfg._attn_implementation = "eager"
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    with torch.no_grad():  # default init is near zero for norms; perturb everything so all paths matter
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return hf, dict(hf.state_dict())


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    from tachy.models import build_model

    cfg = tiny_config(arch, **overrides)
    _, sd = hf_twin(cfg, seed)
    model = build_model(cfg)
    model.load_hf_state_dict(sd)
    return model.eval()


def tiny_gguf_model(arch: str = "llama", seed: int = 0, fmt: str = "Q8_0", **overrides):
    """A tiny model whose matrices are GGUF blocks (quantized by the gguf package from ``hf_twin``'s random
    weights), run by the C forward where the kernels are available."""
    import gguf
    import numpy as np

    from tachy import kernels
    from tachy.models import model_from_state_dict
    from tachy.models.cpu_forward import CPUForward

    cfg = tiny_config(arch, **overrides)
    _, sd = hf_twin(cfg, seed)
    qtype = gguf.GGMLQuantizationType[fmt]
    quantized = {}
    for name, t in sd.items():
        if t.dim() == 2:
            blocks = gguf.quants.quantize(t.detach().numpy().astype(np.float32), qtype)
            quantized[name] = kernels.QuantWeight(int(qtype), torch.from_numpy(np.ascontiguousarray(blocks)), t.shape[1])
        else:
            quantized[name] = t.detach()
    model = model_from_state_dict(cfg, quantized, quantized=True)
    model.cpu_forward = CPUForward.build(model)
    return model.eval()


@pytest.fixture(scope="session")
def smollm():
    """The embedded default model as a user gets it (its GGUF blocks where the CPU kernels run, else bf16),
    loaded once per test session."""
    import tachy

    return tachy.load("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def smollm_torch():
    """The embedded model with bf16 weights on the PyTorch forward (what runs where the C forward cannot:
    other devices, plain-C builds of the kernels), where the int4 self-draft is the default drafter."""
    import tachy

    engine = tachy.load("smollm2-135m", dtype="bf16", progress=False)
    engine.model.cpu_forward = None
    return engine
