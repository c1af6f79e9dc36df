"""Structured configs: the schema every YAML in `configs/` is checked against.

Registered in Hydra's ConfigStore (config/compose.py) so that a typo (`optimizer.lamm=0.1`) or a wrong type
(`optimizer.steps=ten`) fails at start-up with the offending key named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

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

    kind: str = MISSING  # tiny_llama | hf | smollm2 | gemma3 | organism | transformer_lens | tracr
    name_or_path: Optional[str] = None  # hf: local directory or hub id
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "cpu"  # cpu | cuda | cuda:N | auto (a GPU if there is one)
    trust_remote_code: bool = False  # run the model repository's own Python code (hf only)
    device_map: Optional[str] = None  # hf: auto | balanced | sequential: shard over the GPUs (accelerate)
    quantization: Optional[str] = None  # hf: 8bit | 4bit (bitsandbytes)
    gguf_file: Optional[str] = None  # hf: a GGUF file, in name_or_path or a path of its own
    program: Optional[str] = None  # tracr: the RASP program compiled (task/rasp_programs.py)
    asset: str = "organism"  # organism: the one shipped in the package, by folder (organism | organism_positional)
    tiny: TinyLlamaConfig = field(default_factory=TinyLlamaConfig)


@dataclass
class SlotConfig:
    """A task slot's domain: one of an inclusive integer range, a list, or an expression."""

    range: Optional[List[int]] = None  # [low, high]
    values: Optional[List[Any]] = None  # numbers, words, names (or tuples, in a bind variant)
    expr: Optional[str] = None  # derived from other slots, e.g. "capital[country]"
    one_token: bool = False  # each value, after a space, must be one token of the model's tokenizer


@dataclass
class VariantConfig:
    """One dimension of a prompt's form, drawn per prompt: exactly one of templates, bind, swap, insert."""

    templates: Optional[List[str]] = None  # one template drawn from these
    bind: Optional[List[str]] = None  # slots given their texts together, from one tuple of `values`
    values: Optional[List[Any]] = None
    p: Optional[float] = None  # swap / insert: probability per prompt
    swap: Optional[List[int]] = None  # swap these two lines of the prompt
    insert: Optional[str] = None  # a line inserted at a position drawn from `at`
    at: Optional[List[int]] = None  # [first, last] line positions (default: before any line)
    slots: Dict[str, SlotConfig] = field(default_factory=dict)  # the inserted line's own slots
    where: List[str] = field(default_factory=list)  # conditions on the slots drawn, e.g. "dname != xname"


@dataclass
class DesideratumTerm:
    """One desideratum: the alternates it patches from, what the patched model should do, its step."""

    name: str = MISSING  # short, used in metric keys: <name>_test/acc
    title: Optional[str] = None
    vary: List[str] = field(default_factory=list)  # task slots the alternate changes
    within: str = "split"  # split | train: the varied slots range over the pair's split or the train split
    target: str = "alternate"  # alternate | base | tokens: follow the alternate, keep the base, move to tokens
    tokens: List[str] = field(default_factory=list)  # target=tokens: the token set
    contrast: Optional[str] = None  # a slot whose base value is the logit difference's other token
    loss: str = "neg_delta"  # neg_delta (-Δ) | delta_squared (Δ²) | cross_entropy (to the target)
    weight: float = 1.0
    with_sparsity: bool = False  # add the sparsity penalty to this step's loss
    train: bool = True  # false: evaluated only


@dataclass
class DesiderataConfig:
    """The desiderata the circuit must satisfy, optimised in alternation (configs/desiderata/)."""

    name: str = MISSING
    terms: List[DesideratumTerm] = field(default_factory=list)


@dataclass
class TaskConfig:
    """A task as data (configs/task/): templates, slots, the answer, constraints, forms, balance, sizes."""

    name: str = MISSING
    title: Optional[str] = None
    template: str = MISSING  # with {slot} fields
    slots: Dict[str, SlotConfig] = field(default_factory=dict)  # enumerated in this order
    answer: str = MISSING  # an expression over slots; {slot} pastes the slot's text first
    answer_prefix: str = ""  # what the model writes before the answer, e.g. " " after `gave a drink to`
    constraints: List[str] = field(default_factory=list)  # expressions over slots and `answer`
    tables: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # lookups: table[key]
    transfer: Dict[str, SlotConfig] = field(default_factory=dict)  # slot domains of the transfer split
    variants: Dict[str, VariantConfig] = field(default_factory=dict)  # prompt forms, drawn in this order
    balance: str = "first_char"  # first_char | answer | none: what each split is balanced over
    balance_keys: Optional[List[str]] = None  # the keys balanced over (default: every key found)
    n_train: int = 50  # pairs per desideratum
    n_test: int = 50  # held-out pairs per desideratum
    n_transfer: int = 50  # pairs per desideratum on the transfer split
    n_validation: int = 50  # pairs per desideratum that prune the circuit (drawn only with prune=validation)
    desiderata: Optional[DesiderataConfig] = None  # the task's own, used unless +desiderata=... is given


@dataclass
class OptimizerConfig:
    """Mask optimisation (docs/method.md, 'Optimisation')."""

    lam: float = 0.05  # sparsity weight lambda
    lams: Optional[List[float]] = None  # several lambdas trained at once, K masks on shared batches
    target_size: Optional[int] = None  # find the lambda whose circuit has exactly this many units (bisection)
    target_range: List[float] = field(default_factory=lambda: [0.001, 10.0])  # lambdas searched, low and high
    target_lams: int = 4  # lambdas trained side by side per round of the search
    target_rounds: int = 4  # rounds before the search gives the nearest size found
    lr: float = 1e-2
    steps: int = 100  # iterations; each runs one step per desideratum
    eps: float = 1e-3  # the 1.001 of the l0.5 penalty: (1 + eps - w) ** 0.5
    gate: str = "clamp"  # clamp (the paper's) | sigmoid | hard_concrete (methods/gates.py)
    temperature: List[float] = field(default_factory=lambda: [1.0, 0.05])  # gate=sigmoid: T from, to (geometric)
    path_lams: Optional[List[float]] = None  # a ladder trained beside the run: every unit ranked (methods/ranking.py)
    batch_size: Optional[int] = None  # pairs per forward; None = all at once
    eval_every: int = 10  # held-out accuracy of the rounded mask every N steps (curves.png, W&B)


def lambdas(cfg) -> List[float]:
    """The sparsity weights a train config trains: optimizer.lams (K masks at once) or optimizer.lam."""
    return [float(v) for v in cfg.optimizer.lams] if cfg.optimizer.lams else [float(cfg.optimizer.lam)]


@dataclass
class MethodConfig:
    """How the circuit is chosen: dbm trains a mask; the baselines rank components, top k."""

    name: str = "dbm"  # dbm | single_patch | attribution | random
    k: Optional[int] = None  # circuit size for the baselines


@dataclass
class UnitsConfig:
    """What the mask covers (configs/units/): the kind of unit, at which token positions (model/space.py)."""

    kind: str = "heads_mlps"  # heads_mlps | residual | neurons
    positions: List[str] = field(default_factory=lambda: ["last"])  # last, all, task slots (slot#2: 2nd mention)
    group_size: int = 1  # neurons: neurons per unit (1 = single neurons); must divide the MLP width
    memory_gb: Optional[float] = None  # what the masks and caches may take; None: the device's free memory


@dataclass
class PruneConfig:
    """Pruning the search's circuit on the validation split (methods/prune.py; configs/prune/)."""

    enabled: bool = True
    tolerance: float = 0.01  # share of the circuit's improvement of the validation objective pruning may give up
    criterion: str = "bound"  # bound: give up at most `tolerance` in all; price: each unit must buy `tolerance`
    min_pairs: int = 20  # task.n_validation must be at least this: the pruning test needs pairs
    screen_pairs: Optional[int] = None  # score circuits on this many pairs first, doubling them for close calls only
    by_position: bool = False  # first keep one position's (residual stream: layer's) units alone, or drop them together


@dataclass
class EvidenceConfig:
    """Extra evidence computed after a DBM run (evidence=full turns all of it on)."""

    baselines: List[str] = field(default_factory=list)  # single_patch, attribution, random at equal k
    ks: List[int] = field(default_factory=list)  # sizes compared, besides the DBM circuit's own
    random_draws: int = 5
    curves: bool = False  # faithfulness curves of every ranking, with their areas
    stability_seeds: int = 0  # re-run DBM with this many seeds (fresh data each) and compare


def wants_evidence(evidence: EvidenceConfig) -> bool:
    """Whether the `evidence` config asks for anything beyond the circuit itself."""
    return bool(evidence.baselines or evidence.curves or evidence.stability_seeds)


@dataclass
class EvaluateConfig:
    """The circuit's tests at the end of a run and in `circuitfind eval` (evaluation/circuit_tests.py)."""

    ablations: List[str] = field(default_factory=list)  # kinds besides patching (always done): zero, mean, resample
    min_reference: int = 20  # mean and resample ablations need at least this many reference prompts
    min_share: float = 0.01  # minimality: a unit below this share of the circuit's effect is flagged


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
    task: TaskConfig = MISSING
    desiderata: Optional[DesiderataConfig] = None  # +desiderata=vd_oi; none: the task's own
    optimizer: OptimizerConfig = MISSING
    logger: LoggerConfig = MISSING
    method: MethodConfig = field(default_factory=MethodConfig)
    units: UnitsConfig = field(default_factory=UnitsConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    evidence: EvidenceConfig = field(default_factory=EvidenceConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    checks: bool = True  # self-checks of the engine against the model before the search (evaluation/selfcheck.py)
    engine: str = "cached"  # cached: prefix run once, final token per step | full: whole prompt per step
    cache: str = "device"  # engine=cached: prefix KV kept on the device | cpu (moved per batch) | recompute
    seed: int = 0
    min_baseline_acc: float = 0.5  # unpatched task accuracy below this is not trusted
    strict: bool = False  # turn the low-baseline warning into an error
    plots: bool = True
    progress: bool = True  # progress bars on stderr
    overwrite: bool = False  # re-run into a directory that holds an earlier run (its outputs are removed first)
