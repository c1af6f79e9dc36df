"""Self-checks before every search and evaluation, on a few pairs: the silent failures other tools
shipped (a cached prefix built from the wrong rows; a wrapped model whose outputs are not the
model's) stop the run with one line here instead.

model        the engine's clean final logits equal the unhooked Hugging Face model's
keep_all     a mask that keeps every unit gives the unhooked run's final state bit for bit
patch_all    a mask that patches every unit changes the logits
cached_full  the cached engine gives the full engine's final state and mask gradient
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from circuitfind.errors import CircuitfindError
from circuitfind.model.engine import CachedEngine, Engine, FullEngine
from circuitfind.task.encoding import EncodedPairs, position_ids

N_PAIRS = 4
# (absolute, relative to the largest magnitude compared): float32 rounding, or a few steps of the low-precision type
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.float16: (1e-3, 4e-3), torch.bfloat16: (1e-2, 3e-2)}


def tolerance(reference: torch.Tensor, dtype: torch.dtype) -> float:
    absolute, relative = TOLERANCES.get(dtype, TOLERANCES[torch.bfloat16])
    return absolute + relative * float(reference.abs().max())


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float().to(a.device)).abs().max())


def agreement(what: str, ours: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> Dict[str, Any]:
    diff, tol = max_diff(ours, reference), tolerance(reference, dtype)
    return {"what": what, "passed": diff <= tol, "max_abs_diff": diff, "tolerance": tol}


@torch.no_grad()
def model_logits(engine: Engine, pairs: EncodedPairs) -> torch.Tensor:
    """The Hugging Face model's own final-position logits, no hook in place. (B, V)"""
    attn = pairs.base_attn
    out = engine.model(
        input_ids=pairs.base_ids.to(engine.device),
        attention_mask=attn.to(engine.device),
        position_ids=position_ids(attn).to(engine.device),
        use_cache=False,
    )
    return out.logits[:, -1]


def mask_gradient(engine: Engine, pairs: EncodedPairs, mask: torch.Tensor):
    """The final state under a mask, and the gradient of a logit difference with respect to the mask."""
    prep = engine.prepare(pairs)
    mask = mask.clone().requires_grad_(True)
    hidden = engine.final_hidden(prep, mask)
    engine.readout.logit_diff(hidden, pairs.up, pairs.down).sum().backward()
    return hidden.detach(), mask.grad


def self_checks(engine: Engine, encoded: EncodedPairs) -> Dict[str, Any]:
    """Run every check on the first few pairs; a failed one stops the run with one line."""
    pairs = next(encoded.chunks(N_PAIRS))
    dtype = engine.readout.weight.dtype
    shape = engine.space.shape
    results: Dict[str, Dict[str, Any]] = {}
    with torch.no_grad():
        reference = model_logits(engine, pairs)
        finite = torch.isfinite(reference).all(-1)
        if not bool(finite.all()):
            raise CircuitfindError(
                f"self-check model failed: the model's own logits are not finite (NaN or inf) on "
                f"{int((~finite).sum())} of the first {len(pairs)} prompts, before anything is patched; its weights "
                "hold NaN or inf, or model.dtype overflows (float16: try bfloat16)"
            )
        clean = engine.readout.logits(engine.clean_hidden(pairs.base_ids, pairs.base_attn))
        results["model"] = agreement(
            "the engine's clean final logits against the unhooked model's", clean, reference, dtype
        )
        prep = engine.prepare(pairs)
        unhooked = engine.final_hidden(prep, None)
        kept = engine.final_hidden(prep, torch.ones(1, *shape, device=engine.device))
        results["keep_all"] = {
            "what": "a keep-everything mask against the same run with no hook",
            "passed": bool(torch.equal(kept, unhooked)),
            "max_abs_diff": max_diff(kept, unhooked),
            "tolerance": 0.0,
        }
        patched = engine.readout.logits(engine.final_hidden(prep, torch.zeros(1, *shape, device=engine.device)))[0]
        base = engine.readout.logits(unhooked)[0]
        moved, tol = max_diff(patched, base), tolerance(base, dtype)
        results["patch_all"] = {
            "what": "a patch-everything mask must change the logits",
            "passed": moved > tol,
            "max_abs_diff": moved,
            "tolerance": tol,
        }
    if isinstance(engine, CachedEngine):
        mask = torch.rand(1, *shape, generator=torch.Generator().manual_seed(0)).to(engine.device)
        h_cached, g_cached = mask_gradient(engine, pairs, mask)
        h_full, g_full = mask_gradient(FullEngine(engine.model, engine.sites), pairs, mask)
        results["cached_full"] = agreement(
            "the cached engine's final state against the full engine's", h_cached, h_full, dtype
        )
        results["cached_full_gradient"] = agreement(
            "the cached engine's mask gradient against the full engine's", g_cached, g_full, dtype
        )
    for name, result in results.items():
        if not result["passed"]:
            raise CircuitfindError(
                f"self-check {name} failed: {result['what']} (max difference {result['max_abs_diff']:.3g}, "
                f"tolerance {result['tolerance']:.3g}); results on this model would be wrong, so the run stops: "
                "report it with the model's name, or run with checks=false to skip the checks"
            )
    return {"pairs": len(pairs), "dtype": str(dtype).replace("torch.", ""), "results": results}
