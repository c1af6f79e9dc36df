"""Every supported model family, on a tiny random config built in code.

For each family: all weights 1 reproduce the clean logits, all weights 0 give the alternate's
final-position logits, the cached engine agrees with the full one under a random mask, and a
short training run works end to end through the CLI on the saved model.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers as tf

from circuitfind.errors import CircuitfindError
from circuitfind.model.builtin import build_char_tokenizer
from circuitfind.model.components import ADAPTERS, UnitsChoice, locate_components
from circuitfind.model.engine import make_engine, shared_tokens
from circuitfind.task.encoding import position_ids

from conftest import arithmetic_pairs

SMALL = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64
)

# model_type -> (config class, model class, tiny shape). Grouped-query attention where the
# family has it; an explicit head_dim with n_heads * head_dim != hidden where it can have one.
FAMILIES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(SMALL, num_key_value_heads=2)),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(SMALL, num_key_value_heads=2, head_dim=None)),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(SMALL, num_key_value_heads=2)),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(SMALL, num_key_value_heads=2, head_dim=16)),
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, dict(SMALL, num_key_value_heads=1, head_dim=16)),
    "gemma2": (
        tf.Gemma2Config,
        tf.Gemma2ForCausalLM,
        # Soft-capping of attention and final logits; the sliding window is longer than the prompts.
        dict(SMALL, num_key_value_heads=2, head_dim=16, final_logit_softcapping=5.0, attn_logit_softcapping=5.0),
    ),
    "gemma3_text": (
        tf.Gemma3TextConfig,
        tf.Gemma3ForCausalLM,
        # Gemma 3 270M's shape in miniature: one KV head, QK-norm, a sliding-window layer then a global one.
        dict(SMALL, num_key_value_heads=1, head_dim=16, layer_types=["sliding_attention", "full_attention"]),
    ),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, dict(SMALL, num_key_value_heads=2)),
    "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel, dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, dict(SMALL, rotary_pct=0.5)),
}


def tiny_model(family: str, seed: int = 0, **overrides):
    """A random-weight model of `family` sized for the character tokenizer, frozen, in eval mode."""
    tok = build_char_tokenizer()
    config_cls, model_cls, shape = FAMILIES[family]
    config = config_cls(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **{**shape, **overrides},
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.eval().requires_grad_(False), tok


def encoded_pairs(tok, n: int = 9):
    """VD pairs of mixed prompt lengths, so the batch is left-padded."""
    enc = arithmetic_pairs(tok, "vd", n, padded=True)
    assert (enc.base_attn == 0).any(), "the batch must contain padding"
    assert (enc.base_ids[:, -1] == enc.alt_ids[:, -1]).all(), "same last token in base and alternate"
    return enc


def clean_logits(model, ids, attn):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn)).logits[:, -1]


def test_every_required_family_has_an_adapter_and_a_test():
    required = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox"}
    assert required <= set(ADAPTERS)
    # transformer_lens wraps a HookedTransformer, not a transformers model: tests/test_transformer_lens.py
    assert set(ADAPTERS) - {"transformer_lens"} <= set(FAMILIES), "every adapter is tested on a tiny model below"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_layout_matches_the_config(family):
    model, _ = tiny_model(family)
    layout = locate_components(model).space
    expected_dim = {"qwen3": 16, "gemma": 16, "gemma2": 16, "gemma3_text": 16}.get(family, 8)
    assert (layout.n_layers, layout.n_heads, layout.head_dim) == (2, 4, expected_dim)
    assert model.config.model_type == family


@pytest.mark.parametrize("engine", ["full", "cached"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_all_ones_is_clean_and_all_zeros_is_the_alternate(family, engine):
    model, tok = tiny_model(family)
    enc = encoded_pairs(tok)
    sites = locate_components(model)
    eng = make_engine(engine, model, sites)
    prep = eng.prepare(enc)
    with torch.no_grad():
        patched_clean = eng.readout.logits(eng.final_hidden(prep, torch.ones(1, *sites.space.shape))[0])
        patched_alt = eng.readout.logits(eng.final_hidden(prep, torch.zeros(1, *sites.space.shape))[0])
    clean = clean_logits(model, enc.base_ids, enc.base_attn)
    alt = clean_logits(model, enc.alt_ids, enc.alt_attn)
    assert not torch.allclose(clean, alt, atol=1e-3), "base and alternate differ, so the checks mean something"
    assert torch.allclose(patched_clean, clean, atol=1e-5, rtol=0)
    assert torch.allclose(patched_alt, alt, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_engine_equals_full_engine_under_a_random_mask(family):
    model, tok = tiny_model(family)
    enc = encoded_pairs(tok)
    sites = locate_components(model)
    torch.manual_seed(0)
    mask_init = torch.rand(2, *sites.space.shape)
    out = {}
    for engine in ("full", "cached"):
        eng = make_engine(engine, model, sites)
        prep = eng.prepare(enc)
        mask = mask_init.clone().requires_grad_(True)
        logits = eng.readout.logits(eng.final_hidden(prep, mask))
        logits[..., 10:20].sum().backward()
        out[engine] = (logits.detach(), mask.grad)
    (lf, gf), (lc, gc) = out["full"], out["cached"]
    assert torch.allclose(lc, lf, atol=1e-5, rtol=0)
    assert gf.abs().sum() > 0 and torch.allclose(gc, gf, atol=1e-5 * max(1.0, gf.abs().max().item()), rtol=1e-4)


def scored_by_both_engines(model, sites, enc, masks):
    """The logits of masks scored (not trained) by engine=full and by engine=cached, with the cached engine and
    its prepared batch."""
    out = []
    for engine in ("full", "cached"):
        eng = make_engine(engine, model, sites)
        prep = eng.prepare(enc)
        with torch.no_grad():
            out.append(eng.readout.logits(eng.final_hidden(prep, masks)))
    return *out, eng, prep


@pytest.mark.parametrize("family", list(FAMILIES))
def test_masks_that_patch_later_layers_only_skip_the_first_ones_and_equal_the_full_engine(family):
    """Pruning's circuits: the layers below a mask's first patched layer are skipped (the clean residual
    stream enters that layer), which every family's layer loop must allow."""
    model, tok = tiny_model(family)
    enc = encoded_pairs(tok)
    sites = locate_components(model)
    n_layers = sites.space.n_layers
    torch.manual_seed(0)
    masks = (torch.rand(n_layers, *sites.space.shape) < 0.5).float()
    for layer in range(n_layers):
        masks[layer, :layer] = 1
        masks[layer, layer, 0] = 0
    full, cached, eng, prep = scored_by_both_engines(model, sites, enc, masks)
    assert eng.first_patched(prep, masks)[:, 1].tolist() == list(range(n_layers))
    assert n_layers > 1 and torch.allclose(cached, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_masks_that_share_their_units_before_the_final_token_run_that_part_once_and_equal_the_full_engine(family):
    """Pruning's swap trials: the same units at an earlier token, different ones at the final token. That run
    stops before the final token (its keys/values only), and runs its first layer on the earlier token only (the
    tokens after it enter the next layer clean), which every family's attention must allow."""
    model, tok = tiny_model(family)
    enc = encoded_pairs(tok)
    at = [enc.base_ids.shape[1] - 1, enc.base_ids.shape[1] - 6], [enc.alt_ids.shape[1] - 1, enc.alt_ids.shape[1] - 6]
    enc = replace(
        enc, **{k: torch.tensor(t).view(1, 2, 1).repeat(len(enc), 1, 1) for k, t in zip(("base_pos", "alt_pos"), at)}
    )
    sites = locate_components(model, UnitsChoice(positions=("last", "mid")))
    space = sites.space
    masks = []
    for early in range(space.n_layers):  # one earlier part per layer, each with a later part from every layer
        for late in range(space.n_layers):
            mask = torch.ones(space.n_layers, 2, space.per_position)
            mask[early, 1, 0] = mask[late, 0, 1] = 0
            masks.append(mask)
    masks = torch.stack(masks).view(-1, *space.shape)
    first_layer_tokens = []  # per run, the tokens layer 0 runs on
    count = sites.layer_stack[0].register_forward_pre_hook(
        lambda m, args, kwargs: first_layer_tokens.append((args or [kwargs["hidden_states"]])[0].shape[1]),
        with_kwargs=True,
    )
    with count:
        full, cached, eng, prep = scored_by_both_engines(model, sites, enc, masks)
    assert eng.late_starts(prep, masks).tolist() == [enc.base_ids.shape[1] - 1] * len(masks)
    assert torch.allclose(cached, full, atol=1e-5, rtol=0)
    # the cached engine's last runs: the clean run from the earlier token, the earlier part patched at layer 0 (on
    # its token only, not the five up to the final token), the later parts from layer 0 (the final token)
    assert first_layer_tokens[-3:] == [6, 1, 1]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_alternates_run_from_their_first_token_that_differs_and_equal_the_full_run(family):
    """OI's alternates change the operator only: the tokens before it are the base prompts', whose prefix the
    cached engine runs anyway, so the alternates run from there on its keys/values (and their padding), which
    every family's cache must allow."""
    model, tok = tiny_model(family)
    enc = arithmetic_pairs(tok, "oi", 9, padded=True)
    width, shared = enc.alt_ids.shape[1], shared_tokens(enc)
    assert (enc.base_attn == 0).any() and 0 < shared < width - 1
    sites = locate_components(model)
    full = make_engine("full", model, sites).prepare(enc)
    tokens = []  # per run, the tokens layer 0 runs on
    count = sites.layer_stack[0].register_forward_pre_hook(
        lambda m, args, kwargs: tokens.append((args or [kwargs["hidden_states"]])[0].shape[1]), with_kwargs=True
    )
    with count:
        cached = make_engine("cached", model, sites).prepare(enc)
    assert tokens == [width - 1, width - shared]  # the base prompts' prefix, then the alternates from `shared`
    assert torch.allclose(cached.alt_hidden, full.alt_hidden, atol=1e-5, rtol=0)
    for point, layers in full.alt_values.points.items():
        for ours, theirs in zip(cached.alt_values.points[point], layers, strict=True):
            assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "mistral"])  # gemma2 fails loudly, mistral silently
def test_cached_engine_with_a_sliding_window_shorter_than_the_prompt(family):
    model, tok = tiny_model(family, sliding_window=8)
    enc = encoded_pairs(tok)
    assert enc.base_ids.shape[1] > 8
    sites = locate_components(model)
    mask = torch.rand(1, *sites.space.shape, generator=torch.Generator().manual_seed(0))
    out = []
    for engine in ("full", "cached"):
        eng = make_engine(engine, model, sites)
        with torch.no_grad():
            out.append(eng.readout.logits(eng.final_hidden(eng.prepare(enc), mask)))
    assert torch.allclose(out[0], out[1], atol=1e-5, rtol=0)


def test_unsupported_family_is_one_line_listing_the_supported_ones():
    config = tf.BloomConfig(vocab_size=50, hidden_size=16, n_layer=1, n_head=2)
    model = tf.BloomForCausalLM(config)
    with pytest.raises(CircuitfindError) as e:
        locate_components(model)
    message = str(e.value)
    assert "\n" not in message and "model family 'bloom' is not supported; supported: " in message
    for family in FAMILIES:
        assert family in message


def test_wrong_adapter_is_a_clear_error(monkeypatch):
    from circuitfind.model import components

    model, _ = tiny_model("llama")
    monkeypatch.setitem(components.ADAPTERS, "llama", components.Adapter("model.blocks", "self_attn.o_proj", "mlp"))
    with pytest.raises(CircuitfindError, match="the llama adapter does not match this model"):
        locate_components(model)


def save_tiny(family: str, path: Path) -> None:
    model, tok = tiny_model(family)
    model.save_pretrained(path)
    tok.save_pretrained(path)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_short_training_run_through_the_cli(cli, tmp_path, family):
    save_tiny(family, tmp_path / family)
    run_dir = tmp_path / "run"
    res = cli(
        "train",
        "+desiderata=vd_oi",
        "experiment=smoke",
        "progress=false",
        "plots=false",
        "model=hf",
        f"model.name_or_path={tmp_path / family}",
        f"hydra.run.dir={run_dir}",
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    circuit = json.loads((run_dir / "circuit.json").read_text())
    assert circuit["status"] == "complete" and circuit["model"]["model_type"] == family
    assert circuit["n_components"] == 2 * (4 + 1)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and all(torch.isfinite(torch.tensor(r["vd_loss"])) for r in rows)
