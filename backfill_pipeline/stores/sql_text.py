"""A row's text, content hash and vector test computed inside the database, exactly as :mod:`..text` and
:mod:`..detection` compute them, so the aggregate queries find rows needing work without reading them.

Postgres builds the text with ``concat_ws``/``concat`` and ``btrim`` over the characters Python's
``str.strip`` removes, then hashes it with ``sha256``; SQLite calls the Python functions themselves,
registered on the connection.
"""

from __future__ import annotations

import sqlite3
import string

import numpy as np

from ..config import TextSpec
from ..text import content_hash, has_text, render_text

# every character str.strip() removes (str.isspace), so btrim() removes the same ones; a test checks the list
WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680"
    + "".join(map(chr, range(0x2000, 0x200B)))
    + ("\u2028\u2029\u202f\u205f\u3000")
)


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def postgres_text(spec: TextSpec, alias: str = "s") -> tuple[str, list[object]]:
    """The row's text as a Postgres expression, with its parameters."""
    params: list[object] = []

    def column(name: str) -> str:
        return f"({alias}.{_quote(name)})::text"

    if spec.template is not None:
        parts = []
        for literal, name, _, _ in string.Formatter().parse(spec.template):
            if literal:
                parts.append("%s::text")
                params.append(literal)
            if name is not None:
                parts.append(f"coalesce({column(name)}, '')")
        return f"concat({', '.join(parts) or chr(39) * 2})", params
    values = []
    for name in spec.fields:
        values.append(
            f"CASE WHEN {column(name)} IS NULL OR {column(name)} = '' THEN NULL ELSE btrim({column(name)}, %s) END"
        )
        params.append(WHITESPACE)
    return f"concat_ws(%s::text, {', '.join(values)})", [spec.separator, *params]


def postgres_hash(spec: TextSpec, alias: str = "s") -> tuple[str, list[object]]:
    text, params = postgres_text(spec, alias)
    return f"encode(sha256(convert_to({text}, 'UTF8')), 'hex')", params


def postgres_has_text(spec: TextSpec, alias: str = "s") -> tuple[str, list[object]]:
    fields = spec.required_columns or spec.fields
    tests = [f"btrim(({alias}.{_quote(f)})::text, %s) <> ''" for f in fields]
    joined = " AND ".join(tests) if spec.required_columns else " OR ".join(tests)
    return f"({joined})", [WHITESPACE] * len(fields)


def register_sqlite_functions(conn: sqlite3.Connection, spec: TextSpec) -> None:
    """``backfill_text_hash(field, …)`` and ``backfill_has_text(field, …)``, over the text fields in order."""
    fields = spec.fields

    def values(args: tuple) -> dict[str, str | None]:
        return {f: None if v is None else str(v) for f, v in zip(fields, args, strict=True)}

    conn.create_function(
        "backfill_text_hash", len(fields), lambda *a: content_hash(render_text(spec, values(a))), deterministic=True
    )
    conn.create_function(
        "backfill_has_text", len(fields), lambda *a: int(has_text(spec, values(a))), deterministic=True
    )
    conn.create_function("backfill_vector_unusable", 2, vector_unusable, deterministic=True)


def vector_unusable(value: object, dimension: int) -> int:
    """1 when detection would not keep this stored vector: unreadable, missing, of another length, or a
    placeholder (NaN, all zeros, constant, a sequence); the same tests as ``detection.classify_vectors``."""
    from .sqlite_rows import decode_vector

    try:
        vector = decode_vector(value)
    except ValueError:
        return 1
    if vector is None or len(vector) != dimension or not len(vector):
        return 1
    v = vector.astype(np.float64)
    if not np.isfinite(v).all() or v.min() == v.max():
        return 1
    if len(v) >= 3:
        step = np.diff(v)
        if step[0] != 0 and np.abs(step - step[0]).max() <= max(1e-6, 0.01 * abs(step[0])):
            return 1
    return 0


def sqlite_hash(spec: TextSpec, alias: str = "s") -> tuple[str, list[object]]:
    return f"backfill_text_hash({', '.join(f'{alias}.{_quote(f)}' for f in spec.fields)})", []


def sqlite_has_text(spec: TextSpec, alias: str = "s") -> tuple[str, list[object]]:
    return f"backfill_has_text({', '.join(f'{alias}.{_quote(f)}' for f in spec.fields)}) = 1", []
