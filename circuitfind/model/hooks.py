"""Hooks that read or mix component values at the final position, always removed on exit.

The mask has shape (K, n_layers, n_heads + 1): K masks (one per lambda) trained side by
side, per layer the heads then the MLP. The model's batch is K copies of the B base prompts,
k-major (row k * B + b). One hook per module mixes all heads of a layer in one operation:

    value <- w * value(base) + (1 - w) * value(alternate)

written so that w = 1 returns the base value bit for bit and w = 0 the alternate's.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, List

import torch

from circuitfind.model.components import Sites


@dataclass
class FinalValues:
    """Every component's value at the final position of one batch of prompts."""

    heads: List[torch.Tensor] = field(default_factory=list)  # per layer (B, n_heads * head_dim)
    mlps: List[torch.Tensor] = field(default_factory=list)  # per layer (B, hidden)

    def rows(self, sl: slice) -> "FinalValues":
        """The values of some of the prompts."""
        return FinalValues(heads=[h[sl] for h in self.heads], mlps=[m[sl] for m in self.mlps])

    def map(self, fn) -> "FinalValues":
        """The values with `fn` applied to each layer's tensor (B, C) -> (B', C)."""
        return FinalValues(heads=[fn(h) for h in self.heads], mlps=[fn(m) for m in self.mlps])

    @staticmethod
    def concat(parts: List["FinalValues"]) -> "FinalValues":
        """The values of several batches of prompts, one after another."""
        n = len(parts[0].heads)
        return FinalValues(
            heads=[torch.cat([p.heads[i] for p in parts]) for i in range(n)],
            mlps=[torch.cat([p.mlps[i] for p in parts]) for i in range(n)],
        )


@contextmanager
def hooks(handles: List[torch.utils.hooks.RemovableHandle]) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def record_final_values(sites: Sites, grad: bool = False) -> Iterator[FinalValues]:
    """Capture the heads' and MLPs' final-position values during the forward run inside.

    With `grad`, the values keep their graph, so a loss on a run patched from them also
    trains the recorded run (the organism's interchange training); otherwise they are detached.
    """
    n = sites.space.n_layers
    values = FinalValues(heads=[None] * n, mlps=[None] * n)

    def keep(store: list, layer: int, from_input: bool):
        def hook(module, args, output=None):
            value = (args[0] if from_input else output)[:, -1]
            store[layer] = value if grad else value.detach()

        return hook

    handles = [m.register_forward_pre_hook(keep(values.heads, i, True)) for i, m in enumerate(sites.head_projs)]
    handles += [m.register_forward_hook(keep(values.mlps, i, False)) for i, m in enumerate(sites.mlps)]
    with hooks(handles):
        yield values


def _mix_last(x: torch.Tensor, alt: torch.Tensor, keep: torch.Tensor, take: torch.Tensor) -> torch.Tensor:
    """Mix the final position of x (K*B, T, C) with alt (B, C): keep * x + take * alt.

    keep = w and take = 1 - w, shape (K, 1, C) or (K, 1, 1), in (at least) float32: the mix
    is computed there and cast back, so low-precision models still give the mask an accurate
    gradient.
    """
    k = keep.shape[0]
    b, c = alt.shape
    base = x[:, -1].to(keep.dtype).view(k, b, c)  # (K, B, C)
    mixed = keep.to(x.device) * base + take.to(x.device) * alt.to(device=x.device, dtype=keep.dtype)  # (K, B, C)
    mixed = mixed.to(x.dtype).view(k * b, 1, c)
    if x.shape[1] == 1:
        return mixed
    return torch.cat([x[:, :-1], mixed], dim=1)


@contextmanager
def patch_final_position(sites: Sites, mask: torch.Tensor, alt: FinalValues) -> Iterator[None]:
    """Patch every component at the final position from `alt`, weighted by `mask` (K, L, H+1)."""
    n_heads, head_dim = sites.space.n_heads, sites.space.head_dim
    # Expanded once per forward, not per layer: each head's weight over its head_dim slice.
    w = mask.to(torch.promote_types(mask.dtype, torch.float32))
    keep_heads = w[:, :, :n_heads].repeat_interleave(head_dim, dim=2).unsqueeze(2)  # (K, L, 1, H*D)
    keep_mlps = w[:, :, n_heads:].unsqueeze(2)  # (K, L, 1, 1)
    take_heads, take_mlps = 1 - keep_heads, 1 - keep_mlps

    def head_hook(layer: int):
        def hook(module, args):
            mixed = _mix_last(args[0], alt.heads[layer], keep_heads[:, layer], take_heads[:, layer])
            return (mixed,) + tuple(args[1:])

        return hook

    def mlp_hook(layer: int):
        def hook(module, args, output):
            return _mix_last(output, alt.mlps[layer], keep_mlps[:, layer], take_mlps[:, layer])

        return hook

    handles = [m.register_forward_pre_hook(head_hook(i)) for i, m in enumerate(sites.head_projs)]
    handles += [m.register_forward_hook(mlp_hook(i)) for i, m in enumerate(sites.mlps)]
    with hooks(handles):
        yield
