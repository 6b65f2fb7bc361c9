"""Continuous batching: one thread owns the model and advances every active request together.

Each step: waiting requests are prefilled (each into a batch-1 cache, after the blocks of their
prompt the prefix cache already holds) in pieces that end at multiples of the cache's block size,
about one block's worth of tokens per step, so that a long prompt never stalls the running requests
for longer than a block; a prefilled request is copied into a free row of the SlotCache. Where the
model computes each prompt row as if it were alone (glmchat.kernels.prompts_keep_rows_apart: the
int8/int4 C kernels), the step's pieces of several prompts go through one forward pass
(glmchat.generate.prefill_together), the weights read once for all of them; elsewhere each piece
goes alone. Then one batched decode step of the generation core (glmchat.generate) gives
the next token of every active request; finished and cancelled requests leave. Rows are kept
packed (0 .. active-1), so the batch is a view of the cache. Each request hears the core's
`GenerationResponse` records, their text from the request's own `TextStream`.

A request's tokens do not depend on the other requests: decode steps keep rows apart (see
glmchat.kernels.linear and Step.key_lengths) and a prompt's prefill is the same computation
whether its prefix came from the prefix cache or not, and whether other prompts' pieces shared its
forward passes or not.

Under tensor parallelism (glmchat.parallel) every rank has an engine; rank 0's serves and tells the
others each operation on the model and its caches as it does it (`Lockstep`), and theirs `follow`.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..generate import (GenerationResponse, Sampler, SamplingConfig, TextStream, decode_step, piece_length,
                        prefill_together)
from ..kernels import keeps_rows_apart, prompts_keep_rows_apart
from ..model import ContextLengthError, GLMTransformer, KVCache, Step
from .metrics import Metrics
from .prefix_cache import BLOCK, PrefixCache

log = logging.getLogger("glmchat.server")
# A banned token's bias: the lowest finite float, since the sampler's NaN/inf guard would throw a row
# holding -inf away (like generate.vocab_limit).
BANNED = torch.finfo(torch.float32).min


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the caller should retry later."""


class Lockstep:
    """Tensor-parallel ranks' engines in step. Rank 0's engine tells the others every operation on
    the model and its caches as it does it: a prompt to prefill ("start"), the next pieces of some
    prompts ("pieces"), a prompt's admission to a batch row ("join"), a decode step's input ids, a
    row freed. They do the same with their shares of the weights and KV, so every all_reduce inside
    the model meets its partners. Only rank 0 tokenizes, samples and serves; what it decides
    (tokens, cancellations, timing) reaches the others as these operations."""

    HEARTBEAT = 60.0  # seconds: an idle rank 0 still speaks this often (collectives would time out)

    def __init__(self, group=None):
        import torch.distributed as dist

        self._dist, self.group = dist, group
        self.leads = dist.get_rank(group) == 0

    def tell(self, *operation) -> None:
        self._dist.broadcast_object_list([operation], src=0, group=self.group)

    def hear(self) -> tuple:
        box = [None]
        self._dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


class SlotCache:
    """KV cache whose rows (slots) each hold one request at its own length.

    Implements the model's cache protocol for decode steps (one token per active row): row b's new
    K/V goes to position lengths[b], its rotary position is lengths[b], and it sees slots <= that.
    The time dimension grows on demand (doubling, up to the model's context). With fixed_rows every
    step takes all rows, the free ones as padding (position 0, their results unused), so that the
    products always have the same shape: on devices whose libraries pick kernels by the number of
    rows, a row's result then never depends on how many others are running.
    """

    def __init__(self, model: GLMTransformer, rows: int, capacity: int = 256, fixed_rows: bool = False):
        self.fixed_rows = fixed_rows
        c = model.config
        self.limit = c.seq_length
        capacity = min(capacity, self.limit)
        shape = (c.num_layers, rows, c.num_kv_heads, capacity, c.head_dim)
        self.k = torch.zeros(shape, dtype=model.dtype, device=model.device)
        self.v = torch.zeros_like(self.k)
        self.lengths = [0] * rows  # filled slots per row
        self.active = 0  # rows 0 .. active-1 are in use
        self.prompt_marks: torch.Tensor | None = None  # per row, as KVCache.prompt_marks (ChatGLM-6B)

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    def _ensure(self, length: int) -> None:
        capacity = self.k.shape[3]
        if length <= capacity:
            return
        if length > self.limit:
            raise ContextLengthError(f"{length} positions exceed the model's context of {self.limit}")
        grow = min(max(length, 2 * capacity), self.limit) - capacity
        pad = list(self.k.shape)
        pad[3] = grow
        self.k = torch.cat((self.k, self.k.new_zeros(pad)), dim=3)
        self.v = torch.cat((self.v, self.v.new_zeros(pad)), dim=3)

    def add(self, cache: KVCache) -> int:
        """Copy a batch-1 prefilled cache into the next free row; returns the row."""
        row, n = self.active, cache.length
        if row == self.rows:
            raise RuntimeError("no free slot")
        self._ensure(n)
        self.k[:, row, :, :n] = cache.k[:, 0, :, :n]
        self.v[:, row, :, :n] = cache.v[:, 0, :, :n]
        if cache.prompt_marks is not None:
            if self.prompt_marks is None:
                self.prompt_marks = cache.prompt_marks.new_zeros(self.rows, cache.prompt_marks.shape[1])
            self.prompt_marks[row] = cache.prompt_marks[0]
        self.lengths[row] = n
        self.active += 1
        return row

    def remove(self, row: int) -> None:
        """Free a row; the last active row moves into it so rows stay packed."""
        last = self.active - 1
        if row != last:
            n = self.lengths[last]
            self.k[:, row, :, :n] = self.k[:, last, :, :n]
            self.v[:, row, :, :n] = self.v[:, last, :, :n]
            if self.prompt_marks is not None:
                self.prompt_marks[row] = self.prompt_marks[last]
            self.lengths[row] = n
        self.lengths[last] = 0
        self.active -= 1

    def clear(self) -> None:
        self.active = 0
        self.lengths = [0] * self.rows

    # The model's cache protocol (decode only).
    def begin(self, T: int, attention_mask: torch.Tensor | None) -> Step:
        if T != 1 or attention_mask is not None:
            raise ValueError("the slot cache decodes exactly one token per row; prefill with a KVCache")
        B = self.step_rows
        positions = self.lengths[: self.active] + [0] * (B - self.active)  # padding rows: position 0
        span = max(positions) + 1
        self._ensure(span)
        device = self.k.device
        self._rows = torch.arange(B, device=device)
        self._pos = torch.tensor(positions, device=device)
        self._span = span
        for b in range(self.active):
            self.lengths[b] += 1
        # Each row attends over exactly its own keys, alone: batch invariance (Step.key_lengths).
        return Step(self._pos[:, None], None, is_causal=False, key_lengths=[p + 1 for p in positions])

    @property
    def step_rows(self) -> int:
        """Rows in a decode step: the active ones, or all of them with fixed_rows."""
        return self.rows if self.fixed_rows else self.active

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        self.k[layer][self._rows, :, self._pos] = k[:, :, 0]
        self.v[layer][self._rows, :, self._pos] = v[:, :, 0]
        B = self.step_rows
        return self.k[layer, :B, :, : self._span], self.v[layer, :B, :, : self._span]

    def decode_slots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """See KVCache.decode_slots: this layer's rows and each row's new slot."""
        return self.k[layer], self.v[layer], self._pos


@dataclass(eq=False)  # requests are compared by identity
class Request:
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingConfig
    stop_ids: frozenset[int]
    emit: Callable[[GenerationResponse], None]
    logit_bias: torch.Tensor | None = None  # [vocab] added to the logits before sampling
    text: TextStream | None = None  # the reply's visible text; None: records carry ids only
    presence_penalty: float = 0.0  # subtracted once from each id generated before (OpenAI's penalties)
    frequency_penalty: float = 0.0  # subtracted per time an id was generated before
    logprobs: int | None = None  # records carry the id's log-probability and this many alternatives
    counts: torch.Tensor | None = None  # [vocab] times each id was generated (with penalties)
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    sampler: Sampler | None = None
    kv: KVCache | None = None  # while its prompt is prefilled
    todo: torch.Tensor | None = None  # [1, n]: the prompt's tokens still to prefill
    chunk: int = 0  # its prefill pieces end at multiples of this many cache positions
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    last_token: float | None = None
    serial: int = 0  # names the request to the other tensor-parallel ranks (Lockstep)

    def cancel(self) -> None:
        """Ask the engine to stop this request at the next step boundary (thread-safe)."""
        self.cancelled = True

    def record(self, text: str = "", token: int | None = None, finish: str | None = None,
               error: str | None = None, logprobs: tuple | None = None, reasoning: str = "") -> GenerationResponse:
        now = time.perf_counter()
        return GenerationResponse(text, token, finish, len(self.prompt), len(self.tokens),
                                  (self.first_token or now) - self.submitted, now - self.submitted, error,
                                  *(logprobs or (None, None)), reasoning=reasoning)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """This request's row of logits [vocab] as it samples from them: float32, its logit bias
        added, its presence and frequency penalties subtracted (elementwise: batch invariant)."""
        scores = logits.float()
        if self.logit_bias is not None:
            scores = scores + self.logit_bias
        if self.counts is not None:
            scores = scores - self.presence_penalty * (self.counts > 0) - self.frequency_penalty * self.counts
        return scores


class Engine:
    """Owns the model in a background thread; `submit` is safe from any thread."""

    def __init__(self, model: GLMTransformer, *, max_batch: int = 8, max_queue: int = 64, vocab_limit: int | None = None,
                 cache_bytes: int = 2 << 30, prefill_chunk: int = BLOCK, lockstep: Lockstep | None = None):
        """vocab_limit: never pick ids >= this (a tokenizer smaller than the model's vocabulary).
        cache_bytes: the prefix cache's budget (0: none). prefill_chunk: tokens per prefill chunk
        and prefix-cache block. lockstep: the tensor-parallel group's (rank 0 then serves and tells,
        the others `follow`); every rank's engine needs the same options."""
        if max_batch < 1 or max_queue < 0 or cache_bytes < 0 or prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be >= 1, max_queue and cache_bytes >= 0")
        self.model = model
        self.lockstep = lockstep
        self._serials = itertools.count()
        self.prefix = PrefixCache(cache_bytes, prefill_chunk)
        self.metrics = Metrics()
        self.max_queue = max_queue
        self.vocab_limit = vocab_limit
        self.cache = SlotCache(model, max_batch, fixed_rows=not keeps_rows_apart(model))
        self._greedy = Sampler(SamplingConfig(greedy=True), model.device)
        self._pending: deque[Request] = deque()
        self._prefilling: list[Request] = []  # requests whose prompts are being prefilled, oldest first
        # Whether prompts can share forward passes with the bits each would get alone.
        self._packs = model.prompt_is_causal and prompts_keep_rows_apart(model)
        self._active: list[Request] = []  # row i of the cache belongs to _active[i]
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # batched decode steps run
        self.peak_batch = 0  # largest decode batch seen
        self.decoded_tokens = 0  # tokens produced by decode steps (prefills not counted)
        self.decode_seconds = 0.0  # time spent in decode steps

    @property
    def context_length(self) -> int:
        return self.model.config.seq_length

    @property
    def queued(self) -> int:
        """Requests without a first token yet (waiting, or their prompt being prefilled)."""
        return len(self._pending) + len(self._prefilling)

    @property
    def running(self) -> int:
        return len(self._active)

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="glmchat-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def cancel_all(self) -> None:
        """Cancel every request, waiting or running (thread-safe); each ends with finish "cancelled"."""
        with self._cond:
            requests = [*self._pending, *self._prefilling]
            requests += list(self._active)  # after the prefilling ones, which can only move here
            for request in requests:
                request.cancel()
            self._cond.notify()

    def submit(
        self,
        prompt: list[int],
        *,
        max_new_tokens: int,
        emit: Callable[[GenerationResponse], None],
        sampling: SamplingConfig | None = None,
        stop_ids=(),
        logit_bias: dict[int, float] | None = None,
        text: TextStream | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logprobs: int | None = None,
    ) -> Request:
        room = self.context_length - len(prompt)
        if room <= 0:
            raise ContextLengthError(
                f"the prompt is {len(prompt)} tokens, {1 - room} more than fits the model's context of "
                f"{self.context_length} with one new token"
            )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        request = Request(
            list(prompt), min(max_new_tokens, room), sampling or SamplingConfig(greedy=True), frozenset(stop_ids), emit,
            self._bias_vector(logit_bias or {}) if logit_bias or self.vocab_limit else None, text,
            presence_penalty, frequency_penalty, logprobs, serial=next(self._serials),
        )
        if presence_penalty or frequency_penalty:
            request.counts = torch.zeros(self.model.config.padded_vocab_size, device=self.model.device)
        with self._cond:
            if len(self._pending) >= self.max_queue + max(0, self.cache.rows - len(self._active) - len(self._prefilling)):
                raise QueueFullError(f"{len(self._pending)} requests are already waiting; retry later")
            self._pending.append(request)
            self._cond.notify()
        return request

    def _bias_vector(self, logit_bias: dict[int, float]) -> torch.Tensor:
        vocab = self.model.config.padded_vocab_size
        bias = torch.zeros(vocab, device=self.model.device)
        if self.vocab_limit is not None:
            bias[self.vocab_limit :] = BANNED
        for token, value in logit_bias.items():
            if not 0 <= token < vocab:
                raise ValueError(f"logit_bias: token id {token} is outside the vocabulary (0..{vocab - 1})")
            bias[token] = BANNED if value <= -100 else value  # -100 bans, as in OpenAI's API
        return bias

    # ---- the engine thread ------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._pending or self._prefilling or self._active or self._stopping):
                    if not self._cond.wait(Lockstep.HEARTBEAT if self.lockstep else None):
                        self._tell("idle")
                if self._stopping:
                    break
            with torch.inference_mode():
                self._prefill_some()
                self._drop_cancelled()
                if self._active:
                    self._decode_step()
        for request in [*self._active, *self._prefilling, *self._pending]:
            self._send(request, request.record(finish="cancelled"))
        self._tell("stop")

    def _tell(self, *operation) -> None:
        if self.lockstep is not None and self.lockstep.leads:
            self.lockstep.tell(*operation)

    def follow(self) -> None:
        """Do what rank 0's engine tells (see Lockstep) until it stops: the loop of every other
        tensor-parallel rank, with its shares of the weights and KV."""
        prefilling: dict[int, Request] = {}
        self.model.output = torch.nn.Identity()  # rank 0 alone samples: the logits here would go unread
        with torch.inference_mode():
            while True:
                operation, *args = self.lockstep.hear()
                if operation == "start":
                    serial, prompt = args
                    prefilling[serial] = Request(prompt, 1, SamplingConfig(greedy=True), frozenset(), lambda record: None,
                                                 serial=serial)
                    self._start_prefill(prefilling[serial])
                elif operation == "pieces":
                    self._prefill_pieces([prefilling[serial] for serial in args[0]])
                elif operation == "join":
                    self._admit(prefilling.pop(args[0]))
                elif operation == "drop":
                    prefilling.pop(args[0], None)
                elif operation == "decode":
                    decode_step(self.model, torch.tensor(args[0], dtype=torch.long, device=self.model.device), self.cache)
                elif operation == "release":
                    self._release(args[0])
                elif operation == "clear":
                    self._active = []
                    self.cache.clear()
                elif operation == "stop":
                    return

    def _prefill_some(self) -> None:
        """About one block's worth of prompt tokens: the next pieces of the prompts being prefilled,
        oldest first (whole pieces, at least one), in one forward pass where prompts can share it.
        A piece of one token goes alone: alone it is a decode step, whose kernels differ."""
        self._start_waiting()
        budget, together = self.prefix.block, []
        for request in list(self._prefilling):
            if budget <= 0:
                break
            if request.cancelled:
                self._forget(request)
                self._send(request, request.record(finish="cancelled"))
                continue
            n = self._piece(request)
            budget -= n
            if self._packs and n > 1:
                together.append(request)
            else:
                self._prefill_step([request])
        if together:
            self._prefill_step(together)

    def _start_waiting(self) -> None:
        """Waiting requests become prefilling ones while batch rows are free for them. A prompt that
        begins with the same block as one being prefilled waits for that one's blocks in the prefix
        cache (and the requests behind it, in order)."""
        while True:
            with self._cond:
                room = self.cache.rows - len(self._active) - len(self._prefilling)
                if not self._pending or room <= 0 or self._shares_first_block(self._pending[0]):
                    return
                request = self._pending.popleft()
            if self._start_prefill(request):
                self._prefilling.append(request)

    def _shares_first_block(self, request: Request) -> bool:
        n = self.prefix.block
        return (self.prefix.max_bytes > 0 and len(request.prompt) > n
                and any(other.prompt[:n] == request.prompt[:n] for other in self._prefilling))

    def _piece(self, request: Request) -> int:
        return piece_length(request.kv.length, request.todo.shape[1], request.chunk)

    def _prefill_step(self, batch: list[Request]) -> None:
        """The next pieces of these prompts; the ones that are then complete join the batch."""
        self._tell("pieces", [request.serial for request in batch])
        try:
            logits = self._prefill_pieces(batch)
        except Exception as e:  # these requests fail; the others go on
            for request in batch:
                self._fail(request, e)
            return
        for request, row in zip(batch, logits):
            if request.todo.shape[1] == 0:
                self._prefilling.remove(request)
                self._join(request, row[None])

    def _prefill_pieces(self, batch: list[Request]) -> torch.Tensor:
        """Each request's next prompt piece, all in one forward pass; the logits of each piece's last
        position, [len(batch), vocab]."""
        pieces = []
        for request in batch:
            n = self._piece(request)
            pieces.append((request.todo[:, :n], request.kv))
            request.todo = request.todo[:, n:]
        return prefill_together(self.model, pieces)

    def _start_prefill(self, request: Request) -> bool:
        """Set up a request's prefill after the cached blocks of its prompt; False if it ended already."""
        if request.cancelled:
            self._send(request, request.record(finish="cancelled"))
            return False
        self._tell("start", request.serial, request.prompt)
        try:
            request.sampler = Sampler(request.sampling, self.model.device)
            request.kv = self.model.new_cache(1, len(request.prompt))
            chunk = len(request.prompt)  # a prompt that attends both ways (ChatGLM-6B) goes in one piece
            if self.model.prompt_is_causal:
                for block in self.prefix.match(request.prompt):
                    request.kv.append(block.k[:, None], block.v[:, None])
                chunk = self.prefix.block
            request.todo = torch.tensor([request.prompt[request.kv.length :]], dtype=torch.long, device=self.model.device)
            request.chunk = chunk
        except Exception as e:
            self._fail(request, e)
            return False
        return True

    def _join(self, request: Request, logits: torch.Tensor) -> None:
        """A prefilled request: a row of its own, then its first token."""
        self._tell("join", request.serial)
        self._admit(request)
        try:
            [(token, logprobs)] = self._sample([request], logits)
        except Exception as e:
            log.exception("sampling failed")
            self._send(request, request.record(finish="error", error=f"{type(e).__name__}: {e}"))
            self._release(len(self._active) - 1)
            return
        if self._deliver(request, token, logprobs):
            self._release(len(self._active) - 1)

    def _admit(self, request: Request) -> None:
        """A prefilled request's prompt blocks to the prefix cache and its KV to a row of the batch."""
        if self.model.prompt_is_causal:
            self.prefix.store(request.prompt, request.kv.k[:, 0], request.kv.v[:, 0])
        self.cache.add(request.kv)
        request.kv = request.todo = None
        self._active.append(request)

    def _fail(self, request: Request, error: Exception) -> None:
        log.error("prefill failed", exc_info=error)
        self._forget(request)
        self._send(request, request.record(finish="error", error=f"{type(error).__name__}: {error}"))

    def _forget(self, request: Request) -> None:
        """A request whose prefill ends without it joining the batch."""
        self._tell("drop", request.serial)
        if request in self._prefilling:
            self._prefilling.remove(request)
        request.kv = request.todo = None

    def _decode_step(self) -> None:
        batch = self._active
        start = time.perf_counter()
        ids = [r.tokens[-1] for r in batch] + [0] * (self.cache.step_rows - len(batch))  # padding rows: 0
        self._tell("decode", ids)
        inputs = torch.tensor(ids, dtype=torch.long, device=self.model.device)
        try:
            logits = decode_step(self.model, inputs, self.cache)[: len(batch)]
            picks = self._sample(batch, logits)
        except Exception as e:  # cannot tell whose fault: end the batch, keep serving
            log.exception("decode step failed")
            for request in batch:
                self._send(request, request.record(finish="error", error=f"{type(e).__name__}: {e}"))
            self._tell("clear")
            self._active = []
            self.cache.clear()
            return
        self.steps += 1
        self.peak_batch = max(self.peak_batch, len(batch))
        self.decoded_tokens += len(batch)
        self.decode_seconds += time.perf_counter() - start
        finished = [i for i, (request, (token, logprobs)) in enumerate(zip(batch, picks))
                    if self._deliver(request, token, logprobs)]
        for row in reversed(finished):  # high rows first, so moved rows are never ones still to free
            self._release(row)

    def _sample(self, batch: list[Request], logits: torch.Tensor) -> list[tuple[int, tuple | None]]:
        """Each request's next id from its row of logits [B, vocab], and (when it asked for them) the
        id's log-probability and the top alternatives', from the scores it sampled from."""
        scores = torch.stack([request.scores(row) for request, row in zip(batch, logits)])
        picks = self._greedy(scores).tolist()
        out = []
        for i, request in enumerate(batch):
            if not request.sampling.greedy:
                picks[i] = int(request.sampler(scores[i : i + 1])[0])
            if request.counts is not None:
                request.counts[picks[i]] += 1
            logprobs = None
            if request.logprobs is not None:
                row = torch.log_softmax(scores[i], dim=-1)
                top = torch.topk(row, request.logprobs) if request.logprobs else None
                alternatives = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
                logprobs = (float(row[picks[i]]), alternatives)
            out.append((picks[i], logprobs))
        return out

    def _deliver(self, request: Request, token: int, logprobs: tuple | None = None) -> bool:
        """Send a token (and the text it adds); True when the request is finished."""
        now = time.perf_counter()
        request.tokens.append(token)
        if request.first_token is None:
            request.first_token = now
            self.metrics.ttft.observe(now - request.submitted)
            self.metrics.prompt_tokens.inc(len(request.prompt))
        else:
            self.metrics.inter_token.observe(now - request.last_token)
        request.last_token = now
        self.metrics.generation_tokens.inc()
        text = request.text.add(token) if request.text is not None else ""
        finish = None
        if token in request.stop_ids or (request.text is not None and request.text.stopped):
            finish = "stop"
        elif len(request.tokens) >= request.max_new_tokens:
            finish = "length"
        if finish and request.text is not None:
            text += request.text.finish()
        thought = request.text.think(final=finish is not None) if request.text is not None else ""
        if not self._send(request, request.record(text, token, finish, logprobs=logprobs, reasoning=thought)):
            request.cancelled = True
        return finish is not None

    def _send(self, request: Request, record: GenerationResponse) -> bool:
        try:
            request.emit(record)
            return True
        except Exception:  # the listener is gone (e.g. its event loop closed)
            return False

    def _release(self, row: int) -> None:
        self._tell("release", row)
        self.cache.remove(row)
        last = self._active.pop()
        if row < len(self._active):
            self._active[row] = last

    def _drop_cancelled(self) -> None:
        for row in reversed(range(len(self._active))):
            request = self._active[row]
            if request.cancelled:
                self._release(row)
                self._send(request, request.record(finish="cancelled"))
