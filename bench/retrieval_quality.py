"""What the vectors are worth: nearest neighbours of real job postings (SkillSpan, ../shared) by embedder.

For each posting, its 5 nearest others by cosine similarity. Scores, for each embedder:
- knowledge overlap@5: mean Jaccard overlap of the words of the hand-labelled knowledge spans (tools,
  languages, fields: "docker", "selenium", "accounting") between a posting and its neighbours;
- source agreement@5: share of neighbours from the same job board (tech or general);
with the same scores for random pairs as the floor. Run: python bench/retrieval_quality.py
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from backfill_pipeline.config import EmbeddingSpec
from backfill_pipeline.providers import build_embedding_provider

POSTINGS = Path(__file__).resolve().parents[2] / "shared" / "data" / "skillspan" / "postings.jsonl"
STOP = {"and", "or", "of", "the", "in", "to", "a", "with", "for", "on", "skills", "knowledge", "experience"}
K = 5


def labels(posting: dict) -> set[str]:
    words = re.findall(r"[a-z][a-z0-9+#.]+", " ".join(posting.get("gold_knowledge") or []).lower())
    return {w for w in words if w not in STOP}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


def scores(vectors: np.ndarray, label_sets: list[set[str]], sources: list[str]) -> tuple[float, float]:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    neighbours = np.argsort(-similarity, axis=1)[:, :K]
    overlap = np.mean([[jaccard(label_sets[i], label_sets[j]) for j in row] for i, row in enumerate(neighbours)])
    same = np.mean([[sources[i] == sources[j] for j in row] for i, row in enumerate(neighbours)])
    return float(overlap), float(same)


def main() -> None:
    if not POSTINGS.exists():
        print(f"skipped: {POSTINGS} is absent")
        sys.exit(0)
    postings = [json.loads(line) for line in POSTINGS.read_text().splitlines() if line.strip()]
    postings = [p for p in postings if labels(p)]
    texts = [p["text"] for p in postings]
    label_sets, sources = [labels(p) for p in postings], [p["source"] for p in postings]
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, len(postings), size=(5000, 2))
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    floor = (
        float(np.mean([jaccard(label_sets[i], label_sets[j]) for i, j in pairs])),
        float(np.mean([sources[i] == sources[j] for i, j in pairs])),
    )
    print(f"{len(postings)} SkillSpan postings with labelled knowledge; {K} nearest neighbours each\n")
    print(f"{'embedder':<44} {'knowledge overlap@5':>20} {'source agreement@5':>19} {'texts/s':>9}")
    print(f"{'random pairs (the floor)':<44} {floor[0]:>20.3f} {floor[1]:>19.3f} {'':>9}")
    for spec in (
        EmbeddingSpec(provider="offline", model="offline-hash-v1", dimension=768),
        EmbeddingSpec(provider="local", dimension=256),
        EmbeddingSpec(provider="local", dimension=64),
    ):
        provider = build_embedding_provider(spec)
        asyncio.run(provider.embed(texts[:8]))  # load the model
        started = time.perf_counter()
        vectors = np.asarray(asyncio.run(provider.embed(texts)))
        rate = len(texts) / (time.perf_counter() - started)
        overlap, same = scores(vectors, label_sets, sources)
        name = f"{spec.provider} {spec.model} ({spec.dimension} dims)"
        print(f"{name:<44} {overlap:>20.3f} {same:>19.3f} {rate:>9,.0f}")


if __name__ == "__main__":
    main()
