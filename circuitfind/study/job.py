"""One job: a validated config turned into data, a loaded model, an engine and prepared pairs."""

from __future__ import annotations

import time
from typing import List

import torch
import transformers
from omegaconf import DictConfig, OmegaConf

from circuitfind.errors import CircuitfindError
from circuitfind.methods.objective import Objective, unpatched_logit_diff
from circuitfind.model.components import locate_components
from circuitfind.model.engine import FullEngine, Prepared, make_engine
from circuitfind.model.loading import LoadedModel, load_model
from circuitfind.study.evaluate import EvalSplit, prepare_split
from circuitfind.study.validation import interpret_escapes, validate
from circuitfind.task.encoding import PairEncoder
from circuitfind.task.pairs import Pair, build_data


def desiderata_names(desiderata: DictConfig) -> List[str]:
    """The desiderata trained, then those only evaluated, each once, in config order."""
    return list(dict.fromkeys([t.name for t in desiderata.terms] + list(desiderata.evaluate)))


class Job:
    """Everything one run needs, built once: data, model, engine, prepared splits."""

    def __init__(self, cfg: DictConfig, loaded: LoadedModel | None = None):
        self.started = time.perf_counter()
        cfg = interpret_escapes(cfg)
        validate(cfg)
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.data = build_data(cfg.dataset, desiderata_names(cfg.desiderata), cfg.seed)
        if not cfg.progress:
            transformers.utils.logging.disable_progress_bar()  # its weight-loading bar too
        self.loaded = loaded or load_model(cfg.model)
        self.model, self.tokenizer, self.device = self.loaded.model, self.loaded.tokenizer, self.loaded.device
        self.sites = locate_components(self.model)
        self.space = self.sites.space
        k = cfg.method.k
        if cfg.method.name != "dbm" and k > self.space.n_components:
            raise CircuitfindError(
                f"method.k={k} is more than the model's {self.space.n_components} components; "
                f"give method.k between 1 and {self.space.n_components}"
            )
        self.engine: FullEngine = make_engine(cfg.engine, self.model, self.sites, cfg.cache)
        self.encoder = PairEncoder(self.tokenizer, cfg.dataset.template)

    def with_seed(self, seed: int) -> "Job":
        """The same job with another seed (fresh data), on the model already loaded."""
        return Job(OmegaConf.merge(self.cfg, {"seed": seed}), loaded=self.loaded)

    def prepared(self, pairs: List[Pair]) -> List[Prepared]:
        enc = self.encoder.encode(pairs)
        return [self.engine.prepare(chunk) for chunk in enc.chunks(self.cfg.optimizer.batch_size)]

    def objectives(self, split: str = "train") -> List[Objective]:
        """The training objective's terms on the `split` ("train" or held-out "test") pairs."""
        objs = []
        for term in self.cfg.desiderata.terms:
            dd = self.data[term.name]
            batches = self.prepared(getattr(dd, split))
            d0 = [unpatched_logit_diff(self.engine, b) for b in batches]
            objs.append(Objective(dd.desideratum, batches, d0, term.weight, term.with_sparsity))
        return objs

    def eval_splits(self) -> List[EvalSplit]:
        """The held-out and transfer splits of every desideratum, with their unpatched references."""
        splits = []
        for dd in self.data.values():
            for kind, pairs in (("test", dd.test), ("transfer", dd.transfer)):
                if pairs:
                    splits.append(prepare_split(dd.desideratum, kind, self.prepared(pairs), self.engine))
        return splits
