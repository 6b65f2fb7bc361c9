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
    # The fraction of each head that rotary positions touch: 0.5 in ChatGLM2/3 and GLM-4, 1.0 in GLM-Edge.
    partial_rotary_factor: float = 0.5
    # GLM-4-0414 (model_type "glm4"): an RMSNorm on each sublayer's output before its residual add.
    sandwich_norms: bool = False
    # GLM-Edge-1.5B: the output layer is the token embedding (no lm_head tensor in the checkpoint).
    tie_word_embeddings: bool = False
    # Which network: "glm" (glmchat.model: ChatGLM2/3, GLM-4 and their variants) or "chatglm-6b"
    # (glmchat.model_v1: the original ChatGLM-6B, whose positions need the prompt's special ids).
    network: str = "glm"
    bos_token_id: int | None = None
    mask_token_id: int | None = None
    gmask_token_id: int | None = None

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
    def rotary_dim(self) -> int:
        """How many channels of each head rotate (the first ones, in interleaved pairs)."""
        return round(self.kv_channels * self.partial_rotary_factor)

    @property
    def qkv_size(self) -> int:
        return (self.num_attention_heads + 2 * self.multi_query_group_num) * self.kv_channels

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "GLMConfig":
        model_type = raw.get("model_type")
        if is_chatglm_v1(raw):
            raw = _from_chatglm_v1(raw, source)
        elif model_type == "chatglm" and raw.get("tie_word_embeddings", False) is not False:
            # The reference's ChatGLM model never ties its output layer, whatever the key says.
            raise ConfigError(f"{source}: tie_word_embeddings={raw['tie_word_embeddings']!r} selects a model variant "
                              "glmchat does not support for model_type 'chatglm' (supported: tie_word_embeddings=False)")
        if model_type in ("glm", "glm4"):
            raw = _from_transformers_glm(raw, source)
        elif model_type != "chatglm":
            raise ConfigError(
                f"{source}: model_type={model_type!r} is not supported; glmchat loads ChatGLM "
                "checkpoints with model_type 'chatglm' (e.g. THUDM/chatglm3-6b), 'glm' (e.g. THUDM/glm-4-9b-chat-hf, "
                "THUDM/glm-edge-1.5b-chat) or 'glm4' (e.g. THUDM/GLM-4-9B-0414)"
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
        if self.network not in NETWORKS:
            raise ConfigError(f"{source}: network={self.network!r} must be one of {', '.join(NETWORKS)}")
        if self.rope_scaling not in ("base", "position"):
            raise ConfigError(f"{source}: rope_scaling={self.rope_scaling!r} must be 'base' or 'position'")
        rotary = self.kv_channels * self.partial_rotary_factor
        if not 0 < rotary <= self.kv_channels or rotary != int(rotary) or int(rotary) % 2:
            raise ConfigError(
                f"{source}: kv_channels={self.kv_channels} with partial_rotary_factor={self.partial_rotary_factor} "
                "does not give an even number of rotary channels"
            )


NETWORKS = ("glm", "chatglm-6b")

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
    """transformers' native GLM configs in ChatGLM's key names: model_type "glm" (GlmForCausalLM:
    the "-hf" repos, GLM-Edge) and "glm4" (Glm4ForCausalLM: GLM-4-0414, the GLM block with
    sandwich norms).

    Rotary: rope_theta is the full base; partial_rotary_factor of each head rotates (0.5 as in
    ChatGLM unless the config says otherwise; GLM-Edge: 1.0).
    """
    rope = {**raw, **(raw.get("rope_parameters") or {})}
    factor = rope.get("partial_rotary_factor", 0.5)
    if not isinstance(factor, (int, float)) or not 0 < factor <= 1:
        raise ConfigError(f"{source}: partial_rotary_factor={factor!r} must be a number in (0, 1]")
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
            "partial_rotary_factor": float(factor),
            "sandwich_norms": raw.get("model_type") == "glm4",
            "tie_word_embeddings": raw.get("tie_word_embeddings", False),
            "torch_dtype": raw.get("torch_dtype") or raw.get("dtype") or "bfloat16",
            "eos_token_id": raw.get("eos_token_id"),
            "pad_token_id": raw.get("pad_token_id"),
        }
    except KeyError as e:
        raise ConfigError(f"{source}: model_type {raw.get('model_type')!r} config lacks {e.args[0]!r}") from None


def is_chatglm_v1(raw: dict) -> bool:
    """Whether a config.json is the original ChatGLM-6B's (its 2D positions set it apart)."""
    return raw.get("model_type") == "chatglm" and "position_encoding_2d" in raw


def _from_chatglm_v1(raw: dict, source: str) -> dict:
    """The original ChatGLM-6B's config.json (THUDM/chatglm-6b: model_type "chatglm" with
    position_encoding_2d) in the key names above. Every head has its own keys and values, the MLP is
    inner_hidden_size wide, and the output layer is the embedding (the reference never sets
    tie_word_embeddings, so transformers' default ties them)."""
    unsupported = {"position_encoding_2d": (True, "1D positions are GLM-130B's, not ChatGLM-6B's"),
                   "pre_seq_len": (None, "P-tuning prefixes are not supported"),
                   "quantization_bit": (0, "the reference's own int4/int8 checkpoints are not supported; "
                                           "load THUDM/chatglm-6b and pass --quantize int4/int8")}
    for key, (accepted, why) in unsupported.items():
        if raw.get(key, accepted) != accepted:
            raise ConfigError(f"{source}: {key}={raw[key]!r} selects a ChatGLM-6B variant glmchat does not support ({why})")
    try:
        hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
        if not isinstance(hidden, int) or not isinstance(heads, int) or heads <= 0 or hidden % heads:
            raise ConfigError(f"{source}: hidden_size={hidden!r} must be a multiple of num_attention_heads={heads!r}")
        return {
            "model_type": "chatglm",
            "network": "chatglm-6b",
            "hidden_size": hidden,
            "num_layers": raw["num_layers"],
            "num_attention_heads": heads,
            "kv_channels": hidden // heads,
            "ffn_hidden_size": raw.get("inner_hidden_size") or 4 * hidden,
            "padded_vocab_size": raw["vocab_size"],
            "seq_length": raw["max_sequence_length"],
            "layernorm_epsilon": raw.get("layernorm_epsilon", 1e-5),
            "add_qkv_bias": True,
            "tie_word_embeddings": True,
            "torch_dtype": raw.get("torch_dtype") or "float16",
            **{key: raw[key] for key in ("eos_token_id", "pad_token_id", "bos_token_id", "mask_token_id",
                                          "gmask_token_id") if key in raw},
        }
    except KeyError as e:
        raise ConfigError(f"{source}: ChatGLM-6B config lacks {e.args[0]!r}") from None
