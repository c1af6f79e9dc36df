"""Hooks that read or mix unit values at their token positions, always removed on exit.

The mask has shape (K, n_layers, n_cols) (see model/space.py): K masks (one per lambda)
trained side by side. The model's batch is K copies of the B base prompts, k-major (row
k * B + b). A batch's units sit at N sites, one per (prompt, position, token): `SiteIndex`.
One hook per module and layer mixes all its units at all sites in one operation:

    value <- w * value(base) + (1 - w) * value(alternate)

written so that w = 1 returns the base value bit for bit and w = 0 the alternate's.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List

import torch
from torch import nn

from circuitfind.model.components import Sites


@dataclass
class SiteIndex:
    """Where a batch's units sit: N sites, each a prompt row, a position of the unit space, the
    token's index among that position's tokens, and its token index in the base and alternate prompts."""

    rows: torch.Tensor  # (N,) prompt row
    slot: torch.Tensor  # (N,) which of the space's positions
    mention: torch.Tensor  # (N,) which token of that position (a slot may be several tokens)
    base_tok: torch.Tensor  # (N,) token index in the (left-padded) base prompt
    alt_tok: torch.Tensor  # (N,) token index in the (left-padded) alternate prompt

    @staticmethod
    def of(base_pos: torch.Tensor, alt_pos: torch.Tensor) -> "SiteIndex":
        """From (B, P, M) token indices, -1 where a position has fewer than M tokens."""
        rows, slot, mention = (base_pos >= 0).nonzero(as_tuple=True)
        return SiteIndex(rows, slot, mention, base_pos[rows, slot, mention], alt_pos[rows, slot, mention])

    @staticmethod
    def final(n: int, base_width: int, alt_width: int | None = None) -> "SiteIndex":
        """The final token of each of n prompts (the paper's single position)."""
        zeros = torch.zeros(n, dtype=torch.long)
        last = torch.full((n,), base_width - 1, dtype=torch.long)
        alt = last if alt_width is None else torch.full((n,), alt_width - 1, dtype=torch.long)
        return SiteIndex(torch.arange(n), zeros, zeros, last, alt)

    def select(self, chosen: torch.Tensor) -> "SiteIndex":
        """The sites where `chosen` (N,) is true."""
        return SiteIndex(
            self.rows[chosen], self.slot[chosen], self.mention[chosen], self.base_tok[chosen], self.alt_tok[chosen]
        )

    def __len__(self) -> int:
        return self.rows.shape[0]


@dataclass
class SiteValues:
    """Unit values at the N sites of one batch, per hook point, per layer (N, C)."""

    points: Dict[str, List[torch.Tensor]] = field(default_factory=dict)

    def map(self, fn) -> "SiteValues":
        """The values with `fn` applied to each layer's tensor (N, C) -> (N', C)."""
        return SiteValues({p: [fn(v) for v in layers] for p, layers in self.points.items()})

    def rows(self, sl: slice) -> "SiteValues":
        """The values of some of the sites."""
        return self.map(lambda v: v[sl])

    @staticmethod
    def concat(parts: List["SiteValues"]) -> "SiteValues":
        """The values of several batches, one after another."""
        names = parts[0].points
        return SiteValues({p: [torch.cat(layer) for layer in zip(*(part.points[p] for part in parts))] for p in names})


@dataclass(frozen=True)
class HookPoint:
    """Where one kind of unit is read and written: a module per layer, its input or output, and
    which columns of a position's block of the mask it owns."""

    name: str
    modules: List[nn.Module]
    reads_input: bool  # the module's input (else its output)
    first: int  # first column of its units in a position's block
    count: int  # its units per position
    width: int  # channels per unit; 0: one unit covers all channels


def hook_points(sites: Sites) -> List[HookPoint]:
    """The hook points of the sites' unit space."""
    space = sites.space
    if space.kind == "residual":
        return [HookPoint("resid", sites.layers, True, 0, 1, 0)]
    if space.kind == "neurons":
        return [HookPoint("neurons", sites.mlp_downs, True, 0, space.per_position, space.group_size)]
    return [
        HookPoint("heads", sites.head_projs, True, 0, space.n_heads, space.head_dim),
        HookPoint("mlps", sites.mlps, False, space.n_heads, 1, 0),
    ]


@contextmanager
def hooks(handles: List[torch.utils.hooks.RemovableHandle]) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _heads_side_by_side(fn):
    """`fn` on a TransformerLens hook_z, (B, S, n_heads, d_head), seen as (B, S, n_heads * d_head) like
    a Hugging Face head projection's input. A changed value is written back in hook_z's own memory
    layout, so that a keep-everything mix gives the next matmul exactly the tensor it would have had."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            return fn(x)
        flat = x.flatten(2)
        out = fn(flat)
        return x if out is flat else x.clone().copy_(out.view_as(x))

    return apply


def on_input(module: nn.Module, fn, prepend: bool = False) -> torch.utils.hooks.RemovableHandle:
    """Hook `fn(x) -> x'` on the module's first input (positional, or the `hidden_states` keyword)."""

    def pre(module, args, kwargs):
        if args:
            return (fn(args[0]),) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

    return module.register_forward_pre_hook(pre, with_kwargs=True, prepend=prepend)


def _register(point: HookPoint, layer: int, fn) -> torch.utils.hooks.RemovableHandle:
    """Hook `fn(x) -> x'` on the point's tensor of one layer (the module's first input, or its output)."""
    module = point.modules[layer]
    fn = _heads_side_by_side(fn)
    if point.reads_input:
        return on_input(module, fn)
    return module.register_forward_hook(lambda module, args, output: fn(output))


@contextmanager
def record_values(sites: Sites, rows: torch.Tensor, toks: torch.Tensor, grad: bool = False) -> Iterator[SiteValues]:
    """Capture every unit's value at tokens (rows, toks) during the forward run inside. -> (N, C) per layer

    With `grad`, the values keep their graph, so a loss on a run patched from them also
    trains the recorded run (the organism's interchange training); otherwise they are detached.
    """
    values = SiteValues()
    handles = []
    for point in hook_points(sites):
        store = values.points.setdefault(point.name, [None] * len(point.modules))

        def keep(layer: int, store=store):
            def read(x: torch.Tensor) -> torch.Tensor:
                value = x[rows.to(x.device), toks.to(x.device)]
                store[layer] = value if grad else value.detach()
                return x

            return read

        handles += [_register(point, layer, keep(layer)) for layer in range(len(point.modules))]
    with hooks(handles):
        yield values


@contextmanager
def record_final_values(sites: Sites, n: int, width: int, grad: bool = False) -> Iterator[SiteValues]:
    """Every unit's value at the final token of n prompts of `width` tokens (the organism's interchange)."""
    index = SiteIndex.final(n, width)
    with record_values(sites, index.rows, index.base_tok, grad) as values:
        yield values


def unit_weights(sites: Sites, mask: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Each hook point's weights per channel, in (at least) float32: (K, L, P, C) or (K, L, P, 1).

    Expanded once per forward, not per layer: a head's weight over its head_dim slice, a neuron
    group's over its neurons."""
    space = sites.space
    w = mask.to(torch.promote_types(mask.dtype, torch.float32))
    blocks = w.view(w.shape[0], space.n_layers, len(space.positions), space.per_position)
    out = {}
    for point in hook_points(sites):
        cols = blocks[..., point.first : point.first + point.count]
        out[point.name] = cols.repeat_interleave(point.width, dim=-1) if point.width else cols
    return out


def _mix(x: torch.Tensor, where: SiteIndex, offset: int, alt: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mix x (K*B, S, C) at the sites with alt (N, C): keep * x + (1 - keep) * alt.

    `offset` is the first token index x holds (the engine may run a suffix only, and a layer on its first
    tokens only: sites past them are left out, the engine patches none there); keep is
    (K, P, C) or (K, P, 1) per position. The mix is computed in keep's dtype (at least float32)
    and cast back, so low-precision models still give the mask an accurate gradient.
    """
    k = keep.shape[0]
    b = x.shape[0] // k
    if len(where) and int(where.base_tok.max()) - offset >= x.shape[1]:  # a layer run on its first tokens only
        inside = where.base_tok - offset < x.shape[1]  # (the engine's FirstTokensLayer): the others are not in x
        where, alt = where.select(inside), alt[inside.to(alt.device)]
    x4 = x.reshape(k, b, x.shape[1], x.shape[2])
    rows, toks = where.rows.to(x.device), (where.base_tok - offset).to(x.device)
    keep = keep.to(x.device)
    keep = keep if keep.shape[1] == 1 else keep[:, where.slot.to(x.device)]  # (K, N or 1, C)
    base = x4[:, rows, toks].to(keep.dtype)  # (K, N, C)
    mixed = keep * base + (1 - keep) * alt.to(device=x.device, dtype=keep.dtype)
    out = x4.clone()
    out[:, rows, toks] = mixed.to(x.dtype)
    return out.view_as(x)


@contextmanager
def patch_sites(sites: Sites, mask: torch.Tensor, alt: SiteValues, where: SiteIndex, offset: int = 0) -> Iterator[None]:
    """Patch every unit at its sites from `alt`, weighted by `mask` (K, L, n_cols)."""
    weights = unit_weights(sites, mask)
    handles = []
    for point in hook_points(sites):

        def mix(layer: int, point=point):
            keep = weights[point.name][:, layer]
            return lambda x: _mix(x, where, offset, alt.points[point.name][layer], keep)

        handles += [_register(point, layer, mix(layer)) for layer in range(len(point.modules))]
    with hooks(handles):
        yield
