"""Patching identities, gradients, and the cached engine against the full reference."""

from __future__ import annotations

import pytest
import torch

from circuitfind.config.schema import ModelConfig, TinyLlamaConfig
from circuitfind.methods.objective import patched_delta, unpatched_logit_diff
from circuitfind.model.components import locate_components
from circuitfind.model.engine import cached_prefix, make_engine
from circuitfind.model.loading import load_model
from circuitfind.task.encoding import position_ids

from conftest import arithmetic_desideratum, arithmetic_pairs

SHAPES = {"gqa": TinyLlamaConfig(n_kv_heads=2), "mha": TinyLlamaConfig(n_kv_heads=4, n_layers=3)}


def setup(shape: str, padded: bool, n: int = 12, name: str = "vd"):
    loaded = load_model(ModelConfig(kind="tiny_llama", tiny=SHAPES[shape]))
    model, tok = loaded.model, loaded.tokenizer
    enc = arithmetic_pairs(tok, name, n, padded)
    if padded:
        assert (enc.base_attn == 0).any(), "the padded case must contain padding"
    return model, locate_components(model), enc


def clean_logits(model, ids, attn):
    return model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn)).logits[:, -1]


@pytest.mark.parametrize("engine", ["full", "cached"])
@pytest.mark.parametrize("shape", ["gqa", "mha"])
@pytest.mark.parametrize("padded", [False, True])
def test_all_ones_is_the_clean_run_and_all_zeros_the_alternate(engine, shape, padded):
    model, sites, enc = setup(shape, padded)
    eng = make_engine(engine, model, sites)
    prep = eng.prepare(enc)
    ones, zeros = torch.ones(1, *sites.space.shape), torch.zeros(1, *sites.space.shape)
    with torch.no_grad():
        patched_clean = eng.readout.logits(eng.final_hidden(prep, ones)[0])
        patched_alt = eng.readout.logits(eng.final_hidden(prep, zeros)[0])
        clean = clean_logits(model, enc.base_ids, enc.base_attn)
        alt = clean_logits(model, enc.alt_ids, enc.alt_attn)
    tol = 0 if engine == "full" and not padded else 1e-5
    assert torch.allclose(patched_clean, clean, atol=tol, rtol=0)
    # Same last token, every component patched: the final position is the alternate's.
    assert (enc.base_ids[:, -1] == enc.alt_ids[:, -1]).all()
    assert torch.allclose(patched_alt, alt, atol=max(tol, 1e-5), rtol=0)


def test_padding_equals_running_each_prompt_alone():
    model, sites, enc = setup("gqa", padded=True, n=9)
    with torch.no_grad():
        batch = clean_logits(model, enc.base_ids, enc.base_attn)
        for i in range(len(enc)):
            keep = enc.base_attn[i] == 1
            alone = model(input_ids=enc.base_ids[i, keep][None]).logits[0, -1]
            assert torch.allclose(batch[i], alone, atol=1e-5)


@pytest.mark.parametrize("engine", ["full", "cached"])
def test_mask_gradient_matches_finite_differences(engine):
    torch.manual_seed(0)
    model, sites, enc = setup("gqa", padded=False, n=9)
    model.double()
    eng = make_engine(engine, model, sites)
    prep = eng.prepare(enc)
    d0 = unpatched_logit_diff(eng, prep).double()
    mask = torch.rand(1, *sites.space.shape, dtype=torch.float64, requires_grad=True)

    def objective(m):
        return patched_delta(eng, prep, d0, m).pow(2).mean()

    objective(mask).backward()
    # LLaMA's RMSNorm computes in float32 even in a float64 model, so the step cannot be tiny.
    h = 1e-3
    tol = 1e-3 * mask.grad.abs().max()
    for layer, col in [(0, 0), (0, sites.space.n_heads), (1, 2), (1, sites.space.n_heads)]:
        bump = torch.zeros_like(mask)
        bump[0, layer, col] = h
        with torch.no_grad():
            numeric = (objective(mask + bump) - objective(mask - bump)) / (2 * h)
        assert torch.allclose(mask.grad[0, layer, col], numeric, rtol=1e-2, atol=tol), (layer, col)


@pytest.mark.parametrize("shape", ["gqa", "mha"])
@pytest.mark.parametrize("padded", [False, True])
def test_cached_engine_equals_full_engine(shape, padded):
    torch.manual_seed(0)
    model, sites, enc = setup(shape, padded, n=10)
    mask_init = torch.rand(3, *sites.space.shape)
    results = {}
    for engine in ("full", "cached"):
        eng = make_engine(engine, model, sites)
        prep = eng.prepare(enc)
        d0 = unpatched_logit_diff(eng, prep)
        mask = mask_init.clone().requires_grad_(True)
        loss = arithmetic_desideratum("vd").loss_of(patched_delta(eng, prep, d0, mask), None).sum()
        loss.backward()
        results[engine] = (loss.detach(), mask.grad)
    (loss_f, grad_f), (loss_c, grad_c) = results["full"], results["cached"]
    assert torch.allclose(loss_c, loss_f, rtol=1e-5, atol=1e-7)
    # float32 rounding: the engines sum in different orders. Across ATen's default, avx2 and avx512
    # kernels max |grad_c - grad_f| / max |grad_f| was 0.5-1.8e-6 (up to 15 float32 eps), which reached
    # 90% of the old elementwise bound; a wrong prefix or patch moves the gradient by far more than 1e-5
    assert (grad_c - grad_f).abs().max() <= 1e-5 * grad_f.abs().max()


def test_cached_prefix_is_not_mutated_by_steps():
    model, sites, enc = setup("gqa", padded=True)
    eng = make_engine("cached", model, sites)
    prep = eng.prepare(enc)
    before = [(k.clone(), v.clone()) for k, v in cached_prefix(prep)]
    for k in (2, 2, 3, 1):
        eng.final_hidden(prep, torch.rand(k, *sites.space.shape, requires_grad=True)).sum().backward()
        for (k0, v0), (k1, v1) in zip(before, cached_prefix(prep)):
            assert torch.equal(k0, k1) and torch.equal(v0, v1) and k1.shape == k0.shape
        assert prep.buffers[1][0][0].shape[2] == enc.base_ids.shape[1], "the cache never grows"


def test_hooks_are_removed_even_on_error():
    model, sites, enc = setup("gqa", padded=False)
    eng = make_engine("full", model, sites)
    prep = eng.prepare(enc)
    with pytest.raises(RuntimeError):
        eng.final_hidden(prep, torch.ones(1, 1, 1))  # wrong mask shape fails inside the hook
    assert all(not m._forward_pre_hooks for m in sites.head_projs)
    assert all(not m._forward_hooks for m in sites.mlps)
