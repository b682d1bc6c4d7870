"""benchmarks/gpu_smoke.py without a GPU: it refuses clearly, and its checks run on the CPU (tiny settings)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_smoke.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run")
def test_refuses_without_cuda():
    r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "no CUDA device here" in r.stderr and "--device cpu" in r.stderr


@pytest.mark.slow
def test_cpu_dry_run_writes_its_results(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--prompts", "1", "--new-tokens", "6",
                        "--drafters", "model-free", "--out", str(tmp_path)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["passed"] and results["device"].startswith("CPU")
    assert results["parity"]["worst_rel_max_diff"] < 1e-4
    assert set(results["speed"]) == {"plain", "model-free"}
    assert "| model-free | yes |" in (tmp_path / "results.md").read_text()
    assert all(results["batch"][rows]["identical_to_plain"] for rows in ("plain rows", "speculative rows"))
