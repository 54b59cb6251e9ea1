"""OpenAI-compatible endpoints, so every client, UI and evaluation harness that speaks that API can use the server:
`GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (`stream: true` as server-sent events).

`model` names the adapter (or the base model, `base` by default). OpenAI's parameters are acted on: `max_tokens`
(`max_completion_tokens`), `temperature` (0: greedy), `top_p`, `stop`, `n`, `seed` (choice j draws with seed + j),
`echo`, `stream_options.include_usage`, and `usage` counts tokens. Parameters this server does not implement are
accepted only at their neutral value (e.g. `presence_penalty: 0`), and unknown fields are refused, so no request is
answered as if a setting had applied when it did not. `user` is accepted and changes nothing, as in OpenAI's API.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, ClassVar, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import Field, model_validator
from starlette.background import BackgroundTask

from deltatune.apps.serve.batching import Timeout
from deltatune.apps.serve.generation import SamplingParams
from deltatune.apps.serve.http import KINDS, Text, request_id, status_for
from deltatune.apps.serve.server import Run, Server, Strict
from deltatune.errors import DeltatuneError

log = logging.getLogger("deltatune.serve")


class StreamOptions(Strict):
    include_usage: bool = False


class OpenAIRequest(Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # torch generators take 64-bit seeds
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    # field -> the values that mean "not used" (accepted); anything else asks for what this server does not do
    NEUTRAL: ClassVar[dict[str, tuple]] = {
        "presence_penalty": (0.0,),
        "frequency_penalty": (0.0,),
        "logit_bias": (None, {}),
    }

    @model_validator(mode="after")
    def refuse_unsupported(self):
        for name, neutral in self.NEUTRAL.items():
            value = getattr(self, name)
            if value not in neutral:
                raise ValueError(f"{name}={value!r} is not supported by this server; leave it out")
        stops = self.stops()
        if len(stops) > 4 or any(not 0 < len(s) <= 256 for s in stops):
            raise ValueError("stop takes up to 4 strings of 1 to 256 characters")
        return self

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(OpenAIRequest):
    prompt: Text | list[Text]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    NEUTRAL: ClassVar[dict[str, tuple]] = {
        **OpenAIRequest.NEUTRAL,
        "logprobs": (None,),
        "best_of": (None, 1),
        "suffix": (None,),
    }


class TextPart(Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None

    NEUTRAL: ClassVar[dict[str, tuple]] = {
        **OpenAIRequest.NEUTRAL,
        "logprobs": (None, False),
        "top_logprobs": (None,),
        "response_format": (None, {"type": "text"}),
    }


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def add_openai_routes(app: FastAPI, server: Server, answer) -> None:
    settings = server.settings
    started = int(time.time())

    def model_card(name: str) -> dict[str, Any]:
        card = {"id": name, "object": "model", "created": started, "owned_by": "deltatune"}
        if name != settings.base_name:
            card["parent"] = settings.base_name
        return card

    def model_names() -> list[str]:
        adapters = server.adapters
        return [settings.base_name, *sorted({*adapters.names(), *adapters.known})]

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        """The base model and the adapters this server holds or knows (others under the root load on request)."""
        return {"object": "list", "data": [model_card(n) for n in model_names()]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str) -> dict[str, Any]:
        if name not in model_names():
            raise HTTPException(404, f"No model named {name!r}; GET /v1/models lists them.")
        return model_card(name)

    def sampling(req: OpenAIRequest, max_tokens: int | None, default: int) -> SamplingParams:
        server.need_task("causal-lm", "this endpoint")
        if req.n > settings.max_choices:
            raise HTTPException(400, f"n={req.n} is over the limit {settings.max_choices} (--max-choices).")
        tokens = max_tokens if max_tokens is not None else default
        if tokens > settings.max_new_tokens:
            raise HTTPException(
                400, f"max_tokens={tokens} is over the limit {settings.max_new_tokens} (--max-new-tokens)."
            )
        return SamplingParams(
            max_tokens=tokens, temperature=req.temperature, top_p=req.top_p, stop=req.stops(), seed=req.seed
        )

    async def respond(
        req: OpenAIRequest, request: Request, prompts: list[list[int]], params, kind: str, echo=()
    ):
        """Run the request's sequences and answer as JSON, or as a stream of events."""
        adapter = server.adapter_named(req.model)
        run = server.start_generation(prompts, adapter, params, req.n, stream=req.stream)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        prompt_tokens = sum(len(p) for p in prompts)
        if req.stream:
            return streamed(req, run, rid, created, prompt_tokens, kind, echo, request_id(request))
        await server.finish(run, request)
        choices = []
        for i, seq in enumerate(run.seqs):
            text = (echo[i // req.n] if echo else "") + seq.text
            if kind == "chat":
                choice = {"index": i, "message": {"role": "assistant", "content": text}}
            else:
                choice = {"index": i, "text": text}
            choices.append({**choice, "logprobs": None, "finish_reason": seq.finish_reason})
        return {
            "id": rid,
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": created,
            "model": req.model,
            "system_fingerprint": None,
            "choices": choices,
            "usage": usage(run, prompt_tokens),
        }

    def usage(run: Run, prompt_tokens: int) -> dict[str, int]:
        completion = sum(len(s.tokens) for s in run.seqs)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }

    def streamed(req, run: Run, rid, created, prompt_tokens, kind, echo, http_id) -> StreamingResponse:
        """Server-sent events as OpenAI sends them; the adapter stays held (and the rows run) until the stream
        ends or the client leaves."""
        adapter = server.adapter_named(req.model)
        server.adapters.hold(adapter)  # by the stream, from here to its end
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                run.cancel()
                server.adapters.release(adapter)

        def chunk(index: int, text: str | None = None, finish: str | None = None, role: bool = False):
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": index, "delta": delta}
            else:
                choice = {"index": index, "text": text or ""}
            return {
                "id": rid,
                "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                "created": created,
                "model": req.model,
                "system_fingerprint": None,
                "choices": [{**choice, "logprobs": None, "finish_reason": finish}],
            }

        async def events():
            try:
                for i in range(len(run.seqs)):
                    if kind == "chat":
                        yield sse(chunk(i, role=True))
                    elif echo:
                        yield sse(chunk(i, text=echo[i // req.n]))
                async for index, event, payload in run.events():
                    if event == "text":
                        yield sse(chunk(index, text=payload))
                    elif event == "done":
                        yield sse(chunk(index, finish=run.seqs[index].finish_reason))
                if req.stream_options is not None and req.stream_options.include_usage:
                    yield sse(
                        {
                            "id": rid,
                            "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                            "created": created,
                            "model": req.model,
                            "choices": [],
                            "usage": usage(run, prompt_tokens),
                        }
                    )
                yield sse("[DONE]")
            except Exception as err:  # noqa: BLE001 - the status is sent already: the error goes in the stream
                if isinstance(err, DeltatuneError):
                    status, message = status_for(err), str(err)
                elif isinstance(err, Timeout):
                    status, message = 504, f"{err} (--request-timeout)"
                else:
                    log.error("request %s failed while streaming", http_id, exc_info=err)
                    status, message = (
                        500,
                        f"Internal error; the server log has the details under request id {http_id}.",
                    )
                yield sse(
                    {
                        "error": {
                            "message": message,
                            "type": KINDS.get(status, "error"),
                            "code": status,
                            "request_id": http_id,
                        }
                    }
                )
            finally:
                release()

        return StreamingResponse(events(), media_type="text/event-stream", background=BackgroundTask(release))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        """Continue the prompt(s) with the adapter `model` names."""
        params = sampling(req, req.max_tokens, 16)
        texts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not texts or len(texts) * req.n > settings.max_batch_size:
            raise HTTPException(400, f"Send 1 to {settings.max_batch_size} prompts (times n) per request.")
        adapter = server.adapter_named(req.model)

        async def work():
            prompts = await server.tokenize(texts)
            return await respond(req, request, prompts, params, "text", tuple(texts) if req.echo else ())

        return await answer("completions", adapter, work)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        """The assistant's next turn, with the tokenizer's chat template (the one training used)."""
        from deltatune.train.data import render_prompt

        if req.max_tokens is not None and req.max_completion_tokens is not None:
            raise HTTPException(400, "Send max_tokens or max_completion_tokens, not both.")
        params = sampling(req, req.max_completion_tokens or req.max_tokens, settings.max_new_tokens)
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages
        ]
        for m in messages:
            server.check_text(m["content"], "A message")
        adapter = server.adapter_named(req.model)

        async def work():
            text = await server.on_tokenizer_thread(render_prompt, server.tokenizer, messages)
            (ids,) = await server.tokenize([text], special=False)
            room = server.engine.context_length - len(ids)
            chosen = params
            if req.max_tokens is None and req.max_completion_tokens is None and room < params.max_tokens:
                chosen = SamplingParams(
                    **{**params.__dict__, "max_tokens": max(1, room)}
                )  # the default fits the context
            return await respond(req, request, [ids], chosen, "chat")

        return await answer("chat", adapter, work)
