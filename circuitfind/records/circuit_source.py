"""A circuit to evaluate, from wherever it comes: unit names, a run directory, a saved
mask.safetensors, or a MIB circuit file (node level; `a{l}.h{h}` heads and `m{l}` MLPs)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from circuitfind.errors import CircuitfindError
from circuitfind.model.space import ComponentSpace
from circuitfind.records.circuit import RECORD_FILE

MASK_FILE = "mask.safetensors"


@dataclass
class CircuitUnderTest:
    """A circuit to evaluate: its units, and a ranking of every unit when the source has one."""

    names: List[str]
    members: torch.Tensor  # (L, H+1) bool, True = in the circuit
    scores: Optional[torch.Tensor]  # (L, H+1) higher = more important; None without a ranking
    source: str  # where it came from, for the record

    @property
    def ranked_by(self) -> str | None:
        return (
            None
            if self.scores is None
            else "the source's scores (a circuitfind run's ranking: 1 - mask weight, or the regularisation path)"
        )


def from_members(members: torch.Tensor, space: ComponentSpace, scores, source: str) -> CircuitUnderTest:
    names = [u.name for u in space.units() if members[u.layer, u.col]]
    return CircuitUnderTest(names, members.bool(), scores, source)


def from_names(names: Sequence[str], space: ComponentSpace) -> CircuitUnderTest:
    """The circuit of these units; unknown names are one error with the nearest valid ones."""
    members = torch.zeros(space.shape, dtype=torch.bool)
    for unit in space.index(list(names)):
        members[unit.layer, unit.col] = True
    return CircuitUnderTest([u.name for u in space.units() if members[u.layer, u.col]], members, None, "names")


def from_mask_file(path: Path, space: ComponentSpace) -> CircuitUnderTest:
    """A circuitfind mask.safetensors: the circuit it reports (`circuit`: pruned, or the rounded mask; files
    made before pruning have `rounded` only), ranked by its `scores` (or 1 - the continuous weights)."""
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            names = json.loads((f.metadata() or {}).get("names", "null"))
    except (SafetensorError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CircuitfindError(
            f"{path} is not a readable mask file ({first}); it is truncated or corrupt: re-run the search that "
            "wrote it, or give the circuit by unit names (circuit=[L2.H1,L2.H3])"
        ) from None
    circuit, rounded, continuous = (tensors.get(k) for k in ("circuit", "rounded", "continuous"))
    if circuit is None and rounded is None and continuous is None:
        raise CircuitfindError(
            f"{path} holds no 'circuit', 'rounded' or 'continuous' mask; give a circuitfind mask.safetensors"
        )
    mask = next(
        m for m in (circuit, rounded, None if continuous is None else (continuous >= 0.5).float()) if m is not None
    )
    if names and names != space.names():
        raise CircuitfindError(f"{path} is a mask over other units than this run's: {units_hint(names, space)}")
    if tuple(mask.shape) != space.shape:
        raise CircuitfindError(
            f"{path} is a mask of shape {tuple(mask.shape)} (layers, heads + 1) and this model's is {space.shape}; "
            "evaluate it on the model it was trained on (model=...)"
        )
    scores = tensors.get("scores")
    if scores is None and continuous is not None:
        scores = 1 - continuous.float()
    return from_members(mask == 0, space, None if scores is None else scores.float(), str(path))


def units_hint(names: List[str], space: ComponentSpace) -> str:
    """What a mask's own unit names say about the units it was trained over, and the options that give them."""
    kind = "residual" if ".resid" in names[0] else "neurons" if "MLP[" in names[0] else "heads_mlps"
    positions = list(dict.fromkeys(n.rpartition("@")[2] for n in names if "@" in n)) or ["last"]
    layers = len({n.split(".")[0] for n in names})
    options = [f"units={kind}"] if kind != space.kind else []
    if positions != list(space.positions):
        quoted = [f'"{p}"' if "#" in p else p for p in positions]  # Hydra reads `#` as a comment otherwise
        options.append(f"'units.positions=[{','.join(quoted)}]'")
    where = f"{len(names)} units ({names[0]}, ...) of a {layers}-layer model"
    fix = " ".join(options) if options else "model=<the model it was trained on>"
    return f"{where}, and this run's are {space.describe()}; evaluate it with {fix}"


def from_mib_file(path: Path, space: ComponentSpace) -> CircuitUnderTest:
    """A MIB node-level circuit: the nodes in the graph, ranked by their scores when every node has one."""
    try:
        data = json.loads(Path(path).read_text())
        nodes = data["nodes"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CircuitfindError(
            f"{path} is not a MIB circuit file (JSON with a 'nodes' table); give a node-level file"
        ) from None
    cfg = data.get("cfg", {})
    shape = (cfg.get("n_layers"), cfg.get("n_heads"))
    if shape != (space.n_layers, space.n_heads):
        raise CircuitfindError(
            f"{path} is a circuit of a model with {shape[0]} layers and {shape[1]} heads, and this model has "
            f"{space.n_layers} and {space.n_heads}; evaluate it on the model it was found in (model=...)"
        )
    by_node = {u.mib_node: u for u in space.units()}
    members = torch.zeros(space.shape, dtype=torch.bool)
    scores = torch.full(space.shape, float("nan"))
    for node, entry in nodes.items():
        unit = by_node.get(node)
        if unit is None:
            continue  # MIB's `input` and `logits` nodes are not units
        members[unit.layer, unit.col] = bool(entry.get("in_graph", False))
        if entry.get("score") is not None:
            scores[unit.layer, unit.col] = float(entry["score"])
    ranked = None if torch.isnan(scores).any() else scores
    return from_members(members, space, ranked, str(path))


def read_circuit(spec, space: ComponentSpace) -> CircuitUnderTest:
    """A circuit from `circuit=`: a list of unit names, or the path of a run directory, mask or MIB file."""
    if isinstance(spec, (list, tuple)):
        circuit = from_names([str(n) for n in spec], space)
    else:
        path = Path(str(spec))
        if path.is_dir():
            if not (path / MASK_FILE).is_file():
                raise CircuitfindError(
                    f"{path} holds no {MASK_FILE}; give a finished run directory (with {RECORD_FILE})"
                )
            path = path / MASK_FILE
        if path.suffix == ".safetensors" and path.is_file():
            circuit = from_mask_file(path, space)
        elif path.suffix == ".json" and path.is_file():
            circuit = from_mib_file(path, space)
        elif path.exists():
            raise CircuitfindError(
                f"circuit={spec}: give a mask .safetensors, a MIB .json, a run directory or a list of unit names"
            )
        else:
            circuit = from_names([str(spec)], space)  # one unit named without brackets
    if not circuit.names:
        raise CircuitfindError(
            f"circuit={spec}: the circuit is empty, so there is nothing to test; name at least one unit "
            "(circuit=[L2.H1,L2.MLP]) or give a mask or MIB file with units in it"
        )
    return circuit
