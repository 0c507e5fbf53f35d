"""Exported HF folders keep the method: `save_hf_checkpoint` + `AutoModelForCausalLM.from_pretrained(
folder, trust_remote_code=True)` gives the torch_ref model of that method (the folder's own
copy of torch_ref), `standard` stays a plain `LlamaForCausalLM`, and `load_hf_checkpoint`
reads the method back and refuses to change it implicitly. Greedy `generate()` of the exported
folder gives exactly the tokens of JAX's cached greedy decoding.

Tiny random models made here (no downloads); HF's remote-code module cache goes to a tmp dir.
Logits: float32 on both sides, FP32_RTOL (~1e-5 normwise relative, as in test_hf_llama).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from jax_residual.convert import load_hf_checkpoint, save_hf_checkpoint, state_dict_from_params
from jax_residual.generate import generate
from llama_testlib import FP32_RTOL, assert_close, jax_fns, jax_logits, random_ids, random_model, tiny_config, to_jax_params

NEW_TOKENS = 4


pytestmark = pytest.mark.usefixtures("remote_code_cache")  # conftest.py: the session's tmp module cache


def exported(method: str, folder, seed: int = 40):
    """(torch_ref model with moved method weights, its JAX params) written to `folder`."""
    reference = random_model(tiny_config(), method, seed=seed).eval()
    cfg = jax_fns(method)[0]
    params = to_jax_params(reference.state_dict(), cfg)
    save_hf_checkpoint(params, cfg, folder)
    return reference, params


@torch.no_grad()
def greedy_by_hand(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Append the argmax of the last position's logits, `steps` times (the full prefix each time)."""
    for _ in range(steps):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("method", ["method1", "method5.5", "denseformer", "value_residual", "hyper_connections",
                                    "mudd", "dca", "laurel", "attn_res"])
def test_exported_method_loads_as_its_reference_model(method, tmp_path):
    reference, params = exported(method, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] != ["LlamaForCausalLM"] and config["model_type"] == "residual_llama"
    assert config["residual_method"] == method and set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    sources = {p.name for p in tmp_path.glob("*.py")}
    assert {"hf.py", "modeling_llama.py", "functional.py"} <= sources
    assert not any(line.lstrip().startswith(("from torch_ref", "import torch_ref"))
                   for name in sources for line in (tmp_path / name).read_text().splitlines())

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(model).__name__ == "HFResidualLlamaForCausalLM" and model.config.residual_method == method
    ids = random_ids(model.config, 11, seed=41)
    with torch.no_grad():
        logits = model(ids).logits.numpy()
    assert_close(logits, jax_logits(method, reference.state_dict(), ids), FP32_RTOL, f"hf-export-vs-jax {method}")

    prompt = ids[:1, :5]
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                               do_sample=False, eos_token_id=None, pad_token_id=0)
    np.testing.assert_array_equal(generated.numpy(), greedy_by_hand(reference, prompt, NEW_TOKENS).numpy())
    assert_jax_greedy_equals(method, params, prompt, generated)


def assert_jax_greedy_equals(method: str, params, prompt: torch.Tensor, hf_generated: torch.Tensor):
    """JAX's cached greedy decoding (jax_residual.generate) gives HF generate()'s tokens."""
    jax_model = jax_fns(method)[1]
    jax_generated = generate(jax_model, params, prompt.numpy(), hf_generated.shape[1] - prompt.shape[1], temperature=0.0)
    np.testing.assert_array_equal(np.asarray(jax_generated), hf_generated.numpy())


def test_exported_standard_is_a_plain_llama(tmp_path):
    reference, params = exported("standard", tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert not list(tmp_path.glob("*.py"))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(model) is transformers.LlamaForCausalLM
    ids = random_ids(model.config, 11, seed=42)
    with torch.no_grad():
        logits = model(ids).logits.numpy()
    assert_close(logits, jax_logits("standard", reference.state_dict(), ids), FP32_RTOL, "hf-export-vs-jax standard")
    prompt = ids[:1, :5]
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                               do_sample=False, eos_token_id=None, pad_token_id=0)
    assert_jax_greedy_equals("standard", params, prompt, generated)


def test_load_hf_checkpoint_keeps_the_folders_method(tmp_path):
    _, params = exported("method5.5", tmp_path / "m55")
    cfg, loaded = load_hf_checkpoint(tmp_path / "m55")
    assert cfg.residual_method == "method5.5"
    for key, value in state_dict_from_params(params, cfg).items():
        np.testing.assert_array_equal(state_dict_from_params(loaded, cfg)[key], value, err_msg=key)

    with pytest.raises(ValueError, match=r"holds a 'method5.5' model, not 'method1'.*allow_method_change=True"):
        load_hf_checkpoint(tmp_path / "m55", residual_method="method1")
    cfg, loaded = load_hf_checkpoint(tmp_path / "m55", residual_method="method3.2", allow_method_change=True)
    assert cfg.residual_method == "method3.2" and "score_weights" not in loaded["layers"]
    np.testing.assert_array_equal(loaded["layers"]["residual_weight_logits"], 0.0)  # its initial value

    exported("standard", tmp_path / "llama")  # continuing a standard Llama with a method needs no flag
    cfg, loaded = load_hf_checkpoint(tmp_path / "llama", residual_method="method5.5")
    assert cfg.residual_method == "method5.5" and loaded["layers"]["score_weights"].shape == (4, 4)


def test_bad_checkpoint_folders_are_named_in_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"^checkpoint folder \S+/missing does not exist or is not a folder$"):
        load_hf_checkpoint(tmp_path / "missing")
    exported("standard", tmp_path / "corrupt")
    (tmp_path / "corrupt/model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file: ") as error:
        load_hf_checkpoint(tmp_path / "corrupt")
    assert "\n" not in str(error.value)
    (tmp_path / "corrupt/config.json").write_text("")
    with pytest.raises(ValueError, match=r"config.json cannot be read as JSON"):
        load_hf_checkpoint(tmp_path / "corrupt")
