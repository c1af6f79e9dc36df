"""Loading the frozen causal LM and its tokenizer from `cfg.model`."""

from __future__ import annotations

import os
from typing import Tuple

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from circuitfind.config import ModelConfig
from circuitfind.errors import CircuitfindError
from circuitfind.organism.checkpoint import load_checkpoint
from circuitfind.tokenizer import build_char_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise CircuitfindError(f"model.dtype={name!r} is unknown; choose from {sorted(DTYPES)}")
    return DTYPES[name]


def build_tiny_llama(cfg: ModelConfig):
    """A random-weight LLaMA and character tokenizer built in code, for smoke runs and tests."""
    tokenizer = build_char_tokenizer()
    t = cfg.tiny
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=t.hidden,
        intermediate_size=t.intermediate,
        num_hidden_layers=t.n_layers,
        num_attention_heads=t.n_heads,
        num_key_value_heads=t.n_kv_heads,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(t.init_seed)
        model = LlamaForCausalLM(config)
    return model, tokenizer


def load_hf(cfg: ModelConfig):
    """A pretrained causal LM from a local directory or the hub cache."""
    path = cfg.name_or_path
    if not path:
        raise CircuitfindError("model=hf needs model.name_or_path=<local directory or hub id>")
    # A hub id is "org/name"; anything else that names no directory is a typo'd local path.
    is_hub_id = path.count("/") <= 1 and not path.startswith((".", "/", "~"))
    if not is_hub_id and not os.path.isdir(os.path.expanduser(path)):
        raise CircuitfindError(f"model.name_or_path={path!r} does not exist; give an existing directory or a hub id")
    try:
        path = os.path.expanduser(path)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype(cfg.dtype), trust_remote_code=cfg.trust_remote_code
        )
    except OSError as e:
        first = str(e).strip().splitlines()[0]
        raise CircuitfindError(f"cannot load model {path!r}: {first}; check model.name_or_path") from e
    return model, tokenizer


def load_organism(cfg: ModelConfig):
    """The model organism shipped in the package (circuitfind/assets/organism), or the one at model.name_or_path."""
    return load_checkpoint(cfg.name_or_path, torch_dtype(cfg.dtype))


LOADERS = {"tiny_llama": build_tiny_llama, "hf": load_hf, "organism": load_organism}


def load_model(cfg: ModelConfig) -> Tuple[torch.nn.Module, object]:
    """The frozen model in eval mode on `cfg.device`, and its tokenizer."""
    if cfg.kind not in LOADERS:
        raise CircuitfindError(f"model.kind={cfg.kind!r} is unknown; choose from {sorted(LOADERS)}")
    model, tokenizer = LOADERS[cfg.kind](cfg)
    model = model.to(device=torch.device(cfg.device), dtype=torch_dtype(cfg.dtype))
    model.eval()
    model.requires_grad_(False)  # only the mask is trained
    return model, tokenizer
