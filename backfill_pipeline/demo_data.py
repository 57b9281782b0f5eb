"""The demo database: realistic job postings in a local SQLite file, deterministic from a seed.

Rows come in the states real tables are found in: NULL embeddings, 384-dim sequential placeholders in a
768-dim column, a few all-zero vectors, valid vectors with their enrichment, stale rows whose text changed
after they were embedded, rows embedded by an older model, and rows with no description.
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
from pathlib import Path

import numpy as np

from .config import EmbeddingSpec
from .providers import build_embedding_provider
from .providers.offline_enrichment import OfflineEnrichmentProvider
from .text import content_hash

ROLES = {
    "Software Engineer": ["Python", "Django", "PostgreSQL", "Docker", "AWS", "REST APIs", "Git"],
    "Data Engineer": ["Python", "SQL", "Spark", "Airflow", "Kafka", "Snowflake", "dbt"],
    "Frontend Developer": ["JavaScript", "TypeScript", "React", "CSS", "HTML", "GraphQL"],
    "DevOps Engineer": ["Kubernetes", "Terraform", "Docker", "Linux", "AWS", "CI/CD", "Ansible"],
    "Machine Learning Engineer": ["Python", "PyTorch", "TensorFlow", "machine learning", "NLP", "SQL"],
    "QA Engineer": ["Selenium", "Java", "testing", "CI/CD", "Jenkins", "Agile"],
    "Backend Developer": ["Java", "Spring", "Kotlin", "microservices", "PostgreSQL", "Redis"],
    "Digital Marketing Manager": ["SEO", "social media", "marketing", "analytics", "copywriting"],
    "Partnership Head": ["sales", "negotiation", "stakeholder management", "leadership"],
    "Product Manager": ["product management", "Agile", "Jira", "stakeholder management", "analytics"],
    "UX Designer": ["Figma", "user experience", "HTML", "CSS", "communication"],
    "Financial Analyst": ["Excel", "financial modelling", "accounting", "SQL", "Power BI"],
    "Customer Support Specialist": ["customer service", "communication", "Salesforce", "English"],
    "Recruiter": ["recruitment", "communication", "negotiation", "stakeholder management"],
}
LEVELS = [("Junior ", 1), ("", 3), ("Senior ", 6), ("Lead ", 8), ("Principal ", 10)]
COMPANY_HEADS = [
    "Acme",
    "Northwind",
    "Globex",
    "Initech",
    "Hooli",
    "Vandelay",
    "Tyrell",
    "Cyberdyne",
    "Blue Harbor",
    "Evergreen",
    "Quantum Leaf",
    "Redwood",
    "Silverline",
    "Brightpath",
]
COMPANY_TAILS = ["Labs", "Systems", "Analytics", "Group", "Digital", "Health", "Logistics", "Energy", "Finance"]
INDUSTRIES = ["healthcare", "logistics", "fintech", "e-commerce", "renewable energy", "media", "education"]
CITIES = ["Amsterdam", "Berlin", "Copenhagen", "Lisbon", "Oslo", "Utrecht", "Warsaw", "Dublin", "Remote"]
RESPONSIBILITIES = [
    "design and build reliable services used by thousands of customers",
    "own features from the first sketch to production and beyond",
    "work closely with product, design and data colleagues",
    "improve the quality, speed and observability of our platform",
    "mentor colleagues and review their work with care",
    "turn customer feedback into clear priorities",
    "automate repetitive work so the team can focus on what matters",
    "report on results to stakeholders every month",
]
BENEFITS = [
    "a learning budget",
    "flexible hours",
    "a pension plan",
    "30 vacation days",
    "a yearly offsite",
    "remote-first working",
    "a company laptop of your choice",
    "parental leave above the legal minimum",
]

STATES = [  # (state, share)
    ("null", 0.28),
    ("placeholder", 0.20),
    ("zero", 0.01),
    ("valid", 0.34),
    ("valid_unenriched", 0.03),
    ("stale", 0.08),
    ("old_model", 0.04),
    ("no_text", 0.02),
]
LEGACY_MODEL = "legacy-embedder-v0"


def _posting(rng: random.Random) -> dict[str, str]:
    role = rng.choice(list(ROLES))
    level, years = rng.choice(LEVELS)
    company = f"{rng.choice(COMPANY_HEADS)} {rng.choice(COMPANY_TAILS)}"
    skills = rng.sample(ROLES[role], k=min(len(ROLES[role]), rng.randint(3, 5)))
    city = rng.choice(CITIES)
    industry = rng.choice(INDUSTRIES)
    resp = rng.sample(RESPONSIBILITIES, k=3)
    benefits = rng.sample(BENEFITS, k=3)
    paragraphs = [
        f"{company} is a growing {industry} company based in {city}. We build products that our customers "
        f"rely on every day, and we are proud of a culture built on trust, curiosity and ownership.",
        f"We are looking for a {level}{role} to join our {rng.choice(['core', 'platform', 'growth', 'data'])} "
        f"team. You will {resp[0]}, {resp[1]} and {resp[2]}.",
        f"Requirements: at least {years}+ years of experience with {', '.join(skills[:-1])} and {skills[-1]}. "
        f"Good communication skills in English are essential; experience with {rng.choice(ROLES[role])} "
        "in a fast-moving environment is a plus.",
        f"We offer {benefits[0]}, {benefits[1]} and {benefits[2]}, a competitive salary and a friendly team.",
    ]
    return {
        "title": f"{level}{role}",
        "company": company,
        "location": city,
        "description": "\n\n".join(paragraphs),
    }


def render(posting: dict[str, str]) -> str:
    """The demo config's text template, applied to a posting."""
    return f"{posting['title']} at {posting['company']}\n\n{posting['description']}"


def create_demo_database(
    path: Path | str, rows: int = 3000, seed: int = 7, embedding: EmbeddingSpec | None = None
) -> Path:
    """(Re)create the demo table with ``rows`` postings; the same seed gives the same file contents.

    Valid rows hold vectors of ``embedding`` (by default the hashing embedder at 768 dimensions, which the
    tests use), so they are found up to date; placeholders are half the configured dimension."""
    embedding = embedding or EmbeddingSpec(provider="offline", dimension=768)
    dimension = embedding.dimension
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    rng = random.Random(seed)
    states = rng.choices([s for s, _ in STATES], weights=[w for _, w in STATES], k=rows)
    postings = [_posting(rng) for _ in range(rows)]
    old_texts = {}
    for i, state in enumerate(states):
        if state == "stale":  # embedded, then the description was edited
            old_texts[i] = render(postings[i])
            postings[i]["description"] += "\n\nUpdate: this position now also offers a hybrid schedule."
        if state == "no_text":
            postings[i]["description"] = ""

    embedded = [i for i, s in enumerate(states) if s in ("valid", "valid_unenriched", "stale")]
    embedder = build_embedding_provider(embedding)
    vectors = asyncio.run(embedder.embed([old_texts.get(i, render(postings[i])) for i in embedded]))
    vector_of = dict(zip(embedded, vectors, strict=True))
    enriched = [i for i, s in enumerate(states) if s in ("valid", "stale", "old_model")]
    answers = asyncio.run(OfflineEnrichmentProvider().enrich([render(postings[i]) for i in enriched]))
    enrichment_of = dict(zip(enriched, answers, strict=True))
    noise = np.random.default_rng(seed)

    records = []
    for i, (state, posting) in enumerate(zip(states, postings, strict=True)):
        vector = hash_ = model = embedded_at = None
        if state == "placeholder":
            start = round(0.001 * rng.randint(0, 600), 3)
            vector = json.dumps([round(start + 0.001 * k, 3) for k in range(dimension // 2)])
        elif state == "zero":
            vector = json.dumps([0.0] * dimension)
        elif state in ("valid", "valid_unenriched", "stale"):
            vector = json.dumps(np.round(vector_of[i].astype(np.float64), 7).tolist())
            hash_ = content_hash(old_texts.get(i, render(posting)))
            model, embedded_at = embedding.model, "2025-01-01T00:00:00+00:00"
        elif state == "old_model":
            legacy = noise.normal(size=dimension)
            vector = json.dumps(np.round(legacy / np.linalg.norm(legacy), 7).tolist())
            hash_, model, embedded_at = content_hash(render(posting)), LEGACY_MODEL, "2024-06-01T00:00:00+00:00"
        skills = seniority = summary = enriched_at = None
        if i in enrichment_of:
            answer = enrichment_of[i]
            assert isinstance(answer, dict), f"the offline enricher failed for demo row {i}: {answer}"
            skills, seniority, summary = json.dumps(answer["skills"]), answer["seniority"], answer["summary"]
            enriched_at = "2025-01-01T00:00:00+00:00"
        posted = f"2025-{1 + i % 12:02d}-{1 + i % 28:02d}"
        records.append(
            (
                i + 1,
                posting["title"],
                posting["company"],
                posting["location"],
                posting["description"],
                posted,
                vector,
                hash_,
                model,
                embedded_at,
                skills,
                seniority,
                summary,
                enriched_at,
            )
        )

    conn = sqlite3.connect(path)
    with conn:
        conn.execute(
            "CREATE TABLE job_postings (id INTEGER PRIMARY KEY, title TEXT, company TEXT, location TEXT, "
            "description TEXT, posted_at TEXT, embedding TEXT, content_hash TEXT, embedding_model TEXT, "
            "embedded_at TEXT, skills TEXT, seniority TEXT, summary TEXT, enriched_at TEXT)"
        )
        conn.executemany(f"INSERT INTO job_postings VALUES ({', '.join('?' * 14)})", records)
    conn.close()
    return path
