"""The batch APIs of the loopback provider server: OpenAI's files and batches, Gemini's batch mode.

OpenAI: ``POST /v1/files`` (multipart, purpose ``batch``), ``GET /v1/files/{id}/content``, ``POST /v1/batches``,
``GET /v1/batches[/{id}]``, ``POST /v1/batches/{id}/cancel``. Gemini: ``POST /v1beta/models/{m}:batchGenerateContent``
and ``:asyncBatchEmbedContent``, ``GET /v1beta/batches[/{id}]``, ``POST /v1beta/batches/{id}:cancel``.

A batch answers after ``behaviour.delay_seconds``, computed by the same rules as the realtime routes (texts
holding ``FAULT:400`` get an error line, ``FAULT:schema`` an answer violating the schema). ``behaviour.outcome``
makes it end ``expired`` or ``cancelled`` with only the first ``answer_share`` of its lines answered, or
``failed`` as a whole. Every text answered is counted under ``batch_embeddings``/``batch_chat`` in the
server's stats, and every batch created in ``created``, so a test can prove nothing was submitted twice.
"""

from __future__ import annotations

import base64
import email.parser
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from backfill_pipeline.providers.offline_embedding import hashed_ngram_vectors

if TYPE_CHECKING:
    from .fake_providers import FakeProviderServer

_ids = itertools.count(1)


@dataclass
class BatchBehaviour:
    delay_seconds: float = 0.5
    outcome: str = "completed"  # completed, expired, cancelled, failed
    answer_share: float = 0.5  # of the lines, answered before an expiry or a cancellation


@dataclass
class _Batch:
    id: str
    kind: str  # openai or gemini
    endpoint: str  # /v1/embeddings, /v1/chat/completions, embed, generate
    model: str
    lines: list[dict]  # the request lines as sent
    label: str  # metadata.backfill_label (OpenAI) or displayName (Gemini)
    created: float
    outcome: str
    answer_share: float
    delay: float
    status: str = "in_progress"
    results: list[dict] = field(default_factory=list)  # (line number, answer or error) once finished
    output_file_id: str | None = None
    error_file_id: str | None = None


class FakeBatches:
    def __init__(self, server: FakeProviderServer):
        self.server = server
        self.behaviour = BatchBehaviour()
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, _Batch] = {}
        self.created: list[str] = []  # ids of the batches created, in order
        self.lock = threading.Lock()

    # -- OpenAI ---------------------------------------------------------------------------------------
    def upload(self, content_type: str, body: bytes) -> dict:
        message = email.parser.BytesParser().parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
        data, name = b"", "upload.jsonl"
        for part in message.get_payload():  # type: ignore[union-attr]
            if part.get_param("name", header="content-disposition") == "file":
                data = part.get_payload(decode=True)
                name = part.get_filename() or name
        file_id = f"file-{next(_ids)}"
        self.files[file_id] = data
        return {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": name,
            "purpose": "batch",
            "status": "processed",
        }

    def create_openai(self, body: dict) -> dict:
        lines = [json.loads(raw) for raw in self.files[body["input_file_id"]].decode().splitlines() if raw.strip()]
        model = lines[0]["body"].get("model", "") if lines else ""
        batch = self._new(
            "openai", body["endpoint"], model, lines, (body.get("metadata") or {}).get("backfill_label", "")
        )
        return self._openai_view(batch, body.get("metadata"))

    def get_openai(self, batch_id: str) -> dict | None:
        batch = self.batches.get(batch_id)
        return None if batch is None else self._openai_view(self._advance(batch))

    def list_openai(self) -> dict:
        views = [
            self._openai_view(self._advance(b)) for b in reversed(list(self.batches.values())) if b.kind == "openai"
        ]
        return {
            "object": "list",
            "data": views,
            "has_more": False,
            "first_id": views[0]["id"] if views else None,
            "last_id": views[-1]["id"] if views else None,
        }

    def cancel(self, batch_id: str) -> _Batch | None:
        batch = self.batches.get(batch_id)
        if batch is not None and batch.status in ("in_progress", "validating"):
            batch.outcome, batch.delay = "cancelled", 0.0
            self._advance(batch)
        return batch

    def _openai_view(self, batch: _Batch, metadata: dict | None = None) -> dict:
        done = [r for r in batch.results if "response" in r and r["response"]["status_code"] == 200]
        failed = [r for r in batch.results if r not in done]
        view = {
            "id": batch.id,
            "object": "batch",
            "endpoint": batch.endpoint,
            "input_file_id": "file-input",
            "completion_window": "24h",
            "status": batch.status,
            "created_at": int(batch.created),
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
            "metadata": metadata or {"backfill_label": batch.label},
            "model": batch.model,
            "request_counts": {"total": len(batch.lines), "completed": len(done), "failed": len(failed)},
            "errors": None,
        }
        if batch.status == "failed":
            view["errors"] = {
                "object": "list",
                "data": [{"code": "invalid_request", "message": "injected batch failure"}],
            }
        return view

    # -- Gemini ---------------------------------------------------------------------------------------
    def create_gemini(self, model: str, body: dict, kind: str) -> dict:
        spec = body.get("batch") or {}
        requests = (((spec.get("inputConfig") or {}).get("requests") or {}).get("requests")) or []
        batch = self._new("gemini", kind, model, requests, spec.get("displayName", ""))
        return self._gemini_view(batch)

    def get_gemini(self, batch_id: str) -> dict | None:
        batch = self.batches.get(batch_id)
        return None if batch is None else self._gemini_view(self._advance(batch))

    def list_gemini(self) -> dict:
        return {
            "operations": [self._gemini_view(self._advance(b)) for b in self.batches.values() if b.kind == "gemini"]
        }

    def _gemini_view(self, batch: _Batch) -> dict:
        states = {
            "in_progress": "BATCH_STATE_RUNNING",
            "completed": "BATCH_STATE_SUCCEEDED",
            "failed": "BATCH_STATE_FAILED",
            "cancelled": "BATCH_STATE_CANCELLED",
            "expired": "BATCH_STATE_EXPIRED",
        }
        metadata: dict = {
            "model": f"models/{batch.model}",
            "displayName": batch.label,
            "state": states[batch.status],
            "createTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(batch.created)),
        }
        if batch.status != "in_progress" and batch.results:
            answered = [r.get("answer", {"error": r.get("error")}) for r in batch.results]
            metadata["output"] = {"inlinedResponses": {"inlinedResponses": answered}}
        return {"name": f"batches/{batch.id}", "metadata": metadata, "done": batch.status != "in_progress"}

    # -- both -----------------------------------------------------------------------------------------
    def _new(self, kind: str, endpoint: str, model: str, lines: list[dict], label: str) -> _Batch:
        b = self.behaviour
        batch = _Batch(
            f"batch{next(_ids)}",
            kind,
            endpoint,
            model,
            lines,
            label,
            time.time(),
            b.outcome,
            b.answer_share,
            b.delay_seconds,
        )
        with self.lock:
            self.batches[batch.id] = batch
            self.created.append(batch.id)
        return batch

    def _advance(self, batch: _Batch) -> _Batch:
        """Finish the batch once its delay is over: answer its lines (all, or a share, or none)."""
        with self.lock:
            if batch.status != "in_progress" or time.time() - batch.created < batch.delay:
                return batch
            answered = len(batch.lines)
            if batch.outcome in ("expired", "cancelled"):
                answered = int(len(batch.lines) * batch.answer_share)
            if batch.outcome == "failed":
                answered = 0
            batch.results = [self._answer(batch, i) for i in range(answered)]
            batch.status = batch.outcome
            if batch.kind == "openai":
                good = [r for r in batch.results if r["response"]["status_code"] == 200]
                bad = [r for r in batch.results if r["response"]["status_code"] != 200]
                batch.output_file_id = self._file(good)
                batch.error_file_id = self._file(bad)
        return batch

    def _file(self, items: list[dict]) -> str | None:
        if not items:
            return None
        file_id = f"file-{next(_ids)}"
        self.files[file_id] = "".join(json.dumps(r) + "\n" for r in items).encode()
        return file_id

    def _answer(self, batch: _Batch, number: int) -> dict:
        from .fake_providers import _ENCODING, _answer_content, _hash

        line = batch.lines[number]
        if batch.kind == "openai":
            body = line["body"]
            texts = body.get("input") or [m["content"] for m in body.get("messages", []) if m.get("role") == "user"]
            texts = [texts] if isinstance(texts, str) else texts
        else:
            request = line.get("request") or {}
            contents = request.get("contents") or [request.get("content") or {}]
            texts = ["".join(p.get("text", "") for c in contents for p in c.get("parts", []))]
        route = "batch_embeddings" if batch.endpoint in ("/v1/embeddings", "embed") else "batch_chat"
        stats = self.server.stats
        with self.server._lock:
            for text in texts:
                stats.texts[(route, _hash(text))] += 1
                stats.samples[(route, _hash(text))] = text[:100]
        if any("FAULT:400" in t for t in texts):
            message = "the input contains a forbidden token"
            if batch.kind == "gemini":
                return {"error": {"code": 400, "message": message}}
            error = {"error": {"message": message, "type": "invalid_request_error"}}
            return {
                "id": f"req-{number}",
                "custom_id": line["custom_id"],
                "error": None,
                "response": {"status_code": 400, "request_id": f"r{number}", "body": error},
            }
        # metered as the realtime routes meter: tiktoken for OpenAI, characters / 4 for Gemini
        tokens = (
            sum(len(t) for t in _ENCODING.encode_ordinary_batch(texts))
            if batch.kind == "openai"
            else sum(max(1, len(t) // 4) for t in texts)
        )
        if route == "batch_embeddings":
            if batch.kind == "gemini":
                dims = int((line.get("request") or {}).get("outputDimensionality") or 3072)
                vector = hashed_ngram_vectors(texts, dims)[0]
                return {
                    "answer": {
                        "response": {
                            "embedding": {"values": np.round(vector.astype(np.float64), 7).tolist()},
                            "tokenCount": tokens,
                        }
                    }
                }
            dims = int(line["body"].get("dimensions") or 1536)
            data = [
                {"object": "embedding", "index": i, "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()}
                for i, v in enumerate(hashed_ngram_vectors(texts, dims))
            ]
            answer = {
                "object": "list",
                "data": data,
                "model": batch.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        else:
            content = _answer_content(texts[0])
            out = max(1, len(content) // 4)
            if batch.kind == "gemini":
                return {
                    "answer": {
                        "response": {
                            "candidates": [
                                {"content": {"parts": [{"text": content}], "role": "model"}, "finishReason": "STOP"}
                            ],
                            "usageMetadata": {"promptTokenCount": tokens + 60, "candidatesTokenCount": out},
                        },
                        "metadata": line.get("metadata"),
                    }
                }
            answer = {
                "id": f"chatcmpl-{number}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": batch.model,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": content, "refusal": None},
                    }
                ],
                "usage": {"prompt_tokens": tokens + 60, "completion_tokens": out, "total_tokens": tokens + 60 + out},
            }
        return {
            "id": f"req-{number}",
            "custom_id": line["custom_id"],
            "error": None,
            "response": {"status_code": 200, "request_id": f"r{number}", "body": answer},
        }
