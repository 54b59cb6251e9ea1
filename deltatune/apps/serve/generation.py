"""Token-by-token generation for the server: the sequences being written, how each picks its next token, when it
stops, and the running batch's key/value cache that sequences join and leave at token boundaries.

Why a cache of our own rather than `model.generate`: `generate` runs a fixed batch to its end, so a request that
arrives meanwhile waits for the longest row (static batching). Here every running row keeps its keys and values in
one left-padded cache; a newcomer is prefilled on its own, its cache is padded to the batch's length and stacked
under the others, and a finished row is dropped, all between two decoding steps (continuous batching, as vLLM and
TGI do; on the CPU a padded cache stands in for their paged one). Positions come from each row's own token count and
the attention mask hides the padding, so a row's tokens do not depend on who else is in the batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens. temperature 0 is greedy decoding (argmax), as in OpenAI's API."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(eq=False)
class Sequence:
    """One choice being written. The model thread appends tokens and calls `emit(event)` with ("text", delta) as
    text becomes final (when streaming), then ("done", None) or ("error", exception); the event loop may only set
    `cancelled`."""

    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    emit: Callable[[tuple[str, Any]], None] = lambda event: None
    deadline: float = float("inf")  # time.monotonic() after which the sequence is dropped
    stream: bool = False  # emit ("text", delta) events as text becomes final (else only the end is emitted)
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    cancelled: bool = False
    sent: int = 0  # characters of `text` already emitted
    length: int = 0  # tokens in the cache for this row (prompt + generated, without padding)
    generator: torch.Generator = field(init=False)
    # Incremental detokenizing (as vLLM does): each step decodes only tokens[prefix:] and tokens[prefix:read]
    # (how a token decodes can depend on its left neighbour), so a step costs the same at the 1st token and the
    # 500th; the text starts as decoding the written tokens alone starts.
    prefix: int = 0
    read: int = 0

    def __post_init__(self) -> None:
        # Each sequence draws from its own generator, so a seeded request gets the same tokens whoever shares
        # its batch; an unseeded one is seeded at random.
        self.generator = torch.Generator()
        if self.params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(self.params.seed)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def expired(self, now: float) -> bool:
        return self.cancelled or now > self.deadline


def choose_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """The next token of each row of `logits` (rows, vocab): argmax for greedy rows, else a draw from the
    temperature-scaled, top-k/top-p filtered distribution with the row's own generator."""
    logits = logits.float()
    chosen = logits.argmax(-1).tolist()
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.temperature > 0:
            chosen[i] = _sample(logits[i], p, seq.generator)
    return chosen


def _sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> int:
    # In float64 (a float32 temperature of 1e-300 would be 0) and from the maximum: the best token scores 0 and
    # the others -inf at worst, never NaN, so a vanishing temperature is greedy decoding, not a crash.
    logits = logits.double()
    scores = (logits - logits.max()) / p.temperature
    if p.top_k > 0:
        kth = torch.topk(scores, min(p.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = scores.softmax(-1)
    if p.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the better tokens
        sorted_probs[before >= p.top_p] = 0  # the best token always stays
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters may still turn out to be the start of a stop string (or half a character)."""
    if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its other bytes
        return len(text)
    keep = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), keep, -1):
            if text.endswith(stop[:n]):
                keep = n
                break
    return keep


def advance(
    seq: Sequence, token: int, decode: Callable[[list[int]], str], eos: set[int], max_len: int
) -> None:
    """Append `token`, decide whether the sequence is finished, and emit the text that is final. Text is decoded
    as it is written only when someone needs it before the end (a stream, or stop strings to look for)."""
    seq.tokens.append(token)
    stops, cut = seq.params.stop, -1
    if seq.stream or stops:
        searched = len(seq.text)
        before = decode(seq.tokens[seq.prefix : seq.read]) if seq.read > seq.prefix else ""
        after = decode(seq.tokens[seq.prefix :])
        # (text ending in U+FFFD is half a character: wait for the rest)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            seq.text += after[len(before) :]
            seq.prefix, seq.read = seq.read, len(seq.tokens)
        found = (seq.text.find(s, max(0, searched - len(s) + 1)) for s in stops)
        cut = min((i for i in found if i >= 0), default=-1)
    if cut >= 0:
        seq.text, seq.finish_reason = seq.text[:cut], "stop"
    elif token in eos:
        seq.finish_reason = "stop"
    elif len(seq.tokens) >= seq.params.max_tokens or seq.length >= max_len:  # no position left to feed it
        seq.finish_reason = "length"
    if seq.finish_reason is not None and cut < 0:
        seq.text = decode(seq.tokens)  # exactly what decoding the whole sequence gives
    if not seq.stream:
        return
    text = seq.text
    final = len(text) if seq.done else len(text) - _held_back(text, stops)
    if final > seq.sent:
        seq.emit(("text", text[seq.sent : final]))
        seq.sent = final


class RoomyLayer(DynamicLayer):
    """A cache layer that writes each step's keys and values into spare room (`room[..., :used, :]` holds them),
    doubling it when full, where DynamicLayer concatenates (copying the whole cache at every step: most of a step's
    time with 32 rows). Rows leaving and joining also cost one copy of the cache each, not three."""

    SPARE = 64

    def __init__(self, key_room: torch.Tensor, value_room: torch.Tensor, used: int) -> None:
        super().__init__()
        self.dtype, self.device, self.is_initialized = key_room.dtype, key_room.device, True
        self._keys, self._values, self.used = key_room, value_room, used
        self._expose()

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor) -> RoomyLayer:
        """A layer holding copies of these keys and values, with spare room after them."""
        used = keys.shape[-2]
        return cls(_room(keys, used + cls.SPARE), _room(values, used + cls.SPARE), used)

    def rows(self, index: torch.Tensor, start: int) -> RoomyLayer:
        """Only the rows `index`, from column `start` on (one gather; the spare room comes along)."""
        keys = self._keys[..., start:, :].index_select(0, index)
        return RoomyLayer(keys, self._values[..., start:, :].index_select(0, index), self.used - start)

    def stacked(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> RoomyLayer:
        """These rows under the new ones (prefilled keys and values), both left-padded with zeros to `length`:
        written once into a fresh room. Padding must be zeros, not garbage: a masked position still multiplies
        its value by a zero weight, and 0 x NaN is NaN."""
        old, new = self._keys.shape[0], keys.shape[0]
        rooms = []
        for mine, theirs in ((self.keys, keys), (self.values, values)):
            room = mine.new_empty(old + new, mine.shape[1], length + self.SPARE, mine.shape[-1])
            room[:old, :, : length - self.used].zero_()
            room[:old, :, length - self.used : length] = mine
            room[old:, :, : length - theirs.shape[-2]].zero_()
            room[old:, :, length - theirs.shape[-2] : length] = theirs
            rooms.append(room)
        return RoomyLayer(*rooms, length)

    def _expose(self) -> None:
        self.keys, self.values = self._keys[..., : self.used, :], self._values[..., : self.used, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.used + key_states.shape[-2]
        if end > self._keys.shape[-2]:
            self._keys, self._values = _room(self.keys, 2 * end), _room(self.values, 2 * end)
        self._keys[..., self.used : end, :] = key_states
        self._values[..., self.used : end, :] = value_states
        self.used = end
        self._expose()
        return self.keys, self.values


def _room(t: torch.Tensor, size: int) -> torch.Tensor:
    """`t` copied into the start of a tensor with `size` positions (the rest uninitialised)."""
    room = t.new_empty(*t.shape[:-2], size, t.shape[-1])
    room[..., : t.shape[-2], :] = t
    return room


def _cache(layers: list[RoomyLayer]) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = layers
    return cache


def _pad_left(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class DecodeBatch:
    """The running sequences and their key/value cache (rows left-padded to one length, `mask` marking real
    positions). `prefill` runs newcomers' prompts, `join` stacks them in, `step` writes one token for every row."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.set_model(net)
        self.seqs: list[Sequence] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None

    def set_model(self, net: torch.nn.Module) -> None:
        """The model to run (the engine's changes when its first adapter is attached or its last removed)."""
        if getattr(self, "net", None) is net:
            return
        self.net = net
        params = inspect.signature(net.forward).parameters
        self._keep_last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.device = next(net.parameters()).device

    def __len__(self) -> int:
        return len(self.seqs)

    def _forward(self, ids, mask, positions, cache) -> tuple[torch.Tensor, DynamicCache]:
        out = self.net(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            **self._keep_last,
        )
        return out.logits[:, -1], out.past_key_values

    def prefill(self, seqs: list[Sequence]) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        """Run the prompts of `seqs` (left-padded among themselves); (last logits, their cache, their mask)."""
        longest = max(len(s.prompt_ids) for s in seqs)
        ids = torch.zeros(len(seqs), longest, dtype=torch.long)
        mask = torch.zeros(len(seqs), longest, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, longest - len(s.prompt_ids) :] = torch.tensor(s.prompt_ids)
            mask[i, longest - len(s.prompt_ids) :] = 1
            s.length = len(s.prompt_ids)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        logits, cache = self._forward(ids, mask, positions, DynamicCache())
        return logits, cache, mask

    def join(self, seqs: list[Sequence], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Stack prefilled rows under the running ones, padding whichever cache is shorter on the left."""
        if not self.seqs:
            self.seqs, self.mask = list(seqs), mask
            self.cache = _cache([RoomyLayer.holding(layer.keys, layer.values) for layer in cache.layers])
            return
        length = max(self.mask.shape[1], mask.shape[1])
        self.cache = _cache(
            [old.stacked(new.keys, new.values, length) for old, new in zip(self.cache.layers, cache.layers)]
        )
        self.mask = torch.cat([_pad_left(self.mask, length, 1), _pad_left(mask, length, 1)])
        self.seqs += seqs

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (finished and dropped sequences leave), trimming padding no row needs any more."""
        if len(rows) == len(self.seqs):
            return
        self.seqs = [self.seqs[i] for i in rows]
        if not rows:
            self.cache = self.mask = None
            return
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int(mask.any(0).int().argmax())  # the first column some row still uses
        self.mask = mask[:, start:]
        self.cache = _cache([layer.rows(index, start) for layer in self.cache.layers])

    def step(self) -> torch.Tensor:
        """Feed every row its last token; the logits for the next one (rows, vocab)."""
        ids = torch.tensor([[s.tokens[-1]] for s in self.seqs], device=self.device)
        positions = torch.tensor([[s.length] for s in self.seqs], device=self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.seqs), 1)], dim=1)
        logits, self.cache = self._forward(ids, self.mask, positions, self.cache)
        for s in self.seqs:
            s.length += 1
        return logits
