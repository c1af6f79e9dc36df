"""Tokenising pairs: left-padded prompt tensors and the first token of each answer."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, Iterator, List, Sequence

import torch

from circuitfind.errors import CircuitfindError
from circuitfind.task.pairs import Pair


@dataclass
class EncodedPairs:
    """A batch of pairs as tensors; prompts are left-padded so the final token is at -1."""

    base_ids: torch.Tensor  # (B, T_base)
    base_attn: torch.Tensor  # (B, T_base) 1 = real token, 0 = padding
    alt_ids: torch.Tensor  # (B, T_alt)
    alt_attn: torch.Tensor  # (B, T_alt)
    base_answer: torch.Tensor  # (B,) first token of the base prompt's arithmetic answer
    alt_answer: torch.Tensor  # (B,) first token of the alternate's arithmetic answer

    def __len__(self) -> int:
        return self.base_ids.shape[0]

    def to(self, device: torch.device | str) -> "EncodedPairs":
        return EncodedPairs(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def chunks(self, size: int | None) -> Iterator["EncodedPairs"]:
        """Consecutive sub-batches of at most `size` pairs (all at once when None)."""
        size = size or len(self)
        for start in range(0, len(self), size):
            yield EncodedPairs(**{f.name: getattr(self, f.name)[start : start + size] for f in fields(self)})


class PairEncoder:
    """Turns pairs into `EncodedPairs` for one tokenizer and template, memoising answers."""

    def __init__(self, tokenizer, template: str):
        self.tokenizer = tokenizer
        self.template = template
        self._answer_tokens: Dict[tuple[str, int], int] = {}
        self.pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)

    def ids(self, prompt: str) -> List[int]:
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def answer_token(self, prompt: str, answer: int) -> int:
        """The first token the model must produce after `prompt` to start `answer`.

        Found by tokenising prompt and prompt+answer, not by a fixed index, so it holds for
        any tokenizer whose prompt tokens are a prefix of the prompt+answer tokens.
        """
        key = (prompt, answer)
        if key not in self._answer_tokens:
            text = str(answer)
            prompt_ids, full_ids = self.ids(prompt), self.ids(prompt + text)
            first = full_ids[len(prompt_ids)] if len(full_ids) > len(prompt_ids) else None
            piece = self.tokenizer.decode([first]) if first is not None else ""
            if full_ids[: len(prompt_ids)] != prompt_ids or not piece or not text.startswith(piece):
                raise CircuitfindError(
                    f"the tokenizer does not split the answer cleanly after the prompt "
                    f"({prompt[-12:]!r} + {text!r} -> first answer piece {piece!r}); "
                    "use a tokenizer that splits digits, or end dataset.template where a token ends"
                )
            self._answer_tokens[key] = first
        return self._answer_tokens[key]

    def encode(self, pairs: Sequence[Pair]) -> EncodedPairs:
        base_prompts = [p.base.render(self.template) for p in pairs]
        alt_prompts = [p.alt.render(self.template) for p in pairs]
        base_ids, base_attn = left_pad([self.ids(t) for t in base_prompts], self.pad_id)
        alt_ids, alt_attn = left_pad([self.ids(t) for t in alt_prompts], self.pad_id)
        base_answer = [self.answer_token(t, p.base.answer) for t, p in zip(base_prompts, pairs)]
        alt_answer = [self.answer_token(t, p.alt.answer) for t, p in zip(alt_prompts, pairs)]
        return EncodedPairs(
            base_ids=base_ids,
            base_attn=base_attn,
            alt_ids=alt_ids,
            alt_attn=alt_attn,
            base_answer=torch.tensor(base_answer, dtype=torch.long),
            alt_answer=torch.tensor(alt_answer, dtype=torch.long),
        )


def left_pad(seqs: Sequence[List[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as one left-padded batch, so that every final token is at -1. -> ids, attn (B, T)"""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        attn[i, width - len(s) :] = 1
    return ids, attn


def position_ids(attn: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding, so a padded prompt runs as if alone. (B, T)"""
    return (attn.cumsum(dim=-1) - 1).clamp(min=0)
