"""Data invariants: balance, validity, what each pair may differ in, disjoint splits, seeds, and the
paper's pairs reproduced exactly by the arithmetic task."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from circuitfind.errors import CircuitfindError
from circuitfind.model.builtin import build_char_tokenizer
from circuitfind.task.encoding import PairEncoder
from circuitfind.task.library import default_desiderata, load_desiderata, load_task, sample_pairs, shipped, task_config
from circuitfind.task.pairs import balanced_counts, build_data, data_fingerprint, make_pairs

DIGITS = [str(d) for d in range(1, 10)]
VARIANTS = {
    "variants": {
        "names": {"values": [["x", "y"], ["a", "b"]]},
        "y_first": {"p": 0.5},
        "distractor": {"p": 0.5, "slots": {"dname": {"values": ["z", "w"]}}},
    }
}


def arithmetic(overrides=None):
    task = load_task("arithmetic", overrides or {})
    return task, {d.name: d for d in load_desiderata("vd_oi", task)}


def sizes(name: str):
    cfg = task_config(name)
    return SimpleNamespace(**{k: cfg[k] for k in ("n_train", "n_test", "n_transfer")})


@pytest.mark.parametrize(
    "case, overrides, seed",
    [("arithmetic/seed0", None, 0), ("arithmetic/seed1", None, 1), ("arithmetic_variants/seed0", VARIANTS, 0)],
)
def test_the_arithmetic_task_draws_the_papers_pairs(case, overrides, seed):
    recorded = json.loads((Path(__file__).parent / "golden" / "task_fingerprints.json").read_text())
    task, des = arithmetic(overrides)
    data = build_data(task, sizes("arithmetic"), list(des.values()), seed)
    assert data_fingerprint(data) == recorded[case]


@pytest.mark.parametrize("name", ["vd", "oi"])
def test_pairs_are_balanced_valid_and_disjoint(name):
    task, des = arithmetic()
    train, test = make_pairs(task, des[name], "train", [50, 50], random.Random(0))
    assert len(train) == 50 and len(test) == 50
    for split in (train, test):
        counts = Counter(p.base.problem.key for p in split)
        assert counts == Counter(balanced_counts(50, DIGITS))
    for p in train + test:
        assert p.base.problem.answer > 0 and p.alt.problem.answer >= 0
        assert p.base.answer_text[0] != p.alt.answer_text[0]
    assert not {p.base.problem for p in train} & {p.base.problem for p in test}


def test_vd_pairs_differ_only_in_x_and_oi_only_in_the_operation():
    task, des = arithmetic()
    for p in sample_pairs(task, des["vd"], 60):
        assert p.base["x"] != p.alt["x"] and (p.base["y"], p.base["op"]) == (p.alt["y"], p.alt["op"])
    for p in sample_pairs(task, des["oi"], 60):
        assert p.base["op"] != p.alt["op"] and (p.base["x"], p.base["y"]) == (p.alt["x"], p.alt["y"])


def test_forms_are_shared_by_base_and_alternate_and_render_as_before():
    task, des = arithmetic(VARIANTS)
    pairs = sample_pairs(task, des["vd"], 90)
    assert all(p.base.form == p.alt.form for p in pairs)
    assert {p.base.form.edits for p in pairs} > {()}, "some prompts must leave the canonical form"
    problem = task.problem(("+", 12, 34))
    form = type(pairs[0].base.form)(
        task.template,
        (("xname", "a"), ("yname", "b")),
        (("swap", 0, 1), ("insert", 0, "{dname} = {dvalue}", (("dname", "z"), ("dvalue", "17")))),
    )
    assert task.render(problem, form).text == "z = 17\nb = 34\na = 12\na + b = "


def test_same_seed_same_pairs_other_seed_other_pairs():
    task, des = arithmetic()
    assert sample_pairs(task, des["vd"], 20, seed=3) == sample_pairs(task, des["vd"], 20, seed=3)
    assert sample_pairs(task, des["vd"], 20, seed=3) != sample_pairs(task, des["vd"], 20, seed=4)


def test_transfer_pairs_use_the_transfer_operation_and_oi_alternates_the_train_ones():
    task, des = arithmetic()
    assert {p.base["op"] for p in sample_pairs(task, des["vd"], 30, split="transfer")} == {"*"}
    assert {p.alt["op"] for p in sample_pairs(task, des["oi"], 30, split="transfer")} <= {"+", "-"}


def test_too_few_prompts_says_how_many_exist():
    task, des = arithmetic({"slots": {"x": {"range": [10, 12]}, "y": {"range": [10, 12]}}})
    with pytest.raises(CircuitfindError, match=r"usable bases in all.*task.n_train can be at most \d+"):
        make_pairs(task, des["vd"], "train", [50, 10], random.Random(0), ("task.n_train", "task.n_test"))


def test_answer_token_is_found_after_the_prompt():
    task, des = arithmetic()
    enc = PairEncoder(build_char_tokenizer())
    pairs = sample_pairs(task, des["vd"], 9)
    batch = enc.encode(pairs, des["vd"])
    for i, p in enumerate(pairs):
        assert enc.tokenizer.decode([int(batch.base_answer[i])]) == p.base.answer_text[0]
        assert enc.tokenizer.decode([int(batch.alt_answer[i])]) == p.alt.answer_text[0]
    assert (batch.up[:, 0] == batch.alt_answer).all() and (batch.down == batch.base_answer).all()
    assert (batch.base_attn[:, -1] == 1).all() and (batch.alt_attn[:, -1] == 1).all()  # left padding


def test_a_tokenizer_that_merges_prompt_and_answer_is_rejected():
    tok = build_char_tokenizer()
    enc = PairEncoder(tok)
    enc.ids = lambda text: tok(text.replace("= 4", "=#"))["input_ids"]  # a merge across the boundary
    with pytest.raises(CircuitfindError, match="does not split the answer cleanly"):
        enc.answer_token("x = 1\ny = 3\nx + y = ", "4")


def test_retrieval_evaluates_the_query_slot():
    task = load_task("retrieval")
    assert task.problem(("x", 31, 48)).answer == 31 and task.problem(("x + y", 31, 48)).answer == 79
    des = {d.name: d for d in load_desiderata("vd_oi", task)}
    for p in sample_pairs(task, des["vd"], 18):
        assert p.base["op"] == p.alt["op"] and p.alt.problem.answer == p.alt["x"] or p.base["op"] == "x + y"


@pytest.mark.parametrize("name", shipped("task"))
def test_every_shipped_task_builds_its_pairs(name):
    task = load_task(name)
    desiderata = load_desiderata(default_desiderata(name), task)
    data = build_data(task, sizes(name), desiderata, 0)
    for des in desiderata:
        dd = data[des.name]
        assert len(dd.train) == sizes(name).n_train and len(dd.test) == sizes(name).n_test
        for p in dd.train + dd.test + dd.transfer:
            changed = {s for s in task.enumerated if p.base[s] != p.alt[s]}
            assert changed and changed <= set(des.vary), (name, des.name, changed)
            assert p.base.text != p.alt.text


def test_ioi_pairs_name_the_indirect_object_and_contrast_the_subject():
    task = load_task("ioi")
    des = {d.name: d for d in load_desiderata("ioi", task)}
    pairs = sample_pairs(task, des["context"], 16)
    for p in pairs:
        assert p.base.answer_text == f" {p.base['io']}" and p.base.text.endswith(" to")
        assert p.base.answer_text == p.alt.answer_text  # invariance: the answer stays
    names = sorted({p.base["io"] for p in sample_pairs(task, des["io"], 32)})
    assert len(names) == 16  # balanced over the answer: every name is an answer


def test_an_answer_whose_first_token_is_a_bare_space_is_refused():
    # The trap of a tokenizer that writes ` 8` as ` ` then `8`: every answer would start with the
    # space, accuracy would score the space, and no logit difference could tell answers apart.
    enc = PairEncoder(build_char_tokenizer())
    with pytest.raises(CircuitfindError, match="first token is only whitespace"):
        enc.answer_token("Then b =", " 57")
    assert enc.tokenizer.decode([enc.answer_token("Then b = ", "57")]) == "5"
