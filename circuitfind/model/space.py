"""The unit space: every maskable unit of a model, in mask order, with each name it has.

The mask has shape (n_layers, n_cols): one row per layer, and per layer one block of columns
for each position, in `positions` order. A block holds, by `kind`:

- `heads_mlps` (default): the n_heads heads, then the MLP;
- `residual`: one gate on the residual stream entering the layer;
- `neurons`: the MLP's hidden neurons in groups of `group_size`.

A unit is called `L2.H1@x`, `L2.MLP@last`, `L5.resid@last` or `L3.MLP[128:144]@last` (a single
neuron `L3.MLP[128]@last`). The default space, heads and MLPs at the final position only, is
the paper's, and its units keep the paper's names (`L2.H1`, `L2.MLP`); `@last` may be added.
MIB calls them `a{l}.h{h}` and `m{l}` (with the same `@position` and `[a:b]` suffixes, and
`r{l}` for the residual stream); TransformerLens hooks are given with the position.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from circuitfind.config.choices import LAST
from circuitfind.errors import CircuitfindError


@dataclass(frozen=True)
class Unit:
    """One maskable unit: its place in the mask and its names."""

    layer: int
    col: int  # column in the mask row of its layer
    head: Optional[int]  # the head index of an attention head, else None
    kind: str = "head"  # head | mlp | resid | neurons
    position: str = LAST  # a task slot (or slot#mention), `last`, or a token index under `all`
    neurons: Optional[Tuple[int, int]] = None  # [start, end) of a neuron group
    positional: bool = False  # the name carries `@position` (every space but the paper's)

    @property
    def base_name(self) -> str:
        if self.kind == "head":
            return f"L{self.layer}.H{self.head}"
        if self.kind == "resid":
            return f"L{self.layer}.resid"
        return f"L{self.layer}.MLP{neuron_range(self.neurons)}"

    @property
    def name(self) -> str:
        return f"{self.base_name}@{self.position}" if self.positional else self.base_name

    @property
    def mib_node(self) -> str:
        """MIB's node name: attention head `a{l}.h{h}`, MLP `m{l}`, residual `r{l}`, with the suffixes."""
        node = {"head": f"a{self.layer}.h{self.head}", "resid": f"r{self.layer}"}.get(
            self.kind, f"m{self.layer}{neuron_range(self.neurons)}"
        )
        return f"{node}@{self.position}" if self.positional else node

    @property
    def transformerlens(self) -> Dict[str, object]:
        """The TransformerLens hook that carries the unit, with its head, neurons and position."""
        hook = {
            "head": f"blocks.{self.layer}.attn.hook_z",
            "mlp": f"blocks.{self.layer}.hook_mlp_out",
            "resid": f"blocks.{self.layer}.hook_resid_pre",
            "neurons": f"blocks.{self.layer}.mlp.hook_post",
        }[self.kind]
        out: Dict[str, object] = {"hook": hook, "head": self.head, "position": self.position}
        if self.neurons is not None:
            out["neurons"] = list(self.neurons)
        return out


def neuron_range(neurons: Optional[Tuple[int, int]]) -> str:
    if neurons is None:
        return ""
    start, end = neurons
    return f"[{start}]" if end == start + 1 else f"[{start}:{end}]"


@dataclass(frozen=True)
class ComponentSpace:
    """Shape and meaning of the mask: per layer, one block of columns per position."""

    n_layers: int
    n_heads: int
    head_dim: int
    kind: str = "heads_mlps"
    positions: Tuple[str, ...] = (LAST,)
    group_size: int = 1
    mlp_width: int = 0  # the MLP's hidden width (neurons)

    @property
    def is_default(self) -> bool:
        """The paper's space: heads and MLPs at the final position, named without `@last`."""
        return self.kind == "heads_mlps" and self.positions == (LAST,)

    @property
    def per_position(self) -> int:
        """Columns in one position's block."""
        if self.kind == "heads_mlps":
            return self.n_heads + 1
        if self.kind == "residual":
            return 1
        return self.mlp_width // self.group_size

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_layers, len(self.positions) * self.per_position)

    @property
    def n_components(self) -> int:
        return self.shape[0] * self.shape[1]

    def units(self) -> Iterator[Unit]:
        """Every unit in the mask's flattened (layer-major) order."""
        block, positional = self.per_position, not self.is_default
        for layer in range(self.n_layers):
            for p, position in enumerate(self.positions):
                for i in range(block):
                    col = p * block + i
                    if self.kind == "residual":
                        yield Unit(layer, col, None, "resid", position, None, positional)
                    elif self.kind == "neurons":
                        span = (i * self.group_size, (i + 1) * self.group_size)
                        yield Unit(layer, col, None, "neurons", position, span, positional)
                    elif i < self.n_heads:
                        yield Unit(layer, col, i, "head", position, None, positional)
                    else:
                        yield Unit(layer, col, None, "mlp", position, None, positional)

    def flat(self, unit: Unit) -> int:
        """The unit's index in the flattened (layer-major) mask."""
        return unit.layer * self.shape[1] + unit.col

    def names(self) -> List[str]:
        """Unit names in the mask's flattened (layer-major) order."""
        return [unit.name for unit in self.units()]

    def by_name(self) -> Dict[str, Unit]:
        """Every unit under its name, and the default space's units under `name@last` too."""
        out = {unit.name: unit for unit in self.units()}
        if self.is_default:
            out.update({f"{unit.name}@{LAST}": unit for unit in self.units()})
        return out

    def facts(self) -> Dict[str, object]:
        """The space as recorded in circuit.json and the MIB export: kind, positions, group size."""
        return {"kind": self.kind, "positions": list(self.positions), "group_size": self.group_size}

    def describe(self) -> str:
        """The space in a few words, for errors and logs."""
        what = {
            "heads_mlps": f"{self.n_heads} heads + MLP",
            "residual": "residual stream",
            "neurons": f"MLP neurons in groups of {self.group_size}",
        }[self.kind]
        return f"{self.n_layers} layers x {what} at {len(self.positions)} position(s) ({self.n_components} units)"

    def near(self, name: str, valid: List[str]) -> List[str]:
        """Up to 3 valid names close to `name`: the same unit at each position first, when no position is given."""
        at_positions = [f"{name}@{p}" for p in self.positions if "@" not in name and f"{name}@{p}" in valid]
        return list(dict.fromkeys(at_positions + difflib.get_close_matches(name, valid, n=3)))[:3]

    def index(self, names: Sequence[str], what: str = "circuit") -> List[Unit]:
        """The units with these names; unknown names are one error listing them, with near names."""
        by_name = self.by_name()
        unknown = [n for n in names if n not in by_name]
        if unknown:
            valid = self.names()
            hints = [f"{n} (did you mean {', '.join(self.near(n, valid)) or 'nothing close'}?)" for n in unknown]
            raise CircuitfindError(
                f"{what}: unknown unit(s) {'; '.join(hints)}; units of this model are named like {valid[0]}: "
                f"{self.describe()}"
            )
        return [by_name[n] for n in names]
