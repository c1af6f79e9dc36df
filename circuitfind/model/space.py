"""The component space: every maskable unit of a model, in mask order, with each name it has.

A unit is one attention head or one MLP of one layer at the final position. The mask has
shape (n_layers, n_heads + 1): per layer the heads, then the MLP. Each unit is called
`L{layer}.H{head}` or `L{layer}.MLP` here, `a{l}.h{h}` or `m{l}` in MIB, and is carried by
`blocks.{l}.attn.hook_z` (with a head index) or `blocks.{l}.hook_mlp_out` in TransformerLens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

from circuitfind.errors import CircuitfindError


@dataclass(frozen=True)
class Unit:
    """One maskable component: its place in the mask and its names."""

    layer: int
    col: int  # column in the mask: a head index, or n_heads for the MLP
    head: Optional[int]  # None for the MLP

    @property
    def kind(self) -> str:
        return "mlp" if self.head is None else "head"

    @property
    def name(self) -> str:
        return f"L{self.layer}.MLP" if self.head is None else f"L{self.layer}.H{self.head}"

    @property
    def mib_node(self) -> str:
        """MIB's node name: attention head `a{l}.h{h}`, MLP `m{l}`."""
        return f"m{self.layer}" if self.head is None else f"a{self.layer}.h{self.head}"

    @property
    def transformerlens(self) -> Dict[str, Optional[int] | str]:
        """The TransformerLens hook that carries the unit: head outputs before W_O, or MLP out."""
        if self.head is None:
            return {"hook": f"blocks.{self.layer}.hook_mlp_out", "head": None}
        return {"hook": f"blocks.{self.layer}.attn.hook_z", "head": self.head}


@dataclass(frozen=True)
class ComponentSpace:
    """Shape of the mask: per layer, n_heads heads then one MLP."""

    n_layers: int
    n_heads: int
    head_dim: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_layers, self.n_heads + 1)

    @property
    def n_components(self) -> int:
        return self.n_layers * (self.n_heads + 1)

    def units(self) -> Iterator[Unit]:
        """Every unit in the mask's flattened (layer-major) order."""
        for layer in range(self.n_layers):
            for col in range(self.n_heads + 1):
                yield Unit(layer, col, None if col == self.n_heads else col)

    def names(self) -> List[str]:
        """Unit names in the mask's flattened (layer-major) order."""
        return [unit.name for unit in self.units()]

    def index(self, names: Sequence[str], what: str = "circuit") -> List[Unit]:
        """The units with these names; unknown names are one error listing them."""
        by_name = {unit.name: unit for unit in self.units()}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise CircuitfindError(
                f"{what}: unknown component(s) {', '.join(unknown)}; name components L<layer>.H<head> "
                f"or L<layer>.MLP of this {self.n_layers}x{self.n_heads} model"
            )
        return [by_name[n] for n in names]
