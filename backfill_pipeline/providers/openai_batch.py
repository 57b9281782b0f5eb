"""The OpenAI Batch API (and compatible servers that have it): a JSONL file of requests uploaded to
``/v1/files``, a batch created on ``/v1/batches`` with a 24-hour window, its output and error files
downloaded when it ends, lines matched by ``custom_id`` (the line number).

Limits (OpenAI's): 50,000 requests and 200 MB per file, 50,000 embedding inputs per batch. Each line is
the body the realtime call sends, and each answer is read by the realtime reader, so validation, usage
and errors are the same in both modes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from openai.types.chat import ChatCompletion

from .base import ProviderError
from .batch_api import BatchAPI, BatchState

if TYPE_CHECKING:
    from openai import AsyncOpenAI

    from .openai_provider import OpenAIEmbeddingProvider, OpenAIEnrichmentProvider

FINISHED = {"completed", "failed", "expired", "cancelled"}
LABEL = "backfill_label"


class OpenAIBatches(BatchAPI):
    max_lines = 50_000
    max_inputs = 50_000
    max_bytes = 190_000_000  # under the 200 MB a file may hold

    def __init__(
        self,
        client: AsyncOpenAI,
        endpoint: str,
        body: Callable[[list[str]], dict],
        read: Callable[[dict, list[str] | None], object],
    ):
        self.client, self.endpoint, self.body, self.read = client, endpoint, body, read

    @classmethod
    def for_embeddings(cls, provider: OpenAIEmbeddingProvider) -> OpenAIBatches:
        def read(body: dict, texts: list[str] | None) -> np.ndarray:
            return provider.read(body, texts or [])

        return cls(provider.client, "/v1/embeddings", provider.request, read)

    @classmethod
    def for_enrichment(cls, provider: OpenAIEnrichmentProvider) -> OpenAIBatches:
        def read(body: dict, texts: list[str] | None) -> list[dict | Exception]:
            return [provider.read(ChatCompletion.construct(**body), (texts or [""])[0])]

        return cls(provider.client, "/v1/chat/completions", lambda texts: provider.request(texts[0]), read)

    async def submit(self, lines: list[list[str]], label: str) -> str:
        requests = (
            json.dumps({"custom_id": str(i), "method": "POST", "url": self.endpoint, "body": self.body(texts)})
            for i, texts in enumerate(lines)
        )
        data = ("\n".join(requests) + "\n").encode()
        try:
            uploaded = await self.client.files.create(
                file=(f"{label}.jsonl", data, "application/jsonl"), purpose="batch"
            )
            batch = await self.client.batches.create(
                input_file_id=uploaded.id,
                endpoint=self.endpoint,  # type: ignore[arg-type]  # one the API names
                completion_window="24h",
                metadata={LABEL: label},
            )
        except Exception as exc:  # noqa: BLE001
            from .openai_provider import classify

            raise classify(exc) from None
        return batch.id

    async def find(self, label: str) -> str | None:
        async for batch in self.client.batches.list(limit=100):
            if (batch.metadata or {}).get(LABEL) == label:
                return batch.id
        return None

    async def state(self, batch_id: str) -> BatchState:
        batch = await self.client.batches.retrieve(batch_id)
        counts = batch.request_counts
        errors = "; ".join(e.message or e.code or "" for e in (batch.errors.data or [])) if batch.errors else ""
        return BatchState(
            status=batch.status,
            finished=batch.status in FINISHED,
            completed=counts.completed if counts else None,
            failed=counts.failed if counts else None,
            total=counts.total if counts else None,
            error=errors or None,
        )

    async def answers(self, batch_id: str, texts: list[list[str]]) -> dict[int, object | ProviderError]:
        lines = len(texts)
        batch = await self.client.batches.retrieve(batch_id)
        out: dict[int, object | ProviderError] = {}
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            content = await self.client.files.content(file_id)
            for raw in content.text.splitlines():
                if raw.strip():
                    line, answer = self._line(json.loads(raw), texts)
                    if 0 <= line < lines:
                        out[line] = answer
        if batch.status == "failed":  # the file as a whole was refused: every line fails with its words
            why = "; ".join(e.message or e.code or "" for e in (batch.errors.data or [])) if batch.errors else ""
            for line in range(lines):
                out.setdefault(line, ProviderError(f"the batch failed: {why or 'no reason given'}", "permanent"))
        return out

    def _line(self, item: dict, texts: list[list[str]]) -> tuple[int, object | ProviderError]:
        try:
            line = int(item.get("custom_id", -1))
        except ValueError:
            return -1, None
        response = item.get("response") or {}
        error = item.get("error")
        status = response.get("status_code")
        body = response.get("body") or {}
        if error or status != 200:
            words = (error or {}).get("message") or (body.get("error") or {}).get("message") or f"status {status}"
            return line, ProviderError(f"the batch answered this request with an error: {words}", "permanent")
        try:
            return line, self.read(body, texts[line] if 0 <= line < len(texts) else None)
        except ProviderError as exc:
            return line, exc
        except Exception as exc:  # noqa: BLE001 - a line the SDK's types cannot read: paid, unusable
            return line, ProviderError(f"the batch's answer could not be read: {exc}", "unreadable_answer")
