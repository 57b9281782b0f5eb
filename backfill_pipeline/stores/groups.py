"""Table-wide questions answered by one aggregate query: which partitions hold rows, which hold rows
needing work, which hold rows changed since a cursor.

Written once for both databases; a :class:`Dialect` supplies the few expressions that differ (the key's
hash, a timestamp's UTC day, a stored vector's length). A row's partition is a *group value*: its id
range bucket, its hash bucket, its archive value or its UTC day; :mod:`..partitions` turns it into a key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Literal

from ..config import TextSpec
from . import sql_text
from .base import PartitionSpec, utc_now
from .layout import TableLayout

Rows = list[tuple]
HASH_HEX_DIGITS = 8  # the first 32 bits of the key text's MD5: the same in Python, SQLite and Postgres


def hash_bucket(key_text: str, buckets: int) -> int:
    """The hash partition of a key, from its text (``str(uuid)``, ``'abc123'``, ``'42'``)."""
    return int(hashlib.md5(key_text.encode("utf-8")).hexdigest()[:HASH_HEX_DIGITS], 16) % buckets


@dataclass(frozen=True)
class Grouping:
    """How rows map to partitions, as the stores need it."""

    kind: Literal["id_range", "hash", "time", "archive"]
    width: int = 1
    buckets: int = 1
    column: str | None = None  # the timestamp column of time partitions


@dataclass(frozen=True)
class WorkTest:
    """What makes a row need work, as far as SQL tells: no vector, a vector of another length or model, a
    missing enrichment or one by another model, and (with ``redo_unhashed``) no content hash. Rows whose
    text changed are found by change tracking or by a run's detection, which hashes the text."""

    model: str
    dimension: int
    enrichment_model: str | None
    redo_unhashed: bool
    cooldown_hours: float


@dataclass(frozen=True)
class Dialect:
    """The expressions that differ between SQLite and Postgres."""

    param: str
    id_text: Callable[[str], str]
    hash_bucket: Callable[[str, int], str]
    utc_day: Callable[[str], str]
    vector_unusable: Callable[[str, int], str | None]  # a stored vector of the wrong length, zero or NaN
    false: str
    fence: str  # ends a subquery the planner must not flatten (so each row's tests are computed once)
    ago: Callable[[float], object]  # the failures table's time ``hours`` ago, as a parameter
    day_value: Callable[[date], object]
    text_hash: Callable[[TextSpec], tuple[str, list[object]]]  # the content hash of the row's text now
    has_text: Callable[[TextSpec], tuple[str, list[object]]]


def sqlite_dialect(vector_type: str) -> Dialect:
    def vector_unusable(column: str, dimension: int) -> str:  # the whole of detection's test, in Python
        return f"backfill_vector_unusable({column}, {int(dimension)}) = 1"

    return Dialect(
        param="?",
        id_text=lambda e: f"CAST({e} AS TEXT)",
        hash_bucket=lambda e, n: f"backfill_hash_bucket(CAST({e} AS TEXT), {int(n)})",
        utc_day=lambda e: f"date({e})",
        vector_unusable=vector_unusable,
        false="0",
        fence="LIMIT -1 OFFSET 0",
        ago=lambda hours: (utc_now() - timedelta(hours=hours)).isoformat(),
        day_value=lambda day: day.isoformat(),
        text_hash=sql_text.sqlite_hash,
        has_text=sql_text.sqlite_has_text,
    )


def postgres_dialect(vector_typname: str | None, time_typname: str | None) -> Dialect:
    def vector_unusable(column: str, dimension: int) -> str | None:
        n = int(dimension)
        if vector_typname == "vector":
            return f"(vector_dims({column}) <> {n} OR vector_norm({column}) = 0)"
        if vector_typname == "halfvec":
            return f"(vector_dims({column}) <> {n} OR l2_norm({column}) = 0)"
        if vector_typname in ("_float4", "_float8"):
            return f"(cardinality({column}) <> {n} OR 0 = ALL({column}) OR 'NaN' = ANY({column}))"
        if vector_typname == "jsonb":  # jsonb compares numbers by value: [0.0, 0, …] equals the zero vector
            zero = f"(SELECT jsonb_agg(0) FROM generate_series(1, {n}))"
            length = f"CASE WHEN jsonb_typeof({column}) = 'array' THEN jsonb_array_length({column}) END"
            return f"(coalesce(({length}) <> {n}, true) OR {column} = {zero})"  # JSON null, objects: unusable
        if vector_typname == "json":
            length = f"CASE WHEN json_typeof({column}) = 'array' THEN json_array_length({column}) END"
            return f"coalesce(({length}) <> {n}, true)"
        return None  # JSON in a text column: only a run's detection reads it

    def utc_day(e: str) -> str:
        return f"(({e}) AT TIME ZONE 'UTC')::date" if time_typname == "timestamptz" else f"({e})::date"

    return Dialect(
        param="%s",
        id_text=lambda e: f"({e})::text",
        hash_bucket=lambda e, n: (
            f"mod(('x' || substr(md5(({e})::text), 1, {HASH_HEX_DIGITS}))::bit(32)::bigint, {int(n)})"
        ),
        utc_day=utc_day,
        vector_unusable=vector_unusable,
        false="false",
        fence="OFFSET 0",
        ago=lambda hours: utc_now() - timedelta(hours=hours),
        day_value=lambda day: day,
        text_hash=sql_text.postgres_hash,
        has_text=sql_text.postgres_has_text,
    )


def quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


class GroupQueries:
    """The aggregate queries of one dataset's tables, in one dialect."""

    def __init__(
        self,
        layout: TableLayout,
        dialect: Dialect,
        execute: Callable[[str, Sequence[object]], Rows],
        source: str,
        target: str,
        failures: str | None,
        integer_ids: bool,
    ):
        self.layout = layout
        self.d = dialect
        self.execute = execute
        self.source = source  # "(SELECT * FROM src WHERE row_filter) AS s"
        self.target = target
        self.failures = failures  # the failures table, once it exists
        self.integer_ids = integer_ids
        self.id = quote(layout.id_column)

    def tests_vectors(self) -> bool:
        """Whether the database can test the stored vectors (not JSON kept in a Postgres text column)."""
        return self.d.vector_unusable("e", 1) is not None

    def group_expr(self, grouping: Grouping, alias: str = "s", id_column: str | None = None) -> str:
        ref = f"{alias}.{quote(id_column) if id_column else self.id}"
        if grouping.kind == "id_range":
            return f"({ref} / {int(grouping.width)})"
        if grouping.kind == "hash":
            return self.d.hash_bucket(ref, grouping.buckets)
        if grouping.kind == "archive":
            return self.d.id_text(f"{alias}.{quote(self.layout.archive_column or '')}")
        return self.d.utc_day(f"{alias}.{quote(grouping.column or '')}")

    def partition_clause(self, part: PartitionSpec, alias: str = "s") -> tuple[list[str], list[object]]:
        """The conditions selecting a partition's rows."""
        p = self.d.param
        clauses: list[str] = []
        params: list[object] = []
        if part.id_range is not None:
            clauses.append(f"{alias}.{self.id} BETWEEN {p} AND {p}")
            params += list(part.id_range)
        if part.bucket is not None:
            bucket, buckets = part.bucket
            clauses.append(f"{self.d.hash_bucket(f'{alias}.{self.id}', buckets)} = {p}")
            params.append(bucket)
        if part.archive is not None:
            column = f"{alias}.{quote(self.layout.archive_column or '')}"
            clauses.append(f"{self.d.id_text(column)} = {p}")
            params.append(part.archive)
        if part.null_archive:
            clauses.append(f"{alias}.{quote(self.layout.archive_column or '')} IS NULL")
        if part.window is not None:
            day = self.d.utc_day(f"{alias}.{quote(part.window_column or '')}")
            clauses.append(f"{day} >= {p} AND {day} < {p}")
            params += [self.d.day_value(part.window[0]), self.d.day_value(part.window[1])]
        return clauses, params

    def groups(self, grouping: Grouping, after_id: int | None = None) -> Rows:
        """``(group value, rows, max id or None)`` of every group holding rows (with id > ``after_id``)."""
        where = f" WHERE s.{self.id} > {self.d.param}" if after_id is not None else ""
        max_id = f"max(s.{self.id})" if self.integer_ids else "NULL"
        order = f"min(s.{self.id})" if self.integer_ids and grouping.kind == "archive" else "1"
        return self.execute(
            f"SELECT {self.group_expr(grouping)}, count(*), {max_id} FROM {self.source}{where} "
            f"GROUP BY 1 ORDER BY {order}",
            [after_id] if after_id is not None else [],
        )

    def _cooling(self, test: WorkTest, row_id: str | None = None) -> tuple[str, list[object]]:
        """Rows that failed less than the cool-down ago and were not re-queued."""
        p = self.d.param
        condition = (
            f"EXISTS (SELECT 1 FROM {self.failures} f WHERE f.dataset = {p} "
            f"AND f.row_id = {self.d.id_text(row_id or f's.{self.id}')} AND f.requeued = {self.d.false} "
            f"AND f.last_failed_at > {p})"
        )
        return condition, [self.layout.dataset, self.d.ago(test.cooldown_hours)]

    def coverage(self, grouping: Grouping, test: WorkTest) -> Rows:
        """``(group value, rows, rows with text, rows needing work, of those: cooling down)`` per group.

        Each row's tests are computed once, in a subquery the planner may not flatten (``OFFSET 0``), and
        the failures table is looked at only for rows needing work."""
        needs, params = self.needs_work(test, exclude_cooling=False)
        has_text, text_params = self.d.has_text(self.layout.text)
        cooling, cooling_params = (
            ("1 = 0", [])
            if not (self.failures and test.cooldown_hours > 0)
            else (self._cooling(test, row_id="x.bf_id"))
        )
        per_row = (
            f"SELECT {self.group_expr(grouping)} AS bf_group, s.{self.id} AS bf_id, "
            f"CASE WHEN {has_text} THEN 1 ELSE 0 END AS bf_text, CASE WHEN {needs} THEN 1 ELSE 0 END AS bf_needs "
            f"FROM {self._joined()} {self.d.fence}"
        )
        return self.execute(
            f"SELECT x.bf_group, count(*), sum(x.bf_text), sum(x.bf_needs), "
            f"sum(CASE WHEN x.bf_needs = 1 AND {cooling} THEN 1 ELSE 0 END) FROM ({per_row}) AS x "
            "GROUP BY 1 ORDER BY 1",
            [*cooling_params, *text_params, *params],  # in the order the placeholders appear
        )

    def text_counts(self, grouping: Grouping) -> Rows:
        """``(group value, rows, rows with text)`` per group: no vector or hash is looked at."""
        has_text, params = self.d.has_text(self.layout.text)
        return self.execute(
            f"SELECT {self.group_expr(grouping)}, count(*), sum(CASE WHEN {has_text} THEN 1 ELSE 0 END) "
            f"FROM {self.source} GROUP BY 1 ORDER BY 1",
            params,
        )

    def partition_counts(self, part: PartitionSpec) -> tuple[int, int]:
        """``(rows, rows with text)`` of one partition, from one aggregate over its rows."""
        has_text, params = self.d.has_text(self.layout.text)
        clauses, part_params = self.partition_clause(part)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        [(rows, with_text)] = self.execute(
            f"SELECT count(*), sum(CASE WHEN {has_text} THEN 1 ELSE 0 END) FROM {self.source}{where}",
            [*params, *part_params],
        )
        return int(rows), int(with_text or 0)

    def needs_work(self, test: WorkTest, exclude_cooling: bool = True) -> tuple[str, list[object]]:
        """Whether a row needs work, as detection would say. On Postgres, constant and sequential
        placeholders of the right length (and any vector in a text column) are left to a run's detection."""
        lay = self.layout
        r = "r" if lay.separate else "s"
        p = self.d.param
        col = lambda c: f"{r}.{quote(c)}"  # noqa: E731
        emb, model, stored_hash = col(lay.embedding_column), col(lay.model_column), col(lay.content_hash_column)
        text_hash, hash_params = self.d.text_hash(lay.text)
        tests = [f"{emb} IS NULL", f"({model} IS NOT NULL AND {model} <> {p})"]
        params: list[object] = [test.model]
        tests.append(f"({stored_hash} IS NOT NULL AND {stored_hash} <> {text_hash})")
        params += hash_params
        unusable = self.d.vector_unusable(emb, test.dimension)
        if unusable is not None:
            tests.append(unusable)
        if test.redo_unhashed:
            tests.append(f"{stored_hash} IS NULL")
        if lay.enrichment_columns:
            tests += [f"{col(c)} IS NULL" for _, c in lay.enrichment_columns]
            made_by, made_from = col(lay.enrichment_model_column), col(lay.enrichment_hash_column)
            tests.append(f"({made_by} IS NOT NULL AND {made_by} <> {p})")
            tests.append(f"({made_from} IS NOT NULL AND {made_from} <> {text_hash})")
            params += [test.enrichment_model, *hash_params]
        has_text, text_params = self.d.has_text(lay.text)
        condition = f"{has_text} AND ({' OR '.join(tests)})"
        params = text_params + params
        if exclude_cooling and self.failures and test.cooldown_hours > 0:
            cooling, cooling_params = self._cooling(test)
            condition += f" AND NOT {cooling}"
            params += cooling_params
        return condition, params

    def _joined(self) -> str:
        lay = self.layout
        if not lay.separate:
            return self.source
        return f"{self.source} LEFT JOIN {self.target} AS r ON r.{quote(lay.target_id_column)} = s.{self.id}"

    def pending(self, grouping: Grouping, test: WorkTest) -> Rows:
        """``(group value, rows needing work)`` of every group holding such rows, in one query."""
        condition, params = self.needs_work(test)
        return self.execute(
            f"SELECT {self.group_expr(grouping)}, count(*) FROM {self._joined()} WHERE {condition} "
            "GROUP BY 1 ORDER BY 1",
            params,
        )

    def changed(self, grouping: Grouping, column: str, after: tuple[object, str] | None) -> tuple[Rows, Rows]:
        """Groups of the rows changed after the cursor ``(updated_at, id text)``, and the newest such row's
        ``(updated_at, id text)``; the id breaks ties between rows changed at the same instant."""
        stamp = f"s.{quote(column)}"
        key = self.d.id_text(f"s.{self.id}")
        p = self.d.param
        where = f" WHERE {stamp} IS NOT NULL"
        params: list[object] = []
        if after is not None:
            where += f" AND ({stamp} > {p} OR ({stamp} = {p} AND {key} > {p}))"
            params = [after[0], after[0], after[1]]
        groups = self.execute(
            f"SELECT {self.group_expr(grouping)}, count(*) FROM {self.source}{where} GROUP BY 1 ORDER BY 1", params
        )
        newest = self.execute(
            f"SELECT {stamp}, {key} FROM {self.source}{where} ORDER BY {stamp} DESC, {key} DESC LIMIT 1", params
        )
        return groups, newest

    def groups_of(self, grouping: Grouping, id_texts: Sequence[str]) -> dict[str, object]:
        """The group of each of these rows that is still in the (filtered) source."""
        if not id_texts:
            return {}
        key = self.d.id_text(f"s.{self.id}")
        marks = ", ".join([self.d.param] * len(id_texts))
        rows = self.execute(
            f"SELECT {key}, {self.group_expr(grouping)} FROM {self.source} WHERE {key} IN ({marks})", list(id_texts)
        )
        return {str(k): g for k, g in rows}

    def orphans_statement(self, part: PartitionSpec) -> tuple[str, list[object]]:
        """DELETE of the results rows of ``part`` whose source row is gone or filtered out. Partitions that
        a results row's id alone cannot place (archive, time) remove every orphan."""
        lay = self.layout
        target_id = quote(lay.target_id_column)
        scope: list[str] = []
        params: list[object] = []
        if part.id_range is not None or part.bucket is not None:
            only = PartitionSpec(key=part.key, id_range=part.id_range, bucket=part.bucket)
            clauses, params = self.partition_clause(only, alias="t")
            scope = [c.replace(f"t.{self.id}", f"t.{target_id}") for c in clauses]
        where = " AND ".join([*scope, f"NOT EXISTS (SELECT 1 FROM {self.source} WHERE s.{self.id} = t.{target_id})"])
        return f"DELETE FROM {self.target} AS t WHERE {where}", params
