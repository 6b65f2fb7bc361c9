"""The one generation core: sampling, prefill, a decode step, the decode loop, and the typed record
every consumer reads (the native API, the drop-in API, the CLI, bench and the server engine).

`generate_batch` / `generate_tokens` yield token ids; `stream_generate` wraps them into
`GenerationResponse` records whose text follows the one stream-visibility rule (`TextStream`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch

from .families.base import without_partial_tail
from .sampling import SamplingConfig  # noqa: F401  (re-exported)
from .model import ContextLengthError, GLMTransformer, KVCache, PromptPieces

Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Sampler:
    """Picks the next token from logits [B, vocab], in the reference's order: repetition penalty,
    the caller's processors, the NaN/inf guard, then greedy or temperature / top-k / top-p sampling.

    processors: callables `(ids [B, L], scores [B, vocab]) -> scores`, like transformers' logits
    processors; ids holds the prompt and every token generated so far.
    """

    def __init__(self, config: SamplingConfig, device, processors: Sequence[Processor] = ()):
        self.config = config
        self.processors = list(processors)
        self.generator = None
        if config.seed is not None and not config.greedy:
            self.generator = torch.Generator(device=device).manual_seed(config.seed)

    @property
    def needs_ids(self) -> bool:
        return self.config.repetition_penalty != 1.0 or bool(self.processors)

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        logits = logits.float()
        if c.repetition_penalty != 1.0 and seen is not None:
            prev = logits.gather(-1, seen)
            logits = logits.scatter(-1, seen, torch.where(prev < 0, prev * c.repetition_penalty, prev / c.repetition_penalty))
        for process in self.processors:
            logits = process(seen, logits)
        logits = _guard_invalid_scores(logits)
        if c.greedy:
            return logits.argmax(-1)
        logits = logits / c.temperature
        if c.top_k:
            kth = torch.topk(logits, min(c.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if c.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            remove_sorted = cumulative <= 1 - c.top_p
            remove_sorted[..., -1] = False  # always keep the most likely token
            remove = remove_sorted.scatter(-1, order, remove_sorted)
            logits = logits.masked_fill(remove, float("-inf"))
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


def _guard_invalid_scores(logits: torch.Tensor) -> torch.Tensor:
    """The reference's InvalidScoreLogitsProcessor: a row with NaN/inf becomes 5e4 at id 5, else 0.

    Done with `where` rather than an `if`, so the decode loop does not wait on the device here.
    """
    bad = ~torch.isfinite(logits).all(-1, keepdim=True)
    guard = torch.zeros_like(logits)
    guard[..., 5] = 5e4
    return torch.where(bad, guard, logits)


def vocab_limit(limit: int) -> Processor:
    """A processor that never picks ids >= limit (e.g. ids a stand-in tokenizer cannot decode).

    It uses the lowest finite score, not -inf: the NaN/inf guard after the processors would
    otherwise throw the whole row away.
    """

    def process(ids, scores):
        banned = torch.arange(limit, scores.shape[-1], device=scores.device)
        return scores.index_fill(-1, banned, torch.finfo(scores.dtype).min)

    return process


def prefill(model: GLMTransformer, input_ids: torch.Tensor, cache, attention_mask=None, position_ids=None) -> torch.Tensor:
    """Run a prompt [B, T] into the cache; the logits of its last position, [B, vocab]."""
    return model(input_ids, cache=cache, attention_mask=attention_mask, position_ids=position_ids, last_only=True)[:, -1]


def piece_length(cache_length: int, remaining: int, chunk: int) -> int:
    """A prompt's next prefill piece: its next tokens up to the next multiple of `chunk` cache positions."""
    return min(remaining, chunk - cache_length % chunk)


def prefill_chunks(model: GLMTransformer, input_ids: torch.Tensor, cache, chunk: int) -> Iterator[torch.Tensor | None]:
    """A prompt [1, T] prefilled in pieces that end at multiples of `chunk` cache positions, one per
    step, for a caller that does other work in between (the server decodes its running requests):
    None after each piece but the last, then the logits of its last position. The prompt then takes
    the same computations in the same shapes whether the cache started empty or held a prefix of it
    (the server's prefix cache): the same KV and logits, bit for bit."""
    start, T = 0, input_ids.shape[1]
    while start < T:
        end = start + piece_length(cache.length, T - start, chunk)
        logits = prefill(model, input_ids[:, start:end], cache)
        yield logits if end == T else None
        start = end


def prefill_together(model: GLMTransformer, pieces: list[tuple[torch.Tensor, KVCache]]) -> torch.Tensor:
    """Prompt pieces [1, T_i], each after what its own cache holds, in one forward pass (PromptPieces):
    the logits of each piece's last position, [pieces, vocab]. A piece's results are those of its
    forward pass alone where glmchat.kernels.prompts_keep_rows_apart(model) and no piece is a single
    token (which alone would be a decode step); a single piece is run alone."""
    if len(pieces) == 1:
        return prefill(model, *pieces[0])
    packed = PromptPieces([cache for _, cache in pieces], [ids.shape[1] for ids, _ in pieces])
    return model(torch.cat([ids for ids, _ in pieces], dim=1), cache=packed, last_only=True)[:, -1]


def decode_step(model: GLMTransformer, tokens: torch.Tensor, cache, position_ids=None) -> torch.Tensor:
    """One token per row [B] after what the cache holds; the next logits, [B, vocab]."""
    return model.decode(tokens.view(-1, 1), cache, position_ids=position_ids)[:, -1]


def generate_batch(
    model: GLMTransformer,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    stop_ids: Iterable[int] = (),
    sampling: SamplingConfig | None = None,
    processors: Sequence[Processor] = (),
    cache: KVCache | None = None,
    pad_id: int = 0,
    seen_before: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, [B], one step at a time (stop tokens included).

    A row that has produced a stop id gets `pad_id` from then on; it ends when every row has
    stopped or after max_new_tokens (fewer if the model's context would overflow). attention_mask
    and position_ids are HF-style, for left-padded batches or a cache holding earlier turns; the
    last token is never fed to the model, so the cache ends up holding all but the last.
    seen_before: ids [B, n] the cache already holds that the repetition penalty and the processors
    should see too (by default they see input_ids and what follows, like transformers).
    """
    sampling = sampling or SamplingConfig(greedy=True)
    input_ids = input_ids.to(model.device)
    B, T = input_ids.shape
    past = cache.length if cache is not None else 0
    context = model.config.seq_length
    if past + T > context:
        raise ContextLengthError(
            f"the prompt is {past + T} tokens, {past + T - context} more than the model's context of "
            f"{context}; shorten it or clear the history"
        )
    max_new_tokens = min(max_new_tokens, context - past - T)
    if cache is None:
        cache = model.new_cache(B, past + T + max_new_tokens)
    sampler = Sampler(sampling, model.device, processors)
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=model.device)
    seen = None
    if sampler.needs_ids:
        seen = input_ids if seen_before is None else torch.cat((seen_before.to(input_ids), input_ids), dim=1)
    running = torch.ones(B, dtype=torch.bool, device=model.device)

    with torch.inference_mode():
        logits = prefill(model, input_ids, cache, attention_mask, position_ids)
        for i in range(max_new_tokens):
            token = sampler(logits, seen)
            token = torch.where(running, token, torch.full_like(token, pad_id))
            running = running & ~torch.isin(token, stop)
            yield token
            if i == max_new_tokens - 1 or not bool(running.any()):
                return
            if seen is not None:
                seen = torch.cat((seen, token.view(B, 1)), dim=1)
            if position_ids is not None:
                position_ids = position_ids[:, -1:] + 1
            logits = decode_step(model, token, cache, position_ids)


def generate_tokens(
    model: GLMTransformer,
    prompt_ids: list[int] | torch.Tensor,
    *,
    max_new_tokens: int,
    stop_ids: Iterable[int] = (),
    sampling: SamplingConfig | None = None,
    cache: KVCache | None = None,
    processors: Sequence[Processor] = (),
    seen_before: list[int] | None = None,
) -> Iterator[int]:
    """Yield new token ids of one sequence, one at a time (the stop token included, then it ends).

    With a `cache` that already holds earlier turns, the prompt continues after them.
    """
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(1, -1)
    before = torch.tensor([seen_before], dtype=torch.long) if seen_before else None
    for token in generate_batch(model, prompt, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                                sampling=sampling, processors=processors, cache=cache, seen_before=before):
        yield int(token[0])


# ---------------------------------------------------------------------------------------------
# Text: what a reply being generated shows


class StreamDetokenizer:
    """The text of a growing list of token ids, never ending in half a UTF-8 character.

    Decodes only a short window at each step (the tokens since the text last grew, with those of
    the step before as context), so a long answer costs linear time, not quadratic.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = self._read = 0

    def add(self, token_id: int) -> str:
        """Append a token; return the text it completes ("" while a character is incomplete)."""
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        after = self.tokenizer.decode(self.ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        new = after[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += new
        return new


Visible = Callable[[str, bool], str]  # (text so far, final) -> the part a reader may see


class TextStream:
    """The one stream-visibility rule: the text of a reply being generated as it may be shown.

    Stop ids are not text. `visible` (a family's `visible_text`) decides what a reader may see of
    the decoded text (no special token's name, no tool-call segment); stop strings are matched in
    that visible text, never in the raw decoding, so a stop string cannot cut inside a special
    token and a reply with stop strings is a prefix of the one without. The visible text is cut at
    the first stop string (and a tail that may still become one is held back), and what is shown
    only ever grows: `add` returns what a token adds, `finish` what the end adds. `stopped` turns
    True once a stop string has been found: the caller ends the generation there.
    """

    def __init__(self, tokenizer, visible: Visible | None = None, stop_ids: Iterable[int] = (),
                 stop_strings: Sequence[str] = (), reasoning: Callable[[str, bool], str | None] | None = None):
        """reasoning: a reasoning model's rule for its thinking in the decoded text (a family's
        `reasoning`), read by `think`."""
        self.tokenizer = tokenizer
        self.visible = visible or (lambda text, final: text)
        self.reasoning = reasoning
        self.thought = ""  # the reasoning shown so far
        self.stop_ids = frozenset(stop_ids)
        self.stop_strings = [s for s in stop_strings if s]
        self.detok = StreamDetokenizer(tokenizer)
        self.shown = ""
        self.stopped = False
        # At the end: the whole reply's decoded text (its segments, for reading a tool call); cut by
        # a stop string (`stopped`), the visible text up to it, which holds no tool call.
        self.text = ""

    @property
    def ids(self) -> list[int]:
        return self.detok.ids

    def add(self, token: int) -> str:
        if token in self.stop_ids or self.stopped:
            return ""
        self.detok.add(token)
        return self._grow(self.detok.text, final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        return self._grow(self.tokenizer.decode(self.detok.ids), final=True)

    def think(self, final: bool = False) -> str:
        """What the reasoning adds since the last call ("" without a reasoning rule)."""
        if self.reasoning is None:
            return ""
        now = self.reasoning(self.tokenizer.decode(self.detok.ids) if final else self.detok.text, final) or ""
        if len(now) <= len(self.thought) or not now.startswith(self.thought):
            return ""
        delta, self.thought = now[len(self.thought) :], now
        return delta

    def _grow(self, text: str, final: bool) -> str:
        seen = self.visible(text, final)
        cuts = [i for i in (seen.find(s) for s in self.stop_strings) if i >= 0]
        if cuts:
            seen, self.stopped = seen[:min(cuts)].rstrip(), True
            self.text = seen
        elif final:
            self.text = text
        elif self.stop_strings:  # hold back a tail that may become a stop (and blanks before it: cut, they go)
            seen = without_partial_tail(seen, self.stop_strings).rstrip()
        if len(seen) > len(self.shown) and seen.startswith(self.shown):
            delta, self.shown = seen[len(self.shown):], seen
            return delta
        return ""


@dataclass
class GenerationResponse:
    """One step of a generation, the record every consumer reads (mlx-lm's GenerationResponse)."""

    text: str  # visible text this step added ("" while it is held back)
    token: int | None  # the id generated this step, stop ids included (None: an error record)
    finish_reason: str | None  # None while running; "stop", "length" (or "cancelled", "error" in the server)
    prompt_tokens: int
    generation_tokens: int  # ids generated so far, this one included
    time_to_first_token: float  # seconds from the start to the first id (mostly the prefill)
    elapsed: float  # seconds from the start to this record
    error: str | None = None
    logprob: float | None = None  # log-probability of `token` (the server, when asked)
    top_logprobs: list[tuple[int, float]] | None = None  # the most likely ids and their log-probabilities
    reasoning: str = ""  # what a reasoning model's thinking added this step (TextStream.think)


def stream_generate(
    model: GLMTransformer,
    text: TextStream,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    cache: KVCache | None = None,
    cached: int = 0,
    processors: Sequence[Processor] = (),
) -> Iterator[GenerationResponse]:
    """Generate after prompt_ids, one record per id; the last one has the finish reason.

    cache: continue after what it holds; cached: how many of prompt_ids it already holds (the
    rest is prefilled). Ends at a stop id of `text`, a stop string, or after max_new_tokens (fewer
    when the context is full): "stop" or "length".
    """
    start = time.perf_counter()
    first = None
    past = cache.length if cache is not None else 0
    max_new_tokens = min(max_new_tokens, model.config.seq_length - past - (len(prompt_ids) - cached))
    tokens = generate_tokens(model, prompt_ids[cached:], max_new_tokens=max_new_tokens, stop_ids=text.stop_ids,
                             sampling=sampling, cache=cache, processors=processors,
                             seen_before=list(prompt_ids[:cached]))
    count, finish = 0, None
    try:
        for token in tokens:
            now = time.perf_counter()
            first = first or now
            count += 1
            delta = text.add(token)
            if token in text.stop_ids or text.stopped:
                finish = "stop"
            elif count == max_new_tokens:
                finish = "length"
            if finish:
                delta += text.finish()
            yield GenerationResponse(delta, token, finish, len(prompt_ids), count, first - start, now - start,
                                     reasoning=text.think(final=finish is not None))
            if finish:
                return
        # no room for a single new token
        end = time.perf_counter()
        yield GenerationResponse(text.finish(), None, "length", len(prompt_ids), count, (first or end) - start,
                                 end - start)
    finally:
        tokens.close()
