"""`model=tracr`: RASP programs compiled by tracr, converted to HookedTransformers (model/tracr_compile.py).

The converted model against tracr's own `assembled_model.apply` (decoded outputs and the whole final
residual stream), on every program of the library and on every input up to length 2 plus random
longer ones; the ground truth (an unused branch left out, checked by ablating it); the cache; padding;
bad input. Compiling needs tracr and jax (`pip install 'circuitfind[tracr]'`): those tests skip
without them; the bad-input lines that need neither always run.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from circuitfind.config.schema import ModelConfig
from circuitfind.errors import CircuitfindError
from circuitfind.model import tracr_compile
from circuitfind.model.loading import load_model
from circuitfind.model.tracr_compile import TracrLM, TracrTokenizer, compile_program, hooked_transformer, program_spec
from circuitfind.model.tracr_programs import PROGRAMS
from circuitfind.runs.job import Job
from circuitfind.runs.train import Run
from circuitfind.task.library import load_task
from circuitfind.task.spec import SPLITS

from conftest import compose, train_error

pytestmark = pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning")
needs_tracr = pytest.mark.skipif(
    not all(tracr_compile.importlib.util.find_spec(m) for m in ("tracr", "jax", "haiku")),
    reason="tracr and jax are not installed: pip install 'circuitfind[tracr]'",
)

# what each program's output depends on, read off tracr's graph (docs/tracr.md)
TRUTH = {
    "frac_prevs": ["L0.MLP", "L1.H0"],
    "reverse": ["L0.H0", "L0.MLP", "L1.MLP", "L2.MLP", "L3.H0"],
    "sort": ["L0.MLP", "L1.H0", "L1.MLP", "L2.H0"],
    "histogram": ["L0.H0", "L0.MLP"],
    "hist_unused": ["L0.H0", "L0.MLP", "L1.MLP"],
}


@pytest.fixture(scope="module")
def compiled():
    """program -> (tracr's assembled model, the converted TracrLM, its tokenizer, meta), compiled once."""
    out = {}

    def get(name: str):
        if name not in out:
            import jax  # only where tracr is installed (needs_tracr)

            assembled, state, meta = compile_program(PROGRAMS[name])
            assembled.forward = jax.jit(assembled.forward)  # tracr's apply, compiled once per length: same numbers
            out[name] = (
                assembled,
                TracrLM(hooked_transformer(meta["tl_config"], state), meta),
                TracrTokenizer(meta),
                meta,
            )
        return out[name]

    return get


def inputs(spec, n_random: int = 12, seed: int = 0):
    """Every input of length 1..2, and random ones up to max_seq_len."""
    rng = random.Random(seed)
    short = [list(x) for n in (1, 2) for x in itertools.product(spec.vocab, repeat=n)]
    longer = [[rng.choice(spec.vocab) for _ in range(rng.randint(3, spec.max_seq_len))] for _ in range(n_random)]
    return short + longer


def unique(xs):
    return len(set(xs)) == len(xs)


@needs_tracr
@pytest.mark.e2e  # compiles every program afresh: 40 s on 2 cores
@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_conversion_matches_tracr_apply(compiled, name):
    assembled, model, tok, meta = compiled(name)
    spec = PROGRAMS[name]
    assert meta["truth"] == sorted(TRUTH[name], key=tracr_compile._unit_order)
    for x in inputs(spec):
        ref = assembled.apply(["compiler_bos", *x])
        ids = torch.tensor([tok.encode(" ".join(map(str, x)))])
        got = model.program_output(ids)[0]
        resid = model.tl(ids, stop_at_layer=model.tl.cfg.n_layers)[0].detach().numpy()  # (T, D)
        np.testing.assert_allclose(resid, np.asarray(ref.transformer_output[0]), atol=1e-4, err_msg=str(x))
        if meta["categorical"]:
            assert got == ref.decoded[1:], x
        else:
            np.testing.assert_allclose(got, ref.decoded[1:], atol=1e-5, err_msg=str(x))
    # and the program's own answer, on its example
    ids = torch.tensor([tok.encode(" ".join(map(str, spec.example)))])
    if meta["categorical"]:
        assert model.program_output(ids)[0] == list(spec.example_output)
    else:
        np.testing.assert_allclose(model.program_output(ids)[0], spec.example_output, atol=1e-5)


def zero_head(unit: str):
    """A hook zeroing one head's hook_z (TransformerLens's own hooks)."""
    layer, head = int(unit.split(".")[0][1:]), int(unit.split(".H")[1])

    def hook(z, hook):  # (B, T, n_heads, d_head)
        z[:, :, head] = 0.0
        return z

    return [(f"blocks.{layer}.attn.hook_z", hook)]


@needs_tracr
def test_truth_leaves_out_the_unused_branch(compiled):
    assembled, model, tok, meta = compiled("hist_unused")
    unused = [label for label in meta["units"] if label.startswith("n_smaller")]
    assert unused and meta["units"][unused[0]] == ["L0.H1", "L0.MLP"]  # the ignored count: head 1 of layer 0
    assert "L0.H1" not in meta["truth"] and "L0.H0" in meta["truth"]
    assert model.config.circuitfind["planted_circuit"] == meta["truth"]
    # checked on the model: zeroing the unused head changes no output, zeroing the histogram's head does
    columns = [[str(t) for t in meta["tokens"]].index(str(v)) for v in meta["outputs"]]
    changed = {"L0.H1": 0, "L0.H0": 0}
    for x in inputs(PROGRAMS["hist_unused"]):
        ids = torch.tensor([tok.encode(" ".join(x))])
        clean = model.tl(ids)[0, 1:, columns].argmax(-1)
        for head in changed:
            ablated = model.tl.run_with_hooks(ids, fwd_hooks=zero_head(head))[0, 1:, columns].argmax(-1)
            changed[head] += int(not torch.equal(clean, ablated))
    assert changed["L0.H1"] == 0 and changed["L0.H0"] > 0, changed


@needs_tracr
def test_left_padding_is_masked(compiled):
    _, model, tok, _ = compiled("sort")
    prompts = [[3, 1, 2, 5], [2, 1]]
    rows = [tok.encode(" ".join(map(str, x))) for x in prompts]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    attn = (ids != tok.pad_token_id).long()
    padded = model(ids, attention_mask=attn).logits[:, -1]  # (B, V)
    for i, r in enumerate(rows):
        alone = model(torch.tensor([r])).logits[0, -1]
        torch.testing.assert_close(padded[i], alone, atol=1e-4, rtol=0)
    assert tok.decode(padded.argmax(-1)[:1]) == "5"  # the largest token sorts last


@needs_tracr
def test_cache_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cfg = ModelConfig(kind="tracr", program="histogram")
    first = load_model(cfg)
    folders = list((tmp_path / "circuitfind" / "tracr").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("histogram-")
    assert {p.name for p in folders[0].iterdir()} == {"config.json", "model.safetensors", "tracr.json"}

    def no_compile(spec):
        raise AssertionError("compiled again")

    monkeypatch.setattr(tracr_compile, "compile_program", no_compile)
    second = load_model(cfg)
    ids = torch.tensor([second.tokenizer.encode("a b a")])
    torch.testing.assert_close(first.model(ids).logits, second.model(ids).logits)
    assert second.tokenizer.decode(second.model(ids).logits[0, -1:].argmax(-1)) == "2"
    assert second.model.config.circuitfind["planted_circuit"] == TRUTH["histogram"]
    real = tracr_compile.importlib.util.find_spec
    hidden = lambda name, *a: None if name in ("tracr", "jax", "haiku") else real(name, *a)  # noqa: E731
    monkeypatch.setattr(tracr_compile.importlib.util, "find_spec", hidden)
    load_model(cfg)  # cached: no tracr or jax needed


def test_unknown_or_missing_program():
    with pytest.raises(CircuitfindError, match=r"model.program='nope' is not a tracr program here; choose from \["):
        program_spec("nope")
    with pytest.raises(CircuitfindError, match="model=tracr needs model.program=<name>"):
        load_model(ModelConfig(kind="tracr"))


def test_tracr_not_installed(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing cached
    real = tracr_compile.importlib.util.find_spec
    monkeypatch.setattr(
        tracr_compile.importlib.util, "find_spec", lambda name, *a: None if name in ("jax", "tracr") else real(name, *a)
    )
    with pytest.raises(
        CircuitfindError, match=r"compiles with jax, which is not installed: pip install 'circuitfind\[tracr\]'"
    ):
        load_model(ModelConfig(kind="tracr", program="reverse"))


@needs_tracr
def test_bad_tokens_and_lengths(compiled):
    _, model, tok, _ = compiled("histogram")
    with pytest.raises(CircuitfindError, match=r"'z' is not a token of tracr program histogram \(its tokens: a b c"):
        tok("a z b")
    too_long = torch.tensor([tok.encode("a b c a b c")])  # 6 tokens, max_seq_len 5
    with pytest.raises(CircuitfindError, match="takes at most 5 tokens after BOS; got a sequence of 7"):
        model(too_long)
    with pytest.raises(CircuitfindError, match="token '2' is an output of tracr program histogram, not an input"):
        model(torch.tensor([tok.encode("a 2")]))
    with pytest.raises(CircuitfindError, match="takes at most 5 tokens"):
        model.base_model(too_long)  # what the engines call


@needs_tracr
def test_reverse_task_answers_are_the_programs_output():
    """task=tracr_reverse's answer, an expression, is what the RASP program gives at the last position
    (tracr's own RASP evaluator, not the model), on every problem of every split."""
    task = load_task("tracr_reverse")
    program = PROGRAMS["reverse"].build()
    form = task.draw_form(random.Random(0))
    checked = set()
    for split in SPLITS:
        for problem in task.problems(split):
            prompt = task.render(problem, form)
            out = program(prompt.text.split())  # the RASP program, evaluated
            assert prompt.answer_text == str(out[-1]) == str(problem.answer), prompt.text
            checked.add(prompt.text)
    assert len(checked) == 4**4


@needs_tracr
def test_train_on_reverse_reports_precision_and_recall(tmp_path, monkeypatch):
    """`circuitfind train task=tracr_reverse model=tracr model.program=reverse`, in process: varying the first
    token, the circuit is the head that moves it to the last position (L3.H0); the prompts all have four
    tokens, so the length units of the truth never differ between base and alternate: recall 1/5."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = compose("task=tracr_reverse", "model=tracr", "model.program=reverse", "progress=false", "plots=false")
    (record,) = Run(Job(cfg)).execute(tmp_path / "run")
    assert [row["name"] for row in record.circuit] == ["L3.H0"]
    assert record.planted["planted"] == TRUTH["reverse"]
    assert (record.planted["precision"], record.planted["recall"]) == (1.0, 0.2)


@needs_tracr
def test_a_run_with_tokens_the_program_lacks_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    line = train_error("task=arithmetic", "model=tracr", "model.program=reverse")
    assert "is not a token of tracr program reverse (its tokens: a b c d)" in line, line
    (folder,) = (tmp_path / "circuitfind" / "tracr").iterdir()
    (folder / "model.safetensors").write_bytes(b"not weights")
    line = train_error("task=tracr_reverse", "model=tracr", "model.program=reverse")
    assert line.endswith(f"the tracr cache {folder} is unreadable (SafetensorError); delete that folder"), line
