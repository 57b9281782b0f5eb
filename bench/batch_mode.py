"""The legal-documents seed's backfill in realtime and in batch mode: cost from the plan and from the accounting.

The seed (``001``): 41,934 legal documents in archives, ~5,000 characters (~1,250 tokens) each, embedded
with OpenAI ``text-embedding-3-small`` at $0.02 per million tokens. Here the documents are generated
(Norwegian-legal-style words, ~5,000 characters, 8 archives, one partition per archive) into SQLite, and
embedded by the loopback OpenAI server twice, the way a user would run it: ``backfill-pipeline plan
--json`` and ``backfill-pipeline materialize --parallel 2 --json``, once with ``mode: realtime`` and once
with ``mode: batch`` (the server's batches answer after 1 s). It prints, for each mode, the plan's cost,
the accounting's cost and tokens, requests, batches and the texts the server answered, and the ratio.

usage: python bench/batch_mode.py [--docs 41934] [--archives 8]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backfill_pipeline_tests.fake_providers import OPENAI_KEY, FakeProviderServer  # noqa: E402

WORDS = [
    "lov",
    "forskrift",
    "paragraf",
    "departement",
    "kommune",
    "fylke",
    "rett",
    "plikt",
    "vedtak",
    "klage",
    "frist",
    "søknad",
    "tillatelse",
    "eiendom",
    "skatt",
    "avgift",
    "arbeidsgiver",
    "arbeidstaker",
    "miljø",
    "helse",
    "tilsyn",
    "straff",
    "bot",
    "erstatning",
    "avtale",
    "kontrakt",
    "leie",
    "opplysning",
    "personvern",
    "behandling",
    "samtykke",
    "gjelder",
    "endret",
    "opphevet",
    "ikrafttredelse",
    "kongelig",
    "resolusjon",
]


def make_db(path: Path, docs: int, archives: int) -> None:
    rng = random.Random(41934)
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE legal_documents (id INTEGER PRIMARY KEY, archive TEXT, title TEXT, content TEXT)")
    names = [f"forskrifter-{2018 + a}.tar.bz2" for a in range(archives)]
    rows = []
    for i in range(1, docs + 1):
        words = rng.randint(560, 760)  # ~5,000 characters
        body = " ".join(rng.choice(WORDS) for _ in range(words))
        rows.append((i, names[i % archives], f"Forskrift {i} om {rng.choice(WORDS)}", body))
    conn.executemany("INSERT INTO legal_documents VALUES (?, ?, ?, ?)", rows)
    conn.commit()
    conn.close()


def config(db: Path, server: FakeProviderServer, mode: str) -> dict:
    return {
        "datasets": {
            "legal": {
                "database_url": f"sqlite:///{db}",
                "table": "legal_documents",
                "text": {"columns": ["title", "content"]},
                "partitioning": {"kind": "archive"},
                "archive_column": "archive",
                "embedding": {
                    "provider": "openai",
                    "model": "text-embedding-3-small",
                    "dimension": 1536,
                    "base_url": server.openai_url,
                    "batch_size": 512,
                    "max_in_flight": 4,
                    "price_per_million_input_tokens": 0.02,
                    "mode": mode,
                    "batch": {"poll_seconds": 0.5},
                },
            }
        }
    }


def cli(*args: str, env: dict[str, str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "backfill_pipeline.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"backfill-pipeline {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


def one_mode(work: Path, docs: int, archives: int, mode: str) -> dict:
    server = FakeProviderServer().start()
    server.batches.behaviour.delay_seconds = 1.0
    try:
        db = work / f"legal_{mode}.sqlite"
        make_db(db, docs, archives)
        path = work / f"legal_{mode}.yaml"
        path.write_text(yaml.safe_dump(config(db, server, mode)))
        env = {
            **os.environ,
            "BACKFILL_CONFIG": str(path),
            "OPENAI_API_KEY": OPENAI_KEY,
            "DAGSTER_HOME": str(work / f"home_{mode}"),
        }
        Path(env["DAGSTER_HOME"]).mkdir()
        for step in ("migrate", "register"):  # they print lines, not JSON
            done = subprocess.run(
                [sys.executable, "-m", "backfill_pipeline.cli", step], env=env, cwd=ROOT, text=True, capture_output=True
            )
            if done.returncode != 0:
                raise SystemExit(f"{step} failed: {done.stderr[-2000:]}")
        [plan] = cli("plan", "--json", env=env)
        started = time.monotonic()
        summary = cli("materialize", "--parallel", "2", "--yes", "--json", env=env)
        seconds = time.monotonic() - started
        return {
            "plan_cost": plan["estimated_cost_usd"],
            "plan_realtime": plan["estimated_cost_realtime_usd"],
            "plan_batch": plan["estimated_cost_batch_usd"],
            "plan_tokens": plan["embedding"]["tokens"],
            "plan_batches": plan["embedding"]["batches"],
            "summary": summary,
            "seconds": seconds,
            "answered": server.answered("batch_embeddings" if mode == "batch" else "embeddings"),
            "batches": len(server.batches.created),
        }
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=41_934)
    parser.add_argument("--archives", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {mode: one_mode(Path(tmp), args.docs, args.archives, mode) for mode in ("realtime", "batch")}
    print(
        f"legal documents: {args.docs:,} documents of ~5,000 characters in {args.archives} archives, "
        "text-embedding-3-small at $0.02 per million tokens"
    )
    columns = ["mode", "plan: cost", "plan: tokens", "accounting: cost", "accounting: tokens", "requests", "batches"]
    print("| " + " | ".join([*columns, "texts answered", "run"]) + " |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        s = r["summary"]["totals"] if "totals" in r["summary"] else r["summary"]
        print(
            f"| {mode} | ${r['plan_cost']:.4f} | {r['plan_tokens']:,} | ${s['embedding_cost_usd']:.4f} | "
            f"{int(s['embedding_input_tokens']):,} | {int(s['embedding_requests']):,} | {r['batches']} | "
            f"{r['answered']:,} | {r['seconds']:.0f} s |"
        )
    rt, b = results["realtime"]["summary"], results["batch"]["summary"]
    rt, b = rt.get("totals", rt), b.get("totals", b)
    print(
        f"plan (either run): realtime ${results['realtime']['plan_realtime']:.4f}, batch "
        f"${results['realtime']['plan_batch']:.4f}; plan batches: {results['batch']['plan_batches']}"
    )
    print(f"batch / realtime cost from the accounting: {b['embedding_cost_usd'] / rt['embedding_cost_usd']:.3f}")


if __name__ == "__main__":
    main()
