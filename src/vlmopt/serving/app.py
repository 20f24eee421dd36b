"""The HTTP application of `vlmopt serve`: one FastAPI app, run by uvicorn in the `vlmopt serve` process (the
default) or by each Ray Serve replica (`--ray`).

Every request is read with a bound on its size and on the time its body takes, checked item by item (base64,
image size before decoding, pixels, text length, items per request), admitted to a bounded queue (full: 503
with Retry-After) and then batched: encoder items go through the runner's batcher (`vlmopt.serving.batching`),
which hands each tower's runner lists of up to `--max-batch` items gathered within `--max-delay-ms`.
Generations run one at a time per process, in order of arrival.

Every error has one JSON shape, OpenAI's: `{"error": {"message", "type", "code"}}` with a 4xx/5xx status;
`code` is the kind the metrics count it under (`vlmopt_errors_total{kind=...}`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import json
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request

from vlmopt.errors import VlmoptError
from vlmopt.serving.batching import Batcher, QueueBatcher
from vlmopt.serving.options import ServeOptions
from vlmopt.serving.service import BadItem, decode_image

#: batch sizes the histogram tells apart (up to --max-batch 1024)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256, 512, 1024)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
#: what a client is told to wait before retrying a request refused by a full queue, in seconds
RETRY_AFTER_S = 1


class ApiError(Exception):
    """A request the server refuses: its HTTP status, the kind the metrics count, and a message for the client."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (`/metrics`)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("vlmopt_requests", "HTTP requests answered, by endpoint and status.", ["endpoint", "status"], registry=r)
        self.latency = Histogram(
            "vlmopt_request_latency_seconds", "Time to answer a request (to its first byte for a stream).", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "vlmopt_batch_size", "Items per model call formed by the dynamic batcher, by tower.", ["tower"], buckets=BATCH_BUCKETS, registry=r
        )
        self.stage_seconds = Histogram(
            "vlmopt_batch_stage_seconds",
            "Time of the stages, by tower: preprocess (the image processor per image, in its request; the tokenizer per batch) and model (per batch).",
            ["tower", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("vlmopt_queue_depth", "Items (images, texts, generations) admitted and not yet answered.", registry=r)
        self.errors = Counter("vlmopt_errors", "Requests refused or failed, by kind.", ["kind"], registry=r)
        self.tokens = Counter("vlmopt_generated_tokens", "New tokens generated (rate() of it: tokens/s).", registry=r)
        self.decode_rate = Histogram(
            "vlmopt_decode_tokens_per_second", "Decode speed of each generation.", buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000), registry=r
        )
        self.ttft = Histogram("vlmopt_time_to_first_token_seconds", "Time from admission to a generation's first token.", buckets=LATENCY_BUCKETS, registry=r)

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Admission:
    """The bounded queue: at most `limit` items admitted and not yet answered; beyond it a request is refused."""

    def __init__(self, limit: int, gauge: Any):
        self.limit, self.gauge, self.depth = limit, gauge, 0

    def enter(self, items: int) -> None:
        if self.depth + items > self.limit:
            raise ApiError(
                503,
                "overloaded",
                f"the server's queue is full ({self.depth} of {self.limit} items waiting); retry after {RETRY_AFTER_S} s",
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        self.depth += items
        self.gauge.set(self.depth)

    def leave(self, items: int) -> None:
        self.depth -= items
        self.gauge.set(self.depth)


def _data_bytes(value: Any, what: str, max_bytes: int) -> bytes:
    """An image given as a data URL (`data:image/png;base64,...`) or bare base64, decoded within the size limit."""
    if not isinstance(value, str) or not value:
        raise ApiError(400, "bad_image", f"{what} must be a base64 string or a data:image/...;base64, URL")
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        if not header.endswith(";base64"):
            raise ApiError(400, "bad_image", f"{what}: only base64 data URLs are taken (data:image/png;base64,...)")
    elif value.startswith(("http://", "https://", "file:")):
        raise ApiError(400, "bad_image", f"{what}: this server does not fetch URLs; send the image inline as a data URL")
    if len(value) * 3 // 4 > max_bytes + 2:
        raise ApiError(413, "image_too_large", f"{what} is about {len(value) * 3 // 4} bytes; this server takes images of at most {max_bytes} bytes")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "bad_image", f"{what} is not valid base64") from None
    if len(data) > max_bytes:
        raise ApiError(413, "image_too_large", f"{what} is {len(data)} bytes; this server takes images of at most {max_bytes} bytes")
    return data


def _strings(body: dict[str, Any], key: str, options: ServeOptions, text: bool) -> list[str]:
    values = body.get(key)
    if not isinstance(values, list) or not values:
        raise ApiError(400, "invalid_request", f"'{key}' must be a non-empty list")
    if len(values) > options.max_items:
        raise ApiError(413, "too_many_items", f"'{key}' has {len(values)} items; this server takes at most {options.max_items} per request")
    if text:
        for i, value in enumerate(values):
            _check_text(value, f"{key}[{i}]", options)
    return values


def _check_text(value: Any, what: str, options: ServeOptions) -> str:
    if not isinstance(value, str):
        raise ApiError(400, "invalid_request", f"{what} must be a string")
    if not value.strip():
        raise ApiError(400, "empty_text", f"{what} is empty")
    if len(value) > options.max_text_chars:
        raise ApiError(413, "text_too_long", f"{what} has {len(value)} characters; this server takes at most {options.max_text_chars}")
    return value


class ServeApp:
    """The application around a loaded service (`EncoderService` or `ChatService`): its FastAPI app, its metrics,
    its batchers and its admission queue. `app` is what uvicorn or Ray Serve runs."""

    def __init__(self, service: Any, options: ServeOptions, model_name: str, batcher: type[Batcher] = QueueBatcher):
        self.service, self.options, self.model_name = service, options, model_name
        self.metrics = Metrics()
        self.admission = Admission(options.max_queue, self.metrics.queue_depth)
        self._batcher_kind = batcher
        self.batchers: dict[str, Batcher] = {}
        if not getattr(service, "generative", False):
            service.observe = lambda tower, stage, seconds: self.metrics.stage_seconds.labels(tower, stage).observe(seconds)
        self._generation = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmopt-generate")
        self._created = int(time.time())
        self.app = self._build()

    def close(self) -> None:
        for batcher in self.batchers.values():
            batcher.close()
        self._generation.shutdown(wait=False)
        self.service.close()

    # -- plumbing ---------------------------------------------------------------------------------
    def _batcher(self, tower: str, run: Callable[[list[Any]], list[Any]]) -> Batcher:
        # made on first use, inside the server's event loop, where the batcher starts its queue
        if tower not in self.batchers:
            self.batchers[tower] = self._batcher_kind(tower, run, self.options, self.metrics.batch_size.labels(tower).observe)
        return self.batchers[tower]

    async def _json_body(self, request: Request) -> dict[str, Any]:
        """The request's JSON object, read within --request-timeout and the body size bound."""
        limit = self.options.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, "body_too_large", f"the request body is {declared} bytes; this server takes at most {limit}")

        async def read() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, "body_too_large", f"the request body exceeds {limit} bytes")
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            raw = await asyncio.wait_for(read(), self.options.request_timeout)
        except (asyncio.TimeoutError, TimeoutError):
            raise ApiError(408, "timeout", f"the request body did not arrive within {self.options.request_timeout:g} s") from None
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, "bad_json", f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "bad_json", "the body must be a JSON object")
        return body

    def _check_model(self, body: dict[str, Any], required: bool = False) -> None:
        model = body.get("model")
        if model is None and not required:
            return
        if model != self.model_name:
            raise ApiError(404, "unknown_model", f"the model '{model}' does not exist here; this server serves '{self.model_name}' (GET /v1/models)")

    async def _admitted(self, items: int, work: Any) -> Any:
        self.admission.enter(items)
        try:
            return await work
        finally:
            self.admission.leave(items)

    # -- encoders ---------------------------------------------------------------------------------
    def _require(self, tower: str | None, what: str) -> str:
        if getattr(self.service, "generative", False):
            raise ApiError(404, "not_found", f"{what} are served for encoder models; this server serves a generative model (POST /v1/chat/completions)")
        if tower is None:
            raise ApiError(404, "not_found", f"this model has no tower for {what}")
        return tower

    async def _image_embeddings(self, images: list[Any]) -> list[list[float]]:
        tower = self._require(self.service.image_tower, "image embeddings")
        blobs = [_data_bytes(v, f"images[{i}]", self.options.max_image_bytes) for i, v in enumerate(images)]

        async def one(i: int, data: bytes) -> list[float]:
            # decoded (and refused where it is no image) and preprocessed per request; the model runs over the batch
            try:
                image = await asyncio.to_thread(self.service.image, data, self.options.max_image_pixels)
            except BadItem as exc:
                raise ApiError(exc.status, exc.kind, f"images[{i}]: {exc.message}") from None
            return await self._batcher(tower, self.service.embed_images)(image)

        return await self._admitted(len(blobs), asyncio.gather(*(one(i, b) for i, b in enumerate(blobs))))

    async def _text_embeddings(self, texts: list[str]) -> list[list[float]]:
        tower = self._require(self.service.text_tower, "text embeddings")
        batcher = self._batcher(tower, self.service.embed_texts)
        return await self._admitted(len(texts), asyncio.gather(*(batcher(t) for t in texts)))

    def _embedding_response(self, rows: list[list[float]], tower: str) -> dict[str, Any]:
        return {
            "object": "list",
            "model": self.model_name,
            "artifact": self.service.served[tower].artifact,
            "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)],
        }

    # -- generation -------------------------------------------------------------------------------
    def _conversation(self, body: dict[str, Any]) -> tuple[list[dict[str, Any]], list[bytes]]:
        """OpenAI messages -> the chat template's conversation (image parts as {"type": "image"}) and the images' bytes."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "invalid_request", "'messages' must be a non-empty list")
        if len(messages) > self.options.max_items:
            raise ApiError(413, "too_many_items", f"'messages' has {len(messages)} items; this server takes at most {self.options.max_items}")
        conversation, images = [], []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "developer"):
                raise ApiError(400, "invalid_request", f"messages[{i}] must be an object with a role of system, user or assistant")
            content = message.get("content")
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(parts, list) or not parts:
                raise ApiError(400, "invalid_request", f"messages[{i}].content must be a string or a non-empty list of parts")
            converted = []
            for j, part in enumerate(parts):
                where = f"messages[{i}].content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    converted.append({"type": "text", "text": _check_text(part.get("text"), f"{where}.text", self.options)})
                elif kind == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    images.append(_data_bytes(url, f"{where}.image_url", self.options.max_image_bytes))
                    if len(images) > self.options.max_items:
                        raise ApiError(413, "too_many_items", f"the messages hold more than {self.options.max_items} images")
                    converted.append({"type": "image"})
                else:
                    raise ApiError(400, "invalid_request", f"{where} must be a text or an image_url part")
            role = "system" if message["role"] == "developer" else message["role"]
            conversation.append({"role": role, "content": converted})
        return conversation, images

    def _sampling(self, body: dict[str, Any]) -> tuple[int, Any, list[str]]:
        from vlmopt.runners.generate import Sampling

        limit = self.options.max_tokens
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is None:
            max_tokens = min(limit, 256)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ApiError(400, "invalid_request", "'max_tokens' must be a whole number of at least 1")
        if max_tokens > limit:
            raise ApiError(400, "max_tokens", f"'max_tokens' is {max_tokens}; this server generates at most {limit} tokens per request")
        temperature = body.get("temperature", 0.0)
        top_p = body.get("top_p", 1.0)
        seed = body.get("seed", 0)
        for name, value, low, high in (("temperature", temperature, 0.0, 2.0), ("top_p", top_p, 0.0, 1.0)):
            if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
                raise ApiError(400, "invalid_request", f"'{name}' must be a number from {low:g} to {high:g}")
        if top_p == 0:
            raise ApiError(400, "invalid_request", "'top_p' must be above 0")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ApiError(400, "invalid_request", "'seed' must be a whole number of at least 0")
        if body.get("n", 1) != 1:
            raise ApiError(400, "invalid_request", "this server generates one choice per request (n=1)")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise ApiError(400, "invalid_request", "'stop' must be a string or a list of at most 4 non-empty strings")
        greedy = temperature == 0
        return max_tokens, Sampling(float(temperature), 1.0 if greedy else float(top_p), int(seed)), stop

    async def _prepared(self, body: dict[str, Any]) -> tuple[Any, int, Any, list[str]]:
        self._check_model(body, required=True)
        max_tokens, sampling, stop = self._sampling(body)
        conversation, blobs = self._conversation(body)
        generator = self.service.generator

        def prepare() -> Any:
            images = []
            for i, data in enumerate(blobs):
                try:
                    images.append(decode_image(data, self.options.max_image_pixels))
                except BadItem as exc:
                    raise ApiError(exc.status, exc.kind, f"image {i}: {exc.message}") from None
            try:
                return generator.prompt(generator.render_chat(conversation), images, chat=False, max_new_tokens=max_tokens)
            except VlmoptError as exc:
                raise ApiError(400, "invalid_request", exc.message) from None

        return await asyncio.to_thread(prepare), max_tokens, sampling, stop

    def _start_generation(self, prompt: Any, max_tokens: int, sampling: Any, stop: list[str], on_delta: Callable[[str], None]) -> concurrent.futures.Future:
        """Queue the generation on the generation thread; the future's result is (text, result dict)."""
        from vlmopt.generation import StopGeneration

        admitted = time.perf_counter()
        self.admission.enter(1)
        watcher = _StopWatcher(stop, on_delta)

        def work() -> tuple[str, dict[str, Any]]:
            def listen(delta: str) -> None:
                if watcher.cancelled:
                    raise StopGeneration
                watcher.feed(delta)

            result = self.service.generator.generate(prompt, max_tokens, sampling, listen)
            watcher.finish()
            tokens = len(result["tokens"])
            self.metrics.tokens.inc(tokens)
            timings = result["timings"]
            if timings.get("decode_tokens_per_s"):
                self.metrics.decode_rate.observe(timings["decode_tokens_per_s"])
            if tokens:
                self.metrics.ttft.observe(timings["ttft_s"] + (time.perf_counter() - admitted - timings["total_s"]))
            return watcher.text, result

        future = self._generation.submit(work)
        future.add_done_callback(lambda _: self.admission.leave(1))
        future.watcher = watcher  # type: ignore[attr-defined]
        return future

    def _completion(self, text: str, result: dict[str, Any]) -> dict[str, Any]:
        finish = "length" if result["finish_reason"] == "length" else "stop"
        tokens = len(result["tokens"])
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}],
            "usage": {"prompt_tokens": result["prompt_tokens"], "completion_tokens": tokens, "total_tokens": result["prompt_tokens"] + tokens},
        }

    async def _stream(self, prompt: Any, max_tokens: int, sampling: Any, stop: list[str]) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[str | None] = asyncio.Queue()
        future = self._start_generation(prompt, max_tokens, sampling, stop, lambda d: loop.call_soon_threadsafe(deltas.put_nowait, d))
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(deltas.put_nowait, None))
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict[str, Any] | None = None) -> bytes:
            payload = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            }
            if usage is not None:
                payload["usage"] = usage
            return f"data: {json.dumps(payload)}\n\n".encode()

        try:
            yield chunk({"role": "assistant", "content": ""})
            while (delta := await deltas.get()) is not None:
                if delta:
                    yield chunk({"content": delta})
            text, result = await asyncio.wrap_future(future)
            yield chunk({}, self._completion(text, result)["choices"][0]["finish_reason"], self._completion(text, result)["usage"])
            yield b"data: [DONE]\n\n"
        finally:
            future.watcher.cancelled = True  # type: ignore[attr-defined]  # a client that went away stops its generation

    # -- the app ----------------------------------------------------------------------------------
    def _build(self) -> Any:
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse, Response, StreamingResponse

        app = FastAPI(title="vlmopt serve", version="1", docs_url=None, redoc_url=None, openapi_url=None)
        metrics = self.metrics

        def error(exc: ApiError) -> JSONResponse:
            metrics.errors.labels(exc.kind).inc()
            kind = "server_error" if exc.status >= 500 else "invalid_request_error"
            return JSONResponse({"error": {"message": exc.message, "type": kind, "code": exc.kind}}, status_code=exc.status, headers=exc.headers)

        @app.exception_handler(ApiError)
        async def api_error(request: Request, exc: ApiError) -> JSONResponse:
            return error(exc)

        @app.exception_handler(404)
        async def not_found(request: Request, exc: Exception) -> JSONResponse:
            return error(ApiError(404, "not_found", f"no endpoint {request.method} {request.url.path} (see the README: vlmopt serve)"))

        @app.exception_handler(405)
        async def not_allowed(request: Request, exc: Exception) -> JSONResponse:
            return error(ApiError(405, "method_not_allowed", f"{request.url.path} does not take {request.method}"))

        @app.exception_handler(Exception)
        async def internal(request: Request, exc: Exception) -> JSONResponse:
            return error(ApiError(500, "internal", f"internal error: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"))

        replica = f"{socket.gethostname()}:{os.getpid()}"

        @app.middleware("http")
        async def count(request: Request, call_next: Any) -> Any:
            started = time.perf_counter()
            endpoint = request.url.path if request.url.path in known else "other"
            response = await call_next(request)
            response.headers["x-vlmopt-replica"] = replica
            if endpoint not in ("/metrics", "/health", "/ready"):
                metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
            metrics.requests.labels(endpoint, str(response.status_code)).inc()
            return response

        @app.get("/health")
        async def health() -> dict[str, Any]:
            return {"status": "ok"}

        @app.get("/ready")
        async def ready() -> JSONResponse:
            return JSONResponse({"status": "ready", "model": self.model_name, **self.service.describe()})

        @app.get("/metrics")
        async def prometheus() -> Response:
            from prometheus_client import CONTENT_TYPE_LATEST

            return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self._created, "owned_by": "vlmopt"}]}

        @app.post("/v1/embeddings/image")
        async def image_embeddings(request: Request) -> dict[str, Any]:
            body = await self._json_body(request)
            self._check_model(body)
            rows = await self._image_embeddings(_strings(body, "images", self.options, text=False))
            return self._embedding_response(rows, self.service.image_tower)

        @app.post("/v1/embeddings/text")
        async def text_embeddings(request: Request) -> dict[str, Any]:
            body = await self._json_body(request)
            self._check_model(body)
            rows = await self._text_embeddings(_strings(body, "texts", self.options, text=True))
            return self._embedding_response(rows, self.service.text_tower)

        @app.post("/v1/zero-shot")
        async def zero_shot(request: Request) -> dict[str, Any]:
            body = await self._json_body(request)
            self._check_model(body)
            if not getattr(self.service, "zero_shot", None):
                raise ApiError(404, "not_found", "zero-shot scores are served for dual encoders (an image and a text tower)")
            images, labels = _strings(body, "images", self.options, text=False), _strings(body, "labels", self.options, text=True)
            image_rows, label_rows = await asyncio.gather(self._image_embeddings(images), self._text_embeddings(labels))
            cosine, scores = self.service.scores(image_rows, label_rows)
            return {
                "object": "list",
                "model": self.model_name,
                "activation": self.service.zero_shot,
                "data": [
                    {"index": i, "scores": [float(s) for s in row], "similarities": [float(c) for c in sims], "label": labels[int(row.argmax())]}
                    for i, (row, sims) in enumerate(zip(scores, cosine, strict=True))
                ],
            }

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request) -> Any:
            if not getattr(self.service, "generative", False):
                raise ApiError(404, "not_found", "chat completions are served for generative models; this server serves an encoder (POST /v1/embeddings/...)")
            body = await self._json_body(request)
            prompt, max_tokens, sampling, stop = await self._prepared(body)
            if body.get("stream"):
                return StreamingResponse(
                    self._stream(prompt, max_tokens, sampling, stop), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
                )
            text, result = await asyncio.wrap_future(self._start_generation(prompt, max_tokens, sampling, stop, lambda _: None))
            return self._completion(text, result)

        known = {route.path for route in app.routes}  # type: ignore[attr-defined]
        return app


class _StopWatcher:
    """The text of a generation as it streams, held back where it could be the start of a stop string; a stop string
    ends the generation (StopGeneration) with the text before it."""

    def __init__(self, stops: list[str], emit: Callable[[str], None]):
        self.stops, self.emit = stops, emit
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text, self.sent, self.cancelled = "", 0, False

    def feed(self, delta: str) -> None:
        from vlmopt.generation import StopGeneration

        self.text += delta
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self._send(len(self.text))
            raise StopGeneration
        self._send(len(self.text) - self.hold)

    def finish(self) -> None:
        self._send(len(self.text))

    def _send(self, upto: int) -> None:
        if upto > self.sent:
            self.emit(self.text[self.sent : upto])
            self.sent = upto
