"""Where heads look: attention from one position over the parts of the prompt.

A binding circuit must fetch the digits of x's definition, wherever that line is (first,
second, after a distractor) and whatever x is called: either directly from the final
position, or in two hops, through a position that earlier heads copied them into. Two such
carriers are named: the query's x token (`a` in `a - b = `), and the first space of the line
after x's definition (3 to 4 tokens after its digits, a short hop for a positional head).
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from circuitfind.evaluation.attention import attention_maps
from circuitfind.organism.data import Encoder
from circuitfind.organism.problems import Problem

PARTS = ("x digits", "y digits", "distractor digits", "x in query", "y in query", "x carrier", "y carrier", "rest")
SOURCES = ("final", "x carrier")  # where the attention is read from


def part_positions(problem: Problem, template: str) -> Dict[str, List[int]]:
    """Token positions (after <s>, one token per character) of each part of the prompt but the rest."""
    text = problem.render(template)
    lines = text.split("\n")  # definition lines `name = value`, then the query `x op y = `
    starts = [1]  # after <s>
    for line in lines:
        starts.append(starts[-1] + len(line) + 1)
    digits_of, carrier_of = {}, {}
    for k, line in enumerate(lines[:-1]):
        name, _, value = line.partition(" = ")
        first = starts[k] + len(name) + 3
        digits_of[name] = list(range(first, first + len(value)))
        carrier_of[name] = [starts[k + 1] + 1]  # the first space of the next line
    query = starts[len(lines) - 1]
    x_name, y_name = problem.names
    parts = {"x digits": digits_of.get(x_name, []), "y digits": digits_of.get(y_name, [])}
    parts["distractor digits"] = [p for n, ps in digits_of.items() if n not in (x_name, y_name) for p in ps]
    parts["x in query"], parts["y in query"] = [query], [query + 4]
    parts["x carrier"], parts["y carrier"] = carrier_of.get(x_name, []), carrier_of.get(y_name, [])
    return parts


@torch.no_grad()
def attention_shares(
    model, enc: Encoder, problems: Sequence[Problem], heads: Sequence[tuple[int, int]], source: str = "final"
) -> torch.Tensor:
    """Share of each head's attention from `source` on each part, averaged over prompts.

    -> (len(heads), len(PARTS))
    """
    ids, attn = enc.prompts(problems)
    attentions = attention_maps(model, ids, attn)
    shares = torch.zeros(len(heads), len(PARTS))
    for b, problem in enumerate(problems):
        pad = int((attn[b] == 0).sum())
        parts = part_positions(problem, enc.template)
        query = -1 if source == "final" else pad + parts[source][0]
        for i, (layer, head) in enumerate(heads):
            row = attentions[layer][b, head, query]  # (T,) attention of the source position
            for j, part in enumerate(PARTS[:-1]):
                shares[i, j] += row[[pad + p for p in parts[part]]].sum()
    shares /= len(problems)
    shares[:, -1] = 1 - shares[:, :-1].sum(dim=1)
    return shares
