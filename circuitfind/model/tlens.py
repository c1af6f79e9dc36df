"""TransformerLens models (`HookedTransformer`) as a model family.

`TransformerLensLM` wraps a HookedTransformer so that the engines see what they see in a Hugging
Face model: a body (`base_model`) giving the final hidden state, the unembedding (`get_output_embeddings`),
and a forward giving the model's own logits (the self-checks' reference). The units live at
TransformerLens's own hooks (components.py, the `transformer_lens` Adapter):

    heads    blocks.{l}.attn.hook_z      (batch, pos, n_heads, d_head): mixed as n_heads slices side by side
    MLPs     blocks.{l}.hook_mlp_out     (batch, pos, d_model)
    residual blocks.{l} input            (batch, pos, d_model), the same tensor as hook_resid_pre
    neurons  blocks.{l}.mlp.hook_post    (batch, pos, d_mlp)

`engine=cached` keeps each batch's prefix in TransformerLens's own key/value cache, frozen, so
the suffix run per step reads it and never writes it.

A checkpoint directory (model.name_or_path) holds `config.json` (the HookedTransformerConfig's
fields; `save_hooked_transformer` writes one), the weights (`model.safetensors`, or a state dict
`model.pth` / InterpBench's `ll_model.pth`) and a Hugging Face tokenizer.
"""

from __future__ import annotations

import json
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, List, Optional, Tuple

import torch
from torch import nn

from circuitfind.config.choices import CACHE_POLICIES
from circuitfind.errors import CircuitfindError
from circuitfind.model.components import Sites
from circuitfind.model.engine import CachedEngine, FullEngine, Prepared
from circuitfind.model.hooks import SiteValues, record_values
from circuitfind.model.sources import require

INSTALL = "pip install 'circuitfind[tlens]'"
CONFIG_FILES = ("config.json", "ll_model_cfg.json")  # ours; InterpBench's config converted to JSON
WEIGHT_FILES = ("model.safetensors", "model.pth", "ll_model.pth")  # ours, a plain state dict, InterpBench's
WEIGHT_PATTERNS = ("*.safetensors", "*.pth", "*.pt")  # else the directory's one weights file (ll_model_100_100_80.pth)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def require_transformer_lens(what: str) -> None:
    """One line naming the install command when transformer_lens is missing."""
    require("transformer_lens", what, INSTALL, package="transformer-lens")


def new_hooked_transformer(config):
    """An untrained HookedTransformer of `config`, built on the CPU (the caller loads its weights)."""
    from transformer_lens import HookedTransformer

    with warnings.catch_warnings():  # 3.x warns that 4.0 removes HookedTransformer: the extra pins < 4
        warnings.filterwarnings("ignore", "HookedTransformer is deprecated", DeprecationWarning)
        return HookedTransformer(config, move_to_device=False)


@dataclass
class TransformerLensConfig:
    """What circuitfind reads off a model's config, in the names the rest of the tool uses."""

    n_heads: int
    d_head: int
    d_model: int
    d_mlp: int
    num_key_value_heads: int
    final_logit_softcapping: Optional[float]
    model_type: str = "transformer_lens"
    _attn_implementation: str = "eager"  # attention maps come from hook_pattern, whatever is asked

    @property
    def hidden_size(self) -> int:
        return self.d_model

    def get_text_config(self) -> "TransformerLensConfig":
        return self


@dataclass
class _Matrix:
    """A weight (rows are tokens) and an optional bias, as Hugging Face's embedding modules give them."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None


class TransformerLensBody(nn.Module):
    """The blocks and the final norm: the final hidden state before the unembedding."""

    def __init__(self, tl: nn.Module):
        super().__init__()
        self.tl = tl

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, output_attentions=False,
                past_kv_cache=None):  # fmt: skip
        """(B, T) -> last_hidden_state (B, T, d_model). Positions come from the attention mask, as
        TransformerLens computes them (left padding skipped: the same as task.encoding.position_ids)."""
        patterns: List[torch.Tensor] = []
        hooks = []
        if output_attentions:
            for block in self.tl.blocks:  # (B, H, T, T) per layer
                hooks.append(block.attn.hook_pattern.register_forward_hook(lambda m, a, out: patterns.append(out)))
        try:
            resid = self.tl(
                input_ids,
                attention_mask=attention_mask,
                stop_at_layer=self.tl.cfg.n_layers,
                past_kv_cache=past_kv_cache,
            )  # (B, T, d_model), before the final norm
        finally:
            for h in hooks:
                h.remove()
        hidden = self.tl.ln_final(resid) if self.tl.cfg.normalization_type is not None else resid
        return SimpleNamespace(last_hidden_state=hidden, attentions=tuple(patterns) if output_attentions else None)


class TransformerLensLM(nn.Module):
    """A HookedTransformer seen as a causal LM by the engines, the read-out and the self-checks."""

    def __init__(self, tl: nn.Module):
        super().__init__()
        cfg = tl.cfg
        if cfg.attn_only:
            raise CircuitfindError(
                "this TransformerLens model is attention-only (attn_only=True): circuitfind's unit spaces have an MLP "
                "in every layer; give a model with MLPs (attention-only models are not supported)"
            )
        self.tl = tl
        self._body = TransformerLensBody(tl)
        cap = getattr(cfg, "output_logits_soft_cap", -1.0)
        self.config = TransformerLensConfig(
            n_heads=cfg.n_heads,
            d_head=cfg.d_head,
            d_model=cfg.d_model,
            d_mlp=int(cfg.d_mlp or 0),
            num_key_value_heads=int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads),
            final_logit_softcapping=float(cap) if cap and cap > 0 else None,
        )

    # engine=cached runs the suffix on TransformerLens's own key/value cache (make_engine reads this)
    engine_classes = property(lambda self: {"full": FullEngine, "cached": TransformerLensCachedEngine})

    @property
    def base_model(self) -> TransformerLensBody:
        return self._body

    def get_output_embeddings(self) -> _Matrix:
        return _Matrix(self.tl.unembed.W_U.T, self.tl.unembed.b_U)  # (V, d_model), (V,)

    def get_input_embeddings(self) -> _Matrix:
        return _Matrix(self.tl.embed.W_E)  # (V, d_model)

    def set_attn_implementation(self, name: str) -> None:
        """Attention weights always come from hook_pattern: nothing to switch."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        """The HookedTransformer's own forward: its final norm, unembedding and soft-cap. -> logits (B, T, V)"""
        return SimpleNamespace(logits=self.tl(input_ids, attention_mask=attention_mask, return_type="logits"))

    def to(self, device=None, dtype=None, **kwargs):
        """Moved and cast through HookedTransformer.to, which keeps its cfg.device and cfg.dtype in step."""
        if device is not None:
            self.tl.to(device, print_details=False)
        if dtype is not None:
            self.tl.to(dtype, print_details=False)
        return self


class TransformerLensCachedEngine(CachedEngine):
    """engine=cached on a HookedTransformer: each prefix runs once into a TransformerLens key/value
    cache and is kept (cache=device|cpu) or run again per step (recompute). Per step the suffix runs
    on a cache built from K copies of it (row k * B + b), frozen: TransformerLens concatenates the
    suffix's keys and values onto it without storing them, so the kept prefix is never written.

    Unlike the Hugging Face path (SuffixSlotLayer), the K copies and the concatenation are made
    every step: TransformerLens's cache entries have no in-place suffix slots."""

    def __init__(self, model: TransformerLensLM, sites: Sites, cache: str = "device"):
        FullEngine.__init__(self, model, sites)
        if cache not in CACHE_POLICIES:
            raise CircuitfindError(f"cache={cache!r} is unknown; choose from {list(CACHE_POLICIES)}")
        self.cache = cache
        self.tl = model.tl

    @torch.no_grad()
    def _prefix_kv(self, pairs, offset: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """The prefix's keys and values per layer, (B, offset, kvH, D) (TransformerLens's layout)."""
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        cache = TransformerLensKeyValueCache.init_cache(self.tl.cfg, self.device, batch_size=len(pairs))
        self.body(pairs.base_ids[:, :offset].to(self.device), pairs.base_attn[:, :offset].to(self.device),
                  past_kv_cache=cache)  # fmt: skip
        return [(entry.past_keys, entry.past_values) for entry in cache.entries]

    def _frozen_cache(self, kv, prefix_attn: torch.Tensor, k: int):
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
        from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

        entries = []
        for key, val in kv:  # k-major copies: row k * B + b, as the engines lay out K masks
            device = self.device if key.device.type == "cpu" and self.device.type != "cpu" else key.device
            entries.append(TransformerLensKeyValueCacheEntry(
                key.to(device).repeat(k, 1, 1, 1), val.to(device).repeat(k, 1, 1, 1), frozen=True
            ))  # fmt: skip
        return TransformerLensKeyValueCache(entries, prefix_attn.to(self.device), frozen=True)

    def _alt_values_from(self, pairs, where, kv, shared: int):
        """The alternates' site values and final state, run from token `shared` on the base prefix's first
        `shared` keys/values (CachedEngine.prepare)."""
        attn = pairs.alt_attn
        cache = self._frozen_cache([(key[:, :shared], val[:, :shared]) for key, val in kv], attn[:, :shared], 1)
        with record_values(self.sites, where.rows, where.alt_tok - shared) as values:
            out = self.body(
                pairs.alt_ids[:, shared:].to(self.device),
                attention_mask=attn[:, shared:].to(self.device),
                past_kv_cache=cache,
            )
        return values, out.last_hidden_state[:, -1]

    @torch.no_grad()
    def clean_final(self, prep: Prepared, keep: bool = False) -> torch.Tensor:
        """The unpatched final hidden state; no clean run is kept (every circuit runs from the prefix)."""
        return FullEngine.clean_final(self, prep)

    def final_hidden(self, prep: Prepared, mask: torch.Tensor | None, values: SiteValues | None = None) -> torch.Tensor:
        if prep.offset == 0:  # a site at the first token: there is no prefix to keep
            return FullEngine.final_hidden(self, prep, mask, values)
        k, b, n = (1 if mask is None else mask.shape[0]), len(prep.pairs), prep.offset
        kv = prep.prefix_kv if prep.prefix_kv is not None else self._prefix_kv(prep.pairs, n)  # cache=recompute
        attn = prep.pairs.base_attn.repeat(k, 1)
        cache = self._frozen_cache(kv, attn[:, :n], k)
        with self._patched(prep, mask, values, offset=n):
            out = self.body(
                prep.pairs.base_ids[:, n:].repeat(k, 1).to(self.device),
                attention_mask=attn[:, n:].to(self.device),
                past_kv_cache=cache,
            )
        return out.last_hidden_state[:, -1].view(k, b, -1)


def wrap_hooked_transformer(tl: nn.Module, tokenizer: Any = None):
    """(TransformerLensLM, tokenizer) for a HookedTransformer built or loaded in Python; the tokenizer
    is the one given, else the model's own (`tl.tokenizer`); a model without one needs one given."""
    tokenizer = tokenizer if tokenizer is not None else getattr(tl, "tokenizer", None)
    if tokenizer is None:
        raise CircuitfindError(
            "this TransformerLens model has no tokenizer (tracr-converted models have none); give a Hugging Face "
            "tokenizer: wrap_hooked_transformer(model, tokenizer) or tokenizer files in model.name_or_path"
        )
    model = TransformerLensLM(tl)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, torch.device):
        return str(value)
    return value


def save_hooked_transformer(tl: nn.Module, path: str | Path, tokenizer: Any = None) -> Path:
    """Write a HookedTransformer as a checkpoint directory `model=transformer_lens` loads: config.json,
    model.safetensors and (if given) the tokenizer."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {}
    for key, value in tl.cfg.to_dict().items():
        value = _jsonable(value)
        try:
            json.dumps(value)
        except TypeError:
            continue  # derived or runtime-only fields; HookedTransformerConfig recomputes them
        config[key] = value
    (path / "config.json").write_text(json.dumps(config, indent=1))
    save_file({k: v.contiguous() for k, v in tl.state_dict().items()}, str(path / "model.safetensors"))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def _first(path: Path, names) -> Optional[Path]:
    return next((path / n for n in names if (path / n).is_file()), None)


def _weights_file(path: Path) -> Path:
    """The checkpoint's weights: a file named in WEIGHT_FILES, else the directory's only weights file."""
    named = _first(path, WEIGHT_FILES)
    if named is not None:
        return named
    found = sorted({f.name for pattern in WEIGHT_PATTERNS for f in path.glob(pattern) if f.is_file()})
    if len(found) != 1:
        what = f"several weights files ({', '.join(found)})" if found else f"no weights ({', '.join(WEIGHT_FILES)})"
        raise CircuitfindError(f"{path} has {what}; keep one state dict there, or name it {WEIGHT_FILES[1]}")
    return path / found[0]


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _read_weights(weights: Path) -> dict:
    """The state dict of a safetensors file, or of a torch file read with weights_only (no code runs)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if weights.suffix == ".safetensors":
            return load_file(str(weights))
        return torch.load(weights, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
        raise CircuitfindError(
            f"cannot read the weights {weights}: {_first_line(e)}; it is corrupt, truncated or not a plain state "
            "dict: copy it again, or save model.state_dict()"
        ) from None


def load_transformer_lens(cfg) -> tuple[TransformerLensLM, Any]:
    """model=transformer_lens: a HookedTransformer from a checkpoint directory (model.name_or_path)."""
    require_transformer_lens("model=transformer_lens")
    if not cfg.name_or_path:
        raise CircuitfindError(
            "model=transformer_lens needs model.name_or_path=<directory with config.json and weights>"
        )
    path = Path(cfg.name_or_path).expanduser()
    if not path.is_dir():
        raise CircuitfindError(
            f"model.name_or_path={cfg.name_or_path} is not a directory; give the checkpoint directory"
        )
    config_file = _first(path, CONFIG_FILES)
    if config_file is None:
        pickled = ""
        if (path / "ll_model_cfg.pkl").exists():  # InterpBench's: unpickling runs code, so it is never read here
            pickled = " (a pickled ll_model_cfg.pkl is not read: convert it, see docs/transformer_lens.md)"
        raise CircuitfindError(
            f"{path} has no TransformerLens config ({' or '.join(CONFIG_FILES)}){pickled}; "
            "save the model with circuitfind.model.tlens.save_hooked_transformer"
        )
    weights = _weights_file(path)
    if _first(path, TOKENIZER_FILES) is None:
        raise CircuitfindError(
            f"{path} has no tokenizer (tokenizer.json or tokenizer_config.json); save a Hugging Face tokenizer there "
            "with tokenizer.save_pretrained (tracr-converted models have none: build one for their vocabulary)"
        )
    from transformer_lens import HookedTransformerConfig
    from transformers import AutoTokenizer

    try:
        fields = json.loads(config_file.read_text())
        fields.pop("tokenizer_name", None)  # the tokenizer is the directory's: nothing is fetched from the hub
        fields.update(device="cpu", n_devices=1)  # built on the CPU; load_model places it on model.device
        if isinstance(fields.get("dtype"), str):
            fields["dtype"] = getattr(torch, fields["dtype"].replace("torch.", ""))
        config = HookedTransformerConfig.from_dict(fields)
    except (ValueError, TypeError, AttributeError, AssertionError) as e:
        raise CircuitfindError(f"{config_file} is not a HookedTransformerConfig: {_first_line(e)}") from None
    state = _read_weights(weights)
    tl = new_hooked_transformer(config)
    try:
        tl.load_state_dict(state, strict=True)
    except RuntimeError as e:  # torch's message: a heading line, then one line per missing or misshapen tensor
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise CircuitfindError(f"{weights} does not fit {config_file}: {lines[min(1, len(lines) - 1)]}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise CircuitfindError(f"cannot read the tokenizer in {path}: {_first_line(e)}; save it again") from None
    return wrap_hooked_transformer(tl, tokenizer)
