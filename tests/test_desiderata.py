"""Desiderata as data: loss forms, token-set targets, contrast slots, and their checks."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from circuitfind.config.schema import ModelConfig, TinyLlamaConfig
from circuitfind.errors import CircuitfindError
from circuitfind.evaluation.heldout import evaluate_masks, prepare_split
from circuitfind.methods.objective import term_loss, unpatched_logit_diff
from circuitfind.model.components import locate_components
from circuitfind.model.engine import make_engine
from circuitfind.model.loading import load_model
from circuitfind.runs.train import run_search
from circuitfind.task.desiderata import desiderata_from
from circuitfind.task.encoding import PairEncoder, position_ids
from circuitfind.task.library import load_desiderata, load_task, sample_pairs
from circuitfind.task.spec import TaskSpec

from conftest import compose

TWO_VALUES = {
    "name": "two_values",
    "template": "{n1} = {v}\n{n2} = {w}\n{n1} = ",
    "slots": {"v": {"range": [10, 99]}, "w": {"range": [10, 99]}},
    "answer": "v",
    "constraints": ["str(v)[0] != str(w)[0]"],
    "variants": {"names": {"bind": ["n1", "n2"], "values": [["a", "b"], ["p", "q"]]}},
}


def tiny():
    loaded = load_model(ModelConfig(kind="tiny_llama", tiny=TinyLlamaConfig()))
    sites = locate_components(loaded.model)
    return loaded.model, loaded.tokenizer, make_engine("cached", loaded.model, sites), sites


def test_cross_entropy_is_the_models_own_log_probability_when_nothing_is_patched():
    model, tok, engine, sites = tiny()
    task = load_task("arithmetic")
    vd = dataclasses.replace(load_desiderata("vd_oi", task)[0], loss="cross_entropy")
    enc = PairEncoder(tok).encode(sample_pairs(task, vd, 9), vd)
    prep = engine.prepare(enc)
    keep_all = torch.ones(1, *sites.space.shape)
    loss = term_loss(engine, vd, prep, unpatched_logit_diff(engine, prep), keep_all)
    with torch.no_grad():
        logits = model(input_ids=enc.base_ids, attention_mask=enc.base_attn, position_ids=position_ids(enc.base_attn))
    expected = -logits.logits[:, -1].log_softmax(-1).gather(1, enc.alt_answer[:, None]).mean()
    assert torch.allclose(loss[0], expected, atol=1e-5)


def test_a_token_set_target_sums_its_probabilities_and_counts_any_of_its_tokens():
    model, tok, engine, sites = tiny()
    task = load_task("arithmetic")
    entry = {"name": "low", "vary": ["x"], "target": "tokens", "tokens": ["1", "2"], "loss": "cross_entropy"}
    (des,) = desiderata_from({"terms": [entry]}, task)
    enc = PairEncoder(tok).encode(sample_pairs(task, des, 9), des)
    assert enc.target.shape == (9, 2) and enc.up.shape == (9, 2)
    prep = engine.prepare(enc)
    hidden = engine.final_hidden(prep, torch.ones(1, *sites.space.shape))
    logp = engine.readout.logits(hidden).log_softmax(-1)
    expected = logp[..., enc.target[0]].logsumexp(-1)
    assert torch.allclose(engine.readout.target_logprob(hidden, enc.target), expected, atol=1e-5)
    split = prepare_split(des, "test", [prep], engine)
    acc = evaluate_masks(split, engine, torch.ones(1, *sites.space.shape))["acc"]
    pred = logp.argmax(-1)[0]
    assert math.isclose(float(acc[0]), float(((pred == enc.target[0, 0]) | (pred == enc.target[0, 1])).float().mean()))


def test_a_contrast_slot_is_the_other_token_of_the_logit_difference():
    _, tok, _, _ = tiny()
    task = TaskSpec(TWO_VALUES)
    entry = {"name": "wi", "vary": ["w"], "target": "base", "contrast": "w", "loss": "delta_squared"}
    (des,) = desiderata_from({"terms": [entry]}, task)
    pairs = sample_pairs(task, des, 8)
    assert all(p.base.answer_text == p.alt.answer_text for p in pairs)  # an invariance: the answer stays
    enc = PairEncoder(tok).encode(pairs, des)
    for i, p in enumerate(pairs):
        assert tok.decode([int(enc.up[i, 0])]) == str(p.base["v"])[0]
        assert tok.decode([int(enc.down[i])]) == str(p.base["w"])[0]


def test_two_tokens_that_coincide_are_refused():
    _, tok, _, _ = tiny()  # a character tokenizer: `57` and `52` both start with `5`
    task = TaskSpec({**TWO_VALUES, "constraints": ["v // 10 == w // 10", "v != w"]})
    entry = {"name": "wi", "vary": ["w"], "target": "base", "contrast": "w", "loss": "delta_squared"}
    (des,) = desiderata_from({"terms": [entry]}, task)
    with pytest.raises(CircuitfindError, match="are the same token for 4 pairs"):
        PairEncoder(tok).encode(sample_pairs(task, des, 4), des)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"name": "a", "vary": []}, "vary is empty"),
        ({"name": "a", "vary": ["q"]}, "names slot 'q', which task arithmetic lacks"),
        ({"name": "a", "vary": ["x"], "loss": "l1"}, "loss='l1'; choose from"),
        ({"name": "a", "vary": ["x"], "target": "tokens"}, "target: tokens goes with tokens"),
        ({"name": "a", "vary": ["x"], "contrast": "z"}, "names slot 'z'"),
    ],
)
def test_bad_desiderata_are_one_line(entry, message):
    with pytest.raises(CircuitfindError, match=message):
        desiderata_from({"terms": [entry]}, load_task("arithmetic"))


def test_cross_entropy_and_token_targets_train_and_evaluate_end_to_end(tmp_path):
    terms = (
        "desiderata.terms=[{name: vd, vary: [x], loss: cross_entropy, weight: 5.0, with_sparsity: true},"
        "{name: low, vary: [x], target: tokens, tokens: ['1', '2'], loss: cross_entropy, train: false}]"
    )
    overrides = ("+desiderata=vd_oi", "experiment=smoke", "progress=false", "plots=false", terms)
    (record,) = run_search(compose(*overrides), tmp_path / "run")
    assert {"vd_test/acc", "low_test/acc", "low_transfer/acc"} <= set(record.metrics)
    assert all(math.isfinite(v) for k, v in record.metrics.items() if "/acc" in k)
    assert record.titles == {"vd": "vd", "low": "low"}


def test_operation_invariance_alone_finds_the_empty_circuit(tmp_path):
    """README: `+desiderata=oi` is a sanity check; keeping the answer is best served by patching nothing."""
    (record,) = run_search(compose("+desiderata=oi", "progress=false", "plots=false"), tmp_path / "run")
    assert record.n_patched == 0 and record.metrics["oi_test/acc"] == 1.0
    assert list(record.titles) == ["oi", "vd"]
