"""The model side of serving: one shared base with many LoRA adapters (`Engine`), and the one thread that runs it
(`Scheduler`).

Only the model thread touches the model: loads, unloads and forward passes never overlap, and the base weights are
never written (adapters are never merged in place, so no amount of switching can drift the base: every answer is
the one a fresh server gives). A batch may mix adapters: every LoRA layer (and every per-adapter head) gets one
`RowPlan` naming each row's adapter (see deltatune/methods/lora/serving.py), so the base runs once for the batch and
each adapter's B A x is added to its own rows only; the cost depends on the adapters in the batch, not on how many
are loaded.

The scheduler works in ticks: run queued jobs (adapter installs, evictions, task predictions), one classification
batch, then one decoding step of the running sequences. With continuous batching (the default) waiting sequences
join the running batch at every tick and finished ones leave it; with static batching a batch is admitted only when
the previous one has finished (kept for comparison: `bench/serve_load.py`).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltatune.apps.serve.generation import DecodeBatch, SamplingParams, Sequence, advance, choose_tokens
from deltatune.checkpoint import read_adapter_file
from deltatune.config import PeftConfig
from deltatune.errors import AdapterNotFoundError, CheckpointError, ConfigError
from deltatune.layer import ModulesToSave
from deltatune.methods.lora import LoraLayer
from deltatune.methods.lora.serving import RowPlan
from deltatune.model import PeftModel, get_peft_model


class AdapterError(CheckpointError):
    """An adapter folder that cannot be served (wrong method, DoRA, unreadable files)."""


class Timeout(RuntimeError):
    """A request ran past its deadline and was dropped from the batch."""


@dataclass
class PreparedAdapter:
    """An adapter read from disk (off the model thread), ready to attach."""

    config: PeftConfig
    state: dict[str, torch.Tensor]


def _adapter_layers(module: nn.Module) -> list[nn.Module]:
    """The model's LoRA layers and per-adapter heads, found without walking into them (a layer holds one module
    per adapter, so a full walk would cost more with every adapter loaded)."""
    found, stack = [], [module]
    while stack:
        m = stack.pop()
        if isinstance(m, (LoraLayer, ModulesToSave)):
            found.append(m)
        else:
            stack.extend(m.children())
    return found


def _context_length(config: Any) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 30


class Engine:
    """A base model plus named LoRA adapters, answering classification batches and writing sequences. Every
    method except `read_adapter` must be called from one thread (the scheduler's)."""

    def __init__(self, model: nn.Module, tokenizer: Any, task: str) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.task = task
        self.paths: dict[str, str] = {}
        self._layers: list[nn.Module] = []
        if task == "causal-lm":
            self.batch = DecodeBatch(self.net)
            self.context_length = _context_length(self.net.config)
            self.eos = self._eos_ids()

    @property
    def adapters(self) -> list[str]:
        return list(self.paths)

    @property
    def net(self) -> nn.Module:
        """The user's model (with its LoRA layers inside), called directly on the hot path."""
        return self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.net, "generation_config", None), self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            ids.update([value] if isinstance(value, int) else (value or []))
        return ids

    # --- adapters ------------------------------------------------------------------------------
    @staticmethod
    def read_adapter(path: str) -> PreparedAdapter:
        """Read and check an adapter folder (config and safetensors only); any thread, the model is not touched."""
        try:
            config = PeftConfig.from_pretrained(path)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise AdapterError(f"Cannot read the adapter config: {err}") from err
        if getattr(config.peft_type, "value", config.peft_type) != "LORA":
            raise AdapterError(
                f"Only LoRA adapters can be served; this folder holds a {config.peft_type} adapter."
            )
        if getattr(config, "use_dora", False):
            raise AdapterError("This is a DoRA adapter; mixed-adapter batches support plain LoRA only.")
        try:
            state = read_adapter_file(path)
        except (OSError, ValueError) as err:
            raise AdapterError(f"Cannot read the adapter weights: {err}") from err
        config.inference_mode = True
        return PreparedAdapter(config, state)

    def install(self, name: str, adapter: PreparedAdapter, path: str) -> None:
        """Attach a read adapter under `name`; on any error the model is left as it was."""
        if name in self.paths:
            raise ConfigError(
                f"An adapter named {name!r} is already loaded; unload it first or pick a new name."
            )
        first = not isinstance(self.model, PeftModel)
        try:
            if first:
                self.model = get_peft_model(self.model, adapter.config, adapter_name=name)
            else:
                self.model.add_adapter(name, adapter.config)
            # the tensors were read on another thread; checking and copying them in is all that happens here
            self.model._load_weights(name, adapter.state)
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            self._forget(name, first)
            raise AdapterError(f"Could not load adapter {name!r}: {err}") from err
        self.paths[name] = path
        self._layers = _adapter_layers(self.net)
        # new wrappers start in training mode (dropout); set it on them, not by walking the whole model
        for layer in self._layers:
            layer.training = False

    def _forget(self, name: str, first: bool) -> None:
        if not isinstance(self.model, PeftModel) or name not in self.model.peft_config:
            return
        if first:
            self.model = self._plain_base()
        else:
            self.model.delete_adapter(name)

    def _plain_base(self) -> nn.Module:
        for layer in self.model.adapter_layers():
            layer.set_adapter([])  # so unload() keeps the original heads, not the adapter's copies
        return self.model.unload().eval()

    def load(self, name: str, path: str) -> None:
        self.install(name, self.read_adapter(path), path)

    def unload(self, name: str) -> None:
        """Remove an adapter; removing the last one gives back the plain base model."""
        if name not in self.paths:
            raise AdapterNotFoundError(f"No adapter named {name!r} is loaded.")
        if len(self.paths) > 1:
            self.model.delete_adapter(name)
        else:
            self.model = self._plain_base()
        del self.paths[name]
        self._layers = _adapter_layers(self.net)

    def check_names(self, names) -> None:
        missing = sorted({n for n in names if n is not None and n not in self.paths})
        if missing:
            raise AdapterNotFoundError(f"Adapter {missing[0]!r} is not loaded.")

    @contextmanager
    def rows(self, names: list[str | None]):
        """Inside the block, row i of every batch runs adapter names[i] (None: the base alone)."""
        self.check_names(names)
        plan = RowPlan(names)
        # a plain attribute: skip nn.Module.__setattr__'s checks (twice a layer a step)
        for layer in self._layers:
            object.__setattr__(layer, "row_adapters", plan)
        try:
            yield
        finally:
            for layer in self._layers:
                object.__setattr__(layer, "row_adapters", None)

    def one_adapter(self, name: str | None):
        """The whole model on one adapter (for task predictions, whose batches the task makes)."""
        self.check_names([name])
        if not isinstance(self.model, PeftModel):
            return nullcontext()
        if name is None:
            return self.model.disable_adapter()
        self.model.set_adapter(name)
        return nullcontext()

    # --- classification ------------------------------------------------------------------------
    @torch.no_grad()
    def classify_ids(self, ids: list[list[int]], names: list[str | None]) -> list[dict[str, Any]]:
        """Labels with softmax scores, one dict per row of token ids (the same fields as `deltatune predict`)."""
        longest = max(len(row) for row in ids)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(ids), longest), pad, dtype=torch.long)
        mask = torch.zeros(len(ids), longest, dtype=torch.long)
        for i, row in enumerate(ids):  # right padding, as the tokenizer pads a classifier's batch
            input_ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        device = next(self.net.parameters()).device
        with self.rows(names):
            logits = self.net(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        probs = logits.float().softmax(-1)
        labels = self.label_names(probs.shape[-1])
        return [
            {
                "label": labels[int(p.argmax())],
                "score": float(p.max()),
                "scores": {n: float(v) for n, v in zip(labels, p)},
            }
            for p in probs
        ]

    def classify(self, texts: list[str], names: list[str | None]) -> list[dict[str, Any]]:
        """`classify_ids` on texts (tokenized on the calling thread: for scripts and benchmarks, not the server)."""
        return self.classify_ids([self.tokenizer(t)["input_ids"] for t in texts], names)

    def label_names(self, count: int) -> list[str]:
        id2label = getattr(getattr(self.net, "config", None), "id2label", None) or {}
        return [str(id2label.get(i, f"LABEL_{i}")) for i in range(count)]

    # --- generation ----------------------------------------------------------------------------
    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _advance(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        for seq, token in zip(seqs, choose_tokens(logits, seqs)):
            advance(seq, token, self._decode, self.eos, self.context_length)
            if seq.done:
                seq.emit(("done", None))

    @torch.no_grad()
    def prefill(self, seqs: list[Sequence]) -> None:
        """Run newcomers' prompts, write their first token, and stack the unfinished ones into the batch."""
        self.batch.set_model(self.net)
        with self.rows([s.adapter for s in seqs]):
            logits, cache, mask = self.batch.prefill(seqs)
        self._advance(seqs, logits)
        self.batch.join(seqs, cache, mask)
        self.batch.keep([i for i, s in enumerate(self.batch.seqs) if not s.done])

    @torch.no_grad()
    def decode_step(self) -> None:
        """One token for every running sequence; finished ones leave the batch."""
        seqs = self.batch.seqs
        self.batch.set_model(self.net)
        with self.rows([s.adapter for s in seqs]):
            logits = self.batch.step()
        self._advance(seqs, logits)
        self.batch.keep([i for i, s in enumerate(seqs) if not s.done])

    def drop(self, now: float) -> None:
        """Remove cancelled and timed-out sequences from the batch (their clients have gone or given up)."""
        gone = [s for s in self.batch.seqs if s.expired(now)]
        if gone:
            self.batch.keep([i for i, s in enumerate(self.batch.seqs) if not s.expired(now)])
            for seq in gone:
                finish_dropped(seq)

    def fail_running(self, err: BaseException) -> None:
        for seq in self.batch.seqs:
            seq.finish_reason = "error"
            seq.emit(("error", err))
        self.batch.keep([])

    def generate(self, prompts: list[str], names: list[str | None], params: SamplingParams) -> list[str]:
        """Write every prompt to the end as one batch (for scripts and tests; the server schedules sequences)."""
        seqs = [Sequence(self.tokenizer(p)["input_ids"], n, params) for p, n in zip(prompts, names)]
        self.prefill(seqs)
        while len(self.batch):
            self.decode_step()
        return [s.text for s in seqs]


def finish_dropped(seq: Sequence) -> None:
    seq.finish_reason = "cancelled" if seq.cancelled else "timeout"
    seq.emit(("error", Timeout("The request ran past its timeout and was dropped.")))


@dataclass(eq=False)
class _Classify:
    ids: list[list[int]]
    names: list[str | None]
    future: Future


class Scheduler:
    """The model thread: jobs, classification batches and decoding steps, in ticks (see the module docstring).

    Every method but the loop is safe to call from any thread; results come back as concurrent futures or as
    sequence events."""

    def __init__(
        self,
        engine: Engine,
        max_rows: int = 32,
        continuous: bool = True,
        window_s: float = 0.005,
        threads: int | None = None,
        on_batch: Callable[[str, int], None] | None = None,
    ) -> None:
        self.engine = engine
        self.max_rows, self.continuous, self.window_s = max_rows, continuous, window_s
        self.threads = threads
        self.on_batch = on_batch or (lambda kind, rows: None)
        self._wake = threading.Condition()
        self._jobs: deque[tuple[Callable[[], Any], Future]] = deque()
        self._classify: deque[_Classify] = deque()
        self._waiting: deque[Sequence] = deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self._waiting_since: int | None = None  # the tick at which the oldest waiting sequence was first seen

    # --- any thread ------------------------------------------------------------------------------
    def call(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run `fn(*args)` on the model thread between two steps."""
        future: Future = Future()
        self._put(self._jobs, (lambda: fn(*args), future))
        return future

    def classify(self, ids: list[list[int]], names: list[str | None]) -> Future:
        future: Future = Future()
        self._put(self._classify, _Classify(ids, names, future))
        return future

    def submit(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self._put(self._waiting, seq)

    def queued(self) -> int:
        """Rows waiting for the model (not yet running)."""
        return len(self._waiting) + sum(len(c.ids) for c in list(self._classify))

    def running(self) -> int:
        return len(self.engine.batch) if self.engine.task == "causal-lm" else 0

    def _put(self, queue: deque, item: Any) -> None:
        with self._wake:
            queue.append(item)
            self._wake.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="deltatune-model", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        for seq in list(self._waiting) + (self.engine.batch.seqs if self.engine.task == "causal-lm" else []):
            seq.emit(("error", RuntimeError("The server is shutting down.")))

    # --- the model thread ------------------------------------------------------------------------
    def _idle(self) -> bool:
        return not (self._jobs or self._classify or self._waiting or self.running())

    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            with self._wake:
                woke_idle = self._idle()
                while self._idle() and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
            if woke_idle and self.window_s > 0 and not self._jobs:
                time.sleep(self.window_s)  # gather what arrives together into one batch
            self.tick()

    def tick(self) -> None:
        """One round: queued jobs, one classification batch, one decoding step (the loop calls it; tests and
        benchmarks may drive a scheduler whose thread is not started)."""
        while self._jobs:
            fn, future = self._jobs.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as err:  # noqa: BLE001 - the job's caller gets its error
                    future.set_exception(err)
        self._classify_batch()
        if self.engine.task == "causal-lm":
            self._generation_step()
        self.steps += 1

    def _classify_batch(self) -> None:
        items, rows = [], 0
        while self._classify and rows + len(self._classify[0].ids) <= max(self.max_rows, rows + 1):
            item = self._classify.popleft()
            if item.future.set_running_or_notify_cancel():
                items.append(item)
                rows += len(item.ids)
            if rows >= self.max_rows:
                break
        if not items:
            return
        try:
            self.engine.check_names([n for item in items for n in item.names])
            results = self.engine.classify_ids(
                [r for item in items for r in item.ids], [n for item in items for n in item.names]
            )
        except BaseException as err:  # noqa: BLE001 - the error belongs to these requests
            for item in items:
                item.future.set_exception(err)
            return
        self.on_batch("classify", rows)
        start = 0
        for item in items:
            item.future.set_result(results[start : start + len(item.ids)])
            start += len(item.ids)

    JOIN_ROWS, JOIN_TICKS = 4, 4

    def _admit_now(self) -> bool:
        """Whether waiting sequences join the batch at this tick. Static: only when the batch is empty.
        Continuous: whenever the batch is at most half full; above that, newcomers are prefilled together once
        JOIN_ROWS of them can join or the oldest has waited JOIN_TICKS ticks: a prefill is a forward pass of its
        own, and one for every row that frees up would cost the running rows as much as their steps."""
        running = len(self.engine.batch)
        if not self._waiting:
            self._waiting_since = None
            return False
        if not self.continuous:
            return running == 0
        if self._waiting_since is None:
            self._waiting_since = self.steps
        joining = min(self.max_rows - running, len(self._waiting))
        ready = joining > 0 and (
            running <= self.max_rows // 2
            or joining >= self.JOIN_ROWS
            or self.steps - self._waiting_since >= self.JOIN_TICKS
        )
        if ready:
            self._waiting_since = None
        return ready

    def _generation_step(self) -> None:
        engine, now = self.engine, time.monotonic()
        engine.drop(now)
        newcomers = []
        if self._admit_now():
            free = self.max_rows - len(engine.batch)
            while free > 0 and self._waiting:
                seq = self._waiting.popleft()
                if seq.expired(now):
                    finish_dropped(seq)
                    continue
                if seq.adapter is not None and seq.adapter not in engine.paths:
                    seq.finish_reason = "error"
                    seq.emit(("error", AdapterNotFoundError(f"Adapter {seq.adapter!r} is not loaded.")))
                    continue
                newcomers.append(seq)
                free -= 1
        try:
            if len(engine.batch):
                self.on_batch("generate", len(engine.batch))
                engine.decode_step()
        except BaseException as err:  # noqa: BLE001 - a failed step fails the sequences in it, not the server
            engine.fail_running(err)
        if newcomers:
            try:
                engine.prefill(newcomers)
            except BaseException as err:  # noqa: BLE001
                for seq in newcomers:
                    if not seq.done:
                        seq.finish_reason = "error"
                        seq.emit(("error", err))
