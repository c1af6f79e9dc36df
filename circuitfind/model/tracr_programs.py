"""The RASP programs `model=tracr model.program=<name>` compiles (tracr's own library, and one of ours).

Each entry says what the program computes, its input vocabulary and its longest input (without
the BOS token the compiler adds). The program itself is built only when it is compiled, so this
module imports nothing from tracr: naming a program, or loading a cached compile, needs no jax.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple


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
            ("a", "b", "x"),
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
            ("a", "b", "c"),
            5,
            _histogram,
            ("a", "b", "a"),
            (2, 1, 2),
        ),
        TracrProgram(
            "hist_unused",
            "the histogram, with a count of smaller tokens computed beside it that the output ignores",
            ("a", "b", "c"),
            5,
            _hist_unused,
            ("a", "b", "a"),
            (2, 1, 2),
        ),
    )
}
