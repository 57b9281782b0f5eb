"""A rule-based offline enricher: skills from a vocabulary, seniority from the title and the years of
experience asked, and an extractive summary (the sentences that say the most about the role).

For demos and tests; an LLM does better, but this one is free, deterministic and instant.
"""

from __future__ import annotations

import re

from .base import EnrichmentProvider

# canonical name -> the lower-case phrases (one to three tokens) that name it
SKILLS: dict[str, tuple[str, ...]] = {
    "Python": ("python",),
    "Java": ("java",),
    "JavaScript": ("javascript", "js"),
    "TypeScript": ("typescript",),
    "Go": ("golang",),
    "Rust": ("rust",),
    "C++": ("c++",),
    "C#": ("c#",),
    "Ruby": ("ruby",),
    "PHP": ("php",),
    "Kotlin": ("kotlin",),
    "Swift": ("swift",),
    "Scala": ("scala",),
    "SQL": ("sql",),
    "PostgreSQL": ("postgresql", "postgres"),
    "MySQL": ("mysql",),
    "MongoDB": ("mongodb",),
    "Redis": ("redis",),
    "Elasticsearch": ("elasticsearch",),
    "Kafka": ("kafka",),
    "Spark": ("spark", "pyspark"),
    "Airflow": ("airflow",),
    "Dagster": ("dagster",),
    "dbt": ("dbt",),
    "Snowflake": ("snowflake",),
    "BigQuery": ("bigquery",),
    "AWS": ("aws", "amazon web services"),
    "GCP": ("gcp", "google cloud"),
    "Azure": ("azure",),
    "Docker": ("docker",),
    "Kubernetes": ("kubernetes", "k8s"),
    "Terraform": ("terraform",),
    "Ansible": ("ansible",),
    "Linux": ("linux",),
    "Git": ("git",),
    "CI/CD": ("ci/cd", "continuous integration", "continuous delivery"),
    "Jenkins": ("jenkins",),
    "CircleCI": ("circleci",),
    "GitHub Actions": ("github actions",),
    "React": ("react", "reactjs"),
    "Angular": ("angular",),
    "Vue": ("vue", "vue.js", "vuejs"),
    "Node.js": ("node.js", "nodejs", "node"),
    "Django": ("django",),
    "Flask": ("flask",),
    "FastAPI": ("fastapi",),
    "Spring": ("spring", "spring boot"),
    ".NET": (".net",),
    "GraphQL": ("graphql",),
    "REST APIs": ("rest", "restful"),
    "HTML": ("html",),
    "CSS": ("css",),
    "Selenium": ("selenium",),
    "Machine Learning": ("machine learning", "ml"),
    "Deep Learning": ("deep learning",),
    "PyTorch": ("pytorch",),
    "TensorFlow": ("tensorflow",),
    "NLP": ("nlp", "natural language processing"),
    "LLMs": ("llm", "llms", "large language models"),
    "Data Analysis": ("data analysis", "analytics"),
    "Statistics": ("statistics", "statistical"),
    "Excel": ("excel",),
    "Tableau": ("tableau",),
    "Power BI": ("power bi",),
    "Agile": ("agile", "scrum", "kanban"),
    "Project Management": ("project management",),
    "Product Management": ("product management",),
    "Stakeholder Management": ("stakeholder management", "stakeholders"),
    "Communication": ("communication", "communicator"),
    "Leadership": ("leadership",),
    "Mentoring": ("mentoring", "mentor"),
    "Sales": ("sales",),
    "Negotiation": ("negotiation",),
    "Marketing": ("marketing",),
    "SEO": ("seo",),
    "Content Writing": ("copywriting", "content writing"),
    "Social Media": ("social media",),
    "Customer Service": ("customer service", "customer support"),
    "Accounting": ("accounting", "bookkeeping"),
    "Financial Modelling": ("financial modelling", "financial modeling"),
    "Recruiting": ("recruiting", "recruitment", "talent acquisition"),
    "UX Design": ("ux", "user experience"),
    "Figma": ("figma",),
    "Security": ("security", "cybersecurity"),
    "Testing": ("testing", "qa"),
    "Microservices": ("microservices",),
    "Distributed Systems": ("distributed systems",),
    "Embedded Systems": ("embedded systems", "embedded"),
    "Networking": ("networking", "tcp/ip"),
    "SAP": ("sap",),
    "Salesforce": ("salesforce",),
    "Jira": ("jira",),
    "English": ("english",),
    "German": ("german",),
    "Dutch": ("dutch",),
    "French": ("french",),
    "Problem Solving": ("problem solving", "problem-solving"),
}
_PHRASES = {phrase: name for name, phrases in SKILLS.items() for phrase in phrases}
_TOKEN = re.compile(r"[a-z0-9+#./-]+")

_TITLE_LEVELS = [
    ("intern", r"intern|internship|trainee|apprentice|werkstudent"),
    ("executive", r"head of|head|director|vp|vice president|chief|cto|ceo|cfo|coo"),
    ("lead", r"lead|principal|staff|architect|manager"),
    ("senior", r"senior|sr"),
    ("junior", r"junior|jr|graduate|entry[- ]level|associate"),
    ("mid", r"mid|mid-level|intermediate|medior"),
]
_LEVEL_LINE = re.compile(r"experience level:?\s*\n?\s*([a-z\- ]+)")
_YEARS = re.compile(r"(\d{1,2})\s*\+?\s*(?:-\s*\d{1,2}\s*)?(?:years?|yrs?)\b")
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
_ROLE_WORDS = re.compile(r"\b(?:you will|we are looking|we're looking|responsib|join|role|seeking|hiring)\b")


def _tokens(text: str) -> list[str]:
    out: list[str] = []
    for token in _TOKEN.findall(text.lower()):
        token = token.strip(".-/")
        if token in _PHRASES or "/" not in token:
            out.append(token)
        else:
            out.extend(t for t in token.split("/") if t)
    return out


def extract_skills(text: str) -> list[str]:
    """Skills named in ``text``, in order of first mention (phrases of up to three tokens)."""
    tokens = _tokens(text)
    found: dict[str, None] = {}
    for i in range(len(tokens)):
        for n in (3, 2, 1):
            name = _PHRASES.get(" ".join(tokens[i : i + n]))
            if name:
                found[name] = None
                break
    return list(found)


def _level_from(text: str) -> str | None:
    for level, pattern in _TITLE_LEVELS:
        if re.search(rf"(?<![a-z])(?:{pattern})(?![a-z])", text):
            return level
    return None


def infer_seniority(title: str, text: str) -> str:
    lowered = text.lower()
    line = _LEVEL_LINE.search(lowered)
    if line and (level := _level_from(line.group(1))):
        return level
    if level := _level_from(title.lower()):
        return level
    years = [int(y) for y in _YEARS.findall(lowered)]
    if years:
        most = max(years)
        return "junior" if most < 2 else "mid" if most < 5 else "senior" if most < 8 else "lead"
    return "mid"


def extractive_summary(text: str, max_chars: int = 400) -> str:
    sentences = [s.strip() for s in _SENTENCE.split(text) if 40 <= len(s.strip()) <= 400]
    if not sentences:
        return text.strip()[:max_chars] or "(no description)"
    scored = []
    for i, sentence in enumerate(sentences):
        lower = sentence.lower()
        score = len(extract_skills(sentence)) + 2 * bool(_ROLE_WORDS.search(lower)) - 0.05 * i
        scored.append((score, i))
    best = sorted(i for _, i in sorted(scored, reverse=True)[:2])
    summary = " ".join(sentences[i] for i in best)
    return summary if len(summary) <= max_chars else summary[: max_chars - 1].rstrip() + "…"


class OfflineEnrichmentProvider(EnrichmentProvider):
    """For demos and tests: rules, no network."""

    name = "offline"
    max_batch_size = 10_000

    def __init__(self, model: str = "offline-rules-v1"):
        super().__init__()
        self.model = model

    async def enrich(self, texts: list[str]) -> list[dict | Exception]:
        out: list[dict | Exception] = []
        for text in texts:
            title = text.split("\n", 1)[0]
            out.append(
                {
                    "skills": extract_skills(text),
                    "seniority": infer_seniority(title, text),
                    "summary": extractive_summary(text),
                }
            )
        return out
