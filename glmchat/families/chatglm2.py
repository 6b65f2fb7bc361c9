"""ChatGLM2-6B (+ -32k) and CodeGeeX2-6B: ChatGLM3's SentencePiece model with five specials and no
role tokens, "[Round N]" prompts, no tools, and a drop-in chat with (query, response) history."""

from __future__ import annotations

from .base import Family, ParsedReply
from .tokenizer import TokenizerError, as_id_list
from .chatglm3 import ChatGLMTokenizer


class ChatGLM2Tokenizer(ChatGLMTokenizer):
    """ChatGLM2's tokenizer: the same SentencePiece model with five specials and no role tokens.

    Unlike ChatGLM3's, it renders every special (and eos/bos/pad) as empty text when decoding.
    """

    SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")

    def __init__(self, vocab_file) -> None:
        super().__init__(vocab_file)
        # The reference spells these out; its unk_token_id is transformers' lookup of "<unk>".
        self.eos_token, self.pad_token, self.unk_token = "</s>", "<unk>", "<unk>"
        self.unk_token_id = self.sp.piece_to_id("<unk>")

    @property
    def stop_token_ids(self) -> list[int]:
        return [self.eos_token_id]

    def convert_ids_to_tokens(self, ids) -> list[str]:
        id_list = as_id_list(ids)
        pieces = super().convert_ids_to_tokens(id_list)
        return ["" if i in self._special_names else piece for i, piece in zip(id_list, pieces)]

    def build_prompt(self, query: str, history: list[tuple[str, str]] | None = None) -> str:
        """The reference's prompt text: one "[Round N]" block per earlier turn, then the query's."""
        prompt = ""
        for i, (old_query, response) in enumerate(history or []):
            prompt += f"[Round {i + 1}]\n\n问：{old_query}\n\n答：{response}\n\n"
        return prompt + round_text(query, len(history or []) + 1)

    def build_single_message(self, role, metadata, message):
        raise TokenizerError("ChatGLM2 has no role tokens; build prompts with build_prompt(query, history)")

    def build_chat_input(self, query: str, history=None, role: str = "user"):
        """``[gMASK] sop`` + build_prompt(query, history) as a [1, len] batch (history: (query, reply) pairs)."""
        if role != "user":
            raise TokenizerError(f"ChatGLM2 has no {role!r} role; only user queries")
        return self(self.build_prompt(query, history))


def round_text(query: str, number: int) -> str:
    return f"[Round {number}]\n\n问：{query}\n\n答："


def chatglm2_pairs(messages: list[dict], label: str = "ChatGLM2") -> tuple[str, list[tuple[str, str]]]:
    """(query, [(query, reply), ...]) from user/assistant messages that alternate and end with the user."""
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    bad = next((r for r in roles if r not in ("user", "assistant")), None)
    if bad is not None or None in roles:
        raise ValueError(f"{label} knows only user and assistant turns, got role {bad!r}")
    if roles[-1] != "user" or any(r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles)):
        raise ValueError(f"{label} needs alternating user/assistant messages that start and end with the user")
    contents = [m["content"] for m in messages]
    return contents[-1], list(zip(contents[:-1:2], contents[1:-1:2]))


class ChatGLM2(Family):
    name = "chatglm2"
    label = "ChatGLM2-6B"
    base_label = "ChatGLM2-6B (base)"
    rope_scaling = "position"  # ChatGLM2-32k stretches positions: positions / rope_ratio, base 10000
    training_time = "2023年"
    supports_tools = False

    def load_tokenizer(self, directory) -> ChatGLM2Tokenizer:
        return ChatGLM2Tokenizer.from_pretrained(directory)

    def _prompt_ids(self, tokenizer, messages):
        query, history = chatglm2_pairs(messages)
        return tokenizer.encode(tokenizer.build_prompt(query, history))

    def parse_reply(self, text, tools_in_prompt):
        content = text.strip()
        return ParsedReply(self.show(content), None, [{"role": "assistant", "content": content}])

    def visible_text(self, text, final=True, tool_calls=True):
        return super().visible_text(text, final, tool_calls=False)  # no segments: all of it is text

    def tools_turn(self, functions):
        raise ValueError(f"{self.label} was not trained to call tools")

    tool_call_turn = tools_turn

    # The drop-in API: (query, response) history pairs, returned as a new list; every token kept.

    def dropin_text(self, tokenizer, tokens):
        return tokenizer.decode(tokens)

    def process_response(self, response: str) -> str:
        """ChatGLM2's `process_response(response)`: the reply stripped, the placeholder replaced."""
        return self.show(response.strip())

    def build_inputs(self, tokenizer, query, history=None):
        """ChatGLM2's `build_inputs`: `[gMASK] sop` + the "[Round N]" prompt of history and query."""
        return tokenizer.batch_encode([self._dropin_prompt(tokenizer, query, list(history or []), "user", False)])

    def build_stream_inputs(self, tokenizer, query, history=None):
        """ChatGLM2's `build_stream_inputs`: with a history, only this round (its cache holds the rest)."""
        return tokenizer.batch_encode([self._dropin_prompt(tokenizer, query, list(history or []), "user", True)])

    def dropin_response(self, text, query, history):
        response = self.process_response(text)
        return response, history + [(query, response)]

    def dropin_chat(self, tokenizer, generate, query, history, role):
        history = list(history or [])
        tokens = list(generate(self._dropin_prompt(tokenizer, query, history, role, turn_only=False)))
        return self.dropin_response(self.dropin_text(tokenizer, tokens), query, history)

    def dropin_stream_prompt(self, tokenizer, query, history, role, *, past_given, return_past):
        history = list(history)
        turn_only = past_given or return_past  # as the reference decides
        return self._dropin_prompt(tokenizer, query, history, role, turn_only), history

    def _dropin_prompt(self, tokenizer, query: str, history: list, role: str, turn_only: bool) -> list[int]:
        """`[gMASK] sop` + the "[Round N]" rounds of history and query (the reference's build_inputs).

        turn_only (the reference's build_stream_inputs, for a cached conversation): with a history,
        only "\\n\\n[Round N]..." without `[gMASK] sop`, its first id (the dummy prefix) dropped.
        """
        if role != "user":
            raise ValueError(f"ChatGLM2 has no {role!r} role; only user queries")
        if not (turn_only and history):
            return tokenizer.build_chat_input(query, history=history).input_ids[0].tolist()
        return tokenizer.encode("\n\n" + round_text(query, len(history) + 1), add_special_tokens=False)[1:]
