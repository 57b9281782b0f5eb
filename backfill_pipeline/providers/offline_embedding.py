"""A deterministic offline embedder: signed feature hashing of word, word-pair and character n-grams.

It captures lexical similarity honestly (texts sharing words and word pieces get close vectors) and
needs no model, key or network, so demos and tests run anywhere. It is not semantic search: synonyms
with no shared letters stay far apart.

Everything after the per-text normalisation is vectorised with numpy: substring hashes come from one
polynomial prefix-hash array over the whole batch (uint64 arithmetic wraps modulo 2**64), so no Python
code runs per n-gram.
"""

from __future__ import annotations

import re

import numpy as np

from .base import EmbeddingProvider

_P = 1_099_511_628_211  # odd, so invertible modulo 2**64
_P_INV = pow(_P, -1, 2**64)
_NON_WORD = re.compile(r"[^0-9a-z+#]+")
_SEPARATOR = 0  # byte between documents; never produced by normalisation

# (feature family, weight): words weigh most, character n-grams give robustness to inflection.
_CHAR_NGRAMS = {3: 0.25, 4: 0.3, 5: 0.35}
_WORD_WEIGHT = 1.0
_BIGRAM_WEIGHT = 0.6
_SALTS = {
    "word": 0x9E3779B97F4A7C15,
    "bigram": 0xC2B2AE3D27D4EB4F,
    3: 0x165667B19E3779F9,
    4: 0x27D4EB2F165667C5,
    5: 0x85EBCA77C2B2AE63,
}


def _normalise(text: str) -> bytes:
    return (" " + _NON_WORD.sub(" ", text.lower()).strip() + " ").encode("ascii", "ignore")


def _mix(h: np.ndarray) -> np.ndarray:
    """Finaliser of MurmurHash3 (fmix64): spreads every input bit over the output."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def hashed_ngram_vectors(texts: list[str], dimension: int) -> np.ndarray:
    """Embed ``texts`` into L2-normalised float32 vectors of ``dimension`` values."""
    docs = [_normalise(t) for t in texts]
    n_docs = len(docs)
    if n_docs == 0:
        return np.zeros((0, dimension), dtype=np.float32)
    lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=n_docs)
    corpus = np.frombuffer(b"".join(d + bytes([_SEPARATOR]) for d in docs), dtype=np.uint8)
    m = corpus.size
    doc_of = np.repeat(np.arange(n_docs, dtype=np.int64), lengths)
    doc_of[corpus == _SEPARATOR] = -1

    with np.errstate(over="ignore"):
        ppow = np.full(m + 1, _P, dtype=np.uint64)
        ppow[0] = 1
        ppow = np.cumprod(ppow, dtype=np.uint64)  # P**k mod 2**64
        qpow = np.full(m, _P_INV, dtype=np.uint64)
        qpow[0] = 1
        qpow = np.cumprod(qpow, dtype=np.uint64)
        partial = np.cumsum(corpus.astype(np.uint64) * qpow, dtype=np.uint64)
        prefix = np.zeros(m + 1, dtype=np.uint64)  # prefix[i] = hash of corpus[:i]
        prefix[1:] = ppow[:-1] * partial

        def substring_hash(start: np.ndarray, end: np.ndarray) -> np.ndarray:
            return prefix[end] - prefix[start] * ppow[end - start]

        rows, cols, weights = [], [], []

        def add(hashes: np.ndarray, docs_of: np.ndarray, salt: int, weight: float) -> None:
            h = _mix(hashes ^ np.uint64(salt))
            rows.append(docs_of)
            cols.append((h % np.uint64(dimension)).astype(np.int64))
            sign = np.where((h >> np.uint64(63)) == 1, -weight, weight)
            weights.append(sign)

        for n, weight in _CHAR_NGRAMS.items():
            start = np.arange(0, max(m - n + 1, 0), dtype=np.int64)
            ok = (doc_of[start] >= 0) & (doc_of[start] == doc_of[start + n - 1])
            start = start[ok]
            add(substring_hash(start, start + n), doc_of[start], _SALTS[n], weight)

        spaces = np.flatnonzero(corpus == ord(" "))
        w_start, w_end = spaces[:-1] + 1, spaces[1:]
        ok = (w_end > w_start) & (doc_of[spaces[:-1]] == doc_of[spaces[1:]])
        w_start, w_end = w_start[ok], w_end[ok]
        w_doc = doc_of[w_start]
        add(substring_hash(w_start, w_end), w_doc, _SALTS["word"], _WORD_WEIGHT)
        same = w_doc[:-1] == w_doc[1:]
        add(substring_hash(w_start[:-1][same], w_end[1:][same]), w_doc[:-1][same], _SALTS["bigram"], _BIGRAM_WEIGHT)

    flat_index = np.concatenate(rows) * dimension + np.concatenate(cols)
    dense = np.bincount(flat_index, weights=np.concatenate(weights), minlength=n_docs * dimension)
    vectors = dense.reshape(n_docs, dimension)
    norms = np.linalg.norm(vectors, axis=1)
    empty = norms == 0
    vectors[empty, 0] = 1.0  # a unit vector, never the all-zero placeholder
    norms[empty] = 1.0
    return (vectors / norms[:, None]).astype(np.float32)


class OfflineEmbeddingProvider(EmbeddingProvider):
    """For demos and tests: deterministic, any dimension, no network. Not semantic."""

    name = "offline"
    max_batch_size = 100_000

    def __init__(self, model: str = "offline-hash-v1", dimension: int = 768):
        super().__init__()
        self.model = model
        self.dimension = dimension

    async def embed(self, texts: list[str]) -> np.ndarray:
        return hashed_ngram_vectors(texts, self.dimension)
