"""Gemini batch mode through ``google-genai``: ``client.batches.create`` (generate content) and
``client.batches.create_embeddings``, with the requests inline, polled with ``batches.get``.

Inline requests are limited to 20 MB per batch; each request is one text. The batch's display name is
the label the journal recorded, so a run killed mid-submit finds its batch with ``batches.list``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np
from google.genai import types

from .base import ProviderError
from .batch_api import BatchAPI, BatchState

if TYPE_CHECKING:
    from .gemini_provider import GeminiEmbeddingProvider, GeminiEnrichmentProvider

FINISHED = {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"}
INLINE_BYTES = 19_000_000  # under the 20 MB of inline requests a batch may hold


class GeminiBatches(BatchAPI):
    max_bytes = INLINE_BYTES

    def __init__(self, provider: GeminiEmbeddingProvider | GeminiEnrichmentProvider, embeddings: bool):
        self.provider, self.embeddings = provider, embeddings
        self.client = provider.client
        self.generate_config = getattr(provider, "config", None)  # the enricher's schema and system prompt

    async def submit(self, lines: list[list[str]], label: str) -> str:
        from .gemini_provider import classify

        texts = [line[0] for line in lines]
        try:
            if self.embeddings:
                provider = self.provider
                config = types.EmbedContentConfig(
                    output_dimensionality=getattr(provider, "dimension", None),
                    task_type=getattr(provider, "task_type", None),
                )
                source = types.EmbeddingsBatchJobSource(
                    inlined_requests=types.EmbedContentBatch(contents=texts, config=config)
                )
                job = await self.client.aio.batches.create_embeddings(
                    model=self.provider.model, src=source, config={"display_name": label}
                )
            else:
                requests = [
                    types.InlinedRequest(contents=text, config=self.generate_config, metadata={"line": str(i)})
                    for i, text in enumerate(texts)
                ]
                job = await self.client.aio.batches.create(
                    model=self.provider.model, src=requests, config={"display_name": label}
                )
        except Exception as exc:  # noqa: BLE001
            raise classify(exc) from None
        return job.name or ""

    async def find(self, label: str) -> str | None:
        async for job in await self.client.aio.batches.list(config={"page_size": 100}):
            if job.display_name == label:
                return job.name
        return None

    async def state(self, batch_id: str) -> BatchState:
        job = await self.client.aio.batches.get(name=batch_id)
        status = str(job.state.value if job.state is not None else "JOB_STATE_UNSPECIFIED")
        error = job.error.message if job.error is not None else None
        return BatchState(status=status, finished=status in FINISHED, error=error)

    async def answers(self, batch_id: str, texts: list[list[str]]) -> dict[int, object | ProviderError]:
        job = await self.client.aio.batches.get(name=batch_id)
        out: dict[int, object | ProviderError] = {}
        dest = job.dest
        items: list = []
        if dest is not None:
            items = list(dest.inlined_embed_content_responses or dest.inlined_responses or [])
        for position, item in enumerate(items):
            line = int((item.metadata or {}).get("line", position)) if getattr(item, "metadata", None) else position
            if not 0 <= line < len(texts):
                continue
            if item.error is not None:
                words = item.error.message or f"code {item.error.code}"
                out[line] = ProviderError(f"the batch answered this request with an error: {words}", "permanent")
                continue
            try:
                out[line] = self._read(item.response, texts[line])
            except ProviderError as exc:
                out[line] = exc
        if str(job.state.value if job.state is not None else "") == "JOB_STATE_FAILED":
            why = job.error.message if job.error is not None else "no reason given"
            for line in range(len(texts)):
                out.setdefault(line, ProviderError(f"the batch failed: {why}", "permanent"))
        return out

    def _read(self, response: object, texts: list[str]) -> object:
        usage = self.provider.usage
        if self.embeddings:
            embedding = getattr(response, "embedding", None)
            values = getattr(embedding, "values", None)
            if not values:
                raise ProviderError("the batch's answer holds no embedding", "unreadable_answer")
            counted = getattr(response, "token_count", None)
            usage.input_tokens += counted if isinstance(counted, int) else max(1, len(texts[0]) // 4)
            return np.asarray([values], dtype=np.float32)
        meta = getattr(response, "usage_metadata", None)
        if meta is not None:
            usage.input_tokens += meta.prompt_token_count or 0
            usage.output_tokens += meta.candidates_token_count or 0
        try:
            return [json.loads(getattr(response, "text", None) or "")]
        except json.JSONDecodeError as exc:
            return [ProviderError(f"invalid JSON in LLM response: {exc}", "invalid_output")]
