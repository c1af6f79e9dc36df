"""Engines: the patched model's final-position hidden state, as cheaply as possible.

Units are patched at their positions only (the final token by default), so nothing before
the earliest of them changes between optimisation steps. `CachedEngine` (the default) runs
each batch's prefix up to that position once, keeps its KV cache, and then runs only the
suffix per step (the final token alone by default). `FullEngine` runs the whole prompt every
step; it is the plain reference the cached engine is tested against.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Protocol, Tuple

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from circuitfind.config.choices import CACHE_POLICIES, ENGINES
from circuitfind.errors import CircuitfindError
from circuitfind.model.components import Sites, device_of
from circuitfind.model.hooks import SiteIndex, SiteValues, patch_sites, record_values
from circuitfind.model.readout import Readout
from circuitfind.model.space import ComponentSpace
from circuitfind.task.encoding import EncodedPairs, position_ids


@functools.lru_cache(maxsize=None)
def _cache_argument(model_class: type) -> str:
    """transformers 5.24 renamed `past_key_values` to `cache` (the old name goes in 5.40); both
    are in the supported range, so the name is read off the model's own signature, once per class."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def with_cache(body: torch.nn.Module, cache: Optional[Cache]) -> Dict[str, Any]:
    """Keyword arguments that hand `cache` to `body` and ask for one back."""
    return {_cache_argument(type(body)): cache, "use_cache": True}


def returned_cache(out) -> Cache:
    """The key/value cache a forward returned, under either name (see `with_cache`)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@dataclass
class Prepared:
    """What the engine keeps of one batch for all optimisation steps."""

    pairs: EncodedPairs
    where: SiteIndex  # the units' sites in this batch
    alt_values: SiteValues  # the alternate prompts' clean values at the sites
    alt_hidden: torch.Tensor  # (B, hidden) the alternate prompts' clean final hidden state, from the same run
    offset: int = 0  # engine=cached: the tokens before this index (the earliest site) are run once
    prefix_kv: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None  # per layer (B, kvH, offset, D)
    buffers: Optional[Tuple[int, list]] = None  # (K, per layer (K*B, kvH, T, D)): engine=cached, cache=device


class Engine(Protocol):
    """What every engine gives the methods and evaluations: batches prepared once, and the base
    prompts' final hidden state patched under K masks, read as logits through `readout`."""

    name: str
    model: torch.nn.Module
    sites: Sites
    space: ComponentSpace
    readout: Readout
    device: torch.device

    def prepare(self, pairs: EncodedPairs) -> Prepared:
        """Record the alternates' values at the units' sites (and whatever the engine keeps per batch)."""

    def clean_hidden(self, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Unpatched final-position hidden state. (B, T) -> (B, hidden)"""

    def site_values(
        self, ids: torch.Tensor, attn: torch.Tensor, rows: torch.Tensor, toks: torch.Tensor
    ) -> tuple[SiteValues, torch.Tensor]:
        """Every unit's clean value at tokens (rows, toks), and the final hidden state."""

    def clean_final(self, prep: Prepared) -> torch.Tensor:
        """The base prompts' unpatched final hidden state, computed as a patched step would be. (B, hidden)"""

    def final_hidden(self, prep: Prepared, mask: torch.Tensor | None, values: SiteValues | None = None) -> torch.Tensor:
        """The base prompts' final hidden state under each of K masks. mask (K, L, n_cols) -> (K, B, hidden)"""


class FullEngine:
    """Runs the whole prompt through the model at every step (the reference engine).

    An engine gives the patched model's final hidden states and, through its `readout`,
    their logits: every method and evaluation needs the two together.
    """

    name = "full"

    def __init__(self, model: torch.nn.Module, sites: Sites):
        self.model = model
        self.sites = sites
        self.space = sites.space
        self.readout = Readout(model)
        self.body = model.base_model  # decoder stack ending in the final norm
        self.device = next(model.parameters()).device

    def _run(self, ids, attn, **kw):
        return self.body(
            input_ids=ids.to(self.device),
            attention_mask=attn.to(self.device),
            position_ids=position_ids(attn).to(self.device),
            **kw,
        )

    @torch.no_grad()
    def clean_hidden(self, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Unpatched final-position hidden state. (B, T) -> (B, hidden)"""
        return self._run(ids, attn, use_cache=False).last_hidden_state[:, -1]

    @torch.no_grad()
    def site_values(
        self, ids: torch.Tensor, attn: torch.Tensor, rows: torch.Tensor, toks: torch.Tensor
    ) -> tuple[SiteValues, torch.Tensor]:
        """Every unit's clean value at tokens (rows, toks) of these prompts, and the final hidden state."""
        with record_values(self.sites, rows, toks) as values:
            out = self._run(ids, attn, use_cache=False)
        return values, out.last_hidden_state[:, -1]

    @torch.no_grad()
    def prepare(self, pairs: EncodedPairs) -> Prepared:
        where = SiteIndex.of(pairs.base_pos, pairs.alt_pos)
        values, hidden = self.site_values(pairs.alt_ids, pairs.alt_attn, where.rows, where.alt_tok)
        return Prepared(pairs=pairs, where=where, alt_values=values, alt_hidden=hidden)

    @torch.no_grad()
    def clean_final(self, prep: Prepared) -> torch.Tensor:
        """The base prompts' unpatched final hidden state: the same computation as a patched step with
        no hook, so that d(patched) - d0 is exactly 0 for a mask that keeps everything. (B, hidden)"""
        return self.final_hidden(prep, None)[0]

    def final_hidden(self, prep: Prepared, mask: torch.Tensor | None, values: SiteValues | None = None) -> torch.Tensor:
        """Final-position hidden state of the base prompts patched under each of K masks.

        The values patched in are the alternates' unless `values` (an ablation's) are given;
        mask None runs the same computation with no hook at all (the self-checks compare the two).
        mask (K, L, n_cols) -> (K, B, hidden)
        """
        k, b = (1 if mask is None else mask.shape[0]), len(prep.pairs)
        ids, attn = prep.pairs.base_ids.repeat(k, 1), prep.pairs.base_attn.repeat(k, 1)
        with self._patched(prep, mask, values, offset=0):
            out = self._run(ids, attn, use_cache=False)
        return out.last_hidden_state[:, -1].view(k, b, -1)

    def _patched(self, prep: Prepared, mask: torch.Tensor | None, values: SiteValues | None, offset: int):
        if mask is None:
            return nullcontext()
        return patch_sites(self.sites, mask, prep.alt_values if values is None else values, prep.where, offset)


class SuffixSlotLayer(DynamicLayer):
    """One layer's prefix keys/values plus free slots that the suffix tokens write in place.

    The stock cache concatenates the new keys/values onto the prefix, copying the whole
    prefix every step. Here the prefix is written once into a buffer as long as the prompt;
    each step writes only the suffix positions, through a fresh `detach()` view, so the
    prefix positions are never touched and no step's graph reaches into another's.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, prefix_len: int):  # (N, kvH, T, D)
        super().__init__()
        self.buffers = (keys, values)
        self.keys, self.values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self.prefix_len = prefix_len

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = (b.detach() for b in self.buffers)
        keys[..., self.prefix_len :, :] = key_states
        values[..., self.prefix_len :, :] = value_states
        self.keys, self.values = keys, values
        return keys, values

    def get_seq_length(self) -> int:
        return self.prefix_len  # the cached part; the suffix tokens are the queries


def prefix_buffers(prefix_kv, k: int, devices, width: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, K copies of the prefix in a buffer `width` tokens long (free suffix slots), on that
    layer's device (a model sharded with device_map keeps each layer's cache beside it). (K*B, kvH, T, D)"""
    out = []
    for (key, val), device in zip(prefix_kv, devices):
        shape = (k * key.shape[0], key.shape[1], width, key.shape[3])
        pair = []
        for t in (key, val):
            buf = torch.empty(shape, dtype=t.dtype, device=device)
            buf[:, :, : t.shape[2]].view(k, *t.shape).copy_(t.to(device).unsqueeze(0).expand(k, *t.shape))
            pair.append(buf)
        out.append(tuple(pair))
    return out


def cached_prefix(prep: "Prepared") -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The prefix keys/values of a batch, from wherever the engine keeps them. (B, kvH, offset, D)"""
    if prep.prefix_kv is not None:
        return prep.prefix_kv
    b, n = len(prep.pairs), prep.offset
    return [(key[:b, :, :n], val[:b, :, :n]) for key, val in prep.buffers[1]]


def suffix_slot_cache(buffers, prefix_len: int) -> Cache:
    return Cache(layers=[SuffixSlotLayer(key, val, prefix_len) for key, val in buffers])


class CachedEngine(FullEngine):
    """Runs each prefix once and, per step, only the suffix from the earliest site on its cached keys/values."""

    name = "cached"

    def __init__(self, model: torch.nn.Module, sites: Sites, cache: str = "device"):
        super().__init__(model, sites)
        if cache not in CACHE_POLICIES:
            raise CircuitfindError(f"cache={cache!r} is unknown; choose from {list(CACHE_POLICIES)}")
        self.cache = cache
        self.layer_devices = [device_of(m) for m in sites.head_projs]

    @torch.no_grad()
    def _prefix_kv(self, pairs: EncodedPairs, offset: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        # A plain DynamicCache keeps every prefix position, even past a sliding window; the
        # suffix's attention mask then applies the window as the full prompt would.
        out = self._run(
            pairs.base_ids[:, :offset], pairs.base_attn[:, :offset], **with_cache(self.body, DynamicCache())
        )
        return [(layer[0], layer[1]) for layer in returned_cache(out)]  # per layer (B, kvH, offset, D)

    @torch.no_grad()
    def prepare(self, pairs: EncodedPairs) -> Prepared:
        prep = super().prepare(pairs)
        prep.offset = int(prep.where.base_tok.min())  # the earliest site: everything before it is fixed
        if prep.offset > 0 and self.cache != "recompute":
            kv = self._prefix_kv(pairs, prep.offset)
            prep.prefix_kv = [(k.cpu(), v.cpu()) for k, v in kv] if self.cache == "cpu" else kv
        return prep

    def final_hidden(self, prep: Prepared, mask: torch.Tensor | None, values: SiteValues | None = None) -> torch.Tensor:
        if prep.offset == 0:  # a site at the first token: there is no prefix to keep
            return super().final_hidden(prep, mask, values)
        k, b, n = (1 if mask is None else mask.shape[0]), len(prep.pairs), prep.offset
        attn = prep.pairs.base_attn.repeat(k, 1)
        cache = suffix_slot_cache(self._buffers(prep, k), n)  # outside the hooks: it may run the prefix
        with self._patched(prep, mask, values, offset=n):
            out = self.body(
                input_ids=prep.pairs.base_ids[:, n:].repeat(k, 1).to(self.device),
                attention_mask=attn.to(self.device),
                position_ids=position_ids(attn)[:, n:].to(self.device),
                **with_cache(self.body, cache),
            )
        return out.last_hidden_state[:, -1].view(k, b, -1)

    def _buffers(self, prep: Prepared, k: int):
        """The prefix buffers for K masks: built once and kept (device), or built per step."""
        width = prep.pairs.base_ids.shape[1]
        if self.cache == "device":
            if prep.buffers is None or prep.buffers[0] != k:
                prep.buffers = (k, prefix_buffers(cached_prefix(prep), k, self.layer_devices, width))
                prep.prefix_kv = None  # the buffers hold the prefix now: keep one copy only
            return prep.buffers[1]
        kv = prep.prefix_kv if self.cache == "cpu" else self._prefix_kv(prep.pairs, prep.offset)
        return prefix_buffers(kv, k, self.layer_devices, width)


ENGINE_CLASSES = {"full": FullEngine, "cached": CachedEngine}  # keyed by config.choices.ENGINES


def make_engine(name: str, model: torch.nn.Module, sites: Sites, cache: str = "device") -> Engine:
    """The engine called `name`; `cache` is the prefix memory policy of engine=cached."""
    if name not in ENGINES:
        raise CircuitfindError(f"engine={name!r} is unknown; choose from {sorted(ENGINES)}")
    classes = getattr(model, "engine_classes", None) or ENGINE_CLASSES  # a wrapped model may bring its own (tlens.py)
    return classes["cached"](model, sites, cache) if name == "cached" else classes["full"](model, sites)
