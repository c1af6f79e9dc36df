"""Where the maskable components live in each model family.

A component is one attention head (its slice of the input of the attention output
projection, so mixing it mixes exactly that head's write to the residual stream) or one
MLP's output. Adding a model family is one `Adapter` entry in `ADAPTERS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch
from torch import nn

from circuitfind.config.choices import LAST, UNIT_KINDS
from circuitfind.errors import CircuitfindError
from circuitfind.model.space import ComponentSpace


@dataclass(frozen=True)
class UnitsChoice:
    """Which units the mask covers (the `units` config group): their kind, positions and group size."""

    kind: str = "heads_mlps"
    positions: Tuple[str, ...] = (LAST,)
    group_size: int = 1

    def __post_init__(self):
        if self.kind not in UNIT_KINDS:
            raise CircuitfindError(f"units.kind={self.kind!r} is unknown; choose from {', '.join(UNIT_KINDS)}")


@dataclass(frozen=True)
class Adapter:
    """Where one family's components live: dotted paths relative to the model, and config keys.

    The heads are read at the *input* of `head_proj`, the attention output projection (a
    Linear, or GPT-2's Conv1D): there the heads sit side by side, n_heads slices of head_dim,
    whatever the number of key/value heads (grouped-query attention only shares K and V).
    """

    layers: str  # the ModuleList of decoder layers
    head_proj: str  # per layer: the linear map whose input is the heads' outputs side by side
    mlp: str  # per layer: the MLP whose output is added to the residual stream
    mlp_down: str = "mlp.down_proj"  # per layer: the MLP's output projection, whose input is its neurons
    n_heads_key: str = "num_attention_heads"  # config key of the number of query heads
    hidden_key: str = "hidden_size"  # config key of the residual width (head_dim = hidden / n_heads)
    head_dim_key: str | None = "head_dim"  # config key of an explicit head size (Gemma, Qwen3), if any
    mlp_width_key: str | None = None  # config key of the MLP width, where mlp_down is not a Linear (a hook point)


_LLAMA_LIKE = Adapter(layers="model.layers", head_proj="self_attn.o_proj", mlp="mlp")

# Adding a family: one entry. Its key is `config.model_type`; tests/test_families.py checks it.
ADAPTERS = {
    "llama": _LLAMA_LIKE,  # LLaMA 1/2/3, SmolLM/SmolLM2, TinyLlama, Vicuna, ...
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,  # explicit head_dim, q/k norms
    "gemma": _LLAMA_LIKE,  # explicit head_dim (n_heads * head_dim may differ from hidden)
    "gemma2": _LLAMA_LIKE,  # post-attention/post-MLP norms, soft-capping, sliding-window layers
    "gemma3_text": _LLAMA_LIKE,  # Gemma 3 (text only): QK-norm, sliding-window layers mixed with global ones
    "phi3": _LLAMA_LIKE,  # fused qkv_proj and gate_up_proj; o_proj is separate
    "gpt2": Adapter(
        layers="transformer.h",
        head_proj="attn.c_proj",
        mlp="mlp",
        mlp_down="mlp.c_proj",
        n_heads_key="n_head",
        hidden_key="n_embd",
    ),
    "gpt_neox": Adapter(  # Pythia
        layers="gpt_neox.layers", head_proj="attention.dense", mlp="mlp", mlp_down="mlp.dense_4h_to_h"
    ),
    # A HookedTransformer wrapped by model/tlens.py: its own hook points (hooks.py flattens hook_z's heads)
    "transformer_lens": Adapter(
        layers="tl.blocks",
        head_proj="attn.hook_z",
        mlp="hook_mlp_out",
        mlp_down="mlp.hook_post",
        n_heads_key="n_heads",
        hidden_key="d_model",
        head_dim_key="d_head",
        mlp_width_key="d_mlp",
    ),
}


@dataclass
class Sites:
    """The modules to hook, per layer: the decoder layer (its input is the residual stream), the
    head projection, the MLP and the MLP's output projection (its input is the neurons)."""

    space: ComponentSpace
    head_projs: List[nn.Module]
    mlps: List[nn.Module]
    layers: List[nn.Module]
    mlp_downs: List[nn.Module]
    layer_stack: nn.ModuleList  # the model's own list of decoder layers (engine=cached skips some in a run)


def _get(root: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def head_shape(config, adapter: Adapter) -> tuple[int, int]:
    """(n_heads, head_dim) of a family's attention, read from its config."""
    n_heads = getattr(config, adapter.n_heads_key, None)
    if not isinstance(n_heads, int) or n_heads < 1:
        raise CircuitfindError(f"the model's config has no usable {adapter.n_heads_key!r} (number of attention heads)")
    head_dim = getattr(config, adapter.head_dim_key, None) if adapter.head_dim_key else None
    if not head_dim:
        hidden = getattr(config, adapter.hidden_key)
        if hidden % n_heads:
            raise CircuitfindError(
                f"{adapter.hidden_key}={hidden} is not a multiple of {adapter.n_heads_key}={n_heads}"
            )
        head_dim = hidden // n_heads
    return n_heads, int(head_dim)


def input_width(module: nn.Module) -> int | None:
    """The input size of a Linear (in_features) or of GPT-2's Conv1D (weight is (in, out))."""
    if isinstance(getattr(module, "in_features", None), int):
        return module.in_features
    if hasattr(module, "nf") and getattr(module, "weight", None) is not None:  # transformers' Conv1D
        return module.weight.shape[0]
    return None


def locate_components(model: nn.Module, units: UnitsChoice | None = None) -> Sites:
    """Find every head, MLP, neuron and residual site of a supported causal LM; `units` chooses
    which of them the mask covers, and at which positions (default: heads and MLPs, final position)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        model_type = getattr(model.config, "model_type", None)
    if model_type not in ADAPTERS:
        raise unsupported_family(model_type)
    adapter = ADAPTERS[model_type]
    try:
        layers = _get(model, adapter.layers)
        head_projs = [_get(layer, adapter.head_proj) for layer in layers]
        mlps = [_get(layer, adapter.mlp) for layer in layers]
        mlp_downs = [_get(layer, adapter.mlp_down) for layer in layers]
    except AttributeError as e:
        raise CircuitfindError(
            f"the {model_type} adapter does not match this model ({e}); the adapter for this family is wrong"
        ) from None
    n_heads, head_dim = head_shape(config, adapter)
    units = units or UnitsChoice()
    mlp_width = input_width(mlp_downs[0]) or int(getattr(config, adapter.mlp_width_key or "", 0) or 0)
    if units.kind == "neurons" and (units.group_size < 1 or mlp_width % units.group_size):
        raise CircuitfindError(
            f"units.group_size={units.group_size} does not divide the MLP width {mlp_width}; "
            f"give a divisor of {mlp_width} (1 = single neurons)"
        )
    space = ComponentSpace(
        n_layers=len(layers),
        n_heads=n_heads,
        head_dim=head_dim,
        kind=units.kind,
        positions=tuple(units.positions),
        group_size=units.group_size,
        mlp_width=mlp_width,
    )
    in_features = input_width(head_projs[0])
    if in_features is not None and in_features != n_heads * head_dim:
        raise CircuitfindError(
            f"{adapter.head_proj} takes {in_features} inputs, not n_heads*head_dim = {n_heads * head_dim}; "
            "the adapter for this family is wrong"
        )
    return Sites(space, head_projs, mlps, list(layers), mlp_downs, layers)


def unsupported_family(model_type: str | None) -> CircuitfindError:
    """The one-line error for a model family without an Adapter."""
    return CircuitfindError(
        f"model family {model_type!r} is not supported; supported: {', '.join(sorted(ADAPTERS))} "
        "(add an Adapter entry in circuitfind/model/components.py)"
    )


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
