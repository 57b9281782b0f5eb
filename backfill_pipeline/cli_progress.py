"""Progress over a CLI run's partitions: a live bar at a terminal (``rich``), plain lines otherwise.

At a terminal, each partition's line is printed above a bar that shows partitions done of all, rows
written and failed so far, the cost so far, elapsed time and the time left. In logs (not a terminal) the
same lines come one per partition, so a scheduled run's log reads well.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from .run_summary import failed_rows

Report = Callable[[str, dict[str, float]], None]  # (the partition's line, its figures)


def _so_far(totals: Counter[str]) -> str:
    cost = totals["enrichment_cost_usd"] + totals["embedding_cost_usd"]
    return f"{int(totals['rows_written']):,} rows written, {failed_rows(totals):,} failed, ${cost:.4f}"


@contextmanager
def partition_progress(name: str, partitions: int, out: TextIO) -> Iterator[Report]:
    if not out.isatty():
        yield lambda line, figures: print(line, file=out, flush=True)
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    totals: Counter[str] = Counter()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("partitions  {task.fields[so_far]}"),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(file=out), transient=False) as progress:
        task = progress.add_task(name, total=partitions, so_far=_so_far(totals))

        def report(line: str, figures: dict[str, float]) -> None:
            totals.update(figures)
            progress.console.print(line, highlight=False, markup=False)
            progress.update(task, advance=1, so_far=_so_far(totals))

        yield report
