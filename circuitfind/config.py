"""Structured configs: the schema every YAML in `configs/` is checked against.

Registered in Hydra's ConfigStore so that a typo (`optimizer.lamm=0.1`) or a wrong type
(`optimizer.steps=ten`) fails at start-up with the offending key named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class TinyLlamaConfig:
    """Shape of the random-weight LLaMA built in code (`model=tiny_llama`)."""

    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2  # < n_heads: grouped-query attention is exercised by default
    hidden: int = 64
    intermediate: int = 128
    init_seed: int = 0


@dataclass
class ModelConfig:
    """Which causal LM to mask, and where it lives."""

    kind: str = MISSING  # tiny_llama | hf | smollm2 | organism
    name_or_path: Optional[str] = None  # hf: local directory or hub id
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "cpu"  # cpu | cuda | cuda:N | auto (a GPU if there is one)
    trust_remote_code: bool = False  # run the model repository's own Python code (hf only)
    device_map: Optional[str] = None  # hf: auto | balanced | sequential: shard over the GPUs (accelerate)
    quantization: Optional[str] = None  # hf: 8bit | 4bit (bitsandbytes)
    gguf_file: Optional[str] = None  # hf: a GGUF file, in name_or_path or a path of its own
    tiny: TinyLlamaConfig = field(default_factory=TinyLlamaConfig)


@dataclass
class OperandRange:
    """Inclusive ranges of the two operands of one operation."""

    x: List[int] = field(default_factory=lambda: [10, 99])
    y: List[int] = field(default_factory=lambda: [10, 99])


def _default_ranges() -> Dict[str, OperandRange]:
    return {
        "add": OperandRange(),
        "sub": OperandRange(),
        "mul": OperandRange(x=[10, 99], y=[2, 9]),
    }


@dataclass
class VariantsConfig:
    """Prompt variants that stop binding from being purely positional (all off by default)."""

    names: List[List[str]] = field(default_factory=lambda: [["x", "y"]])  # name pairs to draw from
    y_first: float = 0.0  # probability of defining the second operand first
    distractor: float = 0.0  # probability of an extra definition, e.g. `z = 17`
    distractor_names: List[str] = field(default_factory=lambda: ["z"])


@dataclass
class DatasetConfig:
    """Prompts, operations and split sizes (method.md, 'Data')."""

    template: str = "x = {x}\ny = {y}\nx {op} y = "
    train_ops: List[str] = field(default_factory=lambda: ["add", "sub"])  # see task/prompts.py OPERATIONS
    transfer_ops: List[str] = field(default_factory=lambda: ["mul"])
    ranges: Dict[str, OperandRange] = field(default_factory=_default_ranges)  # per operation
    n_train: int = 50  # pairs per desideratum
    n_test: int = 50  # held-out pairs per desideratum
    n_transfer: int = 50  # pairs per desideratum on the transfer operations
    variants: VariantsConfig = field(default_factory=VariantsConfig)


@dataclass
class DesideratumTerm:
    """One desideratum and the optimisation step it gets in each iteration."""

    name: str = MISSING  # a registered desideratum (circuitfind/task/desiderata/): vd | oi
    weight: float = 1.0
    with_sparsity: bool = False  # add the sparsity penalty to this step's loss


@dataclass
class DesiderataConfig:
    """The desiderata the circuit must satisfy, optimised in alternation."""

    name: str = MISSING
    terms: List[DesideratumTerm] = field(default_factory=list)
    evaluate: List[str] = field(default_factory=list)  # desiderata evaluated on held-out pairs besides the terms


@dataclass
class OptimizerConfig:
    """Mask optimisation (method.md, 'Optimisation')."""

    lam: float = 0.05  # sparsity weight lambda
    lams: Optional[List[float]] = None  # several lambdas trained at once, K masks on shared batches
    lr: float = 1e-2
    steps: int = 100  # iterations; each runs one step per desideratum
    eps: float = 1e-3  # the 1.001 of the l0.5 penalty: (1 + eps - w) ** 0.5
    batch_size: Optional[int] = None  # pairs per forward; None = all at once
    eval_every: int = 10  # held-out accuracy of the rounded mask every N steps (curves.png, W&B)


@dataclass
class MethodConfig:
    """How the circuit is chosen: dbm trains a mask; the baselines rank components, top k."""

    name: str = "dbm"  # dbm | single_patch | attribution | random
    k: Optional[int] = None  # circuit size for the baselines


@dataclass
class EvidenceConfig:
    """Extra evidence computed after a DBM run (evidence=full turns all of it on)."""

    baselines: List[str] = field(default_factory=list)  # single_patch, attribution, random at equal k
    ks: List[int] = field(default_factory=list)  # sizes compared, besides the DBM circuit's own
    random_draws: int = 5
    curves: bool = False  # faithfulness curves of every ranking, with their areas
    stability_seeds: int = 0  # re-run DBM with this many seeds (fresh data each) and compare


@dataclass
class LoggerConfig:
    """Experiment tracking; metrics.jsonl is written whatever the backend."""

    backend: str = "none"  # none | wandb
    project: str = "circuitfind"
    entity: Optional[str] = None
    mode: str = "offline"  # offline | online | disabled
    tags: List[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    """Root config of `circuitfind train`."""

    model: ModelConfig = MISSING
    dataset: DatasetConfig = MISSING
    desiderata: Optional[DesiderataConfig] = None  # added by the user: +desiderata=vd_oi
    optimizer: OptimizerConfig = MISSING
    logger: LoggerConfig = MISSING
    method: MethodConfig = field(default_factory=MethodConfig)
    evidence: EvidenceConfig = field(default_factory=EvidenceConfig)
    engine: str = "cached"  # cached: prefix run once, final token per step | full: whole prompt per step
    cache: str = "device"  # engine=cached: prefix KV kept on the device | cpu (moved per batch) | recompute
    seed: int = 0
    min_baseline_acc: float = 0.5  # unpatched task accuracy below this is not trusted
    strict: bool = False  # turn the low-baseline warning into an error
    plots: bool = True
    progress: bool = True  # progress bars on stderr
    overwrite: bool = False  # re-run into a directory that holds an earlier run (its outputs are removed first)


def register_configs() -> None:
    """Register the schemas that the YAML files in `configs/` extend."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
