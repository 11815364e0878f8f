"""What ``warden demo`` sets up in its folder: the config, the sample documents and the people."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TENANT = "acme"
ISSUER = "https://demo.warden.local"
AUDIENCE = "warden-demo"
JWT_SECRET_ENV = "WARDEN_DEV_JWT_SECRET"
ADMIN_TOKEN_ENV = "WARDEN_ADMIN_TOKEN"
TRIAL_LIMIT = 3
"""Requests per minute of a user in the group ``trial`` (the rate-limit step sends one more)."""


@dataclass(frozen=True, slots=True)
class Person:
    user: str
    groups: tuple[str, ...]
    about: str


ALICE = Person("alice", ("staff",), "staff")
BOB = Person("bob", ("staff", "finance", "billing"), "staff, finance and billing")
DAVE = Person("dave", ("trial",), f"trial, {TRIAL_LIMIT} requests a minute")


@dataclass(frozen=True, slots=True)
class Folder:
    """Sample documents ingested with one ACL (the flags of ``warden ingest``)."""

    name: str
    acl_flags: tuple[str, ...]
    files: dict[str, str]


FOLDERS = (
    Folder(
        "handbook",
        ("--public",),
        {
            "travel.md": "# Travel policy\n\n## Meals\n\nMeals on business travel are reimbursed up to 50 EUR a day, "
            "with receipts. Alcohol is never reimbursed.\n",
        },
    ),
    Folder(
        "finance",
        ("--allow-group", "finance"),
        {
            "offsite-2026.md": "# Offsite budget 2026\n\n## Meals\n\nFor the Lisbon offsite the meal allowance is raised to 80 EUR "
            "a day, approved by the CFO on 2026-11-02. Do not share outside finance.\n",
        },
    ),
)

QUESTION = "What is the meal allowance when travelling?"
REFUND = "Please refund 250 EUR on invoice INV-1042, it was a duplicate charge."

TOOLS = [
    {"type": "function", "function": {"name": "lookup_invoice", "description": "Look up an invoice.",
                                      "parameters": {"type": "object", "properties": {"invoice_id": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "refund", "description": "Refund an invoice.",
                                      "parameters": {"type": "object", "properties": {"invoice_id": {"type": "string"},
                                                                                        "amount": {"type": "number"},
                                                                                        "reason": {"type": "string"}}}}},
]
"""The tools the demo application offers with the refund request (Warden replaces their schemas with its own)."""


def config_text(provider_url: str, listen: str, admin_listen: str) -> str:
    """The demo's config: every plugin on, state in the demo folder, the scripted provider upstream."""
    return f"""# warden demo: written by `warden demo`; the upstream is the scripted demo provider, not a model.
[server]
listen = "{listen}"
admin_listen = "{admin_listen}"
drain_s = 2.0

[upstream]
base_url = "{provider_url}"
api_key_env = ""
provider_name = "warden-demo"
max_retries = 0

[auth]
mode = "jwt"
algorithms = ["HS256"]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
hs256_secret_env = "{JWT_SECRET_ENV}"

[admin]
token_env = "{ADMIN_TOKEN_ENV}"

[audit]
path = "audit.db"
durability = "sync"
checkpoint_file = "checkpoints.txt"

[plugins]
enabled = ["limits", "retrieval", "tools", "headers"]

[limits]
backend = "memory"
idempotency_db = "idempotency.db"

[[limits.rules]]
scope = "tenant"
requests = "600/minute"

[[limits.rules]]
scope = "user"
match = {{ groups = ["trial"] }}
requests = "{TRIAL_LIMIT}/minute"
name = "trial-users"

[retrieval]
db = "index.db"
index_dir = "index"
mode = "bm25"
embedder = "none"
sync_interval_s = 0.5
max_lag_s = 5.0

[policy]
read_only = true
state_db = "state.db"

[[tools]]
name = "lookup_invoice"
effect = "read"
description = "Look up an invoice by id."
schema = {{ type = "object", required = ["invoice_id"], additionalProperties = false, properties = {{ invoice_id = {{ type = "string", minLength = 1 }} }} }}

[[tools]]
name = "refund"
effect = "write"
approval = "required"
approval_if = {{ properties = {{ amount = {{ exclusiveMinimum = 100 }} }} }}
allow_groups = ["billing"]
schema = {{ type = "object", required = ["invoice_id", "amount", "reason"], additionalProperties = false, properties = {{ invoice_id = {{ type = "string", minLength = 1 }}, amount = {{ type = "number", exclusiveMinimum = 0 }}, reason = {{ enum = ["duplicate", "fraud", "customer_request", "other"] }} }} }}
"""


def write_documents(root: Path) -> list[Path]:
    """Write the sample documents under ``root/docs``; the folders, in :data:`FOLDERS` order."""
    out = []
    for folder in FOLDERS:
        where = root / "docs" / folder.name
        where.mkdir(parents=True, exist_ok=True)
        for name, text in folder.files.items():
            (where / name).write_text(text)
        out.append(where)
    return out
