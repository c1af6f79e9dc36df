"""`model=tracr`: a RASP program compiled by tracr, converted to a TransformerLens HookedTransformer.

    compile    tracr's own steps (RASP graph -> bases -> craft blocks -> craft model -> assembled model),
               kept apart so that the graph and the craft model are at hand for the ground truth
    convert    the assembled model's haiku params -> HookedTransformer weights (no layer norm,
               attention both ways, ReLU MLPs); each vocabulary item is one token of TracrTokenizer
    truth      which RASP node each head (L{l}.H{h}) and MLP (L{l}.MLP) implements, and what each node reads
               where (skipping the inputs a Map or SequenceMap's function ignores over the values it can see);
               from it, which units the output depends on at all, and a run's truth (tracr_truth.py,
               TracrLM.graph_truth, evaluation/planted.py)
    cache      ~/.cache/circuitfind/tracr/<program>-<hash>/ ($XDG_CACHE_HOME respected): config.json,
               model.safetensors, tracr.json; a second run loads it without importing tracr or jax

The HookedTransformer attends both ways (tracr's models are not causal), so a prefix's values change
with the tokens after it: engine=cached runs as engine=full. Left padding is masked out of every
head's keys, as tracr masks its pad token.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch

from circuitfind.errors import CircuitfindError
from circuitfind.model.engine import FullEngine
from circuitfind.model.tlens import (
    TransformerLensBody,
    TransformerLensLM,
    new_hooked_transformer,
    require_transformer_lens,
)
from circuitfind.model.tracr_truth import GraphTruth, depends_on, graph_truth
from circuitfind.task.rasp_programs import INSTALL, PROGRAMS, TracrProgram, output_values, value_text

log = logging.getLogger(__name__)
CONVERTER_VERSION = 2  # part of the cache key: a changed conversion compiles again
BOS, PAD = "BOS", "PAD"  # the tokenizer's names for tracr's compiler_bos and compiler_pad
MASKED = -1e30  # a pad key's attention score, as tracr writes it
NOT_AN_OUTPUT = -1e4  # the logit of a token that is no output of the program (BOS, PAD, inputs only)


def program_spec(name: Optional[str]) -> TracrProgram:
    """The library's program called `name`, or one line listing them."""
    if not name:
        raise CircuitfindError(f"model=tracr needs model.program=<name>; choose from {sorted(PROGRAMS)}")
    if name not in PROGRAMS:
        raise CircuitfindError(f"model.program={name!r} is not a tracr program here; choose from {sorted(PROGRAMS)}")
    return PROGRAMS[name]


def require_tracr() -> None:
    """One line naming the install command when tracr or jax is missing."""
    for module, package in (("jax", "jax"), ("haiku", "dm-haiku"), ("tracr", "tracr-pypi")):
        if importlib.util.find_spec(module) is None:
            raise CircuitfindError(f"model=tracr compiles with {package}, which is not installed: {INSTALL}")


# ---------------------------------------------------------------------------------------------- compile


def compile_program(spec: TracrProgram) -> Tuple[Any, Dict[str, np.ndarray], Dict[str, Any]]:
    """Compile and convert one program. -> (tracr's assembled model, HookedTransformer state, meta)

    meta holds the HookedTransformer config (`tl_config`), the tokens, the output's kind and the ground truth."""
    require_tracr()
    from tracr.compiler import (
        assemble,
        basis_inference,
        craft_graph_to_model,
        craft_model_to_transformer,
        expr_to_craft_graph,
        nodes,
        rasp_to_graph,
        validating,
    )
    from tracr.craft import bases
    from tracr.rasp import rasp

    start = time.perf_counter()
    program = spec.build()
    bad = validating.static_validate(program)
    if bad:
        raise CircuitfindError(f"tracr cannot compile program {spec.name}: {bad[0].expr.name}: {bad[0].reason}")
    bos, pad = "compiler_bos", "compiler_pad"
    # compiling.compile_rasp_to_model's steps, with the graph and the craft model kept
    extracted = rasp_to_graph.extract_rasp_graph(program)
    graph, sources, sink = extracted.graph, extracted.sources, extracted.sink
    basis_inference.infer_bases(graph, sink, set(spec.vocab), spec.max_seq_len)
    expr_to_craft_graph.add_craft_components_to_rasp_graph(graph, bos_dir=bases.BasisDirection(rasp.tokens.label, bos))
    craft_model = craft_graph_to_model.craft_graph_to_model(graph, sources)
    assembled = craft_model_to_transformer.craft_model_to_transformer(
        craft_model=craft_model,
        graph=graph,
        sink=sink,
        max_seq_len=spec.max_seq_len,
        compiler_bos=bos,
        compiler_pad=pad,
    )
    # the spaces assemble_craft_model joined into the residual stream, rebuilt to read the output off it
    tokens_space = bases.VectorSpaceWithBasis.from_values(rasp.tokens.label, set(spec.vocab) | {bos, pad})
    indices_space = bases.VectorSpaceWithBasis.from_values(rasp.indices.label, range(spec.max_seq_len))
    output_space = bases.VectorSpaceWithBasis(sink[nodes.OUTPUT_BASIS])
    residual = bases.join_vector_spaces(craft_model.residual_space, tokens_space, indices_space, output_space)
    if [str(d) for d in residual.basis] != list(assembled.residual_labels):
        raise CircuitfindError(f"tracr program {spec.name}: the residual stream rebuilt differs from tracr's")
    readout = np.stack([residual.vector_from_basis_direction(d).magnitudes for d in output_space.basis], 1)  # (D, O)

    categorical = rasp.is_categorical(sink[nodes.EXPR])
    if categorical:
        outputs, values = [d.value for d in output_space.basis], []
    else:  # each value the output can take becomes a token (value_text), read off the value (see convert)
        values = output_values(spec.name)
        outputs = [value_text(v) for v in values]
        if len(set(outputs)) != len(outputs):
            raise CircuitfindError(f"tracr program {spec.name}: two output values are written alike ({outputs})")
    tokens = token_list(spec.vocab, outputs)
    state, tl_config = convert(assembled, spec, tokens, outputs, values, readout)
    _, module_names = assemble._get_model_config_and_module_names(craft_model)
    units = units_by_node(graph, craft_model, module_names)
    reads = graph_reads(graph, units)
    truth = sorted(depends_on(reads, sink[nodes.ID]), key=_unit_order)
    meta = {
        "program": spec.name,
        "summary": spec.summary,
        "vocab": list(spec.vocab),
        "max_seq_len": spec.max_seq_len,
        "tokens": tokens,  # token id -> item (BOS, PAD, the inputs, then outputs that are no input)
        "outputs": outputs,  # categorical: the output values, in the order of tracr's output space
        "categorical": bool(categorical),
        "readout": readout.T.tolist() if not categorical else None,  # numerical: the output's direction
        "output_node": sink[nodes.ID],
        "units": {label: us for label, us in units.items()},  # RASP node -> the units implementing it
        "truth": truth,
        "graph": reads,  # what each node reads, where: the cuts of tracr_truth.py
        "tl_config": tl_config,
        "tracr_version": _version("tracr-pypi"),
        "compile_seconds": round(time.perf_counter() - start, 2),
    }
    return assembled, state, meta


def token_list(vocab: Sequence[Any], outputs: Sequence[Any]) -> List[Any]:
    """BOS, PAD, the input items, then the output items that are no input item (one token per text)."""
    tokens: List[Any] = [BOS, PAD]
    for item in list(vocab) + list(outputs):
        if str(item) not in {str(t) for t in tokens}:
            tokens.append(item)
    return tokens


def convert(assembled, spec: TracrProgram, tokens: List[Any], outputs: List[Any], values: List[float],
            readout: np.ndarray) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:  # fmt: skip
    """tracr's haiku params as HookedTransformer weights. -> (state dict of arrays, config fields)

    The unembedding: a categorical output's value directions are its tokens' logits. A numerical output
    (`values` given, `outputs` their texts) has one direction, whose read value v = resid . u scores each
    possible value x as logit[x] = (2 x v - x^2) / g^2 = (v^2 - (v - x)^2) / g^2, g the smallest gap between two
    values: the argmax is the nearest value, a value read exactly wins by at least 1 (as a categorical output's
    token does), and logit[a] - logit[b] = ((v - b)^2 - (v - a)^2) / g^2 is positive when v is nearer a. Tokens
    that are no output get NOT_AN_OUTPUT, so that they never win."""
    params, mc = assembled.params, assembled.model_config
    n_heads, d_head = mc.num_heads, mc.key_size
    embed = np.asarray(params["token_embed"]["embeddings"])  # (tracr input ids, D)
    d_model = embed.shape[1]
    encoding = assembled.input_encoder.encoding_map  # tracr's input item -> its row
    names = {BOS: "compiler_bos", PAD: "compiler_pad"}
    w_e = np.zeros((len(tokens), d_model), np.float32)  # an output item that is no input: a zero row, never an input
    for i, item in enumerate(tokens):
        key = names.get(item, item) if isinstance(item, str) else item
        if key in encoding:
            w_e[i] = embed[encoding[key]]
    texts = [str(t) for t in tokens]
    w_u = np.zeros((d_model, len(tokens)), np.float32)
    b_u = np.full(len(tokens), NOT_AN_OUTPUT, np.float32)
    scale = 1 / min(np.diff(values)) ** 2 if len(values) > 1 else 1.0  # numerical: the nearest value wins by >= 1
    for o, item in enumerate(outputs):
        column = texts.index(str(item))
        if values:  # numerical: logit[x] = (2 x v - x^2) / g^2
            w_u[:, column], b_u[column] = 2 * scale * values[o] * readout[:, 0], -scale * values[o] ** 2
        else:
            w_u[:, column], b_u[column] = readout[:, o], 0.0
    n_ctx = spec.max_seq_len + 1
    state: Dict[str, np.ndarray] = {
        "embed.W_E": w_e,
        "pos_embed.W_pos": np.asarray(params["pos_embed"]["embeddings"])[:n_ctx],  # (n_ctx, D): BOS's row is 0
        "unembed.W_U": w_u,
        "unembed.b_U": b_u,
    }

    def linear(name: str) -> Tuple[np.ndarray, np.ndarray]:
        p = params[name]
        w = np.asarray(p["w"])
        return w, np.asarray(p["b"]) if "b" in p else np.zeros(w.shape[1], np.float32)

    for layer in range(mc.num_layers):
        attn, mlp = f"transformer/layer_{layer}/attn", f"transformer/layer_{layer}/mlp"
        for tracr_name, tl_name in (("query", "Q"), ("key", "K"), ("value", "V")):
            w, b = linear(f"{attn}/{tracr_name}")  # (D, H * d_head)
            state[f"blocks.{layer}.attn.W_{tl_name}"] = w.reshape(d_model, n_heads, d_head).transpose(1, 0, 2)
            state[f"blocks.{layer}.attn.b_{tl_name}"] = b.reshape(n_heads, d_head)
        w, b = linear(f"{attn}/linear")  # (H * d_head, D)
        state[f"blocks.{layer}.attn.W_O"] = w.reshape(n_heads, d_head, d_model)
        state[f"blocks.{layer}.attn.b_O"] = b
        w, b = linear(f"{mlp}/linear_1")
        state[f"blocks.{layer}.mlp.W_in"], state[f"blocks.{layer}.mlp.b_in"] = w, b
        w, b = linear(f"{mlp}/linear_2")
        state[f"blocks.{layer}.mlp.W_out"], state[f"blocks.{layer}.mlp.b_out"] = w, b
    tl_config = {
        "n_layers": mc.num_layers,
        "d_model": d_model,
        "d_head": d_head,
        "n_heads": n_heads,
        "d_mlp": mc.mlp_hidden_size,
        "n_ctx": n_ctx,
        "d_vocab": len(tokens),
        "d_vocab_out": len(tokens),
        "act_fn": "relu",
        "normalization_type": None,
        "attention_dir": "bidirectional",  # tracr's models are not causal
        "positional_embedding_type": "standard",
        "default_prepend_bos": False,
        "original_architecture": "tracr",
    }
    return {k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}, tl_config


# ---------------------------------------------------------------------------------------------- truth


def units_by_node(graph, craft_model, module_names: List[str]) -> Dict[str, List[str]]:
    """RASP node label -> the units (L{l}.H{h}, L{l}.MLP) its craft blocks became in the assembled model.

    A head is found by identity (tracr keeps each node's AttentionHead in the layer's MultiAttentionHead);
    an MLP by its hidden neurons (MLPs of a layer are merged into a new MLP that keeps their neurons)."""
    from tracr.compiler import nodes
    from tracr.craft import transformers

    heads: Dict[int, str] = {}  # id(AttentionHead) -> unit
    mlps: List[Tuple[set, str]] = []  # (hidden neurons, unit)
    for module, name in zip(craft_model.blocks, module_names):
        layer = int(name.split("/")[1].removeprefix("layer_"))
        if isinstance(module, transformers.MLP):
            mlps.append((set(module.fst.output_space.basis), f"L{layer}.MLP"))
        else:
            for h, head in enumerate(module.as_multi().heads()):
                heads[id(head)] = f"L{layer}.H{h}"

    def parts(block) -> List[Any]:
        if isinstance(block, transformers.SeriesWithResiduals):
            return [p for b in block.blocks for p in parts(b)]
        if isinstance(block, transformers.MultiAttentionHead):
            return list(block.heads())
        return [block]

    out: Dict[str, List[str]] = {}
    for label, node in graph.nodes.items():
        block = node.get(nodes.MODEL_BLOCK)
        if block is None:
            continue
        found = []
        for part in parts(block):
            if isinstance(part, transformers.AttentionHead):
                found.append(heads[id(part)])
            else:
                hidden = set(part.fst.output_space.basis)
                found += [unit for neurons, unit in mlps if hidden and hidden <= neurons]
        out[label] = sorted(set(found), key=_unit_order)
    return out


def live_children(expr, graph) -> List[Any]:
    """The children of a RASP expression its value can change with (all of them, but for a function's
    input it ignores: a SequenceMap constant in one argument, a Map constant over its input's values)."""
    from tracr.compiler import nodes
    from tracr.rasp import rasp

    def values(child) -> List[Any]:
        return sorted(graph.nodes[child.label][nodes.VALUE_SET], key=repr)

    try:
        if isinstance(expr, rasp.SequenceMap):
            xs, ys = values(expr.fst), values(expr.snd)
            live = []
            if any(len({expr.f(x, y) for x in xs}) > 1 for y in ys):
                live.append(expr.fst)
            if any(len({expr.f(x, y) for y in ys}) > 1 for x in xs):
                live.append(expr.snd)
            return live
        if isinstance(expr, rasp.Map):
            return [expr.inner] if len({expr.f(x) for x in values(expr.inner)}) > 1 else []
    except Exception:  # a function that cannot run on a value set: keep every input (the safe side)
        pass
    return list(expr.children)


def graph_reads(graph, units: Dict[str, List[str]]) -> Dict[str, Dict[str, Any]]:
    """Per RASP node: the nodes it reads at its own position (`here`), those it reads at every position
    (`everywhere`: an attention's keys and values), and its units in order (a SelectorWidth's head, then
    its MLP). A selector that selects all or nothing (TRUE, FALSE) reads nothing of its keys and queries."""
    from tracr.compiler import nodes
    from tracr.rasp import rasp

    def selector_reads(sel) -> Tuple[List[str], List[str]]:
        if isinstance(sel, rasp.Select):
            if sel.predicate in (rasp.Comparison.TRUE, rasp.Comparison.FALSE):
                return [], []
            return [sel.queries.label], [sel.keys.label]
        here, everywhere = [], []
        for child in sel.children:  # SelectAnd, SelectOr, SelectNot
            q, k = selector_reads(child)
            here, everywhere = here + q, everywhere + k
        return here, everywhere

    out = {}
    for label, node in graph.nodes.items():
        expr = node[nodes.EXPR]
        if isinstance(expr, rasp.Aggregate):
            here, keys = selector_reads(expr.selector)
            everywhere = keys + [expr.sop.label]
        elif isinstance(expr, rasp.SelectorWidth):
            here, everywhere = selector_reads(expr.selector)
        else:
            here, everywhere = [c.label for c in live_children(expr, graph)], []
        out[label] = {"here": sorted(set(here)), "everywhere": sorted(set(everywhere)), "units": units.get(label, [])}
    return out


def _unit_order(unit: str) -> Tuple[int, int]:
    layer, kind = unit.split(".")
    return int(layer[1:]), 10**6 if kind == "MLP" else int(kind[1:])  # MLP after the heads of its layer


# ---------------------------------------------------------------------------------------------- cache


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "circuitfind" / "tracr"


def cache_dir(spec: TracrProgram) -> Path:
    """<cache>/<program>-<hash>: the hash covers the program's source, vocabulary, length and the converter."""
    key = json.dumps(
        [spec.name, [repr(v) for v in spec.vocab], spec.max_seq_len, inspect.getsource(spec.build),
         CONVERTER_VERSION, _version("tracr-pypi")]
    )  # fmt: skip
    return cache_root() / f"{spec.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def compiled_dir(spec: TracrProgram) -> Path:
    """The program's cache directory, compiled into it first if it is not there (written whole, then renamed)."""
    path = cache_dir(spec)
    if (path / "tracr.json").exists():
        return path
    _, state, meta = compile_program(spec)
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{spec.name}-"))
    try:
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(meta["tl_config"], indent=1))
        (tmp / "tracr.json").write_text(json.dumps(meta, indent=1))  # written last: its presence marks a whole compile
        try:
            tmp.rename(path)
        except OSError:  # another run wrote it first: keep theirs
            if not (path / "tracr.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(f"tracr: compiled {spec.name} in {meta['compile_seconds']} s into {path}")
    return path


def hooked_transformer(tl_config: Dict[str, Any], state: Dict[str, torch.Tensor]):
    """A HookedTransformer with these config fields and weights (on the CPU, float32)."""
    from transformer_lens import HookedTransformerConfig

    config = HookedTransformerConfig.from_dict(dict(tl_config, device="cpu", n_devices=1, dtype=torch.float32))
    tl = new_hooked_transformer(config)
    weights = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v)) for k, v in state.items()}
    result = tl.load_state_dict(weights, strict=False)
    buffers = dict(tl.named_buffers())  # TransformerLens's masks, made by the model itself
    missing = [k for k in result.missing_keys if k not in buffers] + list(result.unexpected_keys)
    if missing:
        raise CircuitfindError(
            f"the cached tracr weights do not fit their config ({missing[0]}); delete {cache_root()}"
        )
    tl.eval()
    return tl


def load_compiled(spec: TracrProgram) -> Tuple["TracrLM", "TracrTokenizer"]:
    """The program as a wrapped HookedTransformer and its tokenizer, compiled once and cached."""
    require_transformer_lens("model=tracr")
    path = compiled_dir(spec)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        meta = json.loads((path / "tracr.json").read_text())
        state = load_file(str(path / "model.safetensors"))
    except (OSError, ValueError, SafetensorError) as e:
        raise CircuitfindError(
            f"the tracr cache {path} is unreadable ({type(e).__name__}); delete that folder"
        ) from None
    tl = hooked_transformer(meta["tl_config"], state)
    return TracrLM(tl, meta), TracrTokenizer(meta)


def load_tracr(cfg) -> Tuple["TracrLM", "TracrTokenizer"]:
    """model=tracr model.program=<name>."""
    if cfg.name_or_path:
        raise CircuitfindError("model=tracr compiles model.program itself; drop model.name_or_path")
    return load_compiled(program_spec(cfg.program))


# ---------------------------------------------------------------------------------------------- model


class TracrTokenizer:
    """Each vocabulary item is one token, written as its text; tokens are separated by spaces and BOS is
    prepended (add_special_tokens). What circuitfind's task encoding calls, nothing more."""

    def __init__(self, meta: Dict[str, Any]):
        self.program = meta["program"]
        self.items = list(meta["tokens"])
        self.texts = [str(t) for t in self.items]
        self._ids = {t: i for i, t in enumerate(self.texts)}
        self.bos_token, self.pad_token = BOS, PAD
        self.bos_token_id, self.pad_token_id = self._ids[BOS], self._ids[PAD]
        self.eos_token_id = None
        self.unk_token, self.unk_token_id = None, None  # an unknown token is refused, never read as unk
        self.is_fast = True  # gives character offsets, so units.positions may name task slots

    def __len__(self) -> int:
        return len(self.texts)

    def get_vocab(self) -> Dict[str, int]:
        return dict(self._ids)

    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> List[int]:
        return [self._id(t) for t in tokens]

    def _id(self, piece: str) -> int:
        if piece not in self._ids:
            shown = " ".join(t for t in self.texts if t not in (BOS, PAD))
            raise CircuitfindError(
                f"{piece!r} is not a token of tracr program {self.program} (its tokens: {shown}); "
                "write its inputs with these, separated by spaces"
            )
        return self._ids[piece]

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        return self._encode(text, add_special_tokens)[0]

    def _encode(self, text: str, add_special_tokens: bool) -> Tuple[List[int], List[Tuple[int, int]]]:
        """Token ids and each token's (start, end) characters in `text` (BOS: (0, 0), as Hugging Face gives it)."""
        pieces = list(re.finditer(r"\S+", text))
        ids = [self._id(m.group()) for m in pieces]
        spans = [m.span() for m in pieces]
        if add_special_tokens:
            ids, spans = [self.bos_token_id] + ids, [(0, 0)] + spans
        return ids, spans

    def __call__(self, text, add_special_tokens: bool = True, return_offsets_mapping: bool = False, **_: Any):
        texts = [text] if isinstance(text, str) else list(text)
        encoded = [self._encode(t, add_special_tokens) for t in texts]
        out: Dict[str, Any] = {"input_ids": [ids for ids, _ in encoded]}
        if return_offsets_mapping:
            out["offset_mapping"] = [spans for _, spans in encoded]
        return {k: v[0] for k, v in out.items()} if isinstance(text, str) else out

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        special = {self.bos_token_id, self.pad_token_id} if skip_special_tokens else set()
        return " ".join(self.texts[i] for i in ids if i not in special)


def _full_engine(model, sites, cache: str = "device") -> FullEngine:
    """engine=cached on a tracr model: its attention looks both ways, so no prefix can be kept."""
    log.info("tracr models attend both ways (a prefix changes with the tokens after it): engine=cached runs as full")
    return FullEngine(model, sites)


@contextlib.contextmanager
def pads_masked(tl, attention_mask: Optional[torch.Tensor]) -> Iterator[None]:
    """Every head's scores for padded keys set to -1e30 (tracr masks its pad token so; TransformerLens's
    bidirectional attention ignores the attention mask). Hooks removed on leaving."""
    if attention_mask is None or bool(attention_mask.all()):
        yield
        return
    keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T_key)

    def mask(module, args, scores):  # (B, H, T_query, T_key)
        return scores.masked_fill(~keep, MASKED)

    hooks = [block.attn.hook_attn_scores.register_forward_hook(mask) for block in tl.blocks]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


class TracrBody(TransformerLensBody):
    """The blocks, with the input checked against the program and padded keys masked."""

    def __init__(self, tl, check):
        super().__init__(tl)
        self.check = check

    def forward(self, input_ids, attention_mask=None, **kwargs):
        self.check(input_ids, attention_mask)
        with pads_masked(self.tl, attention_mask):
            return super().forward(input_ids, attention_mask=attention_mask, **kwargs)


class TracrLM(TransformerLensLM):
    """A compiled RASP program as a causal LM for the engines, with its ground truth read off the graph."""

    def __init__(self, tl, meta: Dict[str, Any]):
        super().__init__(tl)
        self.meta = meta
        self._body = TracrBody(tl, self.check_input)
        texts = [str(t) for t in meta["tokens"]]
        self._inputs = torch.tensor([texts.index(str(v)) for v in [BOS, PAD, *meta["vocab"]]])
        self.config.circuitfind = {
            "tracr_depends_on": list(meta["truth"]),  # every unit the output depends on at all
            "tracr_program": meta["program"],
            "tracr_units": meta["units"],
        }

    engine_classes = property(lambda self: {"full": FullEngine, "cached": _full_engine})

    def graph_truth(self, length: int, varied: Set[int], positions: Dict[str, Sequence[int]]) -> GraphTruth:
        """The smallest sets of units at `positions` (name -> token indices) that carry the change of the tokens
        at `varied` to the output at the last of `length` tokens, read off the compiled graph (tracr_truth.py)."""
        return graph_truth(self.meta["graph"], self.meta["output_node"], length, varied, positions)

    def check_input(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> None:
        """One line for a sequence longer than the program's max_seq_len (plus BOS), or a token that is no input."""
        m = self.meta
        if input_ids.shape[-1] > m["max_seq_len"] + 1:
            raise CircuitfindError(
                f"tracr program {m['program']} takes at most {m['max_seq_len']} tokens after BOS; got a sequence of "
                f"{input_ids.shape[-1]}: shorten the task's prompts"
            )
        real = input_ids if attention_mask is None else input_ids[attention_mask.bool()]
        bad = real[~torch.isin(real, self._inputs.to(real.device))]
        if bad.numel():
            raise CircuitfindError(
                f"token {str(m['tokens'][int(bad[0])])!r} is an output of tracr program {m['program']}, not an input "
                f"(its inputs: {' '.join(map(str, m['vocab']))}); write prompts with these"
            )

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        self.check_input(input_ids, attention_mask)
        with pads_masked(self.tl, attention_mask):
            return super().forward(input_ids, attention_mask=attention_mask)

    @torch.no_grad()
    def program_output(self, input_ids: torch.Tensor) -> List[List[Any]]:
        """What the program gives at each position after BOS, read off the model: the categorical
        output's argmax item, or the numerical value. input_ids (B, T), unpadded."""
        self.check_input(input_ids)
        if self.meta["categorical"]:
            logits = self.tl(input_ids, return_type="logits")  # (B, T, V)
            texts = [str(t) for t in self.meta["tokens"]]
            columns = torch.tensor([texts.index(str(v)) for v in self.meta["outputs"]])
            best = logits[:, 1:, columns].argmax(-1)  # (B, T - 1)
            return [[self.meta["outputs"][i] for i in row] for row in best.tolist()]
        resid = self.tl(input_ids, stop_at_layer=self.tl.cfg.n_layers)  # (B, T, D)
        direction = torch.tensor(self.meta["readout"][0], dtype=resid.dtype)  # (D,)
        return (resid[:, 1:] @ direction).tolist()


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
