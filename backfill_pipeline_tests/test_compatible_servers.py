"""OpenAI-compatible servers as they are: a third party's reading of the wire format (``llmock``, started
here from its PyPI package) and the loopback server's variations (no model route, no usage, `dimensions`
refused, embeddings nobody can read), through the real SDK and the Dagster graph."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from .conftest import query, subprocess_env
from .graph_helpers import metadata, register, run_partition
from .test_provider_graph import provider_config, setup

EMBEDDED = "SELECT count(*) FROM job_postings WHERE embedding_model = 'text-embedding-3-small'"


@pytest.fixture(scope="module")
def llmock_url():
    """llmock 0.2.2 serving its OpenAI routes on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    binary = Path(sys.executable).parent / "llmock"
    if not binary.exists():
        pytest.skip("llmock is not installed (pip install -e '.[test]')")
    proc = subprocess.Popen(
        [str(binary), "serve", "-h", "127.0.0.1", "-p", str(port), "--log-level", "warning"],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, "llmock did not start"
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}/v1"
    proc.terminate()
    proc.wait(timeout=30)


def _llmock_config(demo_db: Path, url: str, dimension: int) -> dict:
    data = provider_config(demo_db, _Unused(url))  # type: ignore[arg-type]
    jobs = data["datasets"]["jobs"]
    jobs["embedding"].update(dimension=dimension)
    return data


class _Unused:
    """provider_config's server argument, pointing at llmock."""

    def __init__(self, url: str) -> None:
        self.openai_url = url
        self.gemini_url = url


def test_llmock_embeds_and_enriches_through_the_graph(demo_db, tmp_path, monkeypatch, instance, llmock_url) -> None:
    _, config = setup(tmp_path, _llmock_config(demo_db, llmock_url, 1536), monkeypatch)
    key = register(config, "jobs", instance)[0]
    result = run_partition(config, "jobs", key, instance)
    embedded, enriched = metadata(result, "embeddings"), metadata(result, "llm_enrichment")
    # no GET /models/{id} there: one probe, then float lists where base64 was asked for
    assert embedded["rows_failed"] == 0 and embedded["rows_embedded"] > 0
    assert embedded["provider_requests"] >= 2 and embedded["provider_input_tokens"] > 0
    assert enriched["rows_failed"] == 0 and enriched["rows_enriched"] > 0  # its answers fit the JSON schema
    assert query(demo_db, EMBEDDED)[0][0] == embedded["rows_embedded"]
    assert query(demo_db, "SELECT count(*) FROM job_postings WHERE summary = 'mock-summary'")[0][0] > 0


def test_a_dimension_the_server_ignores_is_one_clear_error_before_paying(
    demo_db, tmp_path, monkeypatch, instance, llmock_url
) -> None:
    data = _llmock_config(demo_db, llmock_url, 768)
    data["datasets"]["jobs"]["enrichment"]["enabled"] = False
    _, config = setup(tmp_path, data, monkeypatch)
    key = register(config, "jobs", instance)[0]
    with pytest.raises(dg.Failure) as info:
        run_partition(config, "jobs", key, instance)
    message = str(info.value.description)
    assert (
        "1536-dimensional" in message
        and "embedding.dimension" in message
        and "set embedding.dimension: 1536" in message
    )
    assert query(demo_db, EMBEDDED)[0][0] == 0


def _compat(server, tmp_path, monkeypatch, demo_db, instance, *modes: str, dimension: int = 768):
    server.compat.update(modes)
    data = provider_config(demo_db, server)
    data["datasets"]["jobs"]["embedding"]["dimension"] = dimension
    data["datasets"]["jobs"]["enrichment"]["enabled"] = False
    _, config = setup(tmp_path, data, monkeypatch)
    return config, register(config, "jobs", instance)[0]


def test_answers_without_usage_are_counted_with_the_tokenizer(
    demo_db,
    tmp_path,
    monkeypatch,
    instance,
    server,
) -> None:
    config, key = _compat(server, tmp_path, monkeypatch, demo_db, instance, "no_usage", "no_model_route")
    embedded = metadata(run_partition(config, "jobs", key, instance), "embeddings")
    sent = sum(tokens for route, _, tokens in server.stats.inputs_per_request if route == "embeddings")
    assert embedded["rows_failed"] == 0
    assert embedded["provider_input_tokens"] == embedded["provider_input_tokens_counted_here"] == sent


def test_dimensions_refused_are_omitted_at_the_models_own_size(
    demo_db, tmp_path, monkeypatch, instance, server
) -> None:
    config, key = _compat(
        server, tmp_path, monkeypatch, demo_db, instance, "reject_dimensions", "no_model_route", dimension=1536
    )
    embedded = metadata(run_partition(config, "jobs", key, instance), "embeddings")
    assert embedded["rows_failed"] == 0 and embedded["rows_embedded"] > 0
    assert server.count("embeddings", 400) == 1  # the probe's first try, then never `dimensions` again


def test_dimensions_refused_at_another_size_is_a_config_error(
    demo_db,
    tmp_path,
    monkeypatch,
    instance,
    server,
) -> None:
    config, key = _compat(server, tmp_path, monkeypatch, demo_db, instance, "reject_dimensions", "no_model_route")
    with pytest.raises(dg.Failure) as info:
        run_partition(config, "jobs", key, instance)
    assert "refuses `dimensions`" in str(info.value.description) and "embedding.dimension" in str(
        info.value.description
    )
    assert server.count("embeddings", 200) == 0


def test_an_unreadable_answer_is_recorded_with_its_words_not_retried(
    demo_db, tmp_path, monkeypatch, instance, server
) -> None:
    config, key = _compat(server, tmp_path, monkeypatch, demo_db, instance, "unreadable")
    embedded = metadata(run_partition(config, "jobs", key, instance), "embeddings")
    requests = server.count("embeddings", 200)
    assert embedded["rows_embedded"] == 0 and embedded["rows_failed"] == embedded["rows_in"]
    assert embedded["provider_requests"] == requests and embedded["provider_retries"] == 0  # no blind retries
    assert embedded["provider_input_tokens"] > 0  # paid for, and counted
    [(cls, message)] = query(demo_db, "SELECT DISTINCT error_class, substr(message, 1, 60) FROM backfill_failures")
    assert cls == "unreadable_answer" and "could not be read" in message
