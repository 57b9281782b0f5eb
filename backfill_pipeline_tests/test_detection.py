"""Detection on crafted rows: every reason, precedence, force, cool-down and limit."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from backfill_pipeline.config import parse_config
from backfill_pipeline.detection import Reason, apply_limit, classify_vectors, detect, reason_counts
from backfill_pipeline.rows import (
    EMBEDDING_ERROR,
    TEXT_ERROR,
    enrichment_col,
    parse_float_list,
    raw_schema,
    text_col,
    vector_array,
)
from backfill_pipeline.text import content_hash, render_text

DIM = 8
RNG = np.random.default_rng(3)


def unit(n: int = DIM) -> np.ndarray:
    v = RNG.normal(size=n).astype(np.float32)
    return v / np.linalg.norm(v)


def test_every_vector_reason() -> None:
    vectors = {
        "null": None,
        "empty": np.array([], dtype=np.float32),
        "sequential_short": np.array([0.414 + 0.001 * k for k in range(5)]),
        "sequential_full": np.array([0.414 + 0.001 * k for k in range(DIM)]),
        "descending": np.array([1.0 - 0.01 * k for k in range(DIM)]),
        "zeros": np.zeros(DIM),
        "constant": np.full(DIM, 0.25),
        "nan": np.array([0.1, np.nan, 0.3, 0.1, 0.2, 0.1, 0.0, 0.5]),
        "inf": np.array([np.inf] + [0.1] * (DIM - 1)),
        "short_real": unit(4),
        "long_real": unit(16),
        "ok": unit(),
    }
    got = dict(zip(vectors, classify_vectors(vector_array(list(vectors.values())), DIM), strict=True))
    assert got == {
        "null": "null_embedding",
        "empty": "null_embedding",
        "sequential_short": "placeholder_sequential",
        "sequential_full": "placeholder_sequential",
        "descending": "placeholder_sequential",
        "zeros": "placeholder_zero",
        "constant": "placeholder_constant",
        "nan": "non_finite",
        "inf": "non_finite",
        "short_real": "wrong_dimension",
        "long_real": "wrong_dimension",
        "ok": "ok",
    }


def test_float32_placeholders_from_json_are_sequential() -> None:
    # The seed's 384-dim placeholders, stored as JSON and read back as float32.
    values = np.array(json.loads(json.dumps([round(0.414 + 0.001 * k, 3) for k in range(384)])), dtype=np.float32)
    assert classify_vectors(vector_array([values]), 768)[0] == "placeholder_sequential"


def test_real_vectors_are_not_mistaken_for_placeholders() -> None:
    real = [unit(768) for _ in range(500)]
    assert set(classify_vectors(vector_array(real), 768)) == {"ok"}


def _config(**overrides):
    data = {
        "datasets": {
            "jobs": {
                "database_url": "sqlite:///x.db",
                "table": "jobs",
                "text": {"template": "{title}\n\n{description}", "required_columns": ["description"]},
                "embedding": {"dimension": DIM, "model": "m1"},
                "enrichment": {"enabled": True, "fields": ["skills", "seniority", "summary"]},
                **overrides,
            }
        }
    }
    return parse_config(data).datasets["jobs"]


def _raw(rows: list[dict]) -> pa.Table:
    schema = raw_schema(["title", "description"], ["skills", "seniority", "summary"])
    columns = {
        "id": [r["id"] for r in rows],
        "archive": [None] * len(rows),
        text_col("title"): [r.get("title", "T") for r in rows],
        text_col("description"): [r.get("description", "D") for r in rows],
        "embedding": vector_array([r.get("embedding") for r in rows]),
        "content_hash": [r.get("hash") for r in rows],
        "model": [r.get("model") for r in rows],
    }
    for f in ("skills", "seniority", "summary"):
        columns[enrichment_col(f)] = [r.get(f, "x" if r.get("enriched", True) else None) for r in rows]
    columns["enrichment_hash"] = [r.get("enrichment_hash") for r in rows]
    columns["enrichment_model"] = [r.get("enrichment_model") for r in rows]
    columns[EMBEDDING_ERROR] = [r.get("unreadable") for r in rows]
    columns[TEXT_ERROR] = [r.get("text_error") for r in rows]
    return pa.table(columns, schema=schema)


def _current_hash(title="T", description="D") -> str:
    return content_hash(render_text(_config().text, {"title": title, "description": description}))


def test_row_reasons_and_needed_work() -> None:
    good = unit()
    rows = [
        {"id": 1, "embedding": good, "hash": _current_hash(), "model": "m1"},
        {"id": 2, "embedding": None},
        {"id": 3, "embedding": good, "hash": "old-hash", "model": "m1"},
        {"id": 4, "embedding": good, "hash": _current_hash(), "model": "m0"},
        {"id": 5, "embedding": good, "hash": _current_hash(), "model": "m1", "enriched": False},
        {"id": 6, "embedding": None, "description": "  "},
        {"id": 7, "embedding": good, "hash": None, "model": None},
        {"id": 8, "embedding": np.array([0.414 + 0.001 * k for k in range(384)]), "hash": "old-hash"},
    ]
    detected = detect(_raw(rows), _config()).to_pylist()
    by_id = {r["id"]: (r["reason"], r["needs_embedding"], r["needs_enrichment"]) for r in detected}
    assert by_id == {
        1: ("ok", False, False),
        2: ("null_embedding", True, False),
        3: ("stale", True, True),
        4: ("model_changed", True, False),
        5: ("enrichment_missing", False, True),
        6: ("no_text", False, False),
        7: ("ok", False, False),  # unhashed rows are trusted by default
        8: ("placeholder_sequential", True, False),
    }
    assert detected[0]["text"] is None  # no text is carried for rows needing nothing
    assert detected[1]["text"] == "T\n\nD"


def test_unhashed_rows_redo_and_force() -> None:
    good = unit()
    rows = [{"id": 1, "embedding": good, "hash": None}, {"id": 2, "embedding": good, "hash": _current_hash()}]
    redo = detect(_raw(rows), _config(unhashed_rows="redo"))
    assert redo.column("reason").to_pylist() == ["unhashed", "ok"]
    forced = detect(_raw(rows + [{"id": 3, "description": ""}]), _config(), force=True)
    assert forced.column("reason").to_pylist() == ["forced", "forced", "no_text"]
    assert forced.column("needs_embedding").to_pylist() == [True, True, False]
    assert forced.column("needs_enrichment").to_pylist() == [True, True, False]


def test_include_enrichment_reembeds_when_enrichment_changes() -> None:
    cfg = _config(embedding={"dimension": DIM, "model": "m1", "include_enrichment": True})
    rows = [{"id": 1, "embedding": unit(), "hash": _current_hash(), "model": "m1", "enriched": False}]
    detected = detect(_raw(rows), cfg)
    assert detected.column("needs_embedding").to_pylist() == [True]


def test_cooling_down_rows_wait() -> None:
    rows = [{"id": 1}, {"id": 2}]
    detected = detect(_raw(rows), _config(), cooling_ids={2})
    assert detected.column("reason").to_pylist() == ["null_embedding", "failed_cooling_down"]
    assert detected.column("needs_embedding").to_pylist() == [True, False]


def test_limit_defers_the_rest() -> None:
    rows = [{"id": i} for i in range(1, 6)]
    limited = apply_limit(detect(_raw(rows), _config()), 2)
    assert limited.column("needs_embedding").to_pylist() == [True, True, False, False, False]
    assert reason_counts(limited) == {"null_embedding": 2, Reason.DEFERRED.value: 3}


@pytest.mark.parametrize("n", [1, 1000])
def test_detection_is_consistent_across_sizes(n: int) -> None:
    vecs = [np.array([0.414 + 0.001 * k for k in range(384)]) if i % 2 else unit() for i in range(n)]
    reasons = classify_vectors(vector_array(vecs), DIM)
    assert list(reasons) == ["placeholder_sequential" if i % 2 else "ok" for i in range(n)]


@pytest.mark.parametrize(
    "body", ['"abc"', '{"a": 1}', "[1, 2], [3, 4]", "1,null,2", '"NaN"', "1,,2", "1, two, 3", '"1.0", "2.0"']
)
def test_what_is_no_list_of_numbers_is_refused(body: str) -> None:
    with pytest.raises(ValueError, match="not a list of numbers"):
        parse_float_list(body)


def test_lists_of_numbers_are_read_exactly() -> None:
    assert parse_float_list(" 0.5, -1e-3,2 ").tolist() == pytest.approx([0.5, -0.001, 2.0])
    assert parse_float_list("").tolist() == []
    assert np.isnan(parse_float_list("1, NaN")[1])  # unquoted NaN is a number: non_finite, not unreadable


def test_an_unreadable_stored_value_is_a_reason_of_its_own() -> None:
    config = _config()
    ok = {"id": 2, "embedding": unit(), "hash": _current_hash(), "model": "m1"}
    raw = _raw([{"id": 1, "unreadable": "not a list of numbers: '\"abc\"'"}, ok])
    detected = detect(raw, config)
    assert detected.column("reason").to_pylist() == [Reason.UNREADABLE.value, Reason.OK.value]
    assert detected.column("needs_embedding").to_pylist() == [True, False]


def test_the_enrichment_keeps_its_own_provenance() -> None:
    """A fresh embedding beside an enrichment made from older text (or by another model) still needs work."""
    config = _config()
    now = _current_hash()
    fresh = {"embedding": unit(), "hash": now, "model": "m1"}
    raw = _raw(
        [
            {"id": 1, **fresh, "enrichment_hash": now, "enrichment_model": "offline-rules-v1"},
            {"id": 2, **fresh, "enrichment_hash": "older text", "enrichment_model": "offline-rules-v1"},
            {"id": 3, **fresh, "enrichment_hash": "", "enrichment_model": None},  # the last try failed
            {"id": 4, **fresh, "enrichment_hash": now, "enrichment_model": "old-llm"},
            {"id": 5, **fresh},  # enriched before the enrichment had its own hash: the embedding's decides
        ]
    )
    detected = detect(raw, config)
    assert detected.column("reason").to_pylist() == [
        Reason.OK.value,
        Reason.ENRICHMENT_STALE.value,
        Reason.ENRICHMENT_STALE.value,
        Reason.ENRICHMENT_MODEL_CHANGED.value,
        Reason.OK.value,
    ]
    assert detected.column("needs_enrichment").to_pylist() == [False, True, True, True, False]
    assert detected.column("needs_embedding").to_pylist() == [False] * 5
