"""Logits from final hidden states, for the whole vocabulary or only the rows a loss needs."""

from __future__ import annotations

import torch


def wide(t: torch.Tensor) -> torch.Tensor:
    """t in at least float32: losses are computed in float32 whatever the model's dtype."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class Readout:
    """Logits from final hidden states, for all of the vocabulary or only the rows needed."""

    def __init__(self, model: torch.nn.Module):
        head = model.get_output_embeddings()
        self.weight = head.weight  # (V, hidden)
        self.bias = getattr(head, "bias", None)
        # Gemma-2 style soft-capping, tanh(logit / c) * c: monotonic, so argmax is unchanged,
        # but logit differences must be taken after it to match the model's own logits.
        self.softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits in float32. (..., hidden) -> (..., V)"""
        out = wide(hidden) @ wide(self.weight).T.to(hidden.device)
        out = out if self.bias is None else out + wide(self.bias).to(hidden.device)
        return self._cap(out)

    def _cap(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if not self.softcap else torch.tanh(logits / self.softcap) * self.softcap

    def rows(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """logit[ids[b]] per example, reading only those rows. hidden (K, B, hidden), ids (B,) -> (K, B)"""
        ids = ids.to(self.weight.device)
        out = torch.einsum("kbh,bh->kb", wide(hidden), wide(self.weight[ids]).to(hidden.device))
        if self.bias is not None:
            out = out + wide(self.bias[ids]).to(hidden.device)
        return self._cap(out)

    def set_rows(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """log-sum-exp of logit[ids[b, :]] per example (the logit itself for one token). ids (B, S) -> (K, B)"""
        if ids.shape[-1] == 1:
            return self.rows(hidden, ids[:, 0])
        return torch.stack([self.rows(hidden, ids[:, s]) for s in range(ids.shape[-1])], dim=-1).logsumexp(-1)

    def logit_diff(self, hidden: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """logit[up] - logit[down] per example, reading only those rows of the unembedding.

        hidden (K, B, hidden), up (B,) or (B, S) token ids (a set: its log-sum-exp), down (B,) -> (K, B)
        """
        return self.set_rows(hidden, up if up.dim() == 2 else up[:, None]) - self.rows(hidden, down)

    def target_logprob(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """log p(target) at the final position, a token set's probabilities summed. target (B, S) -> (K, B)"""
        return self.set_rows(hidden, target) - self.logits(hidden).logsumexp(-1)
