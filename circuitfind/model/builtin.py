"""Models built in code: a character-level tokenizer and small LLaMA configs (tiny_llama, the organism)."""

from __future__ import annotations

import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARACTERS = list(string.digits + string.ascii_lowercase + string.ascii_uppercase + " \n=+-*/()?.,:;")


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A fast tokenizer that splits text into single characters and prepends <s>."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # [\s\S] matches newlines too: each character, newline included, is its own piece.
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
    )


def llama_config(
    tokenizer, n_layers: int, n_heads: int, n_kv_heads: int, hidden: int, intermediate: int, max_positions: int = 128
) -> LlamaConfig:
    """A LlamaConfig for a small model over `tokenizer`'s vocabulary and special tokens."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_llama(cfg):
    """A random-weight LLaMA and character tokenizer built in code, for smoke runs and tests.

    `cfg` is a ModelConfig; its `tiny` part gives the shape and the initialisation seed."""
    tokenizer = build_char_tokenizer()
    t = cfg.tiny
    config = llama_config(tokenizer, t.n_layers, t.n_heads, t.n_kv_heads, t.hidden, t.intermediate)
    with torch.random.fork_rng():
        torch.manual_seed(t.init_seed)
        model = LlamaForCausalLM(config)
    return model, tokenizer
