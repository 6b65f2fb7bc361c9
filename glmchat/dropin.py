"""Drop-in `AutoTokenizer` / `AutoModel` for code written against the reference (trust_remote_code).

`model.chat` and `model.stream_chat` give what the checkpoint family's reference gives, quirks
included: the family (glmchat.families) holds those quirks, this module turns transformers-style
options into sampling settings and runs the generation core.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import NamedTuple

import torch
from torch import nn

from .chat import ChatModel, load, resized_cache
from .config import GLMConfig
from .families import Tokenizer
from .generate import SamplingConfig, generate_batch
from .hub import resolve_checkpoint
from .kernels import install
from .loader import read_config
from .model import KVCache


class AutoTokenizer:
    @staticmethod
    def from_pretrained(path_or_id, *args, **kwargs) -> Tokenizer:
        """The tokenizer of a local directory or hub id, of the checkpoint's own family
        (ChatGLM2/3 SentencePiece, GLM-4 byte-level BPE); trust_remote_code etc. are ignored."""
        directory = resolve_checkpoint(path_or_id, weights=False)
        tokenizer = read_config(directory, name=str(path_or_id))[1].load_tokenizer(directory)
        tokenizer.name_or_path = str(path_or_id)  # like transformers: what the caller named, hub id or path
        return tokenizer


class AutoModel:
    @staticmethod
    def from_pretrained(path_or_id, *args, torch_dtype=None, dtype=None, device=None, device_map=None,
                        **kwargs) -> ChatGLMForConditionalGeneration:
        """Load like the reference: the stored dtype, on the CPU, unless torch_dtype / device say otherwise.

        device_map may name one device ("auto", "cuda", "cpu", {"": "cuda:0"}); splitting a model
        over several devices is not supported. trust_remote_code and the like are ignored.
        """
        dtype = dtype if dtype is not None else torch_dtype
        if dtype == "auto":
            dtype = None  # transformers' "auto": the checkpoint's dtype
        device = _device_from_map(device_map) or device or "cpu"
        return ChatGLMForConditionalGeneration(load(path_or_id, device=device, dtype=dtype))


AutoModelForCausalLM = AutoModel


def _device_from_map(device_map) -> str | None:
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        devices = {str(d) for d in device_map.values()}
        if len(devices) != 1:
            raise ValueError(f"device_map spreads the model over {sorted(devices)}; glmchat runs it on one device")
        device_map = devices.pop()
    if isinstance(device_map, int) or str(device_map).isdigit():
        return f"cuda:{device_map}"
    return str(device_map)


def dropin_config(config: GLMConfig, raw: dict) -> GLMConfig:
    """The drop-in model's `config`: a copy of the network's GLMConfig with every key of the
    checkpoint's config.json as an attribute, the file's value where both have one (as the
    reference's config shows them: `multi_query_attention`, `seq_length`, `rope_ratio`, the
    eos_token_id list, ...). The network keeps its own config. Keys that name one of GLMConfig's
    computed properties (`head_dim` of the "-hf" configs) are read through the property."""
    out = dataclasses.replace(config)
    for key, value in raw.items():
        if not isinstance(getattr(GLMConfig, key, None), property):
            setattr(out, key, copy.deepcopy(value))
    return out


class CausalLMOutput(NamedTuple):
    logits: torch.Tensor
    past_key_values: PastKeyValues | None = None


class PastKeyValues:
    """What `past_key_values` holds: glmchat's KV cache up to `length`. Pass it back unchanged.

    Several of these can share one cache; continuing from one that is no longer the cache's end
    copies its part first, so each keeps meaning what it meant when it was returned.
    """

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.length = cache.length

    def get_seq_length(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return f"PastKeyValues(length={self.length})"


# Generation options of transformers' generate() that change nothing here.
_IGNORED_OPTIONS = {"use_cache", "bos_token_id", "return_dict", "output_attentions", "output_hidden_states"}


class ChatGLMForConditionalGeneration(nn.Module):
    """The reference's model class: forward, generate, chat, stream_chat, and torch's .half()/.cuda()/...."""

    def __init__(self, chat_model: ChatModel):
        super().__init__()
        self.transformer = chat_model.model
        self.config = dropin_config(chat_model.config, chat_model.raw_config)
        self.family = chat_model.family
        self._engine = chat_model
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        # Like the reference, which recomputes its rotary table in float32 and casts it to the
        # model's dtype: converting the table itself (.half().float()) would keep fp16 rounding.
        self.transformer.reset_rotary()
        install(self.transformer)  # the fast paths that fit the new device and dtype
        self._engine._cache = None
        return self

    def quantize(self, *args, **kwargs):
        raise NotImplementedError("model.quantize() is not supported; load the model in bfloat16/float16 instead")

    # ---- forward / generate ----------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache: bool = True, return_last_logit: bool = False, **kwargs) -> CausalLMOutput:
        """Logits [B, T, vocab] and, with use_cache, the past_key_values to continue from."""
        _check_options(kwargs)
        input_ids = input_ids.to(self.device)
        cache = None
        if use_cache or past_key_values is not None:
            cache = self._cache_for(past_key_values, input_ids.shape[0], input_ids.shape[1])
        logits = self.transformer(input_ids, cache=cache, attention_mask=_on(attention_mask, self.device),
                                  position_ids=_on(position_ids, self.device), last_only=return_last_logit)
        return CausalLMOutput(logits, PastKeyValues(cache) if cache is not None else None)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor | None = None, attention_mask=None, position_ids=None, *,
                 inputs=None, max_length: int | None = None, max_new_tokens: int | None = None,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 50,
                 repetition_penalty: float = 1.0, num_beams: int = 1, eos_token_id=None, pad_token_id=None,
                 logits_processor=None, past_key_values=None, **kwargs) -> torch.Tensor:
        """transformers' generate(): the prompt followed by the new tokens, [B, T + new].

        Defaults are transformers' (greedy, max_length 20, stop at eos); finished rows are padded.
        """
        input_ids = (input_ids if input_ids is not None else inputs).to(self.device)
        B, T = input_ids.shape
        sampling, max_new = _options(T, max_length if max_length is not None else 20, max_new_tokens, do_sample,
                                     temperature, top_p, top_k, repetition_penalty, num_beams, kwargs)
        stop = eos_token_id if eos_token_id is not None else self.config.eos_token_id
        stop = [stop] if isinstance(stop, int) else list(stop)
        cache = self._cache_for(past_key_values, B, T + max_new)
        new = list(generate_batch(
            self.transformer, input_ids, max_new_tokens=max_new, attention_mask=_on(attention_mask, self.device),
            position_ids=_on(position_ids, self.device), stop_ids=stop, sampling=sampling,
            processors=list(logits_processor or []), cache=cache,
            pad_id=pad_token_id if pad_token_id is not None else self.config.pad_token_id,
        ))
        return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1) if new else input_ids

    def _generate(self, tokenizer, prompt, max_length, num_beams, do_sample, top_p, temperature, logits_processor,
                  kwargs, past_key_values=None):
        """(generated ids, the cache they go into) for the reference's chat options."""
        sampling, max_new = _options(len(prompt), max_length, kwargs.pop("max_new_tokens", None), do_sample,
                                     temperature, top_p, kwargs.pop("top_k", 50),
                                     kwargs.pop("repetition_penalty", 1.0), num_beams, kwargs)
        cache = self._cache_for(past_key_values, 1, len(prompt) + max_new)
        tokens = self._engine.generate_ids(prompt, max_new_tokens=max_new, sampling=sampling, cache=cache,
                                           stop_ids=self.family.stop_ids(tokenizer),
                                           processors=list(logits_processor or []))
        return tokens, cache

    def _cache_for(self, past: PastKeyValues | None, batch: int, new_tokens: int) -> KVCache:
        """A cache holding `past` with room for new_tokens more (within the model's context)."""
        context = self.config.seq_length
        if past is None:
            return self.transformer.new_cache(batch, min(context, -(-new_tokens // 256) * 256))
        if not isinstance(past, PastKeyValues):
            raise TypeError("past_key_values must be the object glmchat returned (the reference's tuples are not accepted)")
        cache, length = past.cache, past.length
        if cache.k.shape[1] != batch:
            raise ValueError(f"past_key_values holds {cache.k.shape[1]} rows, the input has {batch}")
        needed = min(context, length + new_tokens)
        if (cache.length == length and cache.max_len >= needed and cache.k.device == self.device
                and cache.k.dtype == self.dtype):
            return cache
        return resized_cache(self.transformer, cache, length, max(needed, min(context, 2 * cache.max_len)))

    # ---- the reference's helpers: their shapes are the family's ------------------------------

    def process_response(self, *args, **kwargs):
        """The reference's post-processing of a decoded reply: `(output, history)` -> (response,
        history) for ChatGLM3 / GLM-4, `(response)` -> str for ChatGLM2 (Family.process_response)."""
        return self.family.process_response(*args, **kwargs)

    def build_inputs(self, tokenizer, query: str, history: list | None = None):
        """ChatGLM2's prompt batch for query after history, on the model's device."""
        return self.family.build_inputs(tokenizer, query, history).to(self.device)

    def build_stream_inputs(self, tokenizer, query: str, history: list | None = None):
        """ChatGLM2's prompt batch of this round alone when a history's KV cache is reused."""
        return self.family.build_stream_inputs(tokenizer, query, history).to(self.device)

    # ---- chat ------------------------------------------------------------------------------

    def _chat_defaults(self, max_length, top_p, temperature) -> tuple:
        defaults = self.family.chat_defaults
        return (defaults["max_length"] if max_length is None else max_length,
                defaults["top_p"] if top_p is None else top_p,
                defaults["temperature"] if temperature is None else temperature)

    @torch.inference_mode()
    def chat(self, tokenizer, query: str, history: list | None = None, role: str = "user",
             max_length: int | None = None, num_beams: int = 1, do_sample: bool = True, top_p: float | None = None,
             temperature: float | None = None, logits_processor=None, **kwargs):
        """(response, history) like the family's reference (glmchat.families: `Family.dropin_chat`).

        ChatGLM3 / GLM-4: `history` (a list of messages) gets the query appended in place, the
        last generated token is dropped. ChatGLM2 / ChatGLM-6B: history is (query, response) pairs,
        the caller's list is left alone, every generated token is kept. Options left out take the
        family's reference defaults (max_length 8192, top_p 0.8, temperature 0.8; ChatGLM-6B:
        2048, 0.7, 0.95).
        """
        self.family.check_chat()
        max_length, top_p, temperature = self._chat_defaults(max_length, top_p, temperature)
        options = (max_length, num_beams, do_sample, top_p, temperature, logits_processor, kwargs)

        def generate(prompt):
            return self._generate(tokenizer, prompt, *options)[0]

        return self.family.dropin_chat(tokenizer, generate, query, history, role)

    @torch.inference_mode()
    def stream_chat(self, tokenizer, query: str, history: list | None = None, role: str = "user",
                    past_key_values=None, max_length: int | None = None, do_sample: bool = True,
                    top_p: float | None = None, temperature: float | None = None, logits_processor=None,
                    return_past_key_values: bool = False, **kwargs):
        """Yields (response, history[, past_key_values]) as tokens arrive, like the family's reference.

        With past_key_values (from an earlier call) the prompt holds only this turn. ChatGLM3 /
        GLM-4 lag one token (the newest is left out of each yield) and mutate `history` once;
        ChatGLM2 shows every token and returns `history + [(query, response)]`. Yields whose text
        is empty or ends in U+FFFD are skipped (see `Family.dropin_stream_chat`).
        """
        self.family.check_chat()
        max_length, top_p, temperature = self._chat_defaults(max_length, top_p, temperature)
        options = (max_length, 1, do_sample, top_p, temperature, logits_processor, kwargs)
        cache = None

        def generate(prompt):
            nonlocal cache
            tokens, cache = self._generate(tokenizer, prompt, *options, past_key_values=past_key_values)
            return tokens

        for response, new_history in self.family.dropin_stream_chat(
                tokenizer, generate, query, history, role, past_given=past_key_values is not None,
                return_past=return_past_key_values):
            yield (response, new_history, PastKeyValues(cache)) if return_past_key_values else (response, new_history)


def _options(prompt_len, max_length, max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty,
             num_beams, extra) -> tuple[SamplingConfig, int]:
    """Sampling and the number of new tokens from transformers-style generation options."""
    _check_options(extra, allowed=_IGNORED_OPTIONS | {"pad_token_id"})
    if num_beams != 1:
        raise ValueError(f"num_beams={num_beams}: beam search is not supported (use num_beams=1)")
    if max_new_tokens is None:
        max_new_tokens = max(1, max_length - prompt_len)  # transformers generates at least one token
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    sampling = SamplingConfig(greedy=not do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
                              repetition_penalty=repetition_penalty)
    return sampling, max_new_tokens


def _check_options(options: dict, allowed=_IGNORED_OPTIONS) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(f"unsupported argument(s): {', '.join(unknown)}")


def _on(tensor, device):
    return tensor.to(device) if isinstance(tensor, torch.Tensor) else tensor
