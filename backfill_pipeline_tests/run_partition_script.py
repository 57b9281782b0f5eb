"""Run one partition of a dataset's job in this process and print its outcome as JSON (for subprocess tests).

usage: python -m backfill_pipeline_tests.run_partition_script DATASET KEY [START_AT]
"""

from __future__ import annotations

import json
import sys
import time

import dagster as dg

from backfill_pipeline.config import load_config
from backfill_pipeline.lib import backfill_definitions, job_name


def main() -> None:
    name, key = sys.argv[1], sys.argv[2]
    start_at = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    job = backfill_definitions(load_config()).resolve_job_def(job_name(name))
    instance = dg.DagsterInstance.get()
    while time.time() < start_at:  # both processes start together
        time.sleep(0.002)
    result = job.execute_in_process(partition_key=key, instance=instance, raise_on_error=False)
    out: dict = {"success": result.success, "run_id": result.run_id, "assets": {}, "errors": []}
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        out["assets"][mat.asset_key.path[-1]] = {
            k: v.value for k, v in mat.metadata.items() if isinstance(v.value, int | float | str)
        }
    for event in result.get_step_failure_events():
        error = event.event_specific_data.error
        while error is not None:
            out["errors"].append(error.message)
            error = error.cause
    print(json.dumps(out))


if __name__ == "__main__":
    main()
