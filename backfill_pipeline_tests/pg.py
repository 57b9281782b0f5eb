"""Postgres servers for tests: the one running on 127.0.0.1:5432, and clusters the tests own.

An owned cluster is built from the binaries of the ``pgserver`` wheel (Postgres 16 with pgvector) in a
temporary directory, listening on a free TCP port, so a test can stop and restart it. As root, the server
runs as the ``pgserver`` system user, as pgserver itself does.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import tempfile
import uuid
from pathlib import Path

import psycopg
import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
LOCAL_URL = os.environ.get("BACKFILL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def unavailable(reason: str) -> None:
    """Skip on a developer's machine; in CI every server must be there, so fail."""
    if IN_CI:
        pytest.fail(f"CI must run every test, but: {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OwnedCluster:
    """A throw-away Postgres 16 + pgvector cluster (initdb ~0.6 s, start ~0.1 s)."""

    def __init__(self) -> None:
        try:
            from pgserver._commands import POSTGRES_BIN_PATH, initdb, pg_ctl
            from pgserver.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists
        except ImportError:
            unavailable("the pgserver package (Postgres 16 + pgvector) is not installed: pip install pgserver")
        self._pg_ctl = pg_ctl
        self.root = Path(tempfile.mkdtemp(prefix="backfill-pg-"))
        self.data = self.root / "data"
        self.data.mkdir()
        self.user = None
        if os.geteuid() == 0:
            import pwd

            self.user = "pgserver"
            ensure_user_exists(self.user)
            ensure_prefix_permissions(self.data)
            ensure_prefix_permissions(POSTGRES_BIN_PATH)  # the server user must reach the binaries, as in pgserver
            ensure_folder_permissions(POSTGRES_BIN_PATH, stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH)
            ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
            entry = pwd.getpwnam(self.user)
            os.chown(self.data, entry.pw_uid, entry.pw_gid)
        initdb(["--auth=trust", "--encoding=utf8", "-U", "postgres"], pgdata=self.data, user=self.user)
        self.port = _free_port()
        self.start()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = f"-h 127.0.0.1 -p {self.port} -k {self.data} -c fsync=off -c max_connections=60"
        self._pg_ctl(
            ["-w", "-o", options, "-l", str(self.data / "log"), "start"], pgdata=self.data, user=self.user, timeout=60
        )

    def stop(self, mode: str = "fast") -> None:
        self._pg_ctl(["-w", "-m", mode, "stop"], pgdata=self.data, user=self.user, timeout=60)

    def destroy(self) -> None:
        with contextlib.suppress(Exception):  # already stopped
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def create_database(server_url: str, extensions: tuple[str, ...] = ()) -> str:
    name = f"backfill_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = server_url.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(url, autocommit=True) as conn:
        for extension in extensions:
            conn.execute(f'CREATE EXTENSION IF NOT EXISTS "{extension}"')
    return url


def drop_database(server_url: str, url: str) -> None:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def local_server_url() -> str | None:
    try:
        with psycopg.connect(LOCAL_URL, connect_timeout=3):
            return LOCAL_URL
    except psycopg.OperationalError:
        return None
