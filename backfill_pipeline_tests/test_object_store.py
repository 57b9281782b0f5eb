"""Intermediates in object storage and the executor chosen by configuration alone.

The S3 side is moto's server on 127.0.0.1, speaking the S3 wire protocol to s3fs (through UPath), so the
real client stack is exercised; nothing is written to the instance's local storage."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from backfill_pipeline.config import ConfigError, parse_config
from backfill_pipeline.lib import backfill_definitions, job_name
from backfill_pipeline.stores import open_store

from .conftest import demo_config_dict
from .graph_helpers import metadata, register

BUCKET = "backfill-intermediates"


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch):
    boto3 = pytest.importorskip("boto3")
    server_module = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }.items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=BUCKET)
    yield client
    server.stop()


def _keys(client) -> list[str]:
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=BUCKET).get("Contents", []))


def test_a_partition_leaves_its_intermediates_in_s3_and_a_new_run_reads_them(s3, demo_db: Path, instance) -> None:
    data = demo_config_dict(demo_db)
    data["execution"] = {"intermediates": f"s3://{BUCKET}/backfill"}
    config = parse_config(data)
    with open_store("jobs", config.datasets["jobs"]) as store:
        store.migrate()
    key = register(config, "jobs", instance)[0]
    job = backfill_definitions(config).resolve_job_def(job_name("jobs"))
    first = job.execute_in_process(partition_key=key, instance=instance)
    assert first.success
    stored = _keys(s3)
    for asset in ("raw_rows", "detected_placeholders", "llm_enrichment", "embeddings"):
        assert f"backfill/jobs/{asset}/{key}/{first.run_id}.parquet" in stored, stored
    recorded = metadata(first, "raw_rows")["parquet_path"]
    assert recorded == f"jobs/raw_rows/{key}/{first.run_id}.parquet"  # relative to the root: any machine finds it
    assert not (Path(instance.storage_directory()) / "backfill_parquet").exists()

    # a new run (a retry in a new pod, a re-execution elsewhere) of the write alone reads its inputs from S3
    again = job.execute_in_process(
        partition_key=key, instance=instance, asset_selection=[dg.AssetKey(["jobs", "written_table"])]
    )
    assert again.success and metadata(again, "written_table")["rows_in"] == metadata(first, "written_table")["rows_in"]

    s3.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": k} for k in _keys(s3)]})
    missing = job.execute_in_process(
        partition_key=key,
        instance=instance,
        asset_selection=[dg.AssetKey(["jobs", "written_table"])],
        raise_on_error=False,
    )
    assert not missing.success
    errors = [
        e.event_specific_data.error.to_string()
        for e in missing.all_events
        if e.event_type_value in ("STEP_FAILURE", "STEP_UP_FOR_RETRY") and e.event_specific_data.error
    ]
    said = next((m for m in errors if "no stored result" in m), "\n".join(errors))
    assert f"s3://{BUCKET}/backfill/jobs/" in said and "execution.intermediates" in said, said


def test_the_executor_is_configuration(demo_db: Path) -> None:
    data = demo_config_dict(demo_db)
    data["execution"] = {"executor": "multiprocess"}
    job = backfill_definitions(parse_config(data)).resolve_job_def(job_name("jobs"))
    assert job.executor_def.name == "multiprocess"
    assert (
        backfill_definitions(parse_config(demo_config_dict(demo_db)))
        .resolve_job_def(job_name("jobs"))
        .executor_def.name
        == "in_process"
    )


def test_a_multi_machine_executor_needs_shared_intermediates(demo_db: Path) -> None:
    data = demo_config_dict(demo_db)
    data["execution"] = {"executor": "dagster_celery:celery_executor"}
    with pytest.raises(ConfigError, match="runs steps on other machines.*execution.intermediates"):
        parse_config(data)
    data["execution"]["intermediates"] = f"s3://{BUCKET}/backfill"
    parse_config(data)  # valid; the executor itself is imported when the definitions are built
    data["execution"]["executor"] = "no_such_package:celery_executor"
    with pytest.raises(ConfigError, match="'no_such_package:celery_executor' cannot be loaded"):
        backfill_definitions(parse_config(data))
