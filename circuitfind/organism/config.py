"""Schema of `circuitfind organism` (configs/organism.yaml), registered so that typos fail."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class OperandRange:
    """Inclusive ranges of the two operands of one operation."""

    x: List[int] = field(default_factory=lambda: [10, 99])
    y: List[int] = field(default_factory=lambda: [10, 99])


@dataclass
class VariantsConfig:
    """Prompt variants that stop binding from being purely positional (all off by default)."""

    names: List[List[str]] = field(default_factory=lambda: [["x", "y"]])  # name pairs to draw from
    y_first: float = 0.0  # probability of defining the second operand first
    distractor: float = 0.0  # probability of an extra definition, e.g. `z = 17`
    distractor_names: List[str] = field(default_factory=lambda: ["z"])


def _ranges() -> Dict[str, OperandRange]:
    return {"add": OperandRange(), "sub": OperandRange(), "mul": OperandRange(x=[10, 99], y=[2, 9])}


def _variants() -> VariantsConfig:
    return VariantsConfig(
        names=[["x", "y"], ["a", "b"], ["p", "q"], ["m", "n"], ["u", "v"], ["y", "x"], ["b", "a"]],
        y_first=0.5,
        distractor=0.5,
        distractor_names=["z", "c", "k", "w"],
    )


@dataclass
class OrganismModelConfig:
    """Shape of the LlamaForCausalLM trained from scratch."""

    n_layers: int = 4
    n_heads: int = 8
    hidden: int = 64
    intermediate: int = 256
    max_positions: int = 128


@dataclass
class OrganismDataConfig:
    """The arithmetic distribution: the paper's template plus variants that make binding by name."""

    template: str = "x = {x}\ny = {y}\nx {op} y = "
    ops: List[str] = field(default_factory=lambda: ["add", "sub", "mul"])
    # sampling weight per operation (missing: 1): - and * are learnt more slowly than +
    op_weights: Dict[str, float] = field(default_factory=lambda: {"add": 1.0, "sub": 1.3, "mul": 1.5})
    ranges: Dict[str, OperandRange] = field(default_factory=_ranges)
    paper_share: float = 0.3  # share of training prompts in the paper's exact template
    variants_start: int = 1200  # steps on the paper's template alone before variants are mixed in
    variants: VariantsConfig = field(default_factory=_variants)  # the other prompts
    # per operation, the share of its (x, y) never trained on (missing: 0). * has too few problems
    # (720) for this small model to learn more than a lookup table: held out, it stalls near 60-80%.
    heldout: Dict[str, float] = field(default_factory=lambda: {"add": 0.2, "sub": 0.2, "mul": 0.0})


@dataclass
class IITConfig:
    """Interchange-intervention training: the circuit planted at one position (the final token by default)."""

    circuit: List[str] = field(default_factory=lambda: ["L2.H1", "L2.H3", "L2.H4", "L2.H6"])
    position: str = "last"  # where the circuit acts: last (the final token) or xname#2 (the query's x)
    ops: List[str] = field(default_factory=lambda: ["add", "sub", "mul"])  # operations the losses use
    start: int = 2000  # first step with the interchange losses (the LM learns the task first)
    ramp: int = 0  # steps over which the interchange weights rise linearly from 0 (0: at once)
    batch_size: int = 16  # base prompts per interchange loss
    vd: float = 1.0  # circuit patched from another x: answer the alternate's answer
    oi: float = 1.0  # circuit patched from another operation: keep the base's answer
    strict: float = 1.0  # every other head (and earlier MLPs) patched from another x: keep it
    # one unit (head or MLP) alone at each of `alone_positions`, patched from another x: keep the
    # answer. No single unit there may carry x by itself, so the circuit is the one smallest cut
    alone: float = 0.0
    alone_positions: List[str] = field(default_factory=lambda: ["x", "last"])
    alone_units: int = 4  # units drawn per position and step, each patched alone in its own copy of the batch


@dataclass
class OrganismOptimConfig:
    """AdamW with linear warm-up and cosine decay."""

    steps: int = 6000
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: int = 100
    grad_clip: float = 1.0


@dataclass
class OrganismConfig:
    """Root config of `circuitfind organism`."""

    model: OrganismModelConfig = field(default_factory=OrganismModelConfig)
    dataset: OrganismDataConfig = field(default_factory=OrganismDataConfig)
    iit: IITConfig = field(default_factory=IITConfig)
    optim: OrganismOptimConfig = field(default_factory=OrganismOptimConfig)
    dbm_lams: List[float] = field(default_factory=lambda: [0.02, 0.05, 0.1, 0.2])  # DBM check per lambda; []: none
    n_eval: int = 500  # held-out prompts per operation and prompt form
    seed: int = 0
    # start from trained weights instead of random ones: a shipped asset (organism) or a checkpoint
    # directory; its shape must be `model`'s. How organism_positional moves the shipped circuit
    init: Optional[str] = None
    ship: bool = False  # also write the checkpoint into circuitfind/assets/<asset>
    asset: str = "organism"  # the package's folder it ships to: organism (model=organism) | organism_positional
    out_dir: Optional[str] = None  # checkpoint directory; default: <run dir>/checkpoint
    num_threads: int = 0  # torch CPU threads; 0 = torch's default
    log_every: int = 100
    eval_every: int = 0  # held-out exact match in the log every N steps (a multiple of log_every; 0: off)
    progress: bool = True


def register_organism_config() -> None:
    """Register the schema that configs/organism.yaml extends."""
    ConfigStore.instance().store(name="organism_schema", node=OrganismConfig)
