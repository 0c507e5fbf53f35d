"""Moving parameters between torch_ref / HF PyTorch state dicts and Flax param trees.

Values may be torch tensors or numpy arrays on the way in; everything goes through numpy
(bfloat16 included, via ml_dtypes). Flax trees may hold `nn.Partitioned` boxes; they are
unboxed on the way out. torch is imported only by the functions that build torch tensors.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import types

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import linen as nn

from jax_residual.params import LAYER_PARAMS

# ----------------------------------------------------------------------------- building blocks


def as_numpy(value) -> np.ndarray:
    """A torch tensor (any device, bf16 included), jax array or array-like -> numpy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            import torch

            return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return value.numpy()
    return np.asarray(value)


def as_torch(value):
    """A numpy/jax array (bf16 included, possibly boxed) -> a CPU torch tensor of the same dtype."""
    import torch

    array = np.array(nn.unbox(value))  # a writable copy
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def group_rms_norm_params_from_torch(state_dict) -> dict:
    """torch GroupRMSNorm {'weight': [h]} -> Flax GroupRMSNorm params {'weight': [h]}."""
    return {"weight": as_numpy(state_dict["weight"])}


def group_rms_norm_params_to_torch(params) -> dict:
    """Flax GroupRMSNorm params -> a state dict for torch GroupRMSNorm.load_state_dict."""
    return {"weight": as_torch(params["weight"])}


def embedding_params_from_torch(state_dict) -> dict:
    """torch VocabEmbedding {'weight': [v, e]} -> Flax VocabEmbedding params {'embedding': [v, e]}."""
    return {"embedding": as_numpy(state_dict["weight"])}


def embedding_params_to_torch(params) -> dict:
    """Flax (Parallel)VocabEmbedding params -> a state dict for torch VocabEmbedding."""
    return {"weight": as_torch(params["embedding"])}


def parallel_embedding_params_from_torch(rank_state_dicts) -> dict:
    """The w torch ParallelVocabEmbedding state dicts (rank order) -> {'embedding': [v, e]}."""
    return {"embedding": np.concatenate([as_numpy(sd["weight"]) for sd in rank_state_dicts])}


def parallel_embedding_params_to_torch(params, world_size: int) -> list[dict]:
    """Flax {'embedding': [v, e]} -> w state dicts, rank r holding rows [r*v/w, (r+1)*v/w)."""
    table = as_torch(params["embedding"])
    if table.shape[0] % world_size:
        raise ValueError(f"vocab_size={table.shape[0]} is not divisible by world_size={world_size}")
    return [{"weight": block.clone()} for block in table.chunk(world_size)]


# --- model: HF LlamaForCausalLM / torch_ref state dict <-> Flax params of jax_residual.LlamaForCausalLM

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _layer_key(name: str, layer: int) -> str:
    hf_name = LAYER_PARAMS[name].hf_key if name in LAYER_PARAMS else name
    return f"model.layers.{layer}.{hf_name}"


def _transposed(name: str) -> bool:
    """Whether HF stores the layer parameter `name` as [out, in] (connection weights: never)."""
    return name in LAYER_PARAMS and LAYER_PARAMS[name].transposed


def _expected_model_shapes(config) -> dict[str, tuple[int, ...]]:
    """Flax path ('layers', name) etc. -> shape, for every parameter of the model."""
    from jax_residual.layer import layer_param_specs

    shapes = {("embed_tokens", "embedding"): (config.vocab_size, config.hidden_size),
              ("norm", "weight"): (config.hidden_size,)}
    shapes.update({("layers", name): spec[0] for name, spec in layer_param_specs(config).items()})
    if not config.tie_word_embeddings:
        shapes[("lm_head",)] = (config.hidden_size, config.vocab_size)
    return shapes


def params_from_state_dict(state_dict, config) -> dict:
    """Flax params of `LlamaForCausalLM(config)` from a HF-keyed state dict.

    state_dict: HF `LlamaForCausalLM` keys (torch_ref adds the method keys
    `model.layers.{l}.residual_weight_logits` [L], `score_exponents` [2], `score_weights` [L]);
    values torch tensors or numpy arrays. Method parameters missing from the dict (a plain HF
    checkpoint) take their initial values, so a pretrained Llama can continue with any method.
    Any other missing key, unexpected key or wrong shape raises ValueError naming it.
    """
    arrays = {k: as_numpy(v) for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIXES)}
    method_weights = config.scheme.weights_for(config)
    L = config.num_hidden_layers
    used = set()

    def take(key, shape, transpose=False, default=None):
        if key not in arrays:
            if default is None:
                raise ValueError(f"state dict is missing {key!r} (expected shape {shape})")
            return default
        used.add(key)
        if not jnp.issubdtype(arrays[key].dtype, jnp.floating):
            raise ValueError(f"{key!r} has dtype {arrays[key].dtype}, expected a floating-point dtype")
        value = arrays[key].T if transpose else arrays[key]
        if value.shape != tuple(shape):
            raise ValueError(f"{key!r} has shape {arrays[key].shape}, expected {shape[::-1] if transpose else shape}")
        return value

    params = {"embed_tokens": {"embedding": take("model.embed_tokens.weight", (config.vocab_size, config.hidden_size))},
              "norm": {"weight": take("model.norm.weight", (config.hidden_size,))}, "layers": {}}
    for (scope, *name), shape in _expected_model_shapes(config).items():
        if scope != "layers":
            continue
        name = name[0]
        transpose = _transposed(name)
        initial = method_weights[name].init(config) if name in method_weights else None
        params["layers"][name] = np.stack([
            take(_layer_key(name, l), shape[1:], transpose, None if initial is None else initial[l])
            for l in range(L)
        ])
    if config.tie_word_embeddings:
        used.add("lm_head.weight")  # HF keeps the tied head in its state dict
    else:
        params["lm_head"] = take("lm_head.weight", (config.hidden_size, config.vocab_size), transpose=True)
    unexpected = sorted(set(arrays) - used)
    if unexpected:
        raise ValueError(f"unexpected keys for residual_method={config.residual_method!r}: {unexpected[:8]}")
    return jax.tree.map(jnp.asarray, params)


def state_dict_from_params(params, config) -> dict[str, np.ndarray]:
    """The inverse of `params_from_state_dict`: HF keys (+ method keys) -> numpy arrays."""
    params = jax.tree.map(np.asarray, nn.meta.unbox(params))
    out = {"model.embed_tokens.weight": params["embed_tokens"]["embedding"],
           "model.norm.weight": params["norm"]["weight"]}
    for name, stacked in params["layers"].items():
        transpose = _transposed(name)
        for l in range(config.num_hidden_layers):
            out[_layer_key(name, l)] = stacked[l].T if transpose else stacked[l]
    out["lm_head.weight"] = out["model.embed_tokens.weight"] if config.tie_word_embeddings else params["lm_head"].T
    return out


# --- HF checkpoint folders

REMOTE_CODE_ENTRY = "hf"  # torch_ref/hf.py, the module auto_map points into
REMOTE_CONFIG_CLASS, REMOTE_MODEL_CLASS = "ResidualLlamaConfig", "HFResidualLlamaForCausalLM"
_TORCH_REF_IMPORT = re.compile(r"^(\s*)from torch_ref\.([\w.]+) import", flags=re.MULTILINE)


def flat_module_name(dotted: str) -> str:
    """'modeling.llama' (a torch_ref module) -> 'modeling_llama': HF remote code is one flat folder."""
    return dotted.replace(".", "_")


def remote_code_sources(package_root: pathlib.Path) -> dict[str, str]:
    """{file name: source} of every module of the torch_ref package under package_root, flattened
    (`modeling/llama.py` -> `modeling_llama.py`) with `from torch_ref.x.y import` rewritten to
    `from .x_y import`, so the files import each other inside an HF remote-code folder.
    Package `__init__.py` files are left out (nothing imports them relatively)."""
    sources = {}
    for path in sorted(package_root.rglob("*.py")):
        relative = path.relative_to(package_root).with_suffix("")
        if relative.name == "__init__":
            continue
        text = _TORCH_REF_IMPORT.sub(lambda m: f"{m[1]}from .{flat_module_name(m[2])} import", path.read_text())
        sources[flat_module_name(".".join(relative.parts)) + ".py"] = text
    return sources


def hf_config_dict(config) -> dict:
    """config.json of an exported model: a plain HF Llama for `standard`; otherwise model_type
    "residual_llama" with the method, its knobs and the `auto_map` of torch_ref/hf.py."""
    values = config.to_hf().to_dict() | config.knob_values()
    if config.residual_method == "standard":
        return values | {"architectures": ["LlamaForCausalLM"]}
    return values | {
        "model_type": "residual_llama",
        "architectures": [REMOTE_MODEL_CLASS],
        "auto_map": {"AutoConfig": f"{REMOTE_CODE_ENTRY}.{REMOTE_CONFIG_CLASS}",
                     "AutoModelForCausalLM": f"{REMOTE_CODE_ENTRY}.{REMOTE_MODEL_CLASS}"},
        "residual_method": config.residual_method,
    }


def _read_json(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} cannot be read as JSON: {error}") from None


# config.json fields of a HF Llama that the model needs, and the JSON types each may have
REQUIRED_HF_FIELDS = {name: (int,) for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                                "num_attention_heads")}
OPTIONAL_HF_FIELDS = {"num_key_value_heads": (int, type(None)), "head_dim": (int, type(None)),
                      "rms_norm_eps": (int, float), "rope_theta": (int, float), "max_position_embeddings": (int,),
                      "tie_word_embeddings": (bool,), "initializer_range": (int, float),
                      "rope_parameters": (dict, type(None))}


def hf_config_problems(values) -> list[str]:
    """What is missing or mistyped in a HF config.json's values (a JSON object with the size
    fields as positive integers); empty when ModelConfig.from_hf can read it."""
    if not isinstance(values, dict):
        return [f"expected a JSON object, got {type(values).__name__}"]
    found = [f"missing field {name!r}" for name in REQUIRED_HF_FIELDS if name not in values]
    for name, types_ in {**REQUIRED_HF_FIELDS, **OPTIONAL_HF_FIELDS}.items():
        value = values.get(name)
        if name not in values:
            continue
        if not isinstance(value, types_) or (isinstance(value, bool) and bool not in types_):
            allowed = " or ".join("null" if t is type(None) else t.__name__ for t in types_)
            found.append(f"field {name!r} is {json.dumps(value)}, expected {allowed}")
        elif int in types_ and float not in types_ and isinstance(value, int) and value < 1:
            found.append(f"field {name!r} is {value}, expected a positive integer")
    return found


def _read_safetensors(folder: pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of the folder's *.safetensors files (sharded or not)."""
    from safetensors.numpy import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {folder}")
    state_dict = {}
    for path in files:
        try:
            state_dict.update(load_file(path))
        except Exception as error:  # safetensors raises its own error types for damaged files
            raise ValueError(f"{path} is not a readable safetensors file: {type(error).__name__}: {error}") from None
    return state_dict


def folder_method(hf_config: dict) -> str:
    """The residual method a checkpoint folder's config.json declares (a plain Llama: standard)."""
    return hf_config.get("residual_method") or "standard"


def load_hf_checkpoint(folder, residual_method: str | None = None, *, allow_method_change: bool = False,
                       **overrides):
    """(ModelConfig, params) from a folder written by HF `save_pretrained` or `save_hf_checkpoint`
    (config.json + *.safetensors, sharded or not). Reads files only; needs neither torch nor
    the network.

    The method is the folder's (config.json `residual_method`; a plain Llama is `standard`, as
    are its knobs unless `overrides` set them). `residual_method` may name another one
    only when the folder is a standard model (continuing a pretrained Llama with a method:
    the method's parameters start at their initial values), or with allow_method_change=True
    (the folder's own method parameters are then dropped). Raises ValueError for a missing or
    unreadable folder, config.json or safetensors file, and for an implicit method change.
    """
    from jax_residual.config import ModelConfig
    from jax_residual.connections import get_method, knob_fields, weight_names

    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise ValueError(f"checkpoint folder {folder} does not exist or is not a folder")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json: not a HF checkpoint folder")
    hf_values = _read_json(folder / "config.json")
    problems = hf_config_problems(hf_values)
    if problems:
        raise ValueError(f"{folder / 'config.json'} is not a Llama config: {'; '.join(problems)}")
    saved = folder_method(hf_values)
    method = saved if residual_method is None else residual_method
    if method != saved and saved != "standard" and not allow_method_change:
        raise ValueError(f"{folder} holds a {saved!r} model, not {method!r}: load it as {saved!r}, or pass "
                         f"allow_method_change=True to reuse its weights for {method!r}")
    if method != saved:  # the folder's knobs are its own method's, not the new one's
        hf_values = {k: v for k, v in hf_values.items() if k not in knob_fields()}
    try:
        config = ModelConfig.from_hf(types.SimpleNamespace(**hf_values), residual_method=method, **overrides)
    except (TypeError, ValueError) as error:  # values of the right type that ModelConfig refuses
        raise ValueError(f"{folder / 'config.json'}: {error}") from None
    state_dict = _read_safetensors(folder)
    foreign = weight_names() - set(get_method(method).weights)
    state_dict = {k: v for k, v in state_dict.items() if k.rsplit(".", 1)[-1] not in foreign or method == saved}
    return config, params_from_state_dict(state_dict, config)


def save_hf_checkpoint(params, config, folder, **config_fields):
    """Write config.json + model.safetensors. `standard`: a plain Llama that
    `transformers.LlamaForCausalLM.from_pretrained` loads. Other methods: the folder also holds
    torch_ref's sources (`remote_code_sources`), so
    `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` builds the
    reference model of that method (torch_ref/hf.py) with these weights. `config_fields` go
    into config.json as well (e.g. eos_token_id=0 for generation to stop at the data's EOS)."""
    from safetensors.numpy import save_file

    folder = pathlib.Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"export folder {folder} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config_dict(config) | config_fields, indent=2))
    if config.residual_method != "standard":
        torch_ref_root = pathlib.Path(importlib.util.find_spec("torch_ref").submodule_search_locations[0])
        for name, source in remote_code_sources(torch_ref_root).items():
            (folder / name).write_text(source)
    tensors = state_dict_from_params(params, config)
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, folder / "model.safetensors")
    # safetensors writes its file 0600; give it the mode of the folder's other files (the umask's)
    (folder / "model.safetensors").chmod((folder / "config.json").stat().st_mode & 0o777)


def save_hf_tokenizer(tokenizer, folder, eos_token_id: int, model_max_length: int):
    """Write a `tokenizers.Tokenizer` into an exported folder so that
    `transformers.AutoTokenizer.from_pretrained(folder)` (and so lm-evaluation-harness) encodes
    text to the ids the model was trained on: tokenizer.json without its post-processor
    (training adds no BOS nor any other special token around a document), and
    tokenizer_config.json + special_tokens_map.json naming token `eos_token_id` (the document
    separator) as EOS and padding, no BOS (no run is trained with one; lm-eval then prefixes
    documents with EOS, as training did), no chat template."""
    from tokenizers import Tokenizer

    folder = pathlib.Path(folder)
    tokenizer = Tokenizer.from_str(tokenizer.to_str())  # a copy: the caller's keeps its post-processor
    tokenizer.post_processor = None
    tokenizer.save(str(folder / "tokenizer.json"))
    eos = tokenizer.id_to_token(eos_token_id)
    special = {"bos_token": None, "eos_token": eos, "pad_token": eos, "unk_token": None}
    (folder / "special_tokens_map.json").write_text(json.dumps({k: v for k, v in special.items() if v}, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(special | {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False}, indent=2))
