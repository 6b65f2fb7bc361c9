"""ChatGLM-6B (the original, "v1"): an independent, straightforward re-implementation of the
public reference (THUDM/chatglm-6b's modeling and tokenization code), used by tests as the reference.

It reads the checkpoint files itself and shares no code with glmchat. The facts it implements:

* network: embeddings; per layer a = LN_in(x), x = a*alpha + Attn(a), m = LN_post(x),
  x = m*alpha + MLP(m) with alpha = sqrt(2*num_layers) (the residual is the *normed* input);
  MLP = dense_4h_to_h(gelu_tanh(dense_h_to_4h(m))); final LayerNorm (weight and bias everywhere);
  logits against the word embeddings (lm_head is tied);
* attention: query_key_value viewed per head as [q|k|v] (head_dim each, interleaved per head);
  2D rotary: the first half of each q/k head rotates by position_ids, the second half by
  block_position_ids (rotate-half style, rotary dim head_dim/2, inv_freq rounded to float16);
  q is divided by sqrt(head_dim)*(layer+1), masked scores are set to -10000, then scores are
  multiplied by (layer+1) in float32 and soft-maxed in float32;
* positions for a row with context length c (index of the first <sop>) and mask position
  (index of the first [gMASK], else of the first [MASK]): position_ids = arange with
  position_ids[c:] = mask position; block_position_ids = 0 before c, then 1, 2, 3, ...;
  query i sees key j iff j <= i or j < c;
* tokenizer (ice_text.model): "\n" -> <n>, "\t" -> <|tab|>, runs of n spaces (80..2) ->
  <|blank_n|>, SentencePiece with its dummy prefix, + num_image_tokens, then [gMASK] <sop>
  appended; decoding undoes it (control pieces vanish);
* chat: the "[Round i]\n问：...\n答：..." prompt and process_response's punctuation rules.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

MASKED_SCORE = -10000.0
MAX_BLANK = 80


def _config(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / "config.json").read_text())


def reference_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint by official name, read from the files directly."""
    ckpt = Path(ckpt)
    if (ckpt / "model.safetensors").exists():
        return load_file(ckpt / "model.safetensors")
    if (ckpt / "pytorch_model.bin").exists():
        return torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    for index_name, load in (("model.safetensors.index.json", load_file),
                             ("pytorch_model.bin.index.json", lambda f: torch.load(f, weights_only=True))):
        if (ckpt / index_name).exists():
            index = json.loads((ckpt / index_name).read_text())
            tensors: dict[str, torch.Tensor] = {}
            for shard in sorted(set(index["weight_map"].values())):
                tensors.update(load(ckpt / shard))
            return tensors
    raise FileNotFoundError(f"no weights in {ckpt}")


def reference_positions(row: list[int], config: dict) -> tuple[list[int], list[int], int]:
    """(position_ids, block_position_ids, context_length) of one row."""
    if config["bos_token_id"] not in row:
        raise ValueError("a ChatGLM-6B row must contain <sop> (bos_token_id)")
    c = row.index(config["bos_token_id"])
    mask_id = config["gmask_token_id"] if config["gmask_token_id"] in row else config["mask_token_id"]
    mask_position = row.index(mask_id)
    n = len(row)
    position_ids = list(range(c)) + [mask_position] * (n - c)
    block_position_ids = [0] * c + list(range(1, n - c + 1))
    return position_ids, block_position_ids, c


def reference_mask(n: int, context_length: int) -> torch.Tensor:
    """[n, n] bool, True where query i may attend to key j (j <= i or j < context_length)."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    return (j <= i) | (j < context_length)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotary(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, d]; positions: [T]; angles in float32, tables cast to x's dtype."""
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    table = torch.cat((angles, angles), dim=-1)  # [T, d]
    cos = table.cos().to(x.dtype)[:, None, :]
    sin = table.sin().to(x.dtype)[:, None, :]
    return x * cos + _rotate_half(x) * sin


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def _row_logits(w: dict, config: dict, row: list[int], dtype: torch.dtype) -> torch.Tensor:
    hidden, heads, layers = config["hidden_size"], config["num_attention_heads"], config["num_layers"]
    eps = config["layernorm_epsilon"]
    head_dim = hidden // heads
    d = head_dim // 2
    inv_freq = (1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)).half().float()
    alpha = (2 * layers) ** 0.5

    pos, block, c = reference_positions(row, config)
    pos_t, block_t = torch.tensor(pos), torch.tensor(block)
    allowed = reference_mask(len(row), c)  # [T, T]
    T = len(row)

    def ln(x, name):
        return F.layer_norm(x, (hidden,), w[name + ".weight"], w[name + ".bias"], eps)

    def linear(x, name):
        return F.linear(x, w[name + ".weight"], w[name + ".bias"])

    x = w["transformer.word_embeddings.weight"][torch.tensor(row)]  # [T, H]
    for i in range(layers):
        p = f"transformer.layers.{i}."
        a = ln(x, p + "input_layernorm")
        qkv = linear(a, p + "attention.query_key_value").view(T, heads, 3 * head_dim)
        q, k, v = qkv.split(head_dim, dim=-1)  # each [T, heads, head_dim]
        q = torch.cat((_rotary(q[..., :d], pos_t, inv_freq), _rotary(q[..., d:], block_t, inv_freq)), dim=-1)
        k = torch.cat((_rotary(k[..., :d], pos_t, inv_freq), _rotary(k[..., d:], block_t, inv_freq)), dim=-1)
        coeff = float(i + 1)
        q = q / (math.sqrt(head_dim) * coeff)
        scores = torch.einsum("qhd,khd->hqk", q, k)  # [heads, T, T]
        scores = scores.masked_fill(~allowed[None], MASKED_SCORE)
        probs = torch.softmax(scores.float() * coeff, dim=-1).to(dtype)
        ctx = torch.einsum("hqk,khd->qhd", probs, v).reshape(T, hidden)
        h = linear(ctx, p + "attention.dense")
        x = a * alpha + h
        m = ln(x, p + "post_attention_layernorm")
        mlp = linear(_gelu_tanh(linear(m, p + "mlp.dense_h_to_4h")), p + "mlp.dense_4h_to_h")
        x = m * alpha + mlp
    x = ln(x, "transformer.final_layernorm")
    return x @ w["transformer.word_embeddings.weight"].T  # [T, V]


def reference_logits(ckpt: Path, input_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, T] ids -> [B, T, V] logits (in ``dtype``): a full forward, no cache, each row on its own."""
    config = _config(ckpt)
    w = {k: t.to(dtype) for k, t in reference_tensors(ckpt).items()}
    with torch.no_grad():
        return torch.stack([_row_logits(w, config, row, dtype) for row in input_ids.tolist()])


def reference_greedy(ckpt: Path, prompt_ids: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
    """Greedy continuation of ``prompt_ids`` (new tokens only, eos included), recomputing everything each step."""
    config = _config(ckpt)
    w = {k: t.float() for k, t in reference_tensors(ckpt).items()}
    seq, new = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(_row_logits(w, config, seq, torch.float32)[-1].argmax())
            seq.append(token)
            new.append(token)
            if token == eos_id:
                break
    return new


def _sp_and_offset(ckpt: Path) -> tuple[spm.SentencePieceProcessor, int]:
    ckpt = Path(ckpt)
    sp = spm.SentencePieceProcessor(model_file=str(ckpt / "ice_text.model"))
    tok_config = ckpt / "tokenizer_config.json"
    offset = json.loads(tok_config.read_text()).get("num_image_tokens", 0) if tok_config.exists() else 0
    return sp, offset


def reference_encode(ckpt: Path, text: str) -> list[int]:
    """What the v1 tokenizer's encode gives: the text's ids followed by [gMASK] <sop>."""
    sp, offset = _sp_and_offset(ckpt)
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for n in range(MAX_BLANK, 1, -1):
        text = text.replace(" " * n, f"<|blank_{n}|>")
    ids = [i + offset for i in sp.encode(text)]
    return ids + [sp.piece_to_id("[gMASK]") + offset, sp.piece_to_id("<sop>") + offset]


def reference_decode(ckpt: Path, ids: list[int]) -> str:
    sp, offset = _sp_and_offset(ckpt)
    text = sp.decode([i - offset for i in ids if i - offset >= 0])
    text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
    for n in range(2, MAX_BLANK + 1):
        text = text.replace(f"<|blank_{n}|>", " " * n)
    return text


def reference_prompt(query: str, history: list[tuple[str, str]] | None = None) -> str:
    if not history:
        return query
    prompt = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
    return prompt + f"[Round {len(history)}]\n问：{query}\n答："


def reference_process_response(text: str) -> str:
    text = text.strip().replace("[[训练时间]]", "2023年")
    for ascii_mark, full in ((",", "，"), ("!", "！"), (":", "："), (";", "；"), ("?", "？")):
        mark = re.escape(ascii_mark)
        text = re.sub(rf"([\u4e00-\u9fff]){mark}", rf"\1{full}", text)
        text = re.sub(rf"{mark}([\u4e00-\u9fff])", rf"{full}\1", text)
    return text
