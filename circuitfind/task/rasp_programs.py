"""The RASP programs `model=tracr model.program=<name>` compiles (tracr's own library, and one of ours),
and `rasp(program, t0, t1, ...)`, which runs one on a task's tokens for the task's answer.

Each entry says what the program computes, its input vocabulary and its longest input (without
the BOS token the compiler adds). The program itself is built only when it is compiled or run, so
naming a program, or loading a cached compile, imports nothing from tracr and needs no jax.

`rasp()` evaluates the RASP program itself with tracr's evaluator, never the model: a task's answers
are what the program gives, whatever the compiled model does. Its outputs are written as the model's
tokens are: categorical items as text, numerical values by `value_text` (0.333 for 1/3).
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

from circuitfind.errors import CircuitfindError

INSTALL = "pip install 'circuitfind[tracr]'"


@dataclass(frozen=True)
class TracrProgram:
    """One RASP program of the library: what it computes, over which tokens, up to which length."""

    name: str
    summary: str
    vocab: Tuple[Any, ...]  # the input tokens, each one token of the model; ints or strings
    max_seq_len: int  # input tokens, BOS not counted
    build: Callable[[], Any]  # () -> rasp.SOp, importing tracr when called
    example: Tuple[Any, ...]  # an input and ...
    example_output: Tuple[Any, ...]  # ... what the program gives for it


def _frac_prevs():
    from tracr.compiler import lib
    from tracr.rasp import rasp

    return lib.make_frac_prevs(rasp.tokens == "x")


def _reverse():
    from tracr.compiler import lib
    from tracr.rasp import rasp

    return lib.make_reverse(rasp.tokens)


def _sort():
    from tracr.compiler import lib
    from tracr.rasp import rasp

    return lib.make_sort(rasp.tokens, rasp.tokens, max_seq_len=5, min_key=1)


def _histogram():
    from tracr.compiler import lib

    return lib.make_hist()


def _hist_unused():
    """The histogram, with a second count (of smaller tokens) computed beside it and passed into the
    last step, whose function ignores it: compiled into the model, but nothing the output depends on."""
    from tracr.compiler import lib
    from tracr.rasp import rasp

    hist = lib.make_hist()
    smaller = rasp.Select(rasp.tokens, rasp.tokens, rasp.Comparison.LT).named("smaller_tok")
    unused = rasp.SelectorWidth(smaller).named("n_smaller")
    return rasp.SequenceMap(lambda count, _ignored: count, hist, unused).named("hist_unused")


PROGRAMS: Dict[str, TracrProgram] = {
    p.name: p
    for p in (
        TracrProgram(
            "frac_prevs",
            "the fraction of tokens so far that are `x` (numerical output)",
            ("a", "b", "c", "d", "x"),
            5,
            _frac_prevs,
            ("x", "a", "x", "b"),
            (1.0, 0.5, 2 / 3, 0.5),
        ),
        TracrProgram(
            "reverse",
            "the tokens in reverse order",
            ("a", "b", "c", "d"),
            5,
            _reverse,
            ("a", "b", "c"),
            ("c", "b", "a"),
        ),
        TracrProgram("sort", "the tokens sorted, repeats kept", (1, 2, 3, 4, 5), 5, _sort, (3, 1, 2, 1), (1, 1, 2, 3)),
        TracrProgram(
            "histogram",
            "how often each token occurs in the input",
            ("a", "b", "c", "d"),
            5,
            _histogram,
            ("a", "b", "a"),
            (2, 1, 2),
        ),
        TracrProgram(
            "hist_unused",
            "the histogram, with a count of smaller tokens computed beside it that the output ignores",
            ("a", "b", "c", "d"),
            5,
            _hist_unused,
            ("a", "b", "a"),
            (2, 1, 2),
        ),
    )
}


def value_text(value: Any) -> str:
    """How an output item is written, as a token of the compiled model and as a task's answer: a
    numerical value to three decimals without trailing zeros (1/3 -> 0.333, 1/2 -> 0.5, 1 -> 1)."""
    if isinstance(value, (bool, int, float)):
        return f"{float(value):.3f}".rstrip("0").rstrip(".")
    return str(value)


@functools.lru_cache(maxsize=None)
def _built(name: str):
    if importlib.util.find_spec("tracr") is None:
        raise CircuitfindError(
            f"rasp({name!r}, ...) runs the RASP program with tracr, which is not installed: {INSTALL}"
        )
    return PROGRAMS[name].build()


@functools.lru_cache(maxsize=100_000)
def _evaluate(name: str, tokens: Tuple[Any, ...]) -> Tuple[str, ...]:
    from tracr.rasp import rasp

    program = _built(name)
    write = str if rasp.is_categorical(program) else value_text
    return tuple(write(v) for v in rasp.evaluate(program, list(tokens)))


def run_program(name: str, *tokens: Any) -> List[Any]:
    """What RASP program `name` gives at each position for these input tokens (BOS not given), each item
    written as `value_text` writes it; a task expression calls it as `rasp('reverse', t0, t1, t2, t3)`."""
    if name not in PROGRAMS:
        raise CircuitfindError(f"rasp({name!r}, ...): no such RASP program; choose from {sorted(PROGRAMS)}")
    spec = PROGRAMS[name]
    by_text = {str(v): v for v in spec.vocab}
    unknown = [t for t in tokens if str(t) not in by_text]
    if unknown:
        raise CircuitfindError(
            f"rasp({name!r}, ...): {unknown[0]!r} is not an input of the program (its inputs: "
            f"{' '.join(map(str, spec.vocab))}); give the task's slots these values"
        )
    if not 0 < len(tokens) <= spec.max_seq_len:
        raise CircuitfindError(
            f"rasp({name!r}, ...) takes 1 to {spec.max_seq_len} tokens; got {len(tokens)}: shorten the template"
        )
    return list(_evaluate(name, tuple(by_text[str(t)] for t in tokens)))


def output_values(name: str) -> List[float]:
    """Every value a numerical program gives, at any position of any input up to its max_seq_len, found by
    running it on all of them (tracr's own value-set inference keeps only some of a mean's values)."""
    from tracr.rasp import rasp

    spec, program = PROGRAMS[name], _built(name)
    found = set()
    for n in range(1, spec.max_seq_len + 1):
        for tokens in itertools.product(spec.vocab, repeat=n):
            found.update(float(v) for v in rasp.evaluate(program, list(tokens)) if v is not None)
    return sorted(found)
