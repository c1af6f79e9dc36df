"""TransformerLens HookedTransformer models as a family (model/tlens.py), on tiny random models.

Both engines against the model's own logits; a unit patched from the alternate against
TransformerLens's own `run_with_hooks` doing the same patch (an independent reference); the
self-checks; a checkpoint directory through `model=transformer_lens` and the CLI; bad input.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig  # dev installs it: never skipped

from circuitfind.config.schema import ModelConfig
from circuitfind.errors import CircuitfindError
from circuitfind.evaluation.selfcheck import self_checks
from circuitfind.model import tlens
from circuitfind.model.builtin import build_char_tokenizer
from circuitfind.model.components import UnitsChoice, locate_components
from circuitfind.model.engine import make_engine, shared_tokens
from circuitfind.model.loading import load_model

from conftest import arithmetic_pairs

pytestmark = pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning")

SHAPE = dict(n_layers=2, n_heads=4, d_model=32, d_head=8, d_mlp=64, n_ctx=64, act_fn="gelu")
# GPT-2 style with layer norm; without any norm (as tracr-converted models are); LLaMA style: RMSNorm,
# rotary positions, a gated MLP and grouped-query attention.
VARIANTS = {
    "ln": dict(normalization_type="LN"),
    "no_norm": dict(normalization_type=None),
    "rotary_gqa": dict(
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=8,
        act_fn="silu",
        gated_mlp=True,
        n_key_value_heads=2,
    ),  # fmt: skip
}


def tiny_tl(variant: str = "ln", seed: int = 0, **overrides) -> HookedTransformer:
    tok = build_char_tokenizer()
    cfg = HookedTransformerConfig(**{**SHAPE, "d_vocab": len(tok), "seed": seed, **VARIANTS[variant], **overrides})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tl = HookedTransformer(cfg)
        for p in tl.parameters():  # random biases and norm weights too, so every term of the forward counts
            p.data.add_(0.1 * torch.randn_like(p))
    return tl.eval()


@pytest.fixture(scope="module")
def pairs():
    enc = arithmetic_pairs(build_char_tokenizer(), "vd", 9, padded=True)
    assert (enc.base_attn == 0).any(), "the batch must contain padding"
    return enc


def tl_logits(tl, ids, attn, fwd_hooks=()):
    """The HookedTransformer's own final-position logits, TransformerLens's hooks doing any patch. (B, V)"""
    with torch.no_grad():
        return tl.run_with_hooks(ids, attention_mask=attn, return_type="logits", fwd_hooks=list(fwd_hooks))[:, -1]


@pytest.mark.parametrize("engine", ["full", "cached"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_keep_all_is_the_models_own_logits_and_patch_all_the_alternates(variant, engine, pairs):
    tl = tiny_tl(variant)
    model, _ = tlens.wrap_hooked_transformer(tl, build_char_tokenizer())
    sites = locate_components(model)
    assert (sites.space.n_layers, sites.space.n_heads, sites.space.head_dim) == (2, 4, 8)
    eng = make_engine(engine, model, sites)
    assert type(eng).__name__ == {"full": "FullEngine", "cached": "TransformerLensCachedEngine"}[engine]
    prep = eng.prepare(pairs)
    assert engine == "full" or prep.offset > 0, "the cached engine keeps a prefix"
    with torch.no_grad():
        kept = eng.readout.logits(eng.final_hidden(prep, torch.ones(1, *sites.space.shape))[0])
        patched = eng.readout.logits(eng.final_hidden(prep, torch.zeros(1, *sites.space.shape))[0])
    clean = tl_logits(tl, pairs.base_ids, pairs.base_attn)
    alt = tl_logits(tl, pairs.alt_ids, pairs.alt_attn)
    assert not torch.allclose(clean, alt, atol=1e-3), "base and alternate differ, so the checks mean something"
    assert torch.allclose(kept, clean, atol=1e-5, rtol=0)
    assert torch.allclose(patched, alt, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_alternates_run_from_their_first_token_that_differs_on_the_prefix_cache(variant):
    """OI's alternates share every token before the operator with their bases: the cached engine runs them from
    there on TransformerLens's frozen cache of the base prefix, and records what a whole run records."""
    model, _ = tlens.wrap_hooked_transformer(tiny_tl(variant), build_char_tokenizer())
    sites = locate_components(model)
    enc = arithmetic_pairs(build_char_tokenizer(), "oi", 9, padded=True)
    assert 0 < shared_tokens(enc) < enc.alt_ids.shape[1] - 1
    full, cached = (make_engine(engine, model, sites).prepare(enc) for engine in ("full", "cached"))
    assert torch.allclose(cached.alt_hidden, full.alt_hidden, atol=1e-5, rtol=0)
    for point, layers in full.alt_values.points.items():
        for ours, theirs in zip(cached.alt_values.points[point], layers, strict=True):
            assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)


def _alt_value(tl, pairs, hook: str) -> torch.Tensor:
    """The alternate prompts' value at `hook`, final token, through TransformerLens's own cache."""
    with torch.no_grad():
        _, cache = tl.run_with_cache(pairs.alt_ids, attention_mask=pairs.alt_attn, names_filter=hook)
    return cache[hook][:, -1]


# (units.kind, unit name, TransformerLens hook, the slice of the hook's final-position value it covers)
UNITS = [
    ("heads_mlps", "L1.H2", "blocks.1.attn.hook_z", (slice(None), 2)),  # (B, n_heads, d_head): head 2
    ("heads_mlps", "L0.H0", "blocks.0.attn.hook_z", (slice(None), 0)),
    ("heads_mlps", "L0.MLP", "blocks.0.hook_mlp_out", (slice(None),)),
    ("residual", "L1.resid@last", "blocks.1.hook_resid_pre", (slice(None),)),
    ("neurons", "L0.MLP[16:32]@last", "blocks.0.mlp.hook_post", (slice(None), slice(16, 32))),
]


@pytest.mark.parametrize("engine", ["full", "cached"])
@pytest.mark.parametrize("kind,name,hook,where", UNITS, ids=[u[1] for u in UNITS])
@pytest.mark.parametrize("variant", ["ln", "rotary_gqa"])
def test_one_unit_patched_equals_transformer_lens_run_with_hooks(variant, kind, name, hook, where, engine, pairs):
    tl = tiny_tl(variant)
    model, _ = tlens.wrap_hooked_transformer(tl, build_char_tokenizer())
    sites = locate_components(model, UnitsChoice(kind=kind, group_size=16 if kind == "neurons" else 1))
    unit = sites.space.index([name])[0]
    mask = torch.ones(1, *sites.space.shape)
    mask[0, unit.layer, unit.col] = 0.0
    eng = make_engine(engine, model, sites)
    with torch.no_grad():
        ours = eng.readout.logits(eng.final_hidden(eng.prepare(pairs), mask)[0])
    alt = _alt_value(tl, pairs, hook)

    def patch(value, hook):  # value (B, pos, ...): the final token's slice from the alternate
        value = value.clone()
        value[(slice(None), -1) + where[1:]] = alt[where]
        return value

    reference = tl_logits(tl, pairs.base_ids, pairs.base_attn, [(hook, patch)])
    clean = tl_logits(tl, pairs.base_ids, pairs.base_attn)
    assert (reference - clean).abs().max() > 1e-4, "the patch moves the logits, so the comparison means something"
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cache", ["device", "cpu", "recompute"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_engine_equals_full_engine_under_a_random_mask(variant, cache, pairs):
    tl = tiny_tl(variant)
    model, _ = tlens.wrap_hooked_transformer(tl, build_char_tokenizer())
    sites = locate_components(model)
    mask_init = torch.rand(2, *sites.space.shape, generator=torch.Generator().manual_seed(0))
    out = {}
    for engine in ("full", "cached"):
        eng = make_engine(engine, model, sites, cache)
        prep = eng.prepare(pairs)
        for _ in range(2):  # a second step sees the same prefix: the frozen cache was not written
            mask = mask_init.clone().requires_grad_(True)
            logits = eng.readout.logits(eng.final_hidden(prep, mask))
            logits[..., 10:20].sum().backward()
            out.setdefault(engine, []).append((logits.detach(), mask.grad))
    (lf, gf), (lc, gc) = out["full"][0], out["cached"][-1]
    assert gf.abs().sum() > 0
    assert torch.allclose(lc, lf, atol=1e-5, rtol=0)
    assert torch.allclose(gc, gf, atol=1e-5 * max(1.0, gf.abs().max().item()), rtol=1e-4)


@pytest.mark.parametrize("engine", ["full", "cached"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_self_checks_pass(variant, engine, pairs):
    model, _ = tlens.wrap_hooked_transformer(tiny_tl(variant), build_char_tokenizer())
    eng = make_engine(engine, model, locate_components(model))
    results = self_checks(eng, pairs)["results"]
    assert set(results) >= {"model", "keep_all", "patch_all"} | ({"cached_full"} if engine == "cached" else set())
    assert all(r["passed"] for r in results.values())


def test_self_check_model_catches_a_readout_that_is_not_the_models(pairs):
    tl = tiny_tl("ln", output_logits_soft_cap=2.0)  # TransformerLens caps its logits; the read-out must too
    model, _ = tlens.wrap_hooked_transformer(tl, build_char_tokenizer())
    eng = make_engine("full", model, locate_components(model))
    assert self_checks(eng, pairs)["results"]["model"]["passed"]
    eng.readout.softcap = None
    with pytest.raises(CircuitfindError, match="self-check model failed"):
        self_checks(eng, pairs)


@pytest.mark.parametrize("variant", ["ln", "rotary_gqa"])
def test_attention_maps_are_transformer_lens_hook_pattern(variant, pairs):
    from circuitfind.evaluation.attention import attention_maps

    tl = tiny_tl(variant)
    model, _ = tlens.wrap_hooked_transformer(tl, build_char_tokenizer())
    maps = attention_maps(model, pairs.base_ids, pairs.base_attn)  # per layer (B, H, T, T)
    with torch.no_grad():
        _, cache = tl.run_with_cache(pairs.base_ids, attention_mask=pairs.base_attn)
    assert len(maps) == 2
    for layer, weights in enumerate(maps):
        assert torch.equal(weights, cache[f"blocks.{layer}.attn.hook_pattern"])


def save_tiny(path, variant: str = "ln", tokenizer: bool = True):
    tl = tiny_tl(variant)
    tlens.save_hooked_transformer(tl, path, build_char_tokenizer() if tokenizer else None)
    return tl


@pytest.mark.parametrize("variant", ["no_norm", "rotary_gqa"])
def test_checkpoint_directory_loads_as_the_same_model(tmp_path, variant, pairs):
    tl = save_tiny(tmp_path, variant)
    loaded = load_model(ModelConfig(kind="transformer_lens", name_or_path=str(tmp_path)))
    assert loaded.model.config.model_type == "transformer_lens" and len(loaded.tokenizer) == tl.cfg.d_vocab
    ours = loaded.model(pairs.base_ids, attention_mask=pairs.base_attn).logits[:, -1]
    assert torch.equal(ours, tl_logits(tl, pairs.base_ids, pairs.base_attn))


@pytest.mark.parametrize("weights", ["ll_model.pth", "ll_model_100_100_80.pth"])
def test_interpbench_state_dict_file_loads(tmp_path, weights, pairs):
    tl = save_tiny(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(tl.state_dict(), tmp_path / weights)
    (tmp_path / "config.json").rename(tmp_path / "ll_model_cfg.json")
    loaded = load_model(ModelConfig(kind="transformer_lens", name_or_path=str(tmp_path)))
    ours = loaded.model(pairs.base_ids, attention_mask=pairs.base_attn).logits[:, -1]
    assert torch.equal(ours, tl_logits(tl, pairs.base_ids, pairs.base_attn))


def _load_error(path) -> str:
    with pytest.raises(CircuitfindError) as e:
        load_model(ModelConfig(kind="transformer_lens", name_or_path=str(path) if path else None))
    message = str(e.value)
    assert "\n" not in message
    return message


def test_bad_checkpoint_directories_are_one_line(tmp_path):
    assert "needs model.name_or_path" in _load_error(None)
    assert "is not a directory" in _load_error(tmp_path / "absent")
    save_tiny(tmp_path / "no_config")
    (tmp_path / "no_config" / "config.json").unlink()
    assert "has no TransformerLens config (config.json or ll_model_cfg.json)" in _load_error(tmp_path / "no_config")
    (tmp_path / "no_config" / "ll_model_cfg.pkl").write_bytes(b"")
    assert "ll_model_cfg.pkl is not read" in _load_error(tmp_path / "no_config")
    save_tiny(tmp_path / "no_weights")
    (tmp_path / "no_weights" / "model.safetensors").unlink()
    assert "has no weights" in _load_error(tmp_path / "no_weights")
    for name in ("a.pth", "b.pt"):
        (tmp_path / "no_weights" / name).write_bytes(b"")
    assert "has several weights files (a.pth, b.pt)" in _load_error(tmp_path / "no_weights")
    (tmp_path / "no_weights" / "b.pt").unlink()
    assert "cannot read the weights" in _load_error(tmp_path / "no_weights")  # an empty a.pth
    save_tiny(tmp_path / "truncated")
    weights = tmp_path / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert "cannot read the weights" in _load_error(tmp_path / "truncated")
    save_tiny(tmp_path / "no_tokenizer", tokenizer=False)
    assert "has no tokenizer" in _load_error(tmp_path / "no_tokenizer")
    save_tiny(tmp_path / "wrong_shape")
    config = json.loads((tmp_path / "wrong_shape" / "config.json").read_text())
    (tmp_path / "wrong_shape" / "config.json").write_text(json.dumps({**config, "d_mlp": 48}))
    assert "does not fit" in _load_error(tmp_path / "wrong_shape")
    (tmp_path / "wrong_shape" / "config.json").write_text(json.dumps({"n_layers": 2}))
    assert "is not a HookedTransformerConfig" in _load_error(tmp_path / "wrong_shape")


def test_transformer_lens_not_installed_is_one_line(tmp_path, monkeypatch):
    save_tiny(tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "transformer_lens" else real(name, *a)
    )
    assert _load_error(tmp_path) == (
        "model=transformer_lens needs the transformer-lens package, which is not installed: "
        "pip install 'circuitfind[tlens]'"
    )


def test_attention_only_and_tokenizerless_models_are_one_line():
    with pytest.raises(CircuitfindError, match=r"attention-only \(attn_only=True\)"):
        tlens.wrap_hooked_transformer(tiny_tl("ln", attn_only=True), build_char_tokenizer())
    with pytest.raises(CircuitfindError, match="has no tokenizer.*give a Hugging Face tokenizer"):
        tlens.wrap_hooked_transformer(tiny_tl("no_norm"))


def test_short_training_run_through_the_cli(cli, tmp_path):
    save_tiny(tmp_path / "tl", "no_norm")
    run_dir = tmp_path / "run"
    res = cli(
        "train", "+desiderata=vd_oi", "experiment=smoke", "progress=false", "plots=false", "model=transformer_lens",
        f"model.name_or_path={tmp_path / 'tl'}", f"hydra.run.dir={run_dir}", timeout=180,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    circuit = json.loads((run_dir / "circuit.json").read_text())
    assert circuit["status"] == "complete" and circuit["model"]["model_type"] == "transformer_lens"
    assert circuit["n_components"] == 2 * (4 + 1)
    assert all(check["passed"] for check in circuit["checks"]["results"].values())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and all(torch.isfinite(torch.tensor(r["vd_loss"])) for r in rows)
