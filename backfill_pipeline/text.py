"""Turning a row into the text to embed, and the content hash that tells when that text changed."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import pyarrow as pa

from .config import TextSpec
from .rows import text_col


class _Blank(dict):
    def __missing__(self, key: str) -> str:  # pragma: no cover - fields are validated up front
        return ""


def render_text(spec: TextSpec, values: Mapping[str, str | None]) -> str:
    """The row's text: its template filled in, or its columns joined by the separator."""
    if spec.template is not None:
        return spec.template.format_map(_Blank({k: "" if v is None else str(v) for k, v in values.items()}))
    parts = [str(values[c]).strip() for c in spec.fields if values.get(c) not in (None, "")]
    return spec.separator.join(parts)


def has_text(spec: TextSpec, values: Mapping[str, str | None]) -> bool:
    """False when the row has nothing worth embedding (its required fields, or all fields, are empty)."""

    def filled(c: str) -> bool:
        v = values.get(c)
        return v is not None and str(v).strip() != ""

    if spec.required_columns:
        return all(filled(c) for c in spec.required_columns)
    return any(filled(c) for c in spec.fields)


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def render_column(spec: TextSpec, table: pa.Table) -> tuple[list[str], list[bool]]:
    """Texts and has-text flags for every row of a raw-rows table."""
    columns = {f: table.column(text_col(f)).to_pylist() for f in spec.fields}
    texts, present = [], []
    for i in range(table.num_rows):
        values = {f: columns[f][i] for f in spec.fields}
        texts.append(render_text(spec, values))
        present.append(has_text(spec, values))
    return texts, present


def embedding_input(text: str, summary: str | None, skills_json: str | None) -> str:
    """The text plus the enrichment's summary and skills, for ``include_enrichment`` datasets."""
    extra = []
    if summary:
        extra.append(f"Summary: {summary}")
    if skills_json:
        skills = json.loads(skills_json)
        if skills:
            extra.append("Skills: " + ", ".join(skills))
    return text if not extra else text + "\n\n" + "\n".join(extra)
