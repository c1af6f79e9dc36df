"""Engines: the patched model's final-position hidden state, as cheaply as possible.

Units are patched at their positions only (the final token by default), so nothing before
the earliest of them changes between optimisation steps. `CachedEngine` (the default) runs
each batch's prefix up to that position once, keeps its KV cache, and then runs only the
suffix per step (the final token alone by default). A circuit that is scored, not trained
(pruning's, mostly), runs from the first token and the first layer it patches, on the clean keys and
values before that token and the clean residual stream entering that layer. `FullEngine` runs the
whole prompt every step; it is the plain reference the cached engine is tested against.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Protocol, Tuple

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from circuitfind.config.choices import CACHE_POLICIES, ENGINES
from circuitfind.errors import CircuitfindError
from circuitfind.model.components import Sites, device_of
from circuitfind.model.hooks import SiteIndex, SiteValues, hooks, on_input, patch_sites, record_values
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
    buffers: Optional[Tuple[int, list]] = None  # (K, per layer (K*B, kvH, T, D) or None until a run needs that
    # layer): engine=cached, cache=device
    clean_to: Optional[List[int]] = None  # engine=cached, cache=device: per layer, the buffers hold clean keys/values
    # on tokens [0, clean_to)
    slot_starts: Optional[torch.Tensor] = None  # engine=cached: (P,) each position's first token in this batch
    slot_ends: Optional[torch.Tensor] = None  # engine=cached: (P,) each position's last token in this batch (-1: none)
    clean: Optional["CleanRun"] = None  # engine=cached: the clean run, kept from a mask that patched nothing, or
    # made when a mask first runs from a later token than `offset` or a later layer than the first


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

    def clean_final(self, prep: Prepared, keep: bool = False) -> torch.Tensor:
        """The base prompts' unpatched final hidden state, computed as a patched step would be; `keep`: circuits
        will be scored on this batch, so an engine may keep the clean run for them. (B, hidden)"""

    def final_hidden(self, prep: Prepared, mask: torch.Tensor | None, values: SiteValues | None = None) -> torch.Tensor:
        """The base prompts' final hidden state under each of K masks. mask (K, L, n_cols) -> (K, B, hidden)"""

    def first_patched(self, prep: Prepared, mask: torch.Tensor) -> torch.Tensor:
        """Per mask, the first token and the first layer its run must compute. (K, 2)"""

    def run_groups(self, prep: Prepared, mask: torch.Tensor) -> List[List[int]]:
        """The masks in groups that share runs (they run together best), the groups in an order that puts those
        sharing the most next to each other."""


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
    def clean_final(self, prep: Prepared, keep: bool = False) -> torch.Tensor:
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

    def first_patched(self, prep: Prepared, mask: torch.Tensor) -> torch.Tensor:
        """Every mask runs the whole prompt through every layer. (K, 2)"""
        return torch.zeros(mask.shape[0], 2, dtype=torch.long)

    def run_groups(self, prep: Prepared, mask: torch.Tensor) -> List[List[int]]:
        """Every mask runs alike and alone: the order they came in."""
        return [[i] for i in range(mask.shape[0])]

    def _patched(
        self, prep: Prepared, mask: torch.Tensor | None, values: SiteValues | None, offset: int, end: int | None = None
    ):
        if mask is None:
            return nullcontext()
        values = prep.alt_values if values is None else values
        where = prep.where
        if offset > prep.offset or end is not None:  # sites outside the run's tokens: not in the run
            inside = where.base_tok >= offset
            inside = inside if end is None else inside & (where.base_tok < end)
            where, values = where.select(inside), values.map(lambda v: v[inside.to(v.device)])
        return patch_sites(self.sites, mask, values, where, offset)


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
        end = self.prefix_len + key_states.shape[-2]  # the buffer's width, unless the run stops before the last token
        keys[..., self.prefix_len : end, :] = key_states
        values[..., self.prefix_len : end, :] = value_states
        if end < keys.shape[-2]:
            keys, values = keys[..., :end, :], values[..., :end, :]
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


def shared_tokens(pairs: EncodedPairs) -> int:
    """How many first tokens every pair's base and alternate prompts have in common (ids and padding)."""
    if pairs.base_ids.shape != pairs.alt_ids.shape:
        return 0
    same = (pairs.base_ids == pairs.alt_ids) & (pairs.base_attn == pairs.alt_attn)
    differs = ~same.all(0)  # (T,) a column where some pair differs
    return int(differs.int().argmax()) if differs.any() else pairs.base_ids.shape[1]


def suffix_slot_cache(buffers, prefix_len: int, device=None) -> Cache:
    """A cache over per-layer buffers; a layer without one (None: the run skips it) only reports the prefix."""
    empty = torch.empty(0, device=device)
    return Cache(layers=[SuffixSlotLayer(*(pair or (empty, empty)), prefix_len) for pair in buffers])


class CachedEngine(FullEngine):
    """Runs each prefix once and, per step, only the suffix from the earliest site on its cached keys/values."""

    name = "cached"

    def __init__(self, model: torch.nn.Module, sites: Sites, cache: str = "device"):
        super().__init__(model, sites)
        if cache not in CACHE_POLICIES:
            raise CircuitfindError(f"cache={cache!r} is unknown; choose from {list(CACHE_POLICIES)}")
        self.cache = cache
        self.layer_devices = [device_of(m) for m in sites.head_projs]
        # how far up a patch at one token reaches the others: a head's, MLP's or neuron group's output there changes
        # the residual stream that the next layer's keys and values read; the residual stream entering a layer,
        # that layer's own
        self.reach = 0 if self.space.kind == "residual" else 1

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
        where = SiteIndex.of(pairs.base_pos, pairs.alt_pos)
        offset = int(where.base_tok.min())  # the earliest site: everything before it is fixed
        kv = self._prefix_kv(pairs, offset) if offset > 0 and self.cache != "recompute" else None
        shared = min(shared_tokens(pairs), offset, int(where.alt_tok.min())) if kv is not None else 0
        if shared > 0:  # the alternates run from their first token that differs, on the base prompts' keys/values
            values, hidden = self._alt_values_from(pairs, where, kv, shared)
        else:
            values, hidden = self.site_values(pairs.alt_ids, pairs.alt_attn, where.rows, where.alt_tok)
        prep = Prepared(pairs=pairs, where=where, alt_values=values, alt_hidden=hidden, offset=offset)
        last = pairs.base_ids.shape[1] - 1
        starts = torch.full((len(self.space.positions),), last, dtype=torch.long)
        prep.slot_starts = starts.scatter_reduce(0, where.slot, where.base_tok, reduce="amin")
        prep.slot_ends = torch.full_like(starts, -1).scatter_reduce(0, where.slot, where.base_tok, "amax")
        if kv is not None:
            prep.prefix_kv = [(k.cpu(), v.cpu()) for k, v in kv] if self.cache == "cpu" else kv
        return prep

    def _alt_values_from(
        self, pairs: EncodedPairs, where: SiteIndex, kv, shared: int
    ) -> tuple[SiteValues, torch.Tensor]:
        """`site_values` of the alternate prompts, which equal the base prompts on tokens [0, shared): those tokens'
        keys/values are the base prefix's (`kv`), and the run starts at token `shared` (in a task that changes
        one late token, such as the operator, most of the prompt). (N, C) per layer, (B, hidden)"""
        width = pairs.alt_ids.shape[1]
        buffers = prefix_buffers([(k[:, :, :shared], v[:, :, :shared]) for k, v in kv], 1, self.layer_devices, width)
        with record_values(self.sites, where.rows, where.alt_tok - shared) as values:
            out = self._run_on_slots(pairs.alt_ids, pairs.alt_attn, shared, buffers)
        return values, out.last_hidden_state[:, -1]

    def first_patched(self, prep: Prepared, mask: torch.Tensor) -> torch.Tensor:
        """Per mask, the first token of a position where it patches a unit (a weight below 1), and the first
        layer: every token before that token, and every layer below that layer, runs as in the clean prompt.
        A mask that patches nothing runs as the run with no hook does (from `offset`, every layer), so that
        the two agree bit for bit. (K, 2): token, layer"""
        patched = self._patched_at(mask)
        last = prep.pairs.base_ids.shape[1] - 1
        token = torch.where(patched.any(1), prep.slot_starts, last + 1).min(1).values
        layer = first_layer(patched)
        none = token > last
        layer = torch.zeros_like(layer) if self.cache == "recompute" else layer  # no clean run is kept
        return torch.stack([torch.where(none, prep.offset, token), torch.where(none, 0, layer)], 1)

    def _patched_at(self, mask: torch.Tensor) -> torch.Tensor:
        """Per mask, whether it patches a unit (a weight below 1) at each layer and position. (K, L, P), on the CPU"""
        space = self.space
        return (mask.detach() < 1).view(mask.shape[0], space.n_layers, len(space.positions), -1).any(-1).cpu()

    def run_groups(self, prep: Prepared, mask: torch.Tensor) -> List[List[int]]:
        """Masks that patch the same units before their latest position (`late_starts`) share that part's run: a
        group each; others alone. Ordered by first patched token, then by that part, then by the late start and
        the first patched layer. Patched from the alternates, as `final_hidden` runs them: without the units they
        leave as in the base prompt (`_where_alternates_differ`)."""
        mask = self._where_alternates_differ(prep, mask)
        starts, late = self.first_patched(prep, mask).tolist(), self.late_starts(prep, mask)
        _, part = self._early_part(prep, mask, late).flatten(1).unique(dim=0, return_inverse=True)
        part = torch.where(late >= 0, part.cpu(), -1).tolist()
        order = sorted(range(mask.shape[0]), key=lambda i: (starts[i][0], part[i], int(late[i]), starts[i][1]))
        groups: List[List[int]] = []
        for i in order:
            if groups and part[i] >= 0 and part[groups[-1][0]] == part[i]:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups

    def _where_alternates_differ(self, prep: Prepared, mask: torch.Tensor) -> torch.Tensor:
        """The masks with their units unpatched (1) at positions whose tokens, and every token before them, the
        alternate prompts share with the base prompts: there the alternate's value is the clean one, so patching
        it in changes nothing, and without them a mask runs from a later token (OI's alternates change only the
        operator: a unit at x patches nothing). (K, L, n_cols)"""
        where = prep.where
        same = (where.base_tok == where.alt_tok) & (where.base_tok < shared_tokens(prep.pairs))  # (N,) per site
        unchanged = torch.ones(len(self.space.positions), dtype=torch.long).scatter_reduce(
            0, where.slot, same.long(), "amin"
        )
        return self._unpatched_at(mask, unchanged.bool()) if unchanged.any() else mask

    def _unpatched_at(self, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The masks with every unit at `positions` set to 1 (unpatched): per mask (K, P), or for all (P,).
        (K, L, n_cols)"""
        space, k = self.space, mask.shape[0]
        blocks = mask.detach().view(k, space.n_layers, len(space.positions), -1)
        at = positions.expand(k, -1)[:, None, :, None].to(mask.device)
        return torch.where(at, torch.ones_like(blocks), blocks).view_as(mask)

    def late_starts(self, prep: Prepared, mask: torch.Tensor) -> torch.Tensor:
        """Per mask, the first token of the latest position it patches, when every other position it patches
        ends before that token (and after the first token): its later part can run on the keys/values of a run
        of its earlier part, which masks patching the same units before it share; a mask that patches only such a
        part gets its masks' latest (`_with_parts_alone`). -1 where not. (K,)"""
        patched = self._patched_at(mask).any(1)  # (K, P)
        starts, ends = prep.slot_starts, prep.slot_ends
        late = torch.where(patched, starts, -1).max(1).values
        early = patched & (starts < late[:, None])
        apart = (
            (~early | (ends < late[:, None])).all(1) & early.any(1) & (torch.where(early, starts, 1).min(1).values > 0)
        )
        late = torch.where(apart & (self.cache != "recompute"), late, -1)  # recompute: a prefix run per part
        return self._with_parts_alone(prep, mask, late)

    def _with_parts_alone(self, prep: Prepared, mask: torch.Tensor, late: torch.Tensor) -> torch.Tensor:
        """`late` where a mask that patches exactly another's earlier part (a circuit without its units at the
        final token, scored beside circuits with them) is given that one's latest late start: it shares that
        part's run, and its tokens from there run unpatched on its keys/values. Not where the part reaches the
        later tokens above the top layer (its first patched layer the top one): those stay as in the clean run."""
        alone = late < 0
        if not alone.any() or alone.all():
            return late
        _, part = self._early_part(prep, mask, late).flatten(1).cpu().unique(dim=0, return_inverse=True)
        part_late = torch.full((int(part.max()) + 1,), -1, dtype=late.dtype).scatter_reduce(0, part, late, "amax")
        below_top = first_layer(self._patched_at(mask)) + self.reach < len(self.layer_devices)
        return torch.where(alone & below_top, part_late[part], late)

    def _early_part(self, prep: Prepared, mask: torch.Tensor, late: torch.Tensor) -> torch.Tensor:
        """The masks with nothing patched from their late start on (unchanged where it is -1). (K, L, n_cols)"""
        return self._unpatched_at(mask, (prep.slot_starts >= late[:, None]) & (late[:, None] >= 0))

    def final_hidden(self, prep: Prepared, mask: torch.Tensor | None, values: SiteValues | None = None) -> torch.Tensor:
        """Masks being trained run from `offset` through every layer (the gradient reaches every unit's weight,
        1 or not); others run in groups, each from its first patched token and layer (`first_patched`), and
        masks that patch the same units before their latest position run that part once (`late_starts`); patched
        from the alternates, without the units they leave as in the base prompt (`_where_alternates_differ`)."""
        if mask is None or being_trained(mask):
            return self._final_hidden_from(prep, mask, values, prep.offset, 0)
        if values is None:
            mask = self._where_alternates_differ(prep, mask)
        kept = prep.clean.final if prep.clean is not None else None
        nothing = (mask.detach() >= 1).flatten(1).all(1).cpu() & (kept is not None)  # the clean run's final state
        late = self.late_starts(prep, mask)
        split, shared = (late >= 0).nonzero().flatten(), torch.zeros_like(nothing)
        if len(split):  # one mask alone gains nothing from running in two parts
            early = self._early_part(prep, mask[split.to(mask.device)], late[split])
            _, part, count = early.flatten(1).cpu().unique(dim=0, return_inverse=True, return_counts=True)
            shared[split] = count[part] > 1
        if not (shared.any() or nothing.any()):
            return self._grouped(prep, mask, values)
        k, out = mask.shape[0], None
        if nothing.any():
            out = placed(out, nothing.nonzero().flatten(), kept[None], k)
        whole = (~shared & ~nothing).nonzero().flatten()
        if len(whole):
            out = placed(out, whole, self._grouped(prep, mask[whole.to(mask.device)], values), k)
        rows = shared.nonzero().flatten()
        if len(rows):
            out = placed(out, rows, self._in_parts(prep, mask[rows.to(mask.device)], values, late[rows]), k)
        return out

    @torch.no_grad()
    def clean_final(self, prep: Prepared, keep: bool = False) -> torch.Tensor:
        """The base prompts' unpatched final hidden state; with `keep` (pairs that circuits are scored on) from
        the batch's clean run, kept: later groups start from it, and a mask that patches nothing is given this
        state, d0's, instead of running again (pruning's J(none)). (B, hidden)"""
        if keep and self.cache != "recompute" and prep.clean is None:
            self._clean_run(prep, final=True)
        if keep and prep.clean is not None and prep.clean.final is not None:
            return prep.clean.final
        return super().clean_final(prep)

    def _grouped(self, prep: Prepared, mask: torch.Tensor, values: SiteValues | None) -> torch.Tensor:
        """Masks run in groups, each from its first patched token and layer."""
        starts, group = self.first_patched(prep, mask).unique(dim=0, return_inverse=True)
        if len(starts) == 1:
            return self._final_hidden_from(prep, mask, values, *starts[0].tolist())
        out = None
        for i in starts[:, 0].argsort(descending=True, stable=True).tolist():  # later tokens first: the buffers'
            rows = (group == i).nonzero().flatten()  # clean part shrinks, and is copied back less often
            hidden = self._final_hidden_from(prep, mask[rows.to(mask.device)], values, *starts[i].tolist())
            out = placed(out, rows, hidden, mask.shape[0])
        return out

    def _in_parts(self, prep: Prepared, mask: torch.Tensor, values: SiteValues | None, late: torch.Tensor):
        """Masks with a later part (`late_starts`: each one's first token of it): each distinct earlier part runs
        once, from its first patched token to the latest of its masks' later parts, and each mask's later part
        runs from its own first token on the keys/values of that run, from the lower of its own first patched
        layer and the layer its earlier part reaches it at (`reach`). (K, B, hidden)"""
        b, n_layers, k = len(prep.pairs), len(self.layer_devices), mask.shape[0]
        parts, part = self._early_part(prep, mask, late).unique(dim=0, return_inverse=True)
        runs = self._early_runs(
            prep, parts, values, torch.zeros(len(parts), dtype=torch.long).scatter_reduce(0, part, late, "amax")
        )
        later = prep.slot_starts[None] >= late[:, None]  # (K, P) the positions of each mask's later part
        reached = torch.tensor([runs[i][1] for i in part.tolist()]) + self.reach
        from_layer = torch.minimum(first_layer(self._patched_at(mask) & later[:, None]), reached)
        out = None
        for start, layer in torch.stack([late, from_layer], 1).unique(dim=0).tolist():
            rows = ((late == start) & (from_layer == layer)).nonzero().flatten()
            buffers = self._buffers(prep, len(rows), start, layer)
            first = start
            for j, i in enumerate(part[rows].tolist()):  # each mask's rows hold its earlier part's run
                token, part_layer, kv = runs[i]
                for i_layer in range(max(layer, part_layer), n_layers):
                    for buf, src in zip(buffers[i_layer], kv[i_layer]):  # past what a layer wrote: clean
                        width = min(src.shape[2], start - token)
                        buf[j * b : (j + 1) * b, :, token : token + width] = src[:, :, :width]
                first = min(first, token)
            if self.cache == "device":  # the kept buffers are clean before the earliest part's first token only
                prep.clean_to[layer:] = [min(c, first) for c in prep.clean_to[layer:]]
            with self._from_layer(prep, start, layer):
                hidden = self._run_tokens(prep, mask[rows.to(mask.device)], values, start, None, buffers)
            out = placed(out, rows, hidden[:, -1].view(len(rows), b, -1), k)
        return out

    def _early_runs(self, prep: Prepared, parts: torch.Tensor, values: SiteValues | None, ends: torch.Tensor) -> list:
        """Run each earlier part on tokens [its first patched token, its end), from its first patched layer; per
        part (first token, first layer, per layer the keys/values the run wrote from that token on: the first
        layer's on its `_active_tokens` only, None below that layer)."""
        b = len(prep.pairs)
        runs: list = [None] * parts.shape[0]
        starts, group = torch.cat([self.first_patched(prep, parts), ends[:, None]], 1).unique(
            dim=0, return_inverse=True
        )
        for i, (token, layer, end) in enumerate(starts.tolist()):
            rows = (group == i).nonzero().flatten()
            part = parts[rows.to(parts.device)]
            buffers = self._buffers(prep, len(rows), token, layer)
            active = self._active_tokens(prep, part, token, layer, end)
            with self._from_layer(prep, token, layer, end=end, active=active):
                self._run_tokens(prep, part, values, token, end, buffers)
            wrote = [end if i_layer != layer or active is None else token + active for i_layer in range(len(buffers))]
            for j, row in enumerate(rows.tolist()):
                kv = [None if pair is None else tuple(t[j * b : (j + 1) * b, :, token:stop].clone() for t in pair)
                      for pair, stop in zip(buffers, wrote)]  # fmt: skip
                runs[row] = (token, layer, kv)
        return runs

    def _final_hidden_from(
        self, prep: Prepared, mask: torch.Tensor | None, values: SiteValues | None, n: int, layer: int
    ):
        """The final hidden state of K masks, the prompt run from token n and from `layer` on, on the clean
        keys/values before token n and the clean residual stream entering `layer`."""
        k, b = (1 if mask is None else mask.shape[0]), len(prep.pairs)
        clean = self._clean_row(prep, mask, n, layer)
        scored = mask is not None and not being_trained(mask)
        active = self._active_tokens(prep, mask, n, layer, None) if scored and clean is None and n > 0 else None
        with self._from_layer(prep, n, layer, active=active), self._recording(clean, b, 0) as resid:
            if n == 0:  # a site at the first token: there is no prefix to keep
                return FullEngine.final_hidden(self, prep, mask, values)
            buffers = self._buffers(prep, k, n, layer)
            hidden = self._run_tokens(prep, mask, values, n, None, buffers)
        if clean is not None:  # that mask's run was the clean run: keep it
            rows = slice(clean * b, (clean + 1) * b)
            prep.clean = self._clean_run_of(prep, resid, [(key[rows], val[rows]) for key, val in buffers])
        return hidden[:, -1].view(k, b, -1)

    def _run_tokens(
        self, prep: Prepared, mask: torch.Tensor | None, values: SiteValues | None, n: int, end: int | None, buffers
    ) -> torch.Tensor:
        """Run tokens [n, end) (end None: to the last) of K masks on `buffers`, which hold tokens [0, n) of each
        mask's keys/values and take the run's; the last hidden state. (K*B, end - n, hidden)"""
        k = 1 if mask is None else mask.shape[0]
        ids, attn = prep.pairs.base_ids[:, :end].repeat(k, 1), prep.pairs.base_attn[:, :end].repeat(k, 1)
        with self._patched(prep, mask, values, offset=n, end=end):
            return self._run_on_slots(ids, attn, n, buffers).last_hidden_state

    def _run_on_slots(self, ids: torch.Tensor, attn: torch.Tensor, n: int, buffers):
        """Run tokens n on of prompts `ids` on `buffers`, whose slots hold their tokens [0, n) of keys/values and
        take the run's (positions and attention from the whole `attn`); the model's output."""
        return self.body(
            input_ids=ids[:, n:].to(self.device),
            attention_mask=attn.to(self.device),
            position_ids=position_ids(attn)[:, n:].to(self.device),
            **with_cache(self.body, suffix_slot_cache(buffers, n, self.device)),
        )

    def _clean_row(self, prep: Prepared, mask: torch.Tensor | None, n: int, layer: int) -> int | None:
        """Which of these masks (one that patches nothing) runs the clean run this batch has not kept yet, if
        any does and the run is one to keep (from `offset`, every layer): pruning's J(none) makes it free."""
        if prep.clean is not None or mask is None or self.cache == "recompute" or (n, layer) != (prep.offset, 0):
            return None
        if n == 0 or being_trained(mask):
            return None
        nothing = (mask.detach() >= 1).flatten(1).all(1).nonzero().flatten()
        return int(nothing[0]) if len(nothing) else None

    @contextmanager
    def _recording(self, row: int | None, b: int, start: int) -> Iterator[List[torch.Tensor]]:
        """Record the residual stream entering each layer, on the B rows of mask `row` and tokens `start` on,
        during the run inside (nothing when `row` is None)."""
        resid: List[torch.Tensor] = [None] * len(self.sites.layers)
        if row is None:
            yield resid
            return

        def record(i: int):
            def read(x: torch.Tensor) -> torch.Tensor:
                resid[i] = self._kept(x[row * b : (row + 1) * b, start:].detach())
                return x

            return read

        with hooks([on_input(m, record(i)) for i, m in enumerate(self.sites.layers)]):
            yield resid

    def _kept(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of part of a run, kept where the policy keeps the prefix."""
        return t.contiguous().cpu() if self.cache == "cpu" else t.contiguous()

    def _clean_run_of(
        self, prep: Prepared, resid: List[torch.Tensor], kv, final: torch.Tensor | None = None
    ) -> "CleanRun":
        """The clean run from its recorded residual stream (tokens `offset` on) and keys/values, those before
        the latest position's first token kept (no run starts later), and its final state."""
        latest = int(prep.slot_starts.max())
        if latest == prep.offset:
            return CleanRun(kv=[], resid=resid, final=final)
        kv = [(self._kept(key[:, :, :latest]), self._kept(val[:, :, :latest])) for key, val in kv]
        return CleanRun(kv=kv, resid=resid, final=final)

    @contextmanager
    def _from_layer(
        self, prep: Prepared, n: int, layer: int, end: int | None = None, active: int | None = None
    ) -> Iterator[None]:
        """Skip the layers below `layer` (they run as an identity) and hand `layer` the clean residual stream
        of tokens [n, end) instead; the embedding still runs, it is cheap. With `active`, `layer` runs on the
        first `active` of those tokens only, and the later ones enter the next layer clean (`_active_tokens`)."""
        if layer == 0 and active is None:
            yield
            return
        stop = None if end is None else end - prep.offset
        stack, replaced = self.sites.layer_stack, list(self.sites.layer_stack[: layer + 1])
        if active is not None:
            tail = self._clean_run(prep).resid[layer + 1][:, n + active - prep.offset : stop]
            stack[layer] = FirstTokensLayer(stack[layer], active, tail)
        handle = None
        if layer > 0:
            resid = self._clean_run(prep).resid[layer][:, n - prep.offset : stop]

            def clean_input(x: torch.Tensor) -> torch.Tensor:
                return resid.to(x.device, x.dtype).repeat(x.shape[0] // resid.shape[0], 1, 1)  # K copies, k-major

            handle = on_input(stack[layer], clean_input, prepend=True)  # before a residual unit's patch there
        for i in range(layer):
            stack[i] = SkippedLayer()
        try:
            yield
        finally:
            for i, original in enumerate(replaced):
                stack[i] = original
            if handle is not None:
                handle.remove()

    def _active_tokens(self, prep: Prepared, mask: torch.Tensor, n: int, layer: int, end: int | None) -> int | None:
        """How many tokens from n a run's first patched layer must run on, when fewer than the run's: up to the
        last one that any of these masks patches at that layer. A head's, MLP's or neuron group's patch there
        reaches the later tokens one layer up (`reach`), so they leave that layer as in the clean run. None:
        every token (the residual stream, whose patch reaches them at its own layer; the last layer; no clean run
        kept, with cache=recompute)."""
        if self.reach == 0 or self.cache == "recompute" or layer + 1 >= len(self.layer_devices):
            return None
        at_layer = self._patched_at(mask)[:, layer].any(0)  # (P,) positions patched at `layer`
        if not at_layer.any():
            return None
        stop = prep.pairs.base_ids.shape[1] if end is None else end
        active = int(prep.slot_ends[at_layer].max()) + 1 - n
        return active if active < stop - n else None

    @torch.no_grad()
    def _clean_run(self, prep: Prepared, final: bool = False) -> "CleanRun":
        """The base prompts' clean run: kept from a mask that patched nothing, or run once here (from `offset`,
        as a step that patches nothing, on buffers of its own: a caller may hold the kept ones; with no prefix,
        the whole prompt on a fresh cache). `final`: keep its final state, d0's (`clean_final`)."""
        if prep.clean is None and prep.offset > 0:
            width, nothing = prep.pairs.base_ids.shape[1], torch.ones(1, *self.space.shape, device=self.device)
            buffers = prefix_buffers(self._clean_kv(prep, prep.offset), 1, self.layer_devices, width)
            with self._recording(0, len(prep.pairs), 0) as resid:
                hidden = self._run_tokens(prep, nothing, None, prep.offset, None, buffers)[:, -1]
            prep.clean = self._clean_run_of(prep, resid, buffers, hidden if final else None)
        if prep.clean is None:
            with self._recording(0, len(prep.pairs), prep.offset) as resid:
                out = self._run(prep.pairs.base_ids, prep.pairs.base_attn, **with_cache(self.body, DynamicCache()))
            kv, hidden = [(layer[0], layer[1]) for layer in returned_cache(out)], out.last_hidden_state[:, -1]
            prep.clean = self._clean_run_of(prep, resid, kv, hidden if final else None)
        return prep.clean

    def _clean_kv(self, prep: Prepared, n: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """The clean keys/values of tokens [0, n): the kept prefix, or (n past it) the clean run's."""
        if self.cache == "recompute":
            return self._prefix_kv(prep.pairs, n)
        if n == prep.offset:
            return cached_prefix(prep)
        return [(key[:, :, :n], val[:, :, :n]) for key, val in self._clean_run(prep).kv]

    def _buffers(self, prep: Prepared, k: int, n: int, layer: int):
        """Per layer from `layer` up (below it None: those layers do not run), prefix buffers for K masks,
        clean on tokens [0, n): with cache=device made for the most masks seen, each layer when a run first
        needs it, and kept (clean tokens that a run from an earlier token wrote over are copied back);
        otherwise made per run."""
        width = prep.pairs.base_ids.shape[1]
        if self.cache != "device":
            clean = self._clean_kv(prep, n)[layer:]
            return [None] * layer + prefix_buffers(clean, k, self.layer_devices[layer:], width)
        if prep.buffers is None or prep.buffers[0] < k:  # (re)made for more masks, each layer when needed
            if prep.prefix_kv is None and prep.buffers is not None and prep.offset > 0:  # keep the prefix first
                prep.prefix_kv = [(key.clone(), val.clone()) for key, val in cached_prefix(prep)]
            n_layers = len(self.layer_devices)
            prep.buffers, prep.clean_to = (k, [None] * n_layers), [n] * n_layers
        kept, clean = prep.buffers[1], None
        for i in range(layer, len(kept)):
            if kept[i] is None or prep.clean_to[i] < n:
                clean = clean or self._clean_kv(prep, n)
            if kept[i] is None:
                kept[i] = prefix_buffers([clean[i]], prep.buffers[0], [self.layer_devices[i]], width)[0]
            elif prep.clean_to[i] < n:
                restore_clean(kept[i], clean[i], prep.clean_to[i], n)
            prep.clean_to[i] = n  # the run writes tokens n on
        if all(pair is not None for pair in kept):
            prep.prefix_kv = None  # the buffers hold the prefix now: keep one copy only
        rows = k * len(prep.pairs)
        return [None] * layer + [(key[:rows], val[:rows]) for key, val in kept[layer:]]


@dataclass
class CleanRun:
    """The base prompts' clean run, kept for masks that patch nothing before a later token or layer."""

    kv: List[Tuple[torch.Tensor, torch.Tensor]]  # per layer, before the latest position (B, kvH, latest, D); none
    # when every position starts at `offset`
    resid: List[torch.Tensor]  # per layer, the residual stream entering it on tokens offset on (B, T - offset, hidden)
    final: Optional[torch.Tensor] = None  # (B, hidden) its final hidden state, when d0 comes from it (`clean_final`)


class FirstTokensLayer(torch.nn.Module):
    """A decoder layer run on its input's first `active` tokens only; the later tokens leave it as `tail`, the
    clean run's residual stream entering the next layer there (B, T - active, hidden), K copies. Its inputs
    are cut to those tokens (`first_tokens`). Without a 4-D attention mask (a causal one made from none would
    be aligned wrongly on fewer queries than keys) it runs on every token."""

    def __init__(self, layer: torch.nn.Module, active: int, tail: torch.Tensor):
        super().__init__()
        self.layer, self.active, self.tail = layer, active, tail

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        tokens = hidden.shape[1]
        if not any(_is_attention_mask(v, tokens) for v in (*args, *kwargs.values())):
            return self.layer(*args, **kwargs)
        out = self.layer(*first_tokens(args, tokens, self.active), **first_tokens(kwargs, tokens, self.active))
        tail = self.tail.to(hidden.device, hidden.dtype).repeat(hidden.shape[0] // self.tail.shape[0], 1, 1)
        if isinstance(out, tuple):
            return (torch.cat([out[0], tail], 1), *out[1:])
        return torch.cat([out, tail], 1)


def _is_attention_mask(value: Any, tokens: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[-2] == tokens


def first_tokens(value: Any, tokens: int, active: int) -> Any:
    """A decoder layer's inputs cut from `tokens` query tokens to the first `active`: hidden states and rotary
    tables on dim -2, position ids on dim -1, an attention mask (N, 1, T, keys) on its queries and on its last
    keys (those tokens' own); tuples, lists and dicts of them alike, anything else as it is."""
    if isinstance(value, dict):
        return {key: first_tokens(v, tokens, active) for key, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(first_tokens(v, tokens, active) for v in value)
    if not isinstance(value, torch.Tensor):
        return value
    if _is_attention_mask(value, tokens):
        return value[..., :active, : value.shape[-1] - (tokens - active)]
    if value.dim() == 3 and value.shape[-2] == tokens:
        return value[..., :active, :]
    if value.dim() in (1, 2) and value.shape[-1] == tokens:
        return value[..., :active]
    return value


class SkippedLayer(torch.nn.Module):
    """A decoder layer left out of a run: every family's model loop reads its output as the next hidden state."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def being_trained(mask: torch.Tensor) -> bool:
    """Whether a mask's weights are being trained: its gradient reaches every unit's weight, 1 or not, so it runs
    whole (from the earliest position, every layer, every token)."""
    return torch.is_grad_enabled() and mask.requires_grad


def first_layer(patched: torch.Tensor) -> torch.Tensor:
    """Per mask, the lowest layer with a patch in `patched` (K, L, P); L where there is none. (K,)"""
    n_layers = patched.shape[1]
    return torch.where(patched.any(2), torch.arange(n_layers), n_layers).min(1).values


def placed(out: torch.Tensor | None, rows: torch.Tensor, hidden: torch.Tensor, k: int) -> torch.Tensor:
    """`out` (K, B, hidden; made on the first call) with the masks at `rows` given their final hidden states."""
    out = hidden.new_empty((k, *hidden.shape[1:])) if out is None else out
    out[rows.to(out.device)] = hidden.to(out.device)
    return out


def restore_clean(buffer, clean, start: int, end: int) -> None:
    """Copy one layer's clean keys/values of tokens [start, end) into every mask's rows of its buffers."""
    for buf, src in zip(buffer, clean):
        part = src[:, :, start:end].to(buf.device)
        copies = buf.shape[0] // part.shape[0]
        buf[:, :, start:end].view(copies, *part.shape).copy_(part.unsqueeze(0).expand(copies, *part.shape))


ENGINE_CLASSES = {"full": FullEngine, "cached": CachedEngine}  # keyed by config.choices.ENGINES


def make_engine(name: str, model: torch.nn.Module, sites: Sites, cache: str = "device") -> Engine:
    """The engine called `name`; `cache` is the prefix memory policy of engine=cached."""
    if name not in ENGINES:
        raise CircuitfindError(f"engine={name!r} is unknown; choose from {sorted(ENGINES)}")
    classes = getattr(model, "engine_classes", None) or ENGINE_CLASSES  # a wrapped model may bring its own (tlens.py)
    return classes["cached"](model, sites, cache) if name == "cached" else classes["full"](model, sites)
