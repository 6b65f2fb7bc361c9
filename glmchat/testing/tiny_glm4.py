"""Tiny random GLM-4 checkpoints, in each of the model's official layouts.

- GLM-4-9B-chat / -1m: tensor names as ChatGLM3, a tiktoken-style ``tokenizer.model`` (base64 ranks)
  trained here on the bundled corpus, GLM-4's specials after the ranks.
- GLM-4-9B-chat-hf: transformers' native names (model.layers.N.self_attn.q_proj, ...), model_type
  "glm", and the same vocabulary as a byte-level BPE ``tokenizer.json``.
- GLM-4-9B-0414 (``make_tiny_glm4_0414_checkpoint``): model_type "glm4" (Glm4ForCausalLM), the -hf
  names plus each layer's sandwich norms (post_self_attn_layernorm, post_mlp_layernorm), a
  ``tokenizer.json`` and the chat template in ``chat_template.jinja``.
- GLM-Edge-1.5B-chat (``make_tiny_glm_edge_checkpoint``): model_type "glm" with full rotary
  (partial_rotary_factor 1.0), no attention bias, tied embeddings (no lm_head tensor), a
  ``tokenizer.json`` and its own template (no ``[gMASK]<sop>``) in ``tokenizer_config.json``.
"""

from __future__ import annotations

import base64
import json
import math
import os
from collections import Counter
from pathlib import Path

import regex
import torch

from ..families.glm4 import PATTERN, SPECIAL_TOKENS, bytes_to_unicode
from .tiny_chatglm import corpus_lines, random_weights, write_weights

# ---------------------------------------------------------------------------------------------
# GLM-4 tokenizer


def train_bpe_ranks(merges: int = 400) -> dict[bytes, int]:
    """Byte-level BPE ranks learned from the bundled corpus: bytes 0-255, then merges in order.

    Plain pair counting over GLM-4's pre-tokenized pieces; ties go to the smallest pair, so the
    result is the same on every run.
    """
    pattern = regex.compile(PATTERN)
    words = Counter()
    for line in corpus_lines():
        for piece in pattern.findall(line + "\n"):
            words[tuple(bytes([b]) for b in piece.encode("utf-8"))] += 1
    ranks = {bytes([b]): b for b in range(256)}
    for _ in range(merges):
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merged = best[0] + best[1]
        ranks.setdefault(merged, len(ranks))
        words = Counter({_merge(word, best, merged): c for word, c in words.items()})
    return ranks


def _merge(word: tuple, pair: tuple, merged: bytes) -> tuple:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def write_rank_file(out: Path, ranks: dict[bytes, int]) -> Path:
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in sorted(ranks.items(), key=lambda x: x[1])]
    path = out / "tokenizer.model"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_tokenizer_json(out: Path, ranks: dict[bytes, int]) -> Path:
    """The ranks as a Hugging Face byte-level BPE tokenizer.json (merges ordered by rank)."""
    to_char = bytes_to_unicode()
    text = lambda b: "".join(to_char[x] for x in b)  # noqa: E731
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda x: x[1]):
        for i in range(1, len(token)):
            a, b = token[:i], token[i:]
            if a in ranks and b in ranks:
                merges.append((rank, ranks[a], ranks[b], f"{text(a)} {text(b)}"))
    n = len(ranks)
    data = {
        "version": "1.0",
        "added_tokens": [
            {"id": n + i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i, s in enumerate(SPECIAL_TOKENS)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {text(t): r for t, r in ranks.items()},
                  "merges": [m[3] for m in sorted(merges)]},
    }
    path = out / "tokenizer.json"
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1))
    return path


# The chat template of glm-4-9b-chat's tokenizer_config.json, function tools only.
GLM4_CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for item in messages %}{% if item['tools'] is defined %}<|system|>\n"
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，你的任务是针对用户的问题和要求提供适当的答复和支持。"
    "\n\n# 可用工具{% set tools = item['tools'] %}{% for tool in tools %}{% if tool['type'] == 'function' %}"
    "\n\n## {{ tool['function']['name'] }}\n\n{{ tool['function'] | tojson(indent=4) }}\n"
    "在调用上述函数时，请使用 Json 格式表示调用的参数。{% endif %}{% endfor %}{% endif %}"
    "{% if item['content'] %}<|{{ item['role'] }}|>{{ item['metadata'] }}\n{{ item['content'] }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _glm4_tokenizer_config(n: int, chat: bool, hf: bool) -> dict:
    config = {
        "added_tokens_decoder": {
            str(n + i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": True}
            for i, s in enumerate(SPECIAL_TOKENS)
        },
        "additional_special_tokens": list(SPECIAL_TOKENS[:-4]),
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "remove_space": False,
        "model_max_length": 128000,
    }
    if hf:
        config["tokenizer_class"] = "PreTrainedTokenizer" + "Fast"
        config["model_input_names"] = ["input_ids", "attention_mask"]
    else:
        config["tokenizer_class"] = "ChatGLM4Tokenizer"
        config["auto_map"] = {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]}
    if chat:
        config["chat_template"] = GLM4_CHAT_TEMPLATE
    return config


def _glm4_config(name, n_ranks, padded, hidden_size, num_layers, heads, kv_channels, groups, ffn, eps, seq_length,
                 rope_ratio, dtype, hf: bool) -> dict:
    eos = [n_ranks, n_ranks + 7, n_ranks + 9]  # <|endoftext|>, <|user|>, <|observation|>
    dtype_name = str(dtype).removeprefix("torch.")
    if hf:
        return {
            "architectures": ["GlmForCausalLM"], "model_type": "glm", "attention_bias": True,
            "attention_dropout": 0.0, "eos_token_id": eos, "head_dim": kv_channels, "hidden_act": "silu",
            "hidden_size": hidden_size, "initializer_range": 0.02, "intermediate_size": ffn,
            "max_position_embeddings": seq_length, "num_attention_heads": heads, "num_hidden_layers": num_layers,
            "num_key_value_heads": groups, "pad_token_id": n_ranks, "partial_rotary_factor": 0.5,
            "rms_norm_eps": eps, "rope_theta": 10000.0 * rope_ratio, "tie_word_embeddings": False,
            "torch_dtype": dtype_name, "transformers_version": "4.46.0", "use_cache": True, "vocab_size": padded,
        }
    return {
        "_name_or_path": name, "model_type": "chatglm", "architectures": ["ChatGLMModel"],
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                     "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
        "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True, "attn_implementation": "sdpa", "bias_dropout_fusion": True,
        "ffn_hidden_size": ffn, "fp32_residual_connection": False, "hidden_dropout": 0.0,
        "hidden_size": hidden_size, "kv_channels": kv_channels, "layernorm_epsilon": eps,
        "multi_query_attention": True, "multi_query_group_num": groups, "num_attention_heads": heads,
        "num_hidden_layers": num_layers, "num_layers": num_layers, "rope_ratio": rope_ratio,
        "original_rope": True, "padded_vocab_size": padded, "post_layer_norm": True, "rmsnorm": True,
        "seq_length": seq_length, "use_cache": True, "torch_dtype": dtype_name,
        "transformers_version": "4.42.4", "tie_word_embeddings": False, "eos_token_id": eos, "pad_token_id": n_ranks,
    }


def to_hf_names(tensors: dict[str, torch.Tensor], heads: int, groups: int, kv_channels: int) -> dict[str, torch.Tensor]:
    """ChatGLM tensor names -> transformers' GlmForCausalLM names (q/k/v split out of query_key_value)."""
    out = {}
    sizes = [heads * kv_channels, groups * kv_channels, groups * kv_channels]
    simple = {"input_layernorm.weight": "input_layernorm.weight", "self_attention.dense.weight": "self_attn.o_proj.weight",
              "post_attention_layernorm.weight": "post_attention_layernorm.weight",
              "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight", "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight"}
    for name, t in tensors.items():
        if name == "transformer.embedding.word_embeddings.weight":
            out["model.embed_tokens.weight"] = t
        elif name == "transformer.encoder.final_layernorm.weight":
            out["model.norm.weight"] = t
        elif name == "transformer.output_layer.weight":
            out["lm_head.weight"] = t
        elif name.startswith("transformer.encoder.layers."):
            layer, rest = name.removeprefix("transformer.encoder.layers.").split(".", 1)
            prefix = f"model.layers.{layer}."
            if rest.startswith("self_attention.query_key_value."):
                kind = rest.rsplit(".", 1)[1]
                for proj, part in zip("qkv", t.split(sizes)):
                    out[prefix + f"self_attn.{proj}_proj.{kind}"] = part.contiguous()
            else:
                out[prefix + simple[rest]] = t
    return out


# The default context: room for the family's own tools prompt (about 370 tokens for one small
# function with the tiny tokenizers), several tools and a reply, so tool calls work on a demo
# checkpoint; it costs nothing until used (the cache grows with the conversation).
DEMO_CONTEXT = 2048


def make_tiny_glm4_checkpoint(
    path: str | os.PathLike[str],
    *,
    layout: str = "chatglm",
    chat: bool = True,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_attention_heads: int = 4,
    kv_channels: int = 16,
    multi_query_group_num: int = 2,
    ffn_hidden_size: int = 96,
    layernorm_epsilon: float = 1.5625e-07,
    seq_length: int = DEMO_CONTEXT,
    rope_ratio: float = 500.0,
    dtype: torch.dtype = torch.float32,
    ranks: dict[bytes, int] | None = None,
) -> Path:
    """A random GLM-4-9B-chat-layout checkpoint (layout "hf": the transformers-native -hf repo)."""
    if layout not in ("chatglm", "hf"):
        raise ValueError(f"layout must be 'chatglm' or 'hf', got {layout!r}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    ranks = ranks or train_bpe_ranks()
    n = len(ranks)
    padded = math.ceil((n + len(SPECIAL_TOKENS)) / 64) * 64
    tensors = random_weights(
        torch.Generator().manual_seed(seed), vocab=padded, hidden=hidden_size, num_layers=num_layers,
        heads=num_attention_heads, kv_channels=kv_channels, groups=multi_query_group_num, ffn=ffn_hidden_size,
    )
    tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
    hf = layout == "hf"
    if hf:
        tensors = to_hf_names(tensors, num_attention_heads, multi_query_group_num, kv_channels)
        write_tokenizer_json(out, ranks)
    else:
        write_rank_file(out, ranks)
    write_weights(out, tensors, "safetensors", 1)
    name = "THUDM/glm-4-9b" + ("-chat" if chat else "") + ("-hf" if hf else "")
    config = _glm4_config(name, n, padded, hidden_size, num_layers, num_attention_heads, kv_channels,
                          multi_query_group_num, ffn_hidden_size, layernorm_epsilon, seq_length, rope_ratio, dtype, hf)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok_config = {"name_or_path": name, **_glm4_tokenizer_config(n, chat, hf)}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
    return out


# ---------------------------------------------------------------------------------------------
# GLM-4-0414 and GLM-Edge: transformers-native layouts only

# GLM-4-9B-0414's chat_template.jinja: tools come as apply_chat_template(tools=...), system
# messages first, a tool call is an assistant message with "metadata" (the tool's name).
GLM4_0414_CHAT_TEMPLATE = """[gMASK]<sop>
{%- if tools -%}
<|system|>
# 可用工具
{% for tool in tools %}
    {%- set function = tool.function if tool.get("function") else tool %}

## {{ function.name }}

{{ function | tojson(indent=4, ensure_ascii=False) }}
在调用上述函数时，请使用 Json 格式表示调用的参数。
{%- endfor %}
{%- endif -%}

{%- for msg in messages %}
    {%- if msg.role == 'system' %}
<|system|>
{{ msg.content }}
    {%- endif %}
{%- endfor %}

{%- for message in messages if message.role != 'system' %}
    {%- set role = message['role'] %}
    {%- set content = message['content'] %}
    {%- set meta = message.get("metadata", "") %}

    {%- if role == 'user' %}
<|user|>
{{ content }}
    {%- elif role == 'assistant' and not meta %}
<|assistant|>
{{ content }}
    {%- elif role == 'assistant' and meta %}
<|assistant|>{{ meta }}
{{ content }}
    {%- elif role == 'observation' %}
<|observation|>
{{ content }}
    {%- endif %}
{%- endfor %}
{% if add_generation_prompt %}<|assistant|>{% endif %}"""

# GLM-Z1-9B-0414's chat_template.jinja: as GLM-4-0414's, with the ChatGLM preamble before the tools,
# earlier replies shown after their "</think>", and the reply opened with "<think>".
GLM_Z1_CHAT_TEMPLATE = """[gMASK]<sop>
{%- if tools -%}
<|system|>
你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，你的任务是针对用户的问题和要求提供适当的答复和支持。

# 可用工具
{%- for tool in tools %}
    {%- set function = tool.function if tool.get("function") else tool %}

## {{ function.name }}

{{ function | tojson(indent=4, ensure_ascii=False) }}
在调用上述函数时，请使用 Json 格式表示调用的参数。
{%- endfor %}
{%- endif -%}

{%- for msg in messages %}
    {%- if msg.role == 'system' %}
<|system|>
{{ msg.content }}
    {%- endif %}
{%- endfor %}

{%- for message in messages if message.role != 'system' %}
    {%- set role = message['role'] %}
    {%- set content = message['content'] %}
    {%- set visible = content.split('</think>')[-1].strip() %}
    {%- set meta = message.get("metadata", "") %}

    {%- if role == 'user' %}
<|user|>
{{ visible }}
    {%- elif role == 'assistant' and not meta %}
<|assistant|>
{{ visible }}
    {%- elif role == 'assistant' and meta %}
<|assistant|>{{ meta }}
{{ visible }}
    {%- elif role == 'observation' %}
<|observation|>
{{ visible }}
    {%- endif %}
{%- endfor %}
{% if add_generation_prompt %}<|assistant|>
<think>{% endif %}"""

# GLM-Edge-1.5B/4B-chat's template (tokenizer_config.json): no [gMASK]<sop>, no tools, and the
# assistant turn is always opened.
GLM_EDGE_CHAT_TEMPLATE = (
    "{% for item in messages %}{% if item['role'] == 'system' %}<|system|>\n{{ item['content'] }}"
    "{% elif item['role'] == 'user' %}<|user|>\n{{ item['content'] }}"
    "{% elif item['role'] == 'assistant' %}<|assistant|>\n{{ item['content'] }}"
    "{% endif %}{% endfor %}<|assistant|>"
)


def to_glm4_names(tensors: dict[str, torch.Tensor], generator: torch.Generator, hidden: int) -> dict[str, torch.Tensor]:
    """GlmForCausalLM names plus Glm4ForCausalLM's two sandwich norms per layer (random, around 1)."""
    out = dict(tensors)
    layers = sorted({int(k.split(".")[2]) for k in tensors if k.startswith("model.layers.")})
    for i in layers:
        for norm in ("post_self_attn_layernorm", "post_mlp_layernorm"):
            out[f"model.layers.{i}.{norm}.weight"] = torch.randn(hidden, generator=generator) * 0.1 + 1.0
    return out


def _hf_tokenizer_config(n: int, template: str | None) -> dict:
    config = _glm4_tokenizer_config(n, chat=template is not None, hf=True)
    config.pop("chat_template", None)
    if template is not None:
        config["chat_template"] = template
    return config


def _write_hf_checkpoint(out: Path, *, name: str, config: dict, tensors: dict, ranks: dict, tok_config: dict,
                         template_file: str | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer_json(out, ranks)
    write_weights(out, {k: v.contiguous() for k, v in tensors.items()}, "safetensors", 1)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(
        json.dumps({"name_or_path": name, **tok_config}, indent=2, ensure_ascii=False) + "\n")
    if template_file is not None:
        (out / "chat_template.jinja").write_text(template_file)
    return out


def _hf_base_tensors(seed, padded, hidden_size, num_layers, heads, kv_channels, groups, ffn):
    generator = torch.Generator().manual_seed(seed)
    tensors = random_weights(generator, vocab=padded, hidden=hidden_size, num_layers=num_layers, heads=heads,
                             kv_channels=kv_channels, groups=groups, ffn=ffn)
    return generator, to_hf_names(tensors, heads, groups, kv_channels)


def make_tiny_glm4_0414_checkpoint(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_attention_heads: int = 4,
    kv_channels: int = 16,
    multi_query_group_num: int = 2,
    ffn_hidden_size: int = 96,
    layernorm_epsilon: float = 1e-5,
    seq_length: int = 512,
    rope_theta: float = 10000.0,
    dtype: torch.dtype = torch.float32,
    ranks: dict[bytes, int] | None = None,
    reasoning: bool = False,
) -> Path:
    """A random THUDM/GLM-4-9B-0414-layout checkpoint (Glm4ForCausalLM, chat_template.jinja);
    reasoning: THUDM/GLM-Z1-9B-0414's (the same network, the Z1 template)."""
    ranks = ranks or train_bpe_ranks()
    n = len(ranks)
    padded = math.ceil((n + len(SPECIAL_TOKENS)) / 64) * 64
    generator, tensors = _hf_base_tensors(seed, padded, hidden_size, num_layers, num_attention_heads, kv_channels,
                                          multi_query_group_num, ffn_hidden_size)
    tensors = {k: v.to(dtype) for k, v in to_glm4_names(tensors, generator, hidden_size).items()}
    config = {
        "architectures": ["Glm4ForCausalLM"], "model_type": "glm4", "attention_bias": True,
        "attention_dropout": 0.0, "eos_token_id": [n, n + 7, n + 9], "head_dim": kv_channels, "hidden_act": "silu",
        "hidden_size": hidden_size, "initializer_range": 0.02, "intermediate_size": ffn_hidden_size,
        "max_position_embeddings": seq_length, "num_attention_heads": num_attention_heads,
        "num_hidden_layers": num_layers, "num_key_value_heads": multi_query_group_num, "pad_token_id": n,
        "partial_rotary_factor": 0.5, "rms_norm_eps": layernorm_epsilon, "rope_theta": rope_theta,
        "tie_word_embeddings": False, "torch_dtype": str(dtype).removeprefix("torch."),
        "transformers_version": "4.51.3", "use_cache": True, "vocab_size": padded,
    }
    name = "THUDM/GLM-Z1-9B-0414" if reasoning else "THUDM/GLM-4-9B-0414"
    template = GLM_Z1_CHAT_TEMPLATE if reasoning else GLM4_0414_CHAT_TEMPLATE
    return _write_hf_checkpoint(Path(path), name=name, config=config, tensors=tensors, ranks=ranks,
                                tok_config=_hf_tokenizer_config(n, None), template_file=template)


def make_tiny_glm_edge_checkpoint(
    path: str | os.PathLike[str],
    *,
    name: str = "THUDM/glm-edge-1.5b-chat",
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_attention_heads: int = 4,
    kv_channels: int = 16,
    multi_query_group_num: int = 2,
    ffn_hidden_size: int = 96,
    layernorm_epsilon: float = 1e-5,
    seq_length: int = 512,
    rope_theta: float = 10000.0,
    tie_word_embeddings: bool = True,
    dtype: torch.dtype = torch.float32,
    ranks: dict[bytes, int] | None = None,
) -> Path:
    """A random THUDM/glm-edge-*-chat-layout checkpoint: GlmForCausalLM with full rotary, no
    attention bias and (1.5B) tied embeddings; its template in tokenizer_config.json."""
    ranks = ranks or train_bpe_ranks()
    n = len(ranks)
    padded = math.ceil((n + len(SPECIAL_TOKENS)) / 64) * 64
    _, tensors = _hf_base_tensors(seed, padded, hidden_size, num_layers, num_attention_heads, kv_channels,
                                  multi_query_group_num, ffn_hidden_size)
    tensors = {k: v.to(dtype) for k, v in tensors.items() if not k.endswith("_proj.bias")}
    if tie_word_embeddings:
        del tensors["lm_head.weight"]
    config = {
        "architectures": ["GlmForCausalLM"], "model_type": "glm", "attention_bias": False,
        "attention_dropout": 0.0, "eos_token_id": [n, n + 7, n + 9], "head_dim": kv_channels, "hidden_act": "silu",
        "hidden_size": hidden_size, "initializer_range": 0.02, "intermediate_size": ffn_hidden_size,
        "max_position_embeddings": seq_length, "num_attention_heads": num_attention_heads,
        "num_hidden_layers": num_layers, "num_key_value_heads": multi_query_group_num, "pad_token_id": n,
        "partial_rotary_factor": 1.0, "rms_norm_eps": layernorm_epsilon, "rope_theta": rope_theta,
        "tie_word_embeddings": tie_word_embeddings, "torch_dtype": str(dtype).removeprefix("torch."),
        "transformers_version": "4.47.0.dev0", "use_cache": True, "vocab_size": padded,
    }
    return _write_hf_checkpoint(Path(path), name=name, config=config, tensors=tensors, ranks=ranks,
                                tok_config=_hf_tokenizer_config(n, GLM_EDGE_CHAT_TEMPLATE))
