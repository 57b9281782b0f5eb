"""The Arrow layout of the rows that flow between assets, and helpers to build vector columns.

Raw rows carry: ``id``, ``archive``, one ``text:<column>`` per text field, ``embedding`` (a variable
length list of float32, since placeholders may have the wrong dimension), ``content_hash``, ``model`` and
one ``enrichment:<field>`` per enrichment field (as stored, for the "missing" test).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa

TEXT_PREFIX = "text:"
ENRICHMENT_PREFIX = "enrichment:"
EMBEDDING_ERROR = "embedding_error"
TEXT_ERROR = "text_error"


def text_col(name: str) -> str:
    return TEXT_PREFIX + name


def enrichment_col(name: str) -> str:
    return ENRICHMENT_PREFIX + name


def parse_float_list(body: str) -> np.ndarray:
    """``'1, 2.5, -3'`` as float32; ValueError for anything else (null, strings, nested arrays, objects)."""
    if not body.strip():
        return np.zeros(0, dtype=np.float32)
    try:
        with warnings.catch_warnings():  # numpy warns, and stops, at the first value it cannot parse
            warnings.simplefilter("ignore", DeprecationWarning)
            values = np.fromstring(body, sep=",", dtype=np.float32)
    except ValueError:
        values = np.zeros(0, dtype=np.float32)
    if len(values) != body.count(",") + 1:
        raise ValueError(f"not a list of numbers: {body[:60]!r}")
    return values


def vector_array(vectors: Sequence[np.ndarray | None]) -> pa.ListArray:
    """A list<float32> array from per-row vectors (``None`` for NULL) without a per-value loop."""
    lengths = np.fromiter((0 if v is None else len(v) for v in vectors), dtype=np.int64, count=len(vectors))
    offsets = np.zeros(len(vectors) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    present = [np.asarray(v, dtype=np.float32) for v in vectors if v is not None]
    values = np.concatenate(present) if present else np.zeros(0, dtype=np.float32)
    mask = pa.array(np.fromiter((v is None for v in vectors), dtype=bool, count=len(vectors)))
    if offsets[-1] > np.iinfo(np.int32).max:
        return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values), mask=mask)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values), mask=mask)


def matrix_array(matrix: np.ndarray, valid: np.ndarray | None = None) -> pa.FixedSizeListArray:
    """A fixed_size_list<float32, dim> array from an (n, dim) matrix; rows not ``valid`` are null."""
    _, dim = matrix.shape
    values = pa.array(np.ascontiguousarray(matrix, dtype=np.float32).reshape(-1))
    mask = None if valid is None else pa.array(~np.asarray(valid, dtype=bool))
    return pa.FixedSizeListArray.from_arrays(values, dim, mask=mask)


def raw_schema(
    text_fields: Iterable[str], enrichment_fields: Iterable[str], id_type: pa.DataType | None = None
) -> pa.Schema:
    fields = [pa.field("id", id_type or pa.int64()), pa.field("archive", pa.string())]
    fields += [pa.field(text_col(f), pa.string()) for f in text_fields]
    fields += [
        pa.field("embedding", pa.list_(pa.float32())),
        pa.field("content_hash", pa.string()),
        pa.field("model", pa.string()),
    ]
    enrichment = [pa.field(enrichment_col(f), pa.string()) for f in enrichment_fields]
    fields += enrichment
    if enrichment:  # what the stored enrichment was made from: its own text hash and model
        fields += [pa.field("enrichment_hash", pa.string()), pa.field("enrichment_model", pa.string())]
    fields.append(pa.field(EMBEDDING_ERROR, pa.string()))  # why a stored value could not be read, if so
    fields.append(pa.field(TEXT_ERROR, pa.string()))  # why the row's text could not be read, if so
    return pa.schema(fields)
