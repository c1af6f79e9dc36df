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
from circuitfind.records.circuit import planted_line
from circuitfind.runs.job import Job
from circuitfind.runs.train import Run
from circuitfind.task import rasp_programs
from circuitfind.task.library import load_task
from circuitfind.task.rasp_programs import PROGRAMS, run_program, value_text
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
    assert model.config.circuitfind["tracr_depends_on"] == meta["truth"]
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
    assert second.model.config.circuitfind["tracr_depends_on"] == TRUTH["histogram"]
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


# what each task's answer (the program's output at the last of four tokens) means, written without tracr
MEANING = {
    "reverse": lambda t: t[0],
    "sort": lambda t: max(t),
    "histogram": lambda t: t.count(t[-1]),
    "hist_unused": lambda t: t.count(t[-1]),
    "frac_prevs": lambda t: t.count("x") / len(t),
}


@needs_tracr
@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_task_answers_are_the_programs_output(name):
    """task=tracr_<program>'s answer, rasp(...)[-1], is what the RASP program gives at the last position (tracr's
    evaluator, never the model), written as the model's token: checked against the program's meaning on every
    problem, and rasp() against the library's hand-written example."""
    spec = PROGRAMS[name]
    assert run_program(name, *spec.example) == [value_text(v) for v in spec.example_output]
    task = load_task(f"tracr_{name}")
    form = task.draw_form(random.Random(0))
    problems = {p for split in SPLITS for p in task.problems(split)}
    for problem in problems:
        prompt = task.render(problem, form)
        tokens = [problem[s] for s in ("t0", "t1", "t2", "t3")]
        assert prompt.text.split() == [str(t) for t in tokens]
        assert prompt.answer_text == value_text(MEANING[name](tokens)), prompt.text
    assert len(problems) == len(spec.vocab) ** 4


def test_rasp_bad_input_is_one_line():
    """rasp() in a task's answer: an unknown program, a token outside its vocabulary, too many tokens, tracr
    missing; each one line (checked before tracr is imported)."""
    with pytest.raises(CircuitfindError, match=r"rasp\('nope', ...\): no such RASP program; choose from \["):
        run_program("nope", "a")
    with pytest.raises(CircuitfindError, match=r"'z' is not an input of the program \(its inputs: a b c d\)"):
        run_program("reverse", "a", "z")
    with pytest.raises(CircuitfindError, match=r"takes 1 to 5 tokens; got 6: shorten the template"):
        run_program("reverse", *"abcdab")


def test_rasp_without_tracr_is_one_line(monkeypatch):
    rasp_programs._built.cache_clear()
    real = rasp_programs.importlib.util.find_spec
    monkeypatch.setattr(rasp_programs.importlib.util, "find_spec", lambda n, *a: None if n == "tracr" else real(n, *a))
    with pytest.raises(
        CircuitfindError, match=r"runs the RASP program with tracr, which is not installed: pip install"
    ):
        run_program("histogram", "a", "b")
    rasp_programs._built.cache_clear()


@needs_tracr
@pytest.mark.e2e  # compiles frac_prevs afresh
def test_numerical_output_is_read_as_its_nearest_value(compiled):
    """frac_prevs's output is a number: each value it can take is a token, and the logits score the value read off
    the residual stream, so the argmax at every position is the program's own value, on every input of four."""
    _, model, tok, meta = compiled("frac_prevs")
    assert not meta["categorical"] and meta["outputs"] == ["0", "0.2", "0.25", "0.333", "0.4", "0.5", "0.6",
                                                           "0.667", "0.75", "0.8", "1"]  # fmt: skip
    for tokens in itertools.product(PROGRAMS["frac_prevs"].vocab, repeat=4):
        ids = torch.tensor([tok.encode(" ".join(tokens))])
        logits = model(ids).logits[0, 1:]  # (4, V)
        assert [tok.texts[i] for i in logits.argmax(-1).tolist()] == run_program("frac_prevs", *tokens), tokens
        top2 = logits.topk(2, dim=-1).values
        assert bool((top2[:, 0] - top2[:, 1] >= 1 - 1e-3).all())  # the nearest value wins by at least 1


def train(tmp_path, monkeypatch, *overrides):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    (record,) = Run(Job(compose(*overrides, "model=tracr", "progress=false", "plots=false"))).execute(tmp_path / "run")
    return record


@needs_tracr
def test_train_on_reverse_finds_the_truth(tmp_path, monkeypatch):
    """`circuitfind train task=tracr_reverse model=tracr model.program=reverse`, in process: varying the first
    token, the only unit between it and the output is the head that moves it to the last position (the length
    units never differ: every prompt has four tokens), and the search finds exactly that head."""
    record = train(tmp_path, monkeypatch, "task=tracr_reverse", "model.program=reverse")
    assert [row["name"] for row in record.circuit] == ["L3.H0"]
    assert record.planted == {"planted": ["L3.H0"], "precision": 1.0, "recall": 1.0, "exact": True, "unique": True,
                              "circuits": [["L3.H0"]], "why": None, "on_paths": ["L3.H0"]}  # fmt: skip


@needs_tracr
@pytest.mark.e2e  # compiles two programs afresh (5-7 s each on 2 cores) and runs two searches
def test_train_at_positions_and_a_truth_that_is_not_unique(tmp_path, monkeypatch):
    """sort at every token: the last head alone carries a changed first token (its value is read straight from
    the token), so the truth is one unit and the search finds it. histogram: the count's head and its MLP lie
    in series, either one carries the change, so the record gives both circuits and says why."""
    record = train(tmp_path / "sort", monkeypatch, "task=tracr_sort", "model.program=sort",
                   "units.positions=[t0,t1,t2,last]")  # fmt: skip
    assert record.planted["circuits"] == [["L2.H0@last"]] and record.planted["exact"]
    record = train(tmp_path / "hist", monkeypatch, "task=tracr_histogram", "model.program=histogram")
    assert record.planted["circuits"] == [["L0.H0"], ["L0.MLP"]] and not record.planted["unique"]
    assert record.planted["on_paths"] == ["L0.H0", "L0.MLP"]
    assert "units in series on one path carry the same change" in record.planted["why"]
    assert record.planted["exact"] and record.planted["precision"] == record.planted["recall"] == 1.0
    assert "; not unique: 2 smallest circuits of 1 unit(s) each" in planted_line(record.planted)  # log and report


@needs_tracr
def test_a_run_with_tokens_the_program_lacks_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    line = train_error("task=arithmetic", "model=tracr", "model.program=reverse")
    assert "is not a token of tracr program reverse (its tokens: a b c d)" in line, line
    (folder,) = (tmp_path / "circuitfind" / "tracr").iterdir()
    (folder / "model.safetensors").write_bytes(b"not weights")
    line = train_error("task=tracr_reverse", "model=tracr", "model.program=reverse")
    assert line.endswith(f"the tracr cache {folder} is unreadable (SafetensorError); delete that folder"), line


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_tracr_model_in_low_precision_is_one_line(dtype):
    line = train_error("task=tracr_reverse", "model=tracr", "model.program=reverse", f"model.dtype={dtype}")
    assert line == (
        f"circuitfind: error: model=tracr runs in float32 only, not model.dtype={dtype}: its compiled weights are exact, "
        "and rounding them can change its answers (frac_prevs in bfloat16: 2.2% of them); drop model.dtype"
    ), line


def node(units, here=(), everywhere=()):
    return {"units": list(units), "here": list(here), "everywhere": list(everywhere)}


INPUTS = {"tokens": node([]), "indices": node([])}


@pytest.mark.parametrize(
    "graph, varied, positions, circuits",
    [
        # an attention reads the varied token straight from its position: only its head carries the change
        ({"out": node(["L0.H0"], here=["indices"], everywhere=["tokens"])}, {1}, {"t": [1], "last": [2]},
         [["L0.H0@last"]]),
        # two heads in parallel into a node no unit implements: both are needed, and together they suffice
        ({"h1": node(["L0.H0"], everywhere=["tokens"]), "h2": node(["L0.H1"], everywhere=["tokens"]),
          "out": node([], here=["h1", "h2"])}, {1}, {"last": [2]}, [["L0.H0@last", "L0.H1@last"]]),
        # one MLP implementing two nodes on two paths cuts both
        ({"a": node(["L0.MLP"], here=["tokens"]), "b": node(["L0.MLP"], here=["tokens"]),
          "out": node([], here=["a", "b"])}, {2}, {"last": [2]}, [["L0.MLP@last"]]),
        # a selector width's head and MLP in series, then a map: three cuts of one unit
        ({"w": node(["L0.H0", "L0.MLP"], here=["tokens"], everywhere=["tokens"]), "out": node(["L1.MLP"], here=["w"])},
         {1}, {"last": [2]}, [["L0.H0@last"], ["L0.MLP@last"], ["L1.MLP@last"]]),
        # a map at the last position never sees a token at another: no path, no truth
        ({"out": node(["L0.MLP"], here=["tokens"])}, {1}, {"last": [2]}, []),
        # the change reaches the output only where the run has no unit
        ({"out": node(["L0.H0"], everywhere=["tokens"])}, {1}, {"t": [1]}, []),
    ],
)  # fmt: skip
def test_graph_truth_is_the_smallest_cuts(graph, varied, positions, circuits):
    """The truth read off a graph (model/tracr_truth.py), on small graphs whose smallest cuts are known."""
    from circuitfind.model.tracr_truth import graph_truth

    truth = graph_truth(INPUTS | graph, "out", 3, varied, positions)
    assert truth.circuits == circuits
    assert set(truth.on_paths) >= {u for c in circuits for u in c}  # a cut is made of units on paths
    assert (truth.why is None) == (len(circuits) == 1)
    if len(circuits) > 1:
        assert "units in series on one path carry the same change" in truth.why


def test_a_truth_with_no_circuit_is_recorded_with_its_reason():
    """When no set of the run's units cuts the paths, circuit.json's `planted` says why (it was absent)."""
    from circuitfind.evaluation.planted import Truth, planted_scores
    from circuitfind.model.tracr_truth import graph_truth

    truth = graph_truth(INPUTS | {"out": node(["L0.H0"], everywhere=["tokens"])}, "out", 3, {1}, {"t": [1]})
    planted = planted_scores(Truth(truth.circuits, truth.why, truth.on_paths), ["L0.H0@t"])
    assert planted["planted"] is None and planted["precision"] is None and planted["circuits"] == []
    assert planted_line(planted).startswith("no ground truth to score against: no set of these units cuts every path")
