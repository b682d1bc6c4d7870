"""benchmarks/handoff.py end to end on the embedded model (tiny settings): both modes run, both requests get
their lone tokens, and only the handoff mode lets the short request start before the long one ends."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import needs_data

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "handoff.py"


@pytest.mark.slow
@needs_data   # the load test's prompts
def test_handoff_benchmark_runs_and_reports(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--long-tokens", "48", "--short-tokens", "4",
                        "--arrive-after", "4", "--rounds", "2", "--threads", "1", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["medians"]) == {"handoff", "wait"}
    for mode in ("handoff", "wait"):
        assert len(results["runs"][mode]) == 2
    # handed off, the short request's first token comes before the long request's last; waiting, after it
    assert [run["short_started_first"] for run in results["runs"]["handoff"]] == [True, True]
    assert [run["short_started_first"] for run in results["runs"]["wait"]] == [False, False]
    assert "| handoff |" in (tmp_path / "results.md").read_text()
