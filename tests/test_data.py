"""Data invariants: balance, validity, what each pair may differ in, disjoint splits, seeds."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from circuitfind.errors import CircuitfindError
from circuitfind.model.builtin import build_char_tokenizer
from circuitfind.task.desiderata import get_desideratum
from circuitfind.task.encoding import PairEncoder
from circuitfind.task.pairs import balanced_counts, make_pairs
from circuitfind.organism.problems import Problem, Variants, check_template, first_digit, task_space

RANGES = {
    "add": {"x": [10, 99], "y": [10, 99]},
    "sub": {"x": [10, 99], "y": [10, 99]},
    "mul": {"x": [10, 99], "y": [2, 9]},
}
TEMPLATE = "x = {x}\ny = {y}\nx {op} y = "


def pairs(name: str, sizes=(50, 50), seed=0, ops=("add", "sub"), variants=Variants()):
    space = task_space(RANGES, ["add", "sub", "mul"], ["add", "sub"], variants)
    return make_pairs(get_desideratum(name).alternates, space, list(ops), list(sizes), random.Random(seed), name)


@pytest.mark.parametrize("name", ["vd", "oi"])
def test_pairs_are_balanced_valid_and_disjoint(name):
    train, test = pairs(name, (50, 50))
    assert len(train) == 50 and len(test) == 50
    for split in (train, test):
        counts = Counter(first_digit(p.base.answer) for p in split)
        assert set(counts) == set(range(1, 10)) and max(counts.values()) - min(counts.values()) <= 1
        assert counts == Counter(balanced_counts(50))
    for p in train + test:
        assert p.base.answer > 0 and p.alt.answer >= 0
        assert first_digit(p.base.answer) != first_digit(p.alt.answer)
    assert not {p.base for p in train} & {p.base for p in test}


def test_vd_pairs_differ_only_in_x_and_oi_only_in_the_operation():
    for p in sum(pairs("vd"), []):
        assert p.base.x != p.alt.x and (p.base.y, p.base.op) == (p.alt.y, p.alt.op)
    for p in sum(pairs("oi"), []):
        assert p.base.op != p.alt.op and (p.base.x, p.base.y) == (p.alt.x, p.alt.y)


def test_variants_are_shared_by_base_and_alternate():
    v = Variants(names=(("x", "y"), ("a", "b")), y_first=0.5, distractor=0.5)
    for name in ("vd", "oi"):
        for p in sum(pairs(name, variants=v), []):
            assert (p.base.names, p.base.y_first, p.base.distractor) == (p.alt.names, p.alt.y_first, p.alt.distractor)
    rendered = Problem(12, 34, "add", names=("a", "b"), y_first=True, distractor=("z", 17, 0)).render(TEMPLATE)
    assert rendered == "z = 17\nb = 34\na = 12\na + b = "
    assert Problem(12, 34, "sub").render(TEMPLATE) == "x = 12\ny = 34\nx - y = "


def test_same_seed_same_pairs_other_seed_other_pairs():
    assert pairs("vd", seed=3) == pairs("vd", seed=3)
    assert pairs("vd", seed=3) != pairs("vd", seed=4)


def test_transfer_pairs_use_the_transfer_operation():
    (transfer,) = pairs("vd", sizes=(30,), ops=("mul",))
    assert {p.base.op for p in transfer} == {"mul"}
    (transfer_oi,) = pairs("oi", sizes=(30,), ops=("mul",))
    assert {p.alt.op for p in transfer_oi} <= {"add", "sub"}


def test_too_few_prompts_is_a_clear_error():
    space = task_space({"add": {"x": [10, 12], "y": [10, 12]}}, ["add"], ["add"])
    with pytest.raises(CircuitfindError, match="widen dataset.ranges"):
        make_pairs(get_desideratum("vd").alternates, space, ["add"], [50], random.Random(0), "vd")


def test_unknown_operation_empty_range_and_bad_template_are_errors():
    with pytest.raises(CircuitfindError, match="unknown operation 'pow'"):
        task_space(RANGES, ["pow"], ["add"])
    with pytest.raises(CircuitfindError, match="empty"):
        task_space({"add": {"x": [50, 10], "y": [10, 99]}}, ["add"], ["add"])
    with pytest.raises(CircuitfindError, match="no {op}"):
        check_template("x = {x}\ny = {y}\nx + y = ")


def test_answer_token_is_found_after_the_prompt():
    enc = PairEncoder(build_char_tokenizer(), TEMPLATE)
    train, _ = pairs("vd", (9, 9))
    batch = enc.encode(train)
    for i, p in enumerate(train):
        assert enc.tokenizer.decode([int(batch.base_answer[i])]) == str(p.base.answer)[0]
        assert enc.tokenizer.decode([int(batch.alt_answer[i])]) == str(p.alt.answer)[0]
    # Left padding: every prompt ends at the last column.
    assert (batch.base_attn[:, -1] == 1).all() and (batch.alt_attn[:, -1] == 1).all()


def test_a_tokenizer_that_merges_prompt_and_answer_is_rejected():
    tok = build_char_tokenizer()
    enc = PairEncoder(tok, "x = {x}\ny = {y}\nx {op} y =")
    enc.ids = lambda text: tok(text.replace("= 4", "=#"))["input_ids"]  # a merge across the boundary
    with pytest.raises(CircuitfindError, match="does not split the answer cleanly"):
        enc.answer_token("x = 1\ny = 3\nx + y = ", 4)


def test_retrieval_is_an_operation():
    assert Problem(3, 5, "get").render(TEMPLATE) == "x = 3\ny = 5\nx = " and Problem(3, 5, "get").answer == 3
    assert Problem(3, 5, "get", names=("a", "b"), y_first=True).render(TEMPLATE) == "b = 5\na = 3\na = "
    space = task_space({"get": {"x": [1, 9], "y": [1, 9]}}, ["get"], ["get"])
    (vd,) = make_pairs(get_desideratum("vd").alternates, space, ["get"], [18], random.Random(0), "vd")
    assert all(p.alt.answer == p.alt.x != p.base.x for p in vd)
