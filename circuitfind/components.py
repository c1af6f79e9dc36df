"""Where the maskable components live in each model family, and what they are called.

A component is one attention head (its slice of the input of the attention output
projection, so mixing it mixes exactly that head's write to the residual stream) or one
MLP's output. Adding a model family is one `Adapter` entry in `ADAPTERS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
from torch import nn

from circuitfind.errors import CircuitfindError


@dataclass(frozen=True)
class Adapter:
    """Dotted paths, relative to the model, of the modules a family's components live in."""

    layers: str  # the ModuleList of decoder layers
    head_proj: str  # per layer: the linear map whose input is the heads' outputs side by side
    mlp: str  # per layer: the MLP whose output is added to the residual stream


_LLAMA_LIKE = Adapter(layers="model.layers", head_proj="self_attn.o_proj", mlp="mlp")

ADAPTERS = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
}


@dataclass(frozen=True)
class ComponentLayout:
    """Shape of the mask: per layer, n_heads heads then one MLP. Names `L{l}.H{h}`, `L{l}.MLP`."""

    n_layers: int
    n_heads: int
    head_dim: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_layers, self.n_heads + 1)

    @property
    def n_components(self) -> int:
        return self.n_layers * (self.n_heads + 1)

    def names(self) -> List[str]:
        """Component names in the mask's flattened (layer-major) order."""
        return [
            f"L{layer}.H{h}" if h < self.n_heads else f"L{layer}.MLP"
            for layer in range(self.n_layers)
            for h in range(self.n_heads + 1)
        ]


@dataclass
class Sites:
    """The modules to hook, one head projection and one MLP per layer."""

    layout: ComponentLayout
    head_projs: List[nn.Module]
    mlps: List[nn.Module]


def _get(root: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def locate_components(model: nn.Module) -> Sites:
    """Find every head and MLP of a supported causal LM."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ADAPTERS:
        raise CircuitfindError(
            f"model family {model_type!r} is not supported; supported: {', '.join(sorted(ADAPTERS))} "
            "(add an Adapter entry in circuitfind/components.py)"
        )
    adapter = ADAPTERS[model_type]
    layers = _get(model, adapter.layers)
    cfg = model.config
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    head_projs = [_get(layer, adapter.head_proj) for layer in layers]
    mlps = [_get(layer, adapter.mlp) for layer in layers]
    layout = ComponentLayout(n_layers=len(layers), n_heads=n_heads, head_dim=head_dim)
    in_features = getattr(head_projs[0], "in_features", None)
    if in_features is not None and in_features != n_heads * head_dim:
        raise CircuitfindError(
            f"{adapter.head_proj} takes {in_features} inputs, not n_heads*head_dim = {n_heads * head_dim}; "
            "the adapter for this family is wrong"
        )
    return Sites(layout=layout, head_projs=head_projs, mlps=mlps)


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
