"""GLMConfig: the network's shape, read from a checkpoint's config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path


class ConfigError(ValueError):
    """A config.json we cannot read or a model variant we do not support."""


# Keys whose non-default value selects an architecture variant this package does not implement.
# key -> the only value we accept. Refusing is better than silently computing something else.
_UNSUPPORTED_UNLESS = {
    "rmsnorm": True,
    "add_bias_linear": False,
    "post_layer_norm": True,
    "apply_residual_connection_post_layernorm": False,
    "pre_seq_len": None,
    "tie_word_embeddings": False,
}


@dataclass
class GLMConfig:
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    kv_channels: int = 128
    multi_query_group_num: int = 2
    ffn_hidden_size: int = 13696
    padded_vocab_size: int = 65024
    seq_length: int = 8192
    layernorm_epsilon: float = 1e-5
    add_qkv_bias: bool = True
    rope_ratio: float = 1.0
    # How rope_ratio stretches the rotary positions: "base" (ChatGLM3, GLM-4: base = 10000 *
    # rope_ratio) or "position" (ChatGLM2-32k: positions / rope_ratio, base 10000).
    rope_scaling: str = "base"
    torch_dtype: str = "float16"
    eos_token_id: int = 2
    pad_token_id: int = 0

    @property
    def num_kv_heads(self) -> int:
        return self.multi_query_group_num

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def rope_base(self) -> float:
        return 10000.0 * self.rope_ratio if self.rope_scaling == "base" else 10000.0

    @property
    def rope_position_divisor(self) -> float:
        return self.rope_ratio if self.rope_scaling == "position" else 1.0

    @property
    def qkv_size(self) -> int:
        return (self.num_attention_heads + 2 * self.multi_query_group_num) * self.kv_channels

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "GLMConfig":
        model_type = raw.get("model_type")
        if model_type == "glm":
            raw = _from_transformers_glm(raw, source)
        elif model_type != "chatglm":
            raise ConfigError(
                f"{source}: model_type={model_type!r} is not supported; glmchat loads ChatGLM "
                "checkpoints with model_type 'chatglm' (e.g. THUDM/chatglm3-6b) or 'glm' (e.g. THUDM/glm-4-9b-chat-hf)"
            )
        for key, accepted in _UNSUPPORTED_UNLESS.items():
            value = raw.get(key, accepted)
            if value != accepted:
                raise ConfigError(
                    f"{source}: {key}={value!r} selects a model variant glmchat does not support "
                    f"(supported: {key}={accepted!r})"
                )
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known and v is not None}
        if isinstance(values.get("eos_token_id"), list) and values["eos_token_id"]:
            values["eos_token_id"] = values["eos_token_id"][0]
        _check_types(values, source)
        if not raw.get("multi_query_attention", False):
            values["multi_query_group_num"] = values.get("num_attention_heads", cls.num_attention_heads)
        config = cls(**values)
        config.validate(source)
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> "GLMConfig":
        return cls.from_dict(read_config_json(path), source=str(path))

    def validate(self, source: str = "config") -> None:
        _check_types({f.name: getattr(self, f.name) for f in fields(self)}, source)
        for name in ("hidden_size", "num_layers", "num_attention_heads", "kv_channels", "multi_query_group_num",
                     "ffn_hidden_size", "padded_vocab_size", "seq_length"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{source}: {name}={getattr(self, name)} must be positive")
        for name in ("layernorm_epsilon", "rope_ratio"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ConfigError(f"{source}: {name}={getattr(self, name)} must be a positive number")
        if self.num_attention_heads % self.multi_query_group_num:
            raise ConfigError(
                f"{source}: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"multi_query_group_num={self.multi_query_group_num}"
            )
        if self.rope_scaling not in ("base", "position"):
            raise ConfigError(f"{source}: rope_scaling={self.rope_scaling!r} must be 'base' or 'position'")
        if self.kv_channels % 4:
            raise ConfigError(f"{source}: kv_channels={self.kv_channels} must be a multiple of 4 for the rotary layout")


_JSON_TYPES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _check_types(values: dict, source: str) -> None:
    """A ConfigError naming the first value whose JSON type is not its field's (`"hidden_size": "big"`).

    An integer field takes no bool and no float; a number field takes an integer too.
    """
    kinds = {f.name: f.type for f in fields(GLMConfig)}
    for name, value in values.items():
        kind = kinds.get(name)
        ok = {"int": isinstance(value, int) and not isinstance(value, bool),
              "float": isinstance(value, (int, float)) and not isinstance(value, bool),
              "bool": isinstance(value, bool), "str": isinstance(value, str)}.get(kind, True)
        if not ok:
            raise ConfigError(f"{source}: {name}={json.dumps(value)[:60]} must be {_JSON_TYPES[kind]}")


def read_config_json(path: str | Path) -> dict:
    """A checkpoint's config.json as a dict; a missing or malformed file raises ConfigError."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist: a checkpoint directory needs a config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    return raw


def _from_transformers_glm(raw: dict, source: str) -> dict:
    """transformers' native GLM config (model_type "glm", the "-hf" repos) in ChatGLM's key names.

    The network is the same; only the names differ. Rotary: rope_theta is the full base and only
    partial_rotary_factor 0.5 of each head rotates, as in ChatGLM.
    """
    rope = {**raw, **(raw.get("rope_parameters") or {})}
    if rope.get("partial_rotary_factor", 0.5) != 0.5:
        raise ConfigError(f"{source}: partial_rotary_factor={rope['partial_rotary_factor']!r} is not supported (only 0.5)")
    if rope.get("rope_type", "default") != "default" or raw.get("rope_scaling"):
        raise ConfigError(f"{source}: rope scaling {raw.get('rope_scaling') or rope.get('rope_type')!r} is not supported")
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act={raw['hidden_act']!r} is not supported (only silu)")
    try:
        heads = raw["num_attention_heads"]
        return {
            "model_type": "chatglm",
            "hidden_size": raw["hidden_size"],
            "num_layers": raw["num_hidden_layers"],
            "num_attention_heads": heads,
            "kv_channels": raw.get("head_dim") or raw["hidden_size"] // heads,
            "multi_query_attention": True,
            "multi_query_group_num": raw.get("num_key_value_heads") or heads,
            "ffn_hidden_size": raw["intermediate_size"],
            "padded_vocab_size": raw["vocab_size"],
            "seq_length": raw["max_position_embeddings"],
            "layernorm_epsilon": raw.get("rms_norm_eps", 1e-5),
            "add_qkv_bias": raw.get("attention_bias", True),
            "rope_ratio": rope.get("rope_theta", 10000.0) / 10000.0,
            "tie_word_embeddings": raw.get("tie_word_embeddings", False),
            "torch_dtype": raw.get("torch_dtype") or raw.get("dtype") or "bfloat16",
            "eos_token_id": raw.get("eos_token_id"),
            "pad_token_id": raw.get("pad_token_id"),
        }
    except KeyError as e:
        raise ConfigError(f"{source}: model_type 'glm' config lacks {e.args[0]!r}") from None
