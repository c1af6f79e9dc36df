"""One job: a validated config turned into data, a loaded model, an engine and prepared pairs."""

from __future__ import annotations

import functools
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import torch
import transformers
from omegaconf import DictConfig, OmegaConf

from circuitfind.config.choices import ALL, LAST
from circuitfind.config.validation import normalised, validate
from circuitfind.errors import CircuitfindError
from circuitfind.evaluation.ablation import Reference, ReferencePrompt, reference_values, shift
from circuitfind.evaluation.circuit_tests import CircuitEvaluation
from circuitfind.evaluation.heldout import EvalSplit, prepare_split
from circuitfind.evaluation.planted import Truth, planted_truth
from circuitfind.evaluation.selfcheck import self_checks
from circuitfind.methods.objective import Objective, OnFirstUse, unpatched_logit_diff
from circuitfind.methods.registry import method_named
from circuitfind.methods.staged_scores import stage_pairs
from circuitfind.model.components import UnitsChoice, locate_components
from circuitfind.model.engine import Engine, Prepared, make_engine
from circuitfind.model.loading import LoadedModel, load_model
from circuitfind.model.memory import MemoryEstimate, check_memory, estimate_memory
from circuitfind.progress import on_terminal
from circuitfind.task.desiderata import desiderata_from, trained
from circuitfind.task.encoding import EncodedPairs, PairEncoder
from circuitfind.task.pairs import build_data, data_fingerprint
from circuitfind.task.positions import PositionFinder, check_positions, expand_all, names_slots, slot_labels
from circuitfind.task.spec import TaskSpec


def task_of(cfg: DictConfig) -> TaskSpec:
    """The run's task, checked and compiled (TaskSpec ignores its default desiderata)."""
    return TaskSpec(OmegaConf.to_container(cfg.task, resolve=True))


@contextmanager
def plain_tqdm_disabled(disabled: bool) -> Iterator[None]:
    """Every tqdm bar made inside is silenced (the GGUF loader's is a plain tqdm, deaf to transformers'
    switch), and tqdm is as it was afterwards. tqdm reads TQDM_DISABLE only when it is imported, so the
    bars are turned off at their constructor instead."""
    if not disabled:
        yield
        return
    import tqdm.std

    original = tqdm.std.tqdm.__init__

    def quiet(self, *args, **kwargs):
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    tqdm.std.tqdm.__init__ = quiet
    try:
        yield
    finally:
        tqdm.std.tqdm.__init__ = original


class Job:
    """Everything one run needs, built once: data, model, engine, prepared splits."""

    def __init__(self, cfg: DictConfig, loaded: LoadedModel | None = None):
        self.started = time.perf_counter()
        cfg = normalised(cfg)
        validate(cfg)
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.task = task_of(cfg)
        self.desiderata = desiderata_from(OmegaConf.to_container(cfg.desiderata, resolve=True), self.task)
        n_validation = cfg.task.n_validation if self.prunes else 0  # only pruning reads the validation split
        self.data = build_data(self.task, cfg.task, self.desiderata, cfg.seed, n_validation)
        bars = cfg.progress and on_terminal()  # off a terminal a bar is one long line of carriage returns
        if not bars:
            transformers.utils.logging.disable_progress_bar()  # its weight-loading bar too
        if loaded is None:
            with plain_tqdm_disabled(not bars):  # the GGUF loader's bar is a plain tqdm
                self.loaded = load_model(cfg.model, before_weights=self.encode_all)
        else:
            self.loaded = loaded
            self.encode_all(loaded.tokenizer)
        self.model, self.tokenizer, self.device = self.loaded.model, self.loaded.tokenizer, self.loaded.device
        self.sites = locate_components(self.model, self.units)
        self.space = self.sites.space
        k = cfg.method.k
        size = cfg.optimizer.target_size
        if size is not None and size > self.space.n_components:
            raise CircuitfindError(
                f"optimizer.target_size={size} is more than the model's {self.space.n_components} units; "
                f"give a size between 0 and {self.space.n_components}"
            )
        if not method_named(cfg.method.name).learns_mask and k > self.space.n_components:
            raise CircuitfindError(
                f"method.k={k} is more than the model's {self.space.n_components} components; "
                f"give method.k between 1 and {self.space.n_components}"
            )
        self.engine: Engine = make_engine(cfg.engine, self.model, self.sites, cfg.cache)
        check_memory(self.memory_estimate(), cfg.units.memory_gb, self.device)

    @property
    def prunes(self) -> bool:
        """Whether the search's circuit is pruned on the validation split: prune.enabled, a mask search,
        and no optimizer.target_size (a size asked for is the size reported)."""
        cfg = self.cfg
        return (
            bool(cfg.prune.enabled) and method_named(cfg.method.name).learns_mask and cfg.optimizer.target_size is None
        )

    def encode_all(self, tokenizer) -> None:
        """Tokenise every pair of every split, so that values and answers the tokenizer cannot
        take stop the run before the model's weights are read."""
        positions = self.unit_positions(tokenizer)
        u = self.cfg.units
        self.units = UnitsChoice(u.kind, positions, u.group_size)
        finder = None if positions == (LAST,) else PositionFinder(tokenizer, self.task, positions)
        self.encoder = PairEncoder(tokenizer, self.task.answer_prefix, finder)
        self.encoder.check_one_token_slots(self.task)
        self.encoder.check_representable(
            [text for dd in self.data.values() for pairs in dd.splits().values() for pair in pairs
             for text in (pair.base.text, pair.alt.text, pair.base.answer_text, pair.alt.answer_text)]
        )  # fmt: skip
        self.encoded: Dict[Tuple[str, str], EncodedPairs] = {
            (name, split): self.encoder.encode(pairs, dd.desideratum)
            for name, dd in self.data.items()
            for split, pairs in dd.splits().items()
        }

    def unit_positions(self, tokenizer) -> tuple[str, ...]:
        """The units' positions, checked against the task's slots, with `all` expanded to token indices."""
        positions = list(self.cfg.units.positions)
        splits = [pairs for dd in self.data.values() for pairs in dd.splits().values()]
        prompts = [p for pairs in splits for pair in pairs for p in (pair.base, pair.alt)]
        labels = slot_labels(self.task, prompts) if names_slots(positions) else []  # read every prompt only if needed
        check_positions(positions, labels, self.task.name)
        if ALL not in positions:
            return tuple(positions)
        return expand_all(positions, max(len(tokenizer(p.text, add_special_tokens=True)["input_ids"]) for p in prompts))

    @functools.cached_property
    def truth(self) -> Truth | None:
        """The ground truth found circuits are scored against, if the model has one (evaluation/planted.py):
        for a compiled program, the tokens varied by the trained desiderata that follow the alternate."""
        pairs = [
            pair
            for dd in self.data.values()
            if dd.desideratum.train and dd.desideratum.target == "alternate"
            for pair in dd.train
        ]
        return planted_truth(self.model, self.space, self.encoder, pairs)

    def memory_estimate(self) -> MemoryEstimate:
        """What the masks, the kept prefixes and one step's activations will take (model/memory.py)."""
        cfg = self.cfg
        lams = cfg.optimizer.lams or ([None] * cfg.optimizer.target_lams if cfg.optimizer.target_size else [None])
        return estimate_memory(self.sites, self.model.config, list(self.encoded.values()), len(lams), cfg)

    def with_seed(self, seed: int) -> "Job":
        """The same job with another seed (fresh data), on the model already loaded."""
        return Job(OmegaConf.merge(self.cfg, {"seed": seed}), loaded=self.loaded)

    def chunks(self, name: str, split: str) -> List[EncodedPairs]:
        """A split's pairs in sub-batches of optimizer.batch_size; on the validation split, within the stages in
        which pruning scores them (methods/staged_scores.py)."""
        enc = self.encoded[(name, split)]
        size = self.cfg.optimizer.batch_size
        screen = self.cfg.prune.screen_pairs if split == "validation" else None
        if screen:
            ends = stage_pairs(len(enc), screen)
            stages = [enc.rows(start, stop) for start, stop in zip([0, *ends], ends)]
            return [chunk for stage in stages for chunk in stage.chunks(size)]
        return list(enc.chunks(size))

    def prepared(self, name: str, split: str) -> List[Prepared]:
        return [self.engine.prepare(chunk) for chunk in self.chunks(name, split)]

    def objectives(self, split: str = "train") -> List[Objective]:
        """The training objective's terms on the `split` ("train", "validation" or held-out "test") pairs. The
        validation split's sub-batches are prepared when pruning first scores them (`OnFirstUse`)."""
        objs = []
        for des in trained(self.desiderata):
            if split == "validation":
                chunks = self.chunks(des.name, split)
                shapes = [(len(chunk), chunk.base_ids.shape[1]) for chunk in chunks]
                batches = OnFirstUse(lambda i, chunks=chunks: self.engine.prepare(chunks[i]), shapes)
                d0 = OnFirstUse(
                    lambda i, batches=batches: unpatched_logit_diff(self.engine, batches[i], keep=True), batches.shapes
                )
            else:  # test pairs are scored (the clean run kept), training pairs trained
                batches = self.prepared(des.name, split)
                d0 = [unpatched_logit_diff(self.engine, b, keep=split != "train") for b in batches]
            objs.append(Objective(des, batches, d0, des.weight, des.with_sparsity))
        return objs

    def reference_prompts(self) -> List[ReferencePrompt]:
        """The distinct base prompts of every desideratum's train pairs, with the units' token indices in each:
        the prompts mean and resample ablations read values off (no held-out figure is computed on them)."""
        seen: Dict[str, ReferencePrompt] = {}
        for name, dd in self.data.items():
            enc = self.encoded.get((name, "train"))
            for row, pair in enumerate(dd.train):
                if enc is not None and pair.base.text not in seen:
                    ids = self.encoder.ids(pair.base.text)
                    seen[pair.base.text] = ReferencePrompt(
                        ids, shift(enc.base_pos[row], enc.base_ids.shape[1], len(ids))
                    )
        return list(seen.values())

    def reference(self) -> Reference:
        """The units' values on the reference prompts (evaluation/ablation.py)."""
        cfg = self.cfg
        prompts = self.reference_prompts()
        return reference_values(
            self.engine, prompts, self.encoder.pad_id, cfg.evaluate.min_reference, cfg.optimizer.batch_size
        )

    def circuit_evaluation(self, splits: Sequence[EvalSplit]) -> CircuitEvaluation:
        """The tests of any circuit on these splits, as the `evaluate` config asks."""
        return CircuitEvaluation(self.engine, splits, self.cfg.evaluate, self.cfg.seed, self.reference)

    def provenance(self) -> Dict[str, Any]:
        """What an evaluation was computed on: the data drawn, the model, the desiderata."""
        cfg = self.cfg
        return {
            "data": {
                "task": self.task.name,
                "fingerprint": data_fingerprint(self.data),
                "n_test": cfg.task.n_test,
                "n_transfer": cfg.task.n_transfer,
                "seed": cfg.seed,
            },
            "model": {"kind": cfg.model.kind, "name_or_path": cfg.model.name_or_path, "dtype": cfg.model.dtype},
            "desiderata": cfg.desiderata.name,
        }

    def self_checks(self) -> Dict[str, Any]:
        """The engine's self-checks on a few of the first desideratum's train pairs, or why they were skipped."""
        if not self.cfg.checks:
            return {"skipped": "checks=false"}
        first = next(iter(self.data))
        return self_checks(self.engine, self.encoded[(first, "train")])

    def eval_splits(self) -> List[EvalSplit]:
        """The held-out and transfer splits of every desideratum, with their unpatched references."""
        splits = []
        for name, dd in self.data.items():
            for kind in ("test", "transfer"):
                if (name, kind) in self.encoded:
                    splits.append(prepare_split(dd.desideratum, kind, self.prepared(name, kind), self.engine))
        return splits
