"""Trigger change capture on Postgres: a queue of the keys of inserted, edited and deleted rows.

``migrate`` installs, per dataset, a row trigger on the source table that fires on INSERT, DELETE and
UPDATE OF the text columns (plus the archive column and ``watch_columns``), so the pipeline's own writes
of result columns never queue a row. It appends the row's key (its text) to ``backfill_queue``, the way
the chat-app seed's ``embedding_queue`` and Supabase's automatic embeddings work. The sensor reads what
was queued after its cursor, grouped by partition in one query, and deletes entries only on the next
tick, once Dagster has stored the cursor: a crash between the two loses nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from psycopg import sql

from .groups import Grouping, quote
from .layout import TableRef
from .postgres_catalog import identifier

if TYPE_CHECKING:
    from .postgres_rows import PostgresRows

QUEUE_TABLE = "backfill_queue"
FUNCTION = "backfill_enqueue"

_FUNCTION_BODY = """
BEGIN
  IF TG_OP = 'DELETE' THEN
    INSERT INTO {queue} (dataset, row_id, op) VALUES (TG_ARGV[0], to_jsonb(OLD) ->> TG_ARGV[1], 'delete');
    RETURN OLD;
  END IF;
  INSERT INTO {queue} (dataset, row_id, op) VALUES (TG_ARGV[0], to_jsonb(NEW) ->> TG_ARGV[1], lower(TG_OP));
  RETURN NEW;
END
"""


def queue_ref(rows: PostgresRows) -> TableRef:
    return TableRef(QUEUE_TABLE, rows.layout.target.schema)


def trigger_name(dataset: str) -> str:
    return f"backfill_queue_{dataset}"


def missing(rows: PostgresRows) -> list[str]:
    """What ``migrate`` would add for trigger change capture."""
    lay = rows.layout
    absent = [] if rows.catalog.exists(queue_ref(rows)) else [f"{QUEUE_TABLE} (table)"]
    found = rows.conn.execute(
        "SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass(%s) AND tgname = %s",
        [identifier(lay.source).as_string(rows.conn), trigger_name(lay.dataset)],
    ).fetchone()
    return absent + ([] if found else [f"{lay.source}: trigger {trigger_name(lay.dataset)}"])


def install(rows: PostgresRows, watched: list[str]) -> None:
    """Create the queue table, the function and the dataset's trigger (replacing an older one)."""
    lay = rows.layout
    queue = identifier(queue_ref(rows))
    function = identifier(TableRef(FUNCTION, lay.target.schema))
    conn = rows.conn
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (seq bigserial PRIMARY KEY, dataset text NOT NULL, row_id text NOT NULL, "
            "op text NOT NULL, queued_at timestamptz NOT NULL DEFAULT now())"
        ).format(queue)
    )
    conn.execute(
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (dataset, seq)").format(
            sql.Identifier(f"{QUEUE_TABLE}_seq"), queue
        )
    )
    body = _FUNCTION_BODY.format(queue=queue.as_string(conn))
    conn.execute(
        sql.SQL("CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS {}").format(
            function, sql.Literal(body)
        )
    )
    name = sql.Identifier(trigger_name(lay.dataset))
    conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(name, rows.src))
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in dict.fromkeys(watched))
    conn.execute(
        sql.SQL(
            "CREATE TRIGGER {} AFTER INSERT OR DELETE OR UPDATE OF {} ON {} FOR EACH ROW EXECUTE FUNCTION {}({}, {})"
        ).format(name, columns, rows.src, function, sql.Literal(lay.dataset), sql.Literal(lay.id_column))
    )


def queued_groups(rows: PostgresRows, grouping: Grouping, after: int) -> tuple[list[tuple], int]:
    """``(group value, rows queued)`` of the entries after ``after``, and the last entry's number. A deleted
    row's group is found from its key where the key alone places it (id ranges, hashes); elsewhere it is
    left out, and the next run of any partition removes its results."""
    queue = identifier(queue_ref(rows)).as_string(rows.conn)
    dataset = rows.layout.dataset
    last = rows.conn.execute(f"SELECT max(seq) FROM {queue} WHERE dataset = %s", [dataset]).fetchone()
    upto = int(last[0]) if last and last[0] is not None else after
    if upto <= after:
        return [], after
    queries = rows.queries()
    if grouping.kind == "hash":
        group = queries.d.hash_bucket("q.row_id", grouping.buckets)
        source = ""
    elif grouping.kind == "id_range":
        group = f"(q.row_id::bigint / {int(grouping.width)})"
        source = ""
    else:
        group = queries.group_expr(grouping)
        ids = f"s.{quote(rows.layout.id_column)}"
        source = f" JOIN {queries.source} ON {ids}::text = q.row_id"
    found = rows.conn.execute(
        f"SELECT {group}, count(DISTINCT q.row_id) FROM {queue} AS q{source} "
        "WHERE q.dataset = %s AND q.seq > %s AND q.seq <= %s GROUP BY 1 ORDER BY 1",
        [dataset, after, upto],
    ).fetchall()
    return found, upto


def acknowledge(rows: PostgresRows, upto: int) -> int:
    """Delete the entries up to ``upto`` (a cursor Dagster has stored)."""
    queue = identifier(queue_ref(rows))
    done = rows.conn.execute(
        sql.SQL("DELETE FROM {} WHERE dataset = %s AND seq <= %s").format(queue), [rows.layout.dataset, upto]
    )
    return done.rowcount
