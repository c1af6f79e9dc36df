"""The cached engine's memory policies, and K lambdas trained at once equal K single runs."""

from __future__ import annotations

import warnings

import pytest
import torch

from circuitfind.config.schema import OptimizerConfig
from circuitfind.errors import CircuitfindError
from circuitfind.methods.dbm import train_mask
from circuitfind.methods.objective import Objective, patched_delta, unpatched_logit_diff
from circuitfind.model.engine import make_engine

from conftest import arithmetic_desideratum
from test_patching import setup


@pytest.mark.parametrize("cache", ["cpu", "recompute"])
def test_cache_policies_give_the_same_result(cache):
    torch.manual_seed(0)
    model, sites, enc = setup("gqa", padded=True)
    mask = torch.rand(2, *sites.space.shape)
    out = {}
    for policy in ("device", cache):
        eng = make_engine("cached", model, sites, policy)
        prep = eng.prepare(enc)
        assert (prep.prefix_kv is None) == (policy == "recompute")
        d0 = unpatched_logit_diff(eng, prep)
        out[policy] = patched_delta(eng, prep, d0, mask)
    assert torch.allclose(out["device"], out[cache], atol=1e-6)


def test_cached_engine_uses_no_deprecated_transformers_argument():
    """transformers renamed past_key_values to cache (5.24) and drops the old name in 5.40."""
    model, sites, enc = setup("gqa", padded=True)
    eng = make_engine("cached", model, sites)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        prep = eng.prepare(enc)
        eng.final_hidden(prep, torch.ones(1, *sites.space.shape))


def test_unknown_cache_policy():
    model, sites, _ = setup("gqa", padded=False)
    with pytest.raises(CircuitfindError, match="cache='disk' is unknown; choose from"):
        make_engine("cached", model, sites, "disk")


def objectives(model, sites, enc_vd, enc_oi, engine="cached", batch_size=None):
    eng = make_engine(engine, model, sites)
    objs = []
    for name, enc, weight, sparse in (("vd", enc_vd, 5.0, True), ("oi", enc_oi, 1.0, False)):
        batches = [eng.prepare(c) for c in enc.chunks(batch_size)]
        d0 = [unpatched_logit_diff(eng, b) for b in batches]
        objs.append(Objective(arithmetic_desideratum(name), batches, d0, weight, sparse))
    return eng, objs


def trained(lams, engine="cached", batch_size=None, steps=8):
    model, sites, enc_vd = setup("gqa", padded=True, n=12, name="vd")
    _, _, enc_oi = setup("gqa", padded=True, n=12, name="oi")
    eng, objs = objectives(model, sites, enc_vd, enc_oi, engine, batch_size)
    return train_mask(eng, objs, torch.tensor(lams), OptimizerConfig(lr=0.1, steps=steps, eps=1e-3), progress=False)


def test_k_lambdas_at_once_equal_k_single_runs():
    lams = [0.0, 0.002, 0.05]
    together = trained(lams)
    singles = torch.cat([trained([lam]) for lam in lams])
    assert (together < 0.99).any(), "the masks moved, so equality means something"
    assert not torch.allclose(together[0], together[2]), "different lambdas gave different masks"
    assert torch.allclose(together, singles, atol=1e-4)


def test_sub_batches_and_the_full_engine_give_the_same_masks():
    reference = trained([0.002])
    assert torch.allclose(trained([0.002], batch_size=5), reference, atol=1e-4)
    assert torch.allclose(trained([0.002], engine="full"), reference, atol=1e-4)


def test_nan_loss_stops_with_the_last_good_mask(monkeypatch):
    from circuitfind.task.desiderata import Desideratum

    calls = {"n": 0}
    original = Desideratum.loss_of

    def flaky(self, delta, target_logprob):
        loss = original(self, delta, target_logprob)
        if self.name == "oi":
            calls["n"] += 1
            return loss * float("nan") if calls["n"] == 3 else loss
        return loss

    monkeypatch.setattr(Desideratum, "loss_of", flaky)
    from circuitfind.methods.dbm import NonFiniteLoss

    with pytest.raises(NonFiniteLoss, match="non-finite at step 2") as err:
        trained([0.0], steps=5)
    good = err.value.last_good
    assert torch.isfinite(good).all() and (good < 1).any()


def test_out_of_memory_is_a_clear_error(monkeypatch, tmp_path):
    from circuitfind.model.engine import CachedEngine
    from circuitfind.runs.train import run_search

    from conftest import compose

    def oom(self, pairs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(CachedEngine, "prepare", oom)
    cfg = compose("+desiderata=vd_oi", "experiment=smoke", "progress=false")
    with pytest.raises(CircuitfindError, match="optimizer.batch_size smaller"):
        run_search(cfg, tmp_path)


@pytest.mark.parametrize("engine", ["cached", "full"])
def test_preparing_a_batch_runs_two_whole_prompts_and_keeps_nothing_patched_exact(engine):
    """The alternate's run gives its values and its clean final state; the base's prefix and final token
    (cached) give the clean base state: two passes over whole prompts per batch, not three or four."""
    from circuitfind.runs.job import Job

    from conftest import compose

    job = Job(compose("+desiderata=vd_oi", "progress=false", f"engine={engine}"))
    lengths = []
    handle = job.engine.body.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        splits, objectives = job.eval_splits(), job.objectives()
    finally:
        handle.remove()
    batches = sum(len(s.batches) for s in splits) + sum(len(o.batches) for o in objectives)
    whole = [n for n in lengths if n > 1]
    assert len(whole) == 2 * batches and len(lengths) == (3 if engine == "cached" else 2) * batches
    for split in splits:  # d0 is the no-hook run of the engine itself: keeping every unit moves nothing
        prep, d0 = split.batches[0], split.d0[0]
        keep_all = torch.ones(1, *job.space.shape)
        assert torch.equal(patched_delta(job.engine, prep, d0, keep_all)[0], torch.zeros_like(d0))
