"""How much memory a run's masks, kept prefixes and one step's activations take, estimated before
any of them is built, so that a unit space too large for the device stops with what to change."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch

from circuitfind.errors import CircuitfindError
from circuitfind.model.components import Sites
from circuitfind.task.encoding import EncodedPairs

GIB = 2**30
ACTIVATIONS_PER_LAYER = 8  # hidden-sized tensors one layer keeps for the backward pass, at most
MLP_ACTIVATIONS = 4  # MLP-width tensors likewise


@dataclass(frozen=True)
class MemoryEstimate:
    masks: int  # bytes: K masks with their gradients and Adam's two moments
    prefixes: int  # bytes: every prepared batch's prefix keys/values, K copies (engine=cached, cache=device)
    step: int  # bytes: one step's activations kept for the backward pass, and the expanded weights

    @property
    def total(self) -> int:
        return self.masks + self.prefixes + self.step


def model_widths(sites: Sites, config) -> tuple[int, int, int]:
    """The model's hidden size, key/value heads and MLP width, from its config (a text config inside
    a multimodal one)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0))
    kv_heads = int(getattr(text, "num_key_value_heads", None) or sites.space.n_heads)
    return hidden, kv_heads, sites.space.mlp_width or 4 * hidden


def estimate_memory(sites: Sites, config, encoded: Sequence[EncodedPairs], k: int, cfg) -> MemoryEstimate:
    """An upper estimate for K masks trained side by side on these pairs."""
    space = sites.space
    hidden, kv_heads, width = model_widths(sites, config)
    act_bytes = torch.finfo(getattr(torch, cfg.model.dtype)).bits // 8
    masks = 4 * 4 * k * space.n_components
    prefixes, step = 0, 0
    for enc in encoded:
        rows, length = enc.base_ids.shape
        first = int(enc.base_pos[enc.base_pos >= 0].min())
        if cfg.engine == "cached" and cfg.cache == "device":
            prefixes += k * rows * first * space.n_layers * 2 * kv_heads * space.head_dim * act_bytes
        b = min(rows, cfg.optimizer.batch_size or rows)
        suffix = length - first if cfg.engine == "cached" else length
        per_token = ACTIVATIONS_PER_LAYER * hidden + MLP_ACTIVATIONS * width
        step = max(step, k * b * suffix * space.n_layers * per_token * 4)
    channels = {"heads_mlps": space.n_heads * space.head_dim + 1, "residual": 1, "neurons": width}[space.kind]
    step += 3 * 4 * k * space.n_layers * len(space.positions) * channels
    return MemoryEstimate(masks, prefixes, step)


def scoring_chunk(sites: Sites, config, dtype: torch.dtype, pairs: int, tokens: int, free: int, most: int) -> int:
    """How many circuits to score in one forward pass (pruning's), within half the `free` bytes: each circuit
    holds its own copy of the batch's keys and values (engine=cached's buffers, and as much again for the runs
    its circuits share, model/engine.py) and a forward pass's activations, for `pairs` prompts of `tokens`
    tokens. At least 1, at most `most`."""
    space = sites.space
    hidden, kv_heads, width = model_widths(sites, config)
    keys_values = 2 * 2 * space.n_layers * kv_heads * space.head_dim * (torch.finfo(dtype).bits // 8)
    activations = (ACTIVATIONS_PER_LAYER * hidden + MLP_ACTIVATIONS * width + space.n_heads * tokens) * 4
    per_circuit = pairs * tokens * (keys_values + activations)
    return max(1, min(most, free // 2 // max(per_circuit, 1)))


def free_memory(device: torch.device) -> int:
    """Bytes free on the device: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_memory(estimate: MemoryEstimate, limit_gb: float | None, device: torch.device) -> None:
    """One line naming what to change when the estimate exceeds the limit (default: the device's free memory)."""
    limit = int(limit_gb * GIB) if limit_gb is not None else free_memory(device)
    if estimate.total <= limit:
        return
    raise CircuitfindError(
        f"this unit space would need about {estimate.total / GIB:.1f} GiB (masks {estimate.masks / GIB:.1f}, kept "
        f"prefixes {estimate.prefixes / GIB:.1f}, one step {estimate.step / GIB:.1f}) and "
        f"{'units.memory_gb allows' if limit_gb is not None else 'the device has'} {limit / GIB:.1f} GiB; lower "
        "optimizer.batch_size, give fewer units.positions or a larger units.group_size, or use cache=cpu"
    )
