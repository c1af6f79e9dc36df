"""Scoring circuits in stages of validation pairs: clear comparisons on the first stage, close ones on
as many pairs as they need, and the same decision as scoring every pair. Made-up pair losses stand in
for the model."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Dict

import pytest
import torch

from circuitfind.methods import staged_scores
from circuitfind.methods.objective import Objective, OnFirstUse
from circuitfind.methods.staged_scores import StagedScores, first_stage, packed

BATCH, BATCHES = 50, 8  # 400 validation pairs in batches of 50, as prune=stable draws them
A, B, C, D = frozenset({0}), frozenset({1}), frozenset({2}), frozenset({0, 2})


def pattern(means) -> torch.Tensor:
    """Pair losses: each batch's mean from `means`, spread +-1 around it."""
    spread = torch.tensor([1.0, -1.0]).repeat(BATCH // 2)
    return torch.cat([m + spread for m in means])


# B's losses are 0 on every pair; A - B is +0.2 on the first batch (A looks worse, 1.4 standard errors)
# and -0.3 on the rest, so on all 400 pairs A is better by 0.24 (4.7 standard errors)
# D ties with C on average but differs from it by +-2 pair by pair: the two cannot be told apart
LOSSES = {A: pattern([0.2] + [-0.3] * 7), B: torch.zeros(BATCH * BATCHES), C: pattern([5.0] * 8)}
LOSSES[D] = 10.0 - LOSSES[C]
LOSSES[B | C] = LOSSES[B]


@pytest.fixture
def scores(monkeypatch):
    """StagedScores over one made-up objective whose pair losses are LOSSES, by circuit."""

    def pair_losses(engine, des, prep, d0, masks):
        circuits = [frozenset((m.flatten() == 0).nonzero().flatten().tolist()) for m in masks]
        return torch.stack([LOSSES[c][prep.index * BATCH : (prep.index + 1) * BATCH] for c in circuits])

    monkeypatch.setattr(staged_scores, "term_pair_loss", pair_losses)

    def run_groups(prep, masks):  # groups that move the circuits (larger first): the losses must follow
        patched = (masks.flatten(1) == 0).sum(1).tolist()
        order = sorted(range(len(patched)), key=lambda i: -patched[i])
        return [order[i : i + 3] for i in range(0, len(order), 3)]

    engine = SimpleNamespace(space=SimpleNamespace(shape=(1, 3)), device=torch.device("cpu"), run_groups=run_groups)

    def made(screen_pairs: int | None) -> StagedScores:
        # the validation split's batches are prepared when first scored (OnFirstUse): count them
        batches = OnFirstUse(lambda i: SimpleNamespace(pairs=range(BATCH), index=i), [(BATCH, 23)] * BATCHES)
        objective = Objective(None, batches, [None] * BATCHES, 1.0, True)
        return StagedScores(engine, [objective], chunk=8, screen_pairs=screen_pairs)

    return made


def test_a_clear_comparison_is_decided_on_the_first_stage(scores):
    staged = scores(BATCH)
    assert staged.stages == 4  # 50, 100, 200 and 400 pairs
    assert not staged.at_most(C, B, 0.0)  # C is worse by 5 on every pair
    assert staged.pairs_scored == 2 * BATCH
    assert staged.record()["circuits_on_every_pair"] == 0
    assert staged.objectives[0].batches.prepared == 1 and staged.pairs_of(1) == BATCH  # the rest not prepared


def test_a_close_comparison_takes_more_pairs_and_decides_as_every_pair_does(scores):
    staged = scores(BATCH)
    assert staged.values([A, B]) == pytest.approx([0.2, 0.0])  # the first stage alone would keep B
    assert staged.at_most(A, B, 0.0)
    assert 2 * BATCH < staged.pairs_scored <= 2 * BATCH * BATCHES
    every = scores(None)
    assert every.stages == 1 and every.at_most(A, B, 0.0)
    on_every_pair = staged.values([A], staged.stages)[0]
    assert every.values([A])[0] == pytest.approx(on_every_pair) == pytest.approx(-0.2375)


def test_comparisons_limited_to_the_first_stage_leave_the_close_ones_open(scores):
    """Putting a unit in screens a trial's outcomes on the first stage only: a close call there is None, not
    taken further, and a clear one is the answer every stage gives."""
    staged = scores(BATCH)
    assert staged.each_at_most([(C, B, 0.0), (A, B, 0.0)], stages=1) == [False, None]
    assert staged.pairs_scored == 3 * BATCH and staged.objectives[0].batches.prepared == 1
    assert staged.each_at_most([(C, B, 0.0), (A, B, 0.0)]) == [False, True]


def test_comparisons_decided_together_answer_as_one_at_a_time_and_score_each_batch_once(scores, monkeypatch):
    """Pruning decides which units may go alone all at once: the same answers and pairs as one comparison at a
    time, but each batch of pairs is scored once for every circuit that needs it (circuits that share a run
    share it there)."""
    comparisons = [(C, B, 0.0), (A, B, 0.0), (D, C, 0.0), (B, A, 0.5)]
    runs = []
    losses = staged_scores.term_pair_loss
    monkeypatch.setattr(staged_scores, "term_pair_loss", lambda *a: runs.append(a[2].index) or losses(*a))
    one = scores(BATCH)
    alone = [one.at_most(*comparison) for comparison in comparisons]
    runs_alone, runs[:] = list(runs), []
    together = scores(BATCH)
    assert together.each_at_most(comparisons) == alone == [False, True, True, True]
    assert together.pairs_scored == one.pairs_scored, "the same pairs"
    assert runs == list(range(BATCHES)) and len(runs_alone) > BATCHES, "each batch once (D and C tie: every pair)"


def test_the_best_drops_clear_losers_and_races_the_close_ones_to_the_decision(scores):
    staged = scores(BATCH)
    assert staged.best([B, C, A], [0.0, 0.0, 0.0]) == A
    scored: Dict[frozenset, int] = {c: len(parts[0]) for c, parts in staged.scored.items()}
    assert scored[C] == 1 and scored[A] == scored[B] > 1
    assert staged.best([B, A], [0.0, 0.5]) == B, "an offset (price x size) counts like J"


def test_the_circuit_in_hand_drops_trials_surely_worse_than_it_however_close_they_are_to_one_another(scores):
    staged = scores(BATCH)
    assert staged.best([C, D], [0.0, 0.0]) in (C, D)
    assert len(staged.scored[D][0]) == BATCHES, "without the circuit in hand, two tied trials race to every pair"
    staged = scores(BATCH)
    assert staged.best([B, C, D], [0.0, 0.0, 0.0], incumbent=B) == B
    assert {len(parts[0]) for parts in staged.scored.values()} == {1}, "decided on the first stage"
    assert staged.best([B, B | C], [0.0, 0.0], incumbent=B | C) == B | C, "a tie goes to the circuit in hand"


def test_the_first_stage_holds_the_first_screen_pairs_of_each_objective():
    batches = OnFirstUse(lambda i: SimpleNamespace(pairs=range(30)), [(30, 23)] * 3)
    objective = Objective(None, batches, [None] * 3, 1.0, True)
    (first,) = first_stage([objective], 50)
    assert first.n_pairs == 60 and batches.prepared == 0  # counted before any batch is prepared
    assert first_stage([objective], None)[0].n_pairs == 90
    assert len(first.batches[1].pairs) == 30 and batches.prepared == 1  # prepared once read


def test_masks_that_share_a_run_are_scored_in_one_chunk_unless_their_group_is_larger():
    """Groups of three (a subset and the two swap trials that share its run) in chunks of eight: a chunk takes
    two whole groups rather than splitting the third; a group larger than a chunk is split."""
    groups = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]]
    chunks = packed(groups, 8)
    assert chunks == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17], [18, 19]]
    assert all(len(c) <= 8 for c in chunks)
