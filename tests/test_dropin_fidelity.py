"""Drop-in fidelity: the reference tokenizers' attributes and the reference model's helpers
(`process_response`, `build_inputs`, `build_stream_inputs`) that user code calls directly.

Evidence for the expected values (the public copies of the THUDM repositories' remote code):
- chatglm3-6b tokenization_chatglm.py: `special_tokens` maps "<bos>"/"<eos>" to SentencePiece's
  bos/eos ids and "<unk>"/"<pad>" to its unk id; `eos_token`, `pad_token`, `unk_token` are the
  SentencePiece pieces of those ids, `*_token_id` the ids; `vocab_size` counts the SentencePiece
  pieces and the nine specials; `get_vocab()` is `{_convert_id_to_token(i): i for i in
  range(vocab_size)}`, where bos/eos/pad become "" and specials their names; `padding_side` "left".
- chatglm2-6b tokenization_chatglm.py: the same, but `eos_token` "</s>", `pad_token` and `unk_token`
  "<unk>" are literals, `unk_token_id` is transformers' lookup of "<unk>", five specials, and
  `_convert_id_to_token` makes the specials "" as well.
- glm-4-9b-chat tokenization_chatglm.py (ChatGLM4Tokenizer): `eos_token_id` is <|endoftext|>'s id,
  the other tokens come from tokenizer_config.json; `vocab_size` = ranks + 14 specials; the
  vocabulary maps each rank's bytes (and each special's name) to its id.
- The "-hf", GLM-4-0414 and GLM-Edge repositories use transformers' own fast tokenizer, which is
  the reference here and runs in the test.
- No tokenizer sets a bos_token; `model_max_length` is the tokenizer_config.json's, else
  transformers' VERY_LARGE_INTEGER (int(1e30)); `name_or_path` is what from_pretrained was given.
- modeling_chatglm.py: chatglm2-6b's `process_response(response)` strips and replaces
  "[[训练时间]]" with "2023年"; its `build_inputs` tokenizes `build_prompt(query, history)`, its
  `build_stream_inputs` with a history only "\\n\\n[Round N]\\n\\n问：…\\n\\n答：" without the
  prefix and without the first id. chatglm3-6b's and glm-4-9b-chat's `process_response(output,
  history)` are re-implemented below (`reference_process_response`); GLM-4 replaces the placeholder with
  "2023年" too (THUDM's GLM-4 composite_demo client: the same function with JSON tool arguments).
"""

from __future__ import annotations

import base64
import copy
import json
import shutil

import pytest
import sentencepiece as spm
import torch

from glmchat import AutoModel, AutoTokenizer
from glmchat.families import ToolCallParseError

VERY_LARGE_INTEGER = int(1e30)
CHATGLM3_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
                     "<|observation|>"]
GLM4_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                 "<|begin_of_video|>", "<|end_of_video|>"]


# ---- tokenizer attributes ------------------------------------------------------------------------


def _sp(ckpt) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))


def _common_attributes(tok, ckpt):
    assert tok.name_or_path == str(ckpt)
    assert tok.padding_side == "left"
    assert (tok.bos_token, tok.bos_token_id) == (None, None)


def test_chatglm3_tokenizer_attributes(tiny_ckpt):
    sp, tok = _sp(tiny_ckpt), AutoTokenizer.from_pretrained(str(tiny_ckpt))
    _common_attributes(tok, tiny_ckpt)
    assert (tok.eos_token, tok.eos_token_id) == (sp.id_to_piece(sp.eos_id()), sp.eos_id()) == ("</s>", 2)
    assert (tok.pad_token, tok.pad_token_id) == (sp.id_to_piece(sp.unk_id()), sp.unk_id()) == ("<unk>", 0)
    assert (tok.unk_token, tok.unk_token_id) == ("<unk>", 0)
    assert tok.vocab_size == sp.vocab_size() + 9
    assert tok.model_max_length == VERY_LARGE_INTEGER  # the checkpoint's tokenizer_config.json names none
    vocab = {}
    for i in range(tok.vocab_size):
        if i >= sp.vocab_size():
            vocab[CHATGLM3_SPECIALS[i - sp.vocab_size()]] = i
        else:
            vocab["" if i in (sp.bos_id(), sp.eos_id(), sp.unk_id()) else sp.id_to_piece(i)] = i
    assert tok.get_vocab() == vocab
    assert vocab[""] == 2 and vocab["<|user|>"] == sp.vocab_size() + 6


def test_chatglm2_tokenizer_attributes(chatglm2_ckpt):
    sp, tok = _sp(chatglm2_ckpt), AutoTokenizer.from_pretrained(chatglm2_ckpt)
    _common_attributes(tok, chatglm2_ckpt)
    assert (tok.eos_token, tok.eos_token_id) == ("</s>", sp.eos_id())
    assert (tok.pad_token, tok.pad_token_id) == ("<unk>", sp.unk_id())
    assert (tok.unk_token, tok.unk_token_id) == ("<unk>", sp.piece_to_id("<unk>"))
    assert tok.vocab_size == sp.vocab_size() + 5
    silent = {sp.bos_id(), sp.eos_id(), sp.unk_id()}
    vocab = {"" if i in silent or i >= sp.vocab_size() else sp.id_to_piece(i): i for i in range(tok.vocab_size)}
    assert tok.get_vocab() == vocab and vocab[""] == tok.vocab_size - 1


def test_glm4_tokenizer_attributes(glm4_ckpt):
    ranks = {}
    for line in (glm4_ckpt / "tokenizer.model").read_text().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    config = json.loads((glm4_ckpt / "tokenizer_config.json").read_text())
    tok, n = AutoTokenizer.from_pretrained(glm4_ckpt), len(ranks)
    _common_attributes(tok, glm4_ckpt)
    assert (tok.eos_token, tok.eos_token_id) == (config["eos_token"], n) == ("<|endoftext|>", n)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", n)
    assert (tok.unk_token, tok.unk_token_id) == (None, None)
    assert tok.vocab_size == len(tok) == n + 14
    assert tok.model_max_length == config["model_max_length"] == 128000
    assert tok.get_vocab() == {**ranks, **{name: n + i for i, name in enumerate(GLM4_SPECIALS)}}


@pytest.mark.parametrize("fixture", ["glm4_hf_ckpt", "glm4_0414_ckpt", "glm_edge_ckpt"])
def test_tokenizer_json_attributes_match_transformers(request, fixture):
    from transformers import PreTrainedTokenizerFast

    ckpt = request.getfixturevalue(fixture)
    hf, tok = PreTrainedTokenizerFast.from_pretrained(ckpt), AutoTokenizer.from_pretrained(ckpt)
    for name in ("eos_token", "eos_token_id", "pad_token", "pad_token_id", "unk_token", "unk_token_id",
                 "bos_token", "bos_token_id", "padding_side", "model_max_length", "vocab_size", "name_or_path"):
        assert getattr(tok, name) == getattr(hf, name), name
    assert len(tok) == len(hf)
    assert tok.get_vocab() == hf.get_vocab()


def test_model_max_length_and_name_from_the_checkpoint(tmp_path, tiny_ckpt):
    ckpt = shutil.copytree(tiny_ckpt, tmp_path / "ckpt")
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 8192}))
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert (tok.model_max_length, tok.name_or_path) == (8192, str(ckpt))
    (ckpt / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        AutoTokenizer.from_pretrained(ckpt)


# ---- model.process_response ------------------------------------------------------------------


def reference_process_response(output: str, history: list, read_arguments, training_time: str):
    """ChatGLM3 / GLM-4's process_response, from its rules: split at <|assistant|>; each segment's
    first line is its metadata ("" without a newline); blank metadata is text (stripped, the last one
    returned with the placeholder replaced), any other a tool call: {"name", "parameters"} when the
    conversation's first message is a system message with tools, else {"name", "content"}."""
    history, response = copy.deepcopy(history), ""
    for segment in output.split("<|assistant|>"):
        metadata, content = segment.split("\n", 1) if "\n" in segment else ("", segment)
        if metadata.strip() == "":
            history.append({"role": "assistant", "metadata": metadata, "content": content.strip()})
            response = content.strip().replace("[[训练时间]]", training_time)
            continue
        history.append({"role": "assistant", "metadata": metadata, "content": content})
        if history[0]["role"] == "system" and "tools" in history[0]:
            response = {"name": metadata.strip(), "parameters": read_arguments(content)}
        else:
            response = {"name": metadata.strip(), "content": content}
    return response, history


def chatglm3_arguments(content: str) -> dict:
    """The reference evaluates the call between the code fence lines (safe here: fixed test text)."""
    code = "\n".join(content.split("\n")[1:-1])
    return eval(code, {"__builtins__": {}}, {"tool_call": lambda **kwargs: kwargs})


TOOLS = [{"name": "get_weather", "description": "weather", "parameters": {"city": {"type": "string"}}}]
WITH_TOOLS = [{"role": "system", "content": "Use tools.", "tools": TOOLS}, {"role": "user", "content": "北京天气?"}]
PLAIN = [{"role": "user", "content": "你好"}]
TEXT_REPLIES = [
    "",  # empty reply
    "Hello there",  # no newline: all of it is text
    "\n  你好，我是 ChatGLM，训练于[[训练时间]]。  ",
    "\nfirst part<|assistant|>\nsecond part",  # several segments: the last one is returned
    "\n<|assistant|>",  # two empty segments
]
CHATGLM3_TOOL_REPLIES = [
    "get_weather\n```python\ntool_call(city='北京', days=3, units=None, extra={'a': [1, 2.5]})\n```",
    "\nLet me check.<|assistant|>get_weather\n ```python\ntool_call(city=\"上海\")\n```",
    "\nfirst<|assistant|>get_weather\n```python\ntool_call()\n```<|assistant|>\ndone [[训练时间]]",
]
GLM4_TOOL_REPLIES = ['get_weather\n{"city": "北京", "days": 3}', '\nLet me check.<|assistant|>get_weather\n{"city": "上海"}']


@pytest.fixture(scope="module")
def dropin(tiny_ckpt, chatglm2_ckpt, glm4_ckpt):
    return {name: AutoModel.from_pretrained(str(ckpt), torch_dtype=torch.float32)
            for name, ckpt in [("chatglm3", tiny_ckpt), ("chatglm2", chatglm2_ckpt), ("glm4", glm4_ckpt)]}


@pytest.mark.parametrize("history", [PLAIN, WITH_TOOLS], ids=["plain", "tools"])
@pytest.mark.parametrize("output", TEXT_REPLIES + CHATGLM3_TOOL_REPLIES)
def test_chatglm3_process_response(dropin, output, history):
    before = copy.deepcopy(history)
    got = dropin["chatglm3"].process_response(output, history)
    assert got == reference_process_response(output, history, chatglm3_arguments, "2023年")
    assert history == before  # the caller's list is left alone


# GLM-4's year: "2023年" as in THUDM's GLM-4 code (see glmchat/families/glm4.py for the evidence).
@pytest.mark.parametrize("history", [PLAIN, WITH_TOOLS], ids=["plain", "tools"])
@pytest.mark.parametrize("output", TEXT_REPLIES + GLM4_TOOL_REPLIES)
def test_glm4_process_response(dropin, output, history):
    assert dropin["glm4"].process_response(output, history) == \
        reference_process_response(output, history, json.loads, "2023年")


def test_tool_call_text_is_never_executed(dropin, tmp_path):
    marker = tmp_path / "ran"
    output = f"get_weather\n```python\ntool_call(city=__import__('pathlib').Path('{marker}').touch())\n```"
    with pytest.raises(ToolCallParseError, match="not a literal"):
        dropin["chatglm3"].process_response(output, WITH_TOOLS)
    assert not marker.exists()
    with pytest.raises(ToolCallParseError, match="not JSON"):
        dropin["glm4"].process_response("get_weather\ncity='北京'", WITH_TOOLS)


@pytest.mark.parametrize("response", ["", "  答：你好 [[训练时间]]\n\n", "no newline"])
def test_chatglm2_process_response(dropin, response):
    assert dropin["chatglm2"].process_response(response) == response.strip().replace("[[训练时间]]", "2023年")


# ---- model.build_inputs / build_stream_inputs (ChatGLM2's reference only) ------------------------


def _expected_batch(ids: list[int]) -> dict:
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "position_ids": torch.arange(len(ids))[None]}


@pytest.mark.parametrize("history", [None, [], [("你好", "你好！"), ("hi", "hello")]])
def test_chatglm2_build_inputs(dropin, chatglm2_ckpt, history):
    sp, model = _sp(chatglm2_ckpt), dropin["chatglm2"]
    tok = AutoTokenizer.from_pretrained(chatglm2_ckpt)
    gmask, sop = sp.vocab_size() + 1, sp.vocab_size() + 3
    rounds = "".join(f"[Round {i + 1}]\n\n问：{q}\n\n答：{r}\n\n" for i, (q, r) in enumerate(history or []))
    query = "今天天气怎么样？"
    n = len(history or []) + 1
    full = [gmask, sop] + sp.encode(rounds + f"[Round {n}]\n\n问：{query}\n\n答：")
    inputs = model.build_inputs(tok, query, history=history)
    assert {k: v.tolist() for k, v in inputs.items()} == {k: v.tolist() for k, v in _expected_batch(full).items()}
    stream = model.build_stream_inputs(tok, query, history=history)
    turn = sp.encode(f"\n\n[Round {n}]\n\n问：{query}\n\n答：")[1:] if history else full
    assert {k: v.tolist() for k, v in stream.items()} == {k: v.tolist() for k, v in _expected_batch(turn).items()}


@pytest.mark.parametrize("family", ["chatglm3", "glm4"])
def test_build_inputs_only_where_the_reference_has_it(dropin, family, tiny_ckpt):
    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    for helper in (dropin[family].build_inputs, dropin[family].build_stream_inputs):
        with pytest.raises(AttributeError, match="reference model has no build_.*tokenizer.build_chat_input"):
            helper(tok, "hi")


# ---- tokenizer.apply_chat_template (GLM-4 and its successors) --------------------------------------

TEMPLATE_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "天气",
                                                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TEMPLATE_CONVERSATIONS = [
    ([{"role": "user", "content": "你好"}], None),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "again?"}], None),
    ([{"role": "user", "content": "北京天气?"}], TEMPLATE_TOOLS),
]


@pytest.mark.parametrize("fixture", ["glm4_ckpt", "glm4_0414_ckpt", "glm_z1_ckpt", "glm_edge_ckpt"])
@pytest.mark.parametrize("conversation, tools", TEMPLATE_CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_apply_chat_template_matches_transformers(request, glm4_hf_ckpt, fixture, conversation, tools,
                                                  add_generation_prompt):
    """Against transformers rendering each checkpoint's own template (glm-4-9b-chat's through its
    "-hf" twin: the same vocabulary and template)."""
    from transformers import AutoTokenizer as HFAutoTokenizer

    ckpt = request.getfixturevalue(fixture)
    tok = AutoTokenizer.from_pretrained(ckpt)
    if tools and fixture == "glm_edge_ckpt":  # GLM-Edge's template has no tools: refused, not dropped
        with pytest.raises(ValueError, match="no tools"):
            tok.apply_chat_template(conversation, tools=tools, add_generation_prompt=add_generation_prompt)
        return
    hf = HFAutoTokenizer.from_pretrained(glm4_hf_ckpt if fixture == "glm4_ckpt" else ckpt)
    # glm-4-9b-chat's template reads tools from the messages; the others take apply_chat_template(tools=)
    hf_args = ([{"role": "system", "content": "", "tools": tools}, *conversation], None) \
        if tools and fixture == "glm4_ckpt" else (conversation, tools)
    text = hf.apply_chat_template(hf_args[0], tools=hf_args[1], add_generation_prompt=add_generation_prompt,
                                  tokenize=False)
    assert tok.apply_chat_template(conversation, tools=tools, add_generation_prompt=add_generation_prompt,
                                   tokenize=False) == text
    ids = hf.apply_chat_template(hf_args[0], tools=hf_args[1], add_generation_prompt=add_generation_prompt)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert tok.apply_chat_template(conversation, tools=tools, add_generation_prompt=add_generation_prompt) == ids
    batch = tok.apply_chat_template(conversation, tools=tools, add_generation_prompt=add_generation_prompt,
                                    return_tensors="pt", return_dict=True)
    assert batch["input_ids"].tolist() == [ids] and batch["attention_mask"].tolist() == [[1] * len(ids)]
