"""How well a model does a task unpatched: greedy first-token accuracy on the task's own prompts.

The answer's first token is found by the project's answer-token logic (prompt and prompt +
answer tokenised together), so a tokenizer that writes ` 8` as ` ` and `8` is scored on
the token it must actually produce.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List

import torch

from circuitfind.model.engine import Engine
from circuitfind.task.encoding import PairEncoder, left_pad
from circuitfind.task.spec import Prompt, TaskSpec


@dataclass
class Accuracy:
    """First-token accuracy of the unpatched model on n prompts of one split of a task."""

    task: str
    split: str
    n: int
    correct: int
    examples: List[tuple[str, str, str]]  # (prompt end, expected answer, first token produced), mistakes first

    @property
    def value(self) -> float:
        return self.correct / self.n if self.n else float("nan")


def task_prompts(task: TaskSpec, split: str, n: int, seed: int = 0) -> List[Prompt]:
    """n prompts drawn uniformly from the split's problems, each in a drawn form."""
    rng = random.Random(f"{seed}/accuracy")
    problems = task.problems(split)
    chosen = rng.sample(problems, min(n, len(problems)))
    return [task.render(p, task.draw_form(rng)) for p in chosen]


@torch.no_grad()
def task_accuracy(
    engine: Engine, tokenizer, task: TaskSpec, split: str = "train", n: int = 200, seed: int = 0, batch: int = 50
) -> Accuracy:
    """Greedy first-token accuracy of the engine's unpatched model on n prompts of `split`."""
    encoder = PairEncoder(tokenizer, task.answer_prefix)
    encoder.check_one_token_slots(task)
    prompts = task_prompts(task, split, n, seed)
    correct, examples = 0, []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        ids, attn = left_pad([encoder.ids(p.text) for p in chunk], encoder.pad_id)
        device = engine.model.get_input_embeddings().weight.device
        hidden = engine.clean_hidden(ids.to(device), attn.to(device))
        pred = engine.readout.logits(hidden).argmax(-1).cpu()
        want = torch.tensor([encoder.answer_token(p.text, p.answer_text) for p in chunk])
        ok = pred == want
        correct += int(ok.sum())
        for p, good, got in zip(chunk, ok.tolist(), pred.tolist()):
            examples.append((not good, p.text[-40:], p.answer_text, tokenizer.decode([got])))
    examples.sort(key=lambda e: not e[0])
    return Accuracy(task.name, split, len(prompts), correct, [e[1:] for e in examples[:5]])
