"""Tokenising pairs: left-padded prompt tensors and the first token of each answer."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, Iterator, List, Sequence

import torch

from circuitfind.errors import CircuitfindError
from circuitfind.task.desiderata import Desideratum
from circuitfind.task.pairs import Pair
from circuitfind.task.positions import PositionFinder
from circuitfind.task.spec import SPLITS, TaskSpec


@dataclass
class EncodedPairs:
    """A batch of pairs as tensors; prompts are left-padded so the final token is at -1.

    d = logit[up] - logit[down] (the log-sum-exp over up's S tokens); `target` is what the
    patched model should say (its first token, or a token set), read by accuracy and cross-entropy.
    """

    base_ids: torch.Tensor  # (B, T_base)
    base_attn: torch.Tensor  # (B, T_base) 1 = real token, 0 = padding
    alt_ids: torch.Tensor  # (B, T_alt)
    alt_attn: torch.Tensor  # (B, T_alt)
    base_answer: torch.Tensor  # (B,) first token of the base prompt's answer
    alt_answer: torch.Tensor  # (B,) first token of the alternate's answer
    up: torch.Tensor  # (B, S)
    down: torch.Tensor  # (B,)
    target: torch.Tensor  # (B, S')
    base_pos: torch.Tensor  # (B, P, M) token indices of the unit space's positions in the base prompts, -1 = none
    alt_pos: torch.Tensor  # (B, P, M) the aligned tokens in the alternates (task/positions.py)

    def __len__(self) -> int:
        return self.base_ids.shape[0]

    def to(self, device: torch.device | str) -> "EncodedPairs":
        return EncodedPairs(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def chunks(self, size: int | None) -> Iterator["EncodedPairs"]:
        """Consecutive sub-batches of at most `size` pairs (all at once when None)."""
        size = size or len(self)
        for start in range(0, len(self), size):
            yield self.rows(start, start + size)

    def rows(self, start: int, stop: int) -> "EncodedPairs":
        """The pairs start..stop-1."""
        return EncodedPairs(**{f.name: getattr(self, f.name)[start:stop] for f in fields(self)})


class PairEncoder:
    """Turns pairs into `EncodedPairs` for one tokenizer, memoising answer tokens."""

    def __init__(self, tokenizer, answer_prefix: str = "", finder: PositionFinder | None = None):
        self.tokenizer = tokenizer
        self.finder = finder  # the units' positions; None: the final token only
        self.answer_prefix = answer_prefix  # written before an answer (and before a contrast slot's value)
        self._answer_tokens: Dict[tuple[str, str], int] = {}
        self.pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)

    def ids(self, prompt: str) -> List[int]:
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def answer_token(self, prompt: str, text: str) -> int:
        """The first token the model must produce after `prompt` to start `text`.

        Found by tokenising prompt and prompt+text, not by a fixed index, so it holds for
        any tokenizer whose prompt tokens are a prefix of the prompt+text tokens.
        """
        key = (prompt, text)
        if key not in self._answer_tokens:
            prompt_ids, full_ids = self.ids(prompt), self.ids(prompt + text)
            first = full_ids[len(prompt_ids)] if len(full_ids) > len(prompt_ids) else None
            piece = self.tokenizer.decode([first]) if first is not None else ""
            if full_ids[: len(prompt_ids)] != prompt_ids or not piece or not text.startswith(piece):
                raise CircuitfindError(
                    f"the tokenizer does not split the answer cleanly after the prompt "
                    f"({prompt[-12:]!r} + {text!r} -> first answer piece {piece!r}); use a tokenizer that "
                    "splits it there, or end task.template where a token ends (set task.answer_prefix)"
                )
            if not piece.strip() and text.strip():
                # SmolLM2 writes ` 8` as ` ` then `8`: every answer would start with the same space token,
                # so accuracy would score the space and no logit difference could tell answers apart.
                raise CircuitfindError(
                    f"the answer's first token is only whitespace ({prompt[-12:]!r} + {text!r} -> {piece!r}); "
                    "end task.template with that space and drop it from task.answer_prefix, so the first "
                    "token carries the answer"
                )
            self._answer_tokens[key] = first
        return self._answer_tokens[key]

    def single_token(self, text: str, where: str) -> int:
        """The one token `text` is, or a clear error."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = [self.tokenizer.decode([i]) for i in ids]
            raise CircuitfindError(
                f"{where}: {text!r} is {len(ids)} tokens {pieces} for this tokenizer; use one-token values"
            )
        return ids[0]

    def check_representable(self, texts: Sequence[str]) -> None:
        """Every text tokenises without the unknown token: a character the tokenizer cannot represent is
        one line naming it, before any training (it would be read as `<unk>`, silently)."""
        unk = self.tokenizer.unk_token_id
        texts = list(dict.fromkeys(texts))
        if unk is None or not texts:
            return  # byte-level tokenizers represent every character
        unk_text = self.tokenizer.unk_token or ""
        for text, ids in zip(texts, self.tokenizer(texts, add_special_tokens=False)["input_ids"]):
            if unk in ids and not (unk_text and unk_text in text):
                bad = [
                    c for c in dict.fromkeys(text) if unk in self.tokenizer(c, add_special_tokens=False)["input_ids"]
                ]
                shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in bad) or "a character sequence"
                raise CircuitfindError(
                    f"the tokenizer cannot represent {shown} in {text[-40:]!r}: it would be read as {unk_text or 'unk'}; "
                    "write the task's template and values with characters the tokenizer knows, or use a model whose "
                    "tokenizer has them"
                )

    def check_one_token_slots(self, task: TaskSpec) -> None:
        """Every value of a `one_token: true` slot is one token after a space, in every split."""
        for slot in task.one_token:
            for split in SPLITS:
                for value in task.domains[split].get(slot, []):
                    self.single_token(f" {value}", f"task.slots.{slot} (one_token: true)")

    def encode(self, pairs: Sequence[Pair], des: Desideratum) -> EncodedPairs:
        base_ids, base_attn = left_pad([self.ids(p.base.text) for p in pairs], self.pad_id)
        alt_ids, alt_attn = left_pad([self.ids(p.alt.text) for p in pairs], self.pad_id)
        base_answer = torch.tensor([self.answer_token(p.base.text, p.base.answer_text) for p in pairs])
        alt_answer = torch.tensor([self.answer_token(p.alt.text, p.alt.answer_text) for p in pairs])
        own = alt_answer if des.target == "alternate" else base_answer
        if des.target == "tokens":
            token_set = [self.single_token(t, f"desiderata.terms[{des.name}].tokens") for t in des.tokens]
            target = torch.tensor(token_set).expand(len(pairs), -1)
        else:
            target = own[:, None]
        if des.contrast is not None:
            contrast = [self.answer_prefix + str(p.base[des.contrast]) for p in pairs]
            down = torch.tensor([self.answer_token(p.base.text, c) for p, c in zip(pairs, contrast)])
            up = target
        else:
            up, down = (target if des.target == "tokens" else alt_answer[:, None]), base_answer
        if self.finder is None:
            base_pos = torch.full((len(pairs), 1, 1), base_ids.shape[1] - 1)
            alt_pos = torch.full((len(pairs), 1, 1), alt_ids.shape[1] - 1)
        else:
            base_pos, alt_pos = self.finder.encode(pairs, base_ids.shape[1], alt_ids.shape[1])
        same = (up == down[:, None]).all(-1)  # d is identically zero for these pairs
        if bool(same.any()):
            i = int(same.nonzero()[0])
            raise CircuitfindError(
                f"{des.name}: the two tokens of the logit difference are the same token for "
                f"{int(same.sum())} pairs (e.g. {pairs[i].base.text[-20:]!r} -> {pairs[i].base.answer_text!r} vs "
                f"{pairs[i].alt.answer_text!r}); balance the task on what the first token shows (task.balance)"
            )
        return EncodedPairs(
            base_ids=base_ids,
            base_attn=base_attn,
            alt_ids=alt_ids,
            alt_attn=alt_attn,
            base_answer=base_answer,
            alt_answer=alt_answer,
            up=up.contiguous(),
            down=down,
            target=target.contiguous(),
            base_pos=base_pos,
            alt_pos=alt_pos,
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
