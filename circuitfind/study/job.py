"""One job: a validated config turned into data, a loaded model, an engine and prepared pairs."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Dict, Iterator, List, Tuple

import torch
import transformers
from omegaconf import DictConfig, OmegaConf

from circuitfind.errors import CircuitfindError
from circuitfind.methods.objective import Objective, unpatched_logit_diff
from circuitfind.model.components import UnitsChoice, locate_components
from circuitfind.model.engine import FullEngine, Prepared, make_engine
from circuitfind.model.loading import LoadedModel, load_model
from circuitfind.model.memory import MemoryEstimate, check_memory, estimate_memory
from circuitfind.model.space import ALL, LAST
from circuitfind.study.evaluate import EvalSplit, prepare_split
from circuitfind.study.validation import normalised, validate
from circuitfind.task.desiderata import desiderata_from, trained
from circuitfind.task.encoding import EncodedPairs, PairEncoder
from circuitfind.task.pairs import build_data
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
        self.data = build_data(self.task, cfg.task, self.desiderata, cfg.seed)
        if not cfg.progress:
            transformers.utils.logging.disable_progress_bar()  # its weight-loading bar too
        if loaded is None:
            with plain_tqdm_disabled(not cfg.progress):  # the GGUF loader's bar is a plain tqdm
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
        if cfg.method.name != "dbm" and k > self.space.n_components:
            raise CircuitfindError(
                f"method.k={k} is more than the model's {self.space.n_components} components; "
                f"give method.k between 1 and {self.space.n_components}"
            )
        self.engine: FullEngine = make_engine(cfg.engine, self.model, self.sites, cfg.cache)
        check_memory(self.memory_estimate(), cfg.units.memory_gb, self.device)

    def encode_all(self, tokenizer) -> None:
        """Tokenise every pair of every split, so that values and answers the tokenizer cannot
        take stop the run before the model's weights are read."""
        positions = self.unit_positions(tokenizer)
        u = self.cfg.units
        self.units = UnitsChoice(u.kind, positions, u.group_size)
        finder = None if positions == (LAST,) else PositionFinder(tokenizer, self.task, positions)
        self.encoder = PairEncoder(tokenizer, self.task.answer_prefix, finder)
        self.encoder.check_one_token_slots(self.task)
        self.encoded: Dict[Tuple[str, str], EncodedPairs] = {
            (name, split): self.encoder.encode(pairs, dd.desideratum)
            for name, dd in self.data.items()
            for split, pairs in (("train", dd.train), ("test", dd.test), ("transfer", dd.transfer))
            if pairs
        }

    def unit_positions(self, tokenizer) -> tuple[str, ...]:
        """The units' positions, checked against the task's slots, with `all` expanded to token indices."""
        positions = list(self.cfg.units.positions)
        splits = [pairs for dd in self.data.values() for pairs in (dd.train, dd.test, dd.transfer)]
        prompts = [p for pairs in splits for pair in pairs for p in (pair.base, pair.alt)]
        labels = slot_labels(self.task, prompts) if names_slots(positions) else []  # read every prompt only if needed
        check_positions(positions, labels, self.task.name)
        if ALL not in positions:
            return tuple(positions)
        return expand_all(positions, max(len(tokenizer(p.text, add_special_tokens=True)["input_ids"]) for p in prompts))

    def memory_estimate(self) -> MemoryEstimate:
        """What the masks, the kept prefixes and one step's activations will take (model/memory.py)."""
        cfg = self.cfg
        lams = cfg.optimizer.lams or ([None] * cfg.optimizer.target_lams if cfg.optimizer.target_size else [None])
        return estimate_memory(self.sites, self.model.config, list(self.encoded.values()), len(lams), cfg)

    def with_seed(self, seed: int) -> "Job":
        """The same job with another seed (fresh data), on the model already loaded."""
        return Job(OmegaConf.merge(self.cfg, {"seed": seed}), loaded=self.loaded)

    def prepared(self, name: str, split: str) -> List[Prepared]:
        enc = self.encoded[(name, split)]
        return [self.engine.prepare(chunk) for chunk in enc.chunks(self.cfg.optimizer.batch_size)]

    def objectives(self, split: str = "train") -> List[Objective]:
        """The training objective's terms on the `split` ("train" or held-out "test") pairs."""
        objs = []
        for des in trained(self.desiderata):
            batches = self.prepared(des.name, split)
            d0 = [unpatched_logit_diff(self.engine, b) for b in batches]
            objs.append(Objective(des, batches, d0, des.weight, des.with_sparsity))
        return objs

    def eval_splits(self) -> List[EvalSplit]:
        """The held-out and transfer splits of every desideratum, with their unpatched references."""
        splits = []
        for name, dd in self.data.items():
            for kind in ("test", "transfer"):
                if (name, kind) in self.encoded:
                    splits.append(prepare_split(dd.desideratum, kind, self.prepared(name, kind), self.engine))
        return splits
