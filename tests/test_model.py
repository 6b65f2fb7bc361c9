"""The native model against transformers' GlmForCausalLM, and its own cache against recomputation."""

from __future__ import annotations

import pytest
import torch

from glmchat.generate import generate_tokens
from glmchat.loader import load_model
from glmchat.model import ContextLengthError
from glmchat.families.chatglm3 import ChatGLMTokenizer
from reference import reference_model

PROMPTS = [
    "Hello, how are you?",
    "什么是ChatGLM？ChatGLM和ChatGPT之间有哪些相似和不同之处？",
    "Implement code for binary search in Python",
    "解释自然语言处理领域的最近发展。 .Provide answer in English 😀",
]
TOL = 1e-4  # float32, tiny shapes: differences are rounding only


@pytest.fixture(scope="module", params=["tiny_ckpt", "tiny_ckpt_b"])
def pair(request):
    """(our model, reference model, tokenizer) for each tiny shape."""
    ckpt = request.getfixturevalue(request.param)
    ours, _ = load_model(ckpt, dtype=torch.float32, progress=False)
    return ours, reference_model(ckpt), ChatGLMTokenizer.from_pretrained(ckpt)


def _ids(tokenizer, text):
    return torch.tensor([tokenizer.encode(text)])


@pytest.mark.parametrize("text", PROMPTS)
def test_logits_match_reference(pair, text):
    ours, ref, tokenizer = pair
    ids = _ids(tokenizer, text)
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < TOL


def test_chat_input_logits_match_reference(pair):
    ours, ref, tokenizer = pair
    history = [{"role": "system", "content": "You are ChatGLM3."},
               {"role": "user", "content": "你好"}, {"role": "assistant", "metadata": "", "content": "你好👋"}]
    ids = tokenizer.build_chat_input("Summarize the paper 'Attention Is All You Need'", history=history)["input_ids"]
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() < TOL


def test_kv_cache_decoding_matches_reference(pair):
    ours, ref, tokenizer = pair
    ids = _ids(tokenizer, PROMPTS[1])
    split = ids.shape[1] // 2
    with torch.no_grad():
        expected = ref(ids).logits
        cache = ours.new_cache(1, ids.shape[1])
        pieces = [ours(ids[:, :split], cache=cache)]
        pieces += [ours(ids[:, t:t + 1], cache=cache) for t in range(split, ids.shape[1])]
    assert cache.length == ids.shape[1]
    assert (torch.cat(pieces, dim=1) - expected).abs().max().item() < TOL


def test_chunked_prefill_matches_full(pair):
    ours, _, tokenizer = pair
    ids = _ids(tokenizer, PROMPTS[0] + PROMPTS[1])
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache(1, ids.shape[1])
        chunks = [ours(ids[:, i:i + 5], cache=cache) for i in range(0, ids.shape[1], 5)]
    assert (torch.cat(chunks, dim=1) - full).abs().max().item() < TOL


def test_left_padded_batch_matches_reference_and_single(pair):
    ours, ref, tokenizer = pair
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    mask = batch["attention_mask"]
    assert (mask[:, 0] == 0).any(), "the prompts should need padding"
    with torch.no_grad():
        got = ours(batch["input_ids"], attention_mask=mask)
        expected = ref(batch["input_ids"], attention_mask=mask).logits
        for row, text in enumerate(PROMPTS):
            alone = ours(_ids(tokenizer, text))[0]
            assert (got[row, -alone.shape[0]:] - alone).abs().max().item() < TOL
    real = mask.bool()
    assert torch.isfinite(got).all()
    assert (got - expected)[real].abs().max().item() < TOL


def test_left_padded_batch_decoding_with_cache(pair):
    ours, _, tokenizer = pair
    batch = tokenizer(PROMPTS[:3], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    steps = 6
    with torch.no_grad():
        cache = ours.new_cache(3, ids.shape[1] + steps)
        logits = ours(ids, cache=cache, attention_mask=mask)
        tokens = []
        for _ in range(steps):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt)
            logits = ours(nxt, cache=cache)
        generated = torch.cat(tokens, dim=1)
        for row, text in enumerate(PROMPTS[:3]):
            alone = list(generate_tokens(ours, _ids(tokenizer, text)[0].tolist(), max_new_tokens=steps))
            assert generated[row].tolist() == alone


def test_greedy_tokens_match_reference_generate(pair):
    ours, ref, tokenizer = pair
    for text in PROMPTS[:2]:
        prompt = tokenizer.build_chat_input(text)["input_ids"]
        with torch.no_grad():
            expected = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24,
                                    do_sample=False, eos_token_id=None, pad_token_id=0)
        got = list(generate_tokens(ours, prompt[0].tolist(), max_new_tokens=24))
        assert got == expected[0, prompt.shape[1]:].tolist()


def test_positions_past_context_are_refused(tiny_ckpt):
    model, _ = load_model(tiny_ckpt, progress=False)
    n = model.config.seq_length
    with pytest.raises(ContextLengthError, match="by 1"):
        model(torch.zeros(1, n + 1, dtype=torch.long))
    with pytest.raises(ContextLengthError):
        model.new_cache(1, n + 1)
    with pytest.raises(ContextLengthError, match=str(n)):
        model(torch.zeros(1, 1, dtype=torch.long), position_ids=torch.tensor([[n]]))
    cache = model.new_cache(1, 4)
    model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
    with pytest.raises(ContextLengthError):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ContextLengthError, match="more than the model's context"):
        next(generate_tokens(model, [5] * (n + 3), max_new_tokens=1))
    # A prompt that fills the context exactly still gets its one token, and no more.
    assert len(list(generate_tokens(model, [5] * (n - 1), max_new_tokens=10))) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_float32(tiny_ckpt, tokenizer, dtype):
    ref, _ = load_model(tiny_ckpt, dtype=torch.float32, progress=False)
    half, _ = load_model(tiny_ckpt, dtype=dtype, progress=False)
    assert half.dtype == dtype
    ids = _ids(tokenizer, PROMPTS[1])
    with torch.no_grad():
        expected = ref(ids)
        got = half(ids).float()
        cache = half.new_cache(1, ids.shape[1])
        cached = torch.cat([half(ids[:, :-1], cache=cache), half(ids[:, -1:], cache=cache)], dim=1).float()
    assert torch.isfinite(got).all()
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() < 0.05 * scale
    assert (cached - got).abs().max().item() < 0.05 * scale


def test_compiled_decode_gives_the_eager_tokens(tiny_ckpt, tokenizer):
    """--compile: the compiled decode step (dynamic shapes, one compile as the cache grows)."""
    model, _ = load_model(tiny_ckpt, dtype=torch.float32, progress=False)
    prompt = _ids(tokenizer, PROMPTS[0])[0].tolist()
    eager = list(generate_tokens(model, prompt, max_new_tokens=12))
    model.compile_decode()
    compiled = list(generate_tokens(model, prompt, max_new_tokens=12))
    with torch._dynamo.config.patch(error_on_recompile=True):  # the growing cache compiled once for all
        compiled_again = list(generate_tokens(model, prompt, max_new_tokens=12))
    assert compiled == eager == compiled_again
