"""A semantic embedder that runs on the CPU with nothing to download: WordLlama's static token embeddings.

``wordllama`` ships its model (``l2_supercat``, 256 dimensions, Matryoshka-trained so the first 64 or 128
dimensions also work) and tokenizer inside the wheel. Version 0.4 looks for the packaged tokenizer in the
wrong folder and then tries to download it; pointing ``cache_dir`` at the package's own folder with
downloads disabled loads both from the wheel, so a run never touches the network.
"""

from __future__ import annotations

import asyncio
import os
from functools import lru_cache

import numpy as np

from ..config import ConfigError
from .base import EmbeddingProvider

MODELS = {"wordllama-l2-supercat": ("l2_supercat", 256)}
DEFAULT_MODEL = "wordllama-l2-supercat"


@lru_cache(maxsize=4)
def _model(config: str, dimension: int):  # noqa: ANN202 - a WordLlamaInference
    try:
        import wordllama
        from wordllama import WordLlama
    except ImportError:
        raise ConfigError("provider 'local' needs the wordllama package: pip install wordllama") from None
    folder = os.path.dirname(wordllama.__file__)
    return WordLlama.load(config, cache_dir=folder, disable_download=True, trunc_dim=dimension)


class LocalEmbeddingProvider(EmbeddingProvider):
    """Semantic, offline and fast (tens of thousands of texts per second); not as good as a hosted model."""

    name = "local"
    max_batch_size = 4096

    def __init__(self, model: str, dimension: int):
        super().__init__()
        if model not in MODELS:
            raise ConfigError(f"embedding.model {model!r} is not a local model; use one of {', '.join(MODELS)}")
        config, largest = MODELS[model]
        if dimension > largest:
            raise ConfigError(f"{model} gives at most {largest} dimensions, not {dimension} (embedding.dimension)")
        self.model, self.dimension, self._config = model, dimension, config

    def warm_up(self) -> None:
        _model(self._config, self.dimension)

    async def embed(self, texts: list[str]) -> np.ndarray:
        model = _model(self._config, self.dimension)
        vectors = await asyncio.to_thread(model.embed, texts, norm=True)
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), self.dimension)
