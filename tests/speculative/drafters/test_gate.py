"""SpeedGate: picks the draft budget with the lowest measured seconds per committed token."""
from __future__ import annotations

from tachy.speculative.drafters import gate as gate_module
from tachy.speculative.drafters.base import Drafter
from tachy.speculative.drafters.gate import SpeedGate
from tachy.speculative.tree import DraftTree


class ChainDrafter(Drafter):
    """Always drafts ``max_tokens`` copies of token 1 (the fake target decides what is accepted)."""

    name = "chain"

    def _draft(self, max_tokens: int) -> DraftTree:
        return DraftTree.chain([1] * max_tokens)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def run_steps(gate: SpeedGate, clock: FakeClock, steps: int, step_cost, accepted) -> list[int]:
    """Drive the gate like the engine: propose, 'forward' (advance the clock), update. Returns arms played."""
    ids, arms = [0, 0, 0], []
    for _ in range(steps):
        tree = gate.propose(ids, 16)
        arms.append(gate.arm)
        n = accepted(len(tree))
        clock.now += step_cost(len(tree))
        ids = ids + [1] * (n + 1)
        gate.update(ids, n)
    return arms


def test_gate_settles_on_plain_decoding_when_nothing_is_accepted(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(gate_module, "time", clock)
    gate = SpeedGate(ChainDrafter(), explore=0.0)
    gate.reset([0, 0, 0])
    arms = run_steps(gate, clock, 20, step_cost=lambda T: 0.01 * (1 + 0.05 * T), accepted=lambda T: 0)
    assert arms[:4] == [16, 8, 4, 0]            # every arm measured once, largest first
    assert set(arms[4:]) == {0}                 # then plain decoding, the cheapest per token


def test_gate_prefers_the_budget_with_the_lowest_cost_per_token(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(gate_module, "time", clock)
    gate = SpeedGate(ChainDrafter(), explore=0.0)
    gate.reset([0, 0, 0])
    # acceptance saturates at 6 tokens while cost keeps growing: budget 8 is best (7 tokens for 1.4 units)
    arms = run_steps(gate, clock, 30, step_cost=lambda T: 0.01 * (1 + 0.05 * T), accepted=lambda T: min(T, 6))
    assert set(arms[4:]) == {8}


def test_gate_keeps_its_costs_across_requests(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(gate_module, "time", clock)
    gate = SpeedGate(ChainDrafter(), explore=0.0)
    gate.reset([0, 0, 0])
    cost = lambda T: 0.01 * (1 + 0.05 * T)  # noqa: E731
    run_steps(gate, clock, 10, step_cost=cost, accepted=lambda T: 0)
    gate.reset([5, 5, 5])                        # a new request: no re-measuring of every arm
    arms = run_steps(gate, clock, 5, step_cost=cost, accepted=lambda T: 0)
    assert arms == [0] * 5
