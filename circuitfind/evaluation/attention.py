"""Where the circuit's heads look: attention from their position, averaged over held-out prompts."""

from __future__ import annotations

from collections import Counter
from typing import Dict, List, Sequence, Tuple

import torch

from circuitfind.config.choices import LAST
from circuitfind.task.encoding import EncodedPairs, PairEncoder, left_pad, position_ids
from circuitfind.task.positions import slot_positions
from circuitfind.task.spec import Prompt, TaskSpec


@torch.no_grad()
def attention_maps(model: torch.nn.Module, ids: torch.Tensor, attn: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Every layer's attention weights on left-padded prompts. (B, T) -> per layer (B, H, T, T)"""
    device = next(model.parameters()).device
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")  # sdpa does not return attention weights
    try:
        out = model.base_model(
            input_ids=ids.to(device),
            attention_mask=attn.to(device),
            position_ids=position_ids(attn).to(device),
            output_attentions=True,
            use_cache=False,
        )
    finally:
        model.set_attn_implementation(previous)
    return out.attentions


def final_position_attention(
    model: torch.nn.Module, tokenizer, enc: EncodedPairs, heads: Sequence[Tuple[int, int]]
) -> Tuple[torch.Tensor, List[str]]:
    """Mean attention of the final position over the prompt, for each (layer, head).

    Only prompts of the most common length are used, so that every position means the
    same token slot. Returns (len(heads), T) weights and the T token labels.
    """
    lengths = enc.base_attn.sum(dim=1)
    modal = Counter(lengths.tolist()).most_common(1)[0][0]
    keep = lengths == modal
    ids, attn = enc.base_ids[keep][:, -modal:], enc.base_attn[keep][:, -modal:]
    attentions = attention_maps(model, ids, attn)
    weights = torch.stack([attentions[layer][:, head, -1].float().mean(dim=0).cpu() for layer, head in heads])
    labels = [tokenizer.decode([t]).replace("\n", "\\n").replace(" ", "␣") or "·" for t in ids[0].tolist()]
    return weights, labels


def query_token(query: str, n: int, positions: Dict[str, List[int]]) -> int | None:
    """The token a query position reads from, in a prompt of n tokens: a slot's last token."""
    if query == LAST:
        return n - 1
    if query in positions:
        return positions[query][-1]
    return n + int(query) if n + int(query) >= 0 else None


@torch.no_grad()
def attention_by_slot(
    model: torch.nn.Module,
    encoder: PairEncoder,
    task: TaskSpec,
    prompts: Sequence[Prompt],
    heads: Sequence[Tuple[int, int]],
    queries: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
) -> Dict[str, Dict[str, float]]:
    """For each (layer, head): the mean attention from its query position (the final token by default;
    a slot's last token, or a distance from the end) to the tokens of each slot of the prompts, and
    to everything else (`other`: template words, the BOS token). Keyed by `names` (default L{l}.H{h}).
    One forward pass serves every head and query."""
    tokens = [encoder.tokenizer(p.text, add_special_tokens=True, return_offsets_mapping=True) for p in prompts]
    ids = [t["input_ids"] for t in tokens]  # as the encoder tokenises, with each token's offsets
    batch, attn = left_pad(ids, encoder.pad_id)
    attentions = attention_maps(model, batch, attn)
    width = batch.shape[1]
    names = list(names or [f"L{layer}.H{head}" for layer, head in heads])
    queries = list(queries or [LAST] * len(heads))
    totals: Dict[str, Dict[str, float]] = {name: Counter() for name in names}
    used: Counter = Counter()  # prompts each head was read on
    for b, prompt in enumerate(prompts):
        shift = width - len(ids[b])  # left padding
        positions = slot_positions(tokens[b]["offset_mapping"], task.spans(prompt))
        for name, (layer, head), query in zip(names, heads, queries):
            at = query_token(query, len(ids[b]), positions)
            if at is None:  # a distance from the end beyond this prompt's start
                continue
            used[name] += 1
            row = attentions[layer][b, head, shift + at].float().cpu()
            masses = {label: float(row[[shift + i for i in idx]].sum()) for label, idx in positions.items()}
            masses["other"] = float(row.sum()) - sum(masses.values())
            totals[name].update(masses)
    return {name: {label: round(v / max(used[name], 1), 4) for label, v in t.items()} for name, t in totals.items()}
