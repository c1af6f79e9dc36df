"""Task YAML: the expression language, slots, derived values, forms, and the one-line errors."""

from __future__ import annotations

import pytest

from circuitfind.errors import CircuitfindError
from circuitfind.task.expressions import Expression
from circuitfind.task.spec import TaskSpec

CAPITALS = {
    "name": "capitals",
    "template": "{country}: {city}\n{country} capital:",
    "slots": {
        "country": {"values": ["France", "Italy", "Spain"]},
        "city": {"expr": "capital[country]"},
    },
    "tables": {"capital": {"France": "Paris", "Italy": "Rome", "Spain": "Madrid"}},
    "answer": "city",
    "answer_prefix": " ",
    "balance": "answer",
}


def expr(text: str, names=("x", "y", "op")):
    return Expression(text, names, {"t": {"a": 1}}, "task.answer")


def test_expressions_compute_with_pasted_slots_tables_and_indexing():
    assert expr("x {op} y")({"x": 7, "y": 3, "op": "-"}) == 4
    assert expr("x {op} y")({"x": 7, "y": 3, "op": "*"}) == 21
    assert expr("str(x)[0] != str(y)[0] and x // 10 in [1, 2]")({"x": 17, "y": 23, "op": "+"})
    assert expr("t[op] + max(x, y)")({"x": 7, "y": 3, "op": "a"}) == 8


@pytest.mark.parametrize(
    "text, message",
    [
        ("x ** y", "uses 'x \\*\\* y', which task expressions do not allow"),
        ("x.__class__", "do not allow"),
        ("open('f')", "do not allow"),
        ("(lambda: 1)()", "do not allow"),
        ("z + 1", "uses 'z', which is not a slot; the slots are op, x, y"),
        ("x +", "is not an expression"),
        ("{q} + 1", "pastes {q}, which is not a slot"),
    ],
)
def test_expressions_refuse_anything_outside_the_grammar(text, message):
    with pytest.raises(CircuitfindError, match=message):
        expr(text)


def test_an_expression_that_fails_on_a_value_names_it():
    with pytest.raises(CircuitfindError, match="cannot be evaluated for"):
        expr("x // y")({"x": 1, "y": 0, "op": "+"})


def test_derived_slots_read_tables_and_answers_may_be_words():
    task = TaskSpec(CAPITALS)
    problems = task.problems("train")
    assert [p.answer for p in problems] == ["Paris", "Rome", "Madrid"]
    prompt = task.render(problems[1], task.draw_form(__import__("random").Random(0)))
    assert prompt.text == "Italy: Rome\nItaly capital:" and prompt.answer_text == " Rome"
    assert [(s, prompt.text[a:b]) for s, a, b in task.spans(prompt)] == [
        ("country", "Italy"), ("city", "Rome"), ("country", "Italy")
    ]  # fmt: skip


def test_without_balance_an_alternate_still_needs_another_answer():
    """balance: none gives every answer the key "": alternates are told apart by their answers, not by that
    key (which drew none at all)."""
    task = TaskSpec(CAPITALS | {"balance": "none"})
    base = task.problems("train")[0]
    assert [p.answer for p in task.varied(base, ["country"], "train", new_key=True)] == ["Rome", "Madrid"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"template": "{country} {planet}:"}, "uses {planet}, which has no domain; add task.slots.planet"),
        ({"template": "{country:>8}:"}, "has a format"),
        ({"slots": {"country": {"values": []}}}, "values is empty"),
        ({"slots": {"country": {"range": [5, 1]}}}, "is empty or not two integers"),
        ({"slots": {"country": {"range": [1, 5], "values": [1]}}}, "needs exactly one of"),
        ({"balance": "middle"}, "task.balance='middle' is unknown"),
        ({"variants": {"v": {"swap": [0, 9], "p": 0.5}}}, "swap=\\[0, 9\\]: give two line numbers"),
        ({"variants": {"v": {"insert": "x", "p": 2.0}}}, "p=2.0 is a probability"),
        ({"variants": {"v": {"bind": ["a", "b"], "values": [["x"]]}}}, "must list tuples of 2 values"),
        ({"transfer": {"planet": {"values": [1]}}}, "task.transfer.planet is not an enumerated slot"),
    ],
)
def test_task_mistakes_are_one_line(change, message):
    cfg = {**CAPITALS, **change}
    if "slots" in change:
        cfg["slots"] = {**CAPITALS["slots"], **change["slots"]}
    with pytest.raises(CircuitfindError, match=message):
        TaskSpec(cfg)


def test_variable_chain_distractors_make_copying_a_number_score_as_chance():
    """The chain's forms: two without another variable, one with it after the chain's head, one with it
    first. In the two distractor forms, copying the first number or the last is right in one form only,
    and the distractor never starts with the answer's first digit, so first-token accuracy cannot
    count a copied distractor as binding."""
    import random
    import re

    from circuitfind.evaluation.accuracy import task_prompts
    from circuitfind.task.library import load_desiderata, load_task, sample_pairs

    task = load_task("variable_chain")
    (form,) = [v for v in task.variants if v.templates]
    assert len(form.templates) == 4
    prompts = task_prompts(task, "train", 200)
    by_form = {t: [p for p in prompts if p.form.template == t] for t in form.templates}
    assert all(len(found) >= 30 for found in by_form.values()), "every form is drawn"
    for template, found in by_form.items():
        for p in found:
            numbers = re.findall(r"\d+", p.text)
            assert p.answer_text in numbers and len(numbers) == 1 + ("{d}" in template)
            if len(numbers) == 2:
                other = [n for n in numbers if n != p.answer_text][0]
                assert other[0] != p.answer_text[0]
    after, first = form.templates[2], form.templates[3]
    assert all(re.findall(r"\d+", p.text)[0] == p.answer_text for p in by_form[after])  # the head's value first
    assert all(re.findall(r"\d+", p.text)[-1] == p.answer_text for p in by_form[first])  # ... or last
    assert all(p.text.startswith(f"Let {dict(p.form.texts)['n3']} = ") for p in by_form[first])
    (vd,) = load_desiderata("chain", task)
    for pair in sample_pairs(task, vd, 40, seed=3):
        assert pair.base["d"] == pair.alt["d"] and pair.base["v"] != pair.alt["v"]
        assert pair.base.form == pair.alt.form and str(pair.alt["d"])[0] != str(pair.alt["v"])[0]
    assert task.render(task.problems("train")[0], task.draw_form(random.Random(0))).text.endswith(" = ")
