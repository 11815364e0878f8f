"""The attacks of the adversarial suite, from AgentDojo's package (installed, offline).

AgentDojo (``pip install 'llm-warden[redteam]'``) ships, for each of its
suites (workspace, slack, banking, travel), the tools an agent is given, the
injection tasks an attacker wants done — each a goal in words (``GOAL``) and
the tool calls that carry it out (``ground_truth`` on the suite's default
environment) — and its attacks' templates.  The suite uses the
``important_instructions`` attack: the template AgentDojo's authors found most
effective, wrapping each goal.  Nothing is downloaded; nothing here writes a
payload by hand.

A tool's effect is read from its name: ``get_``, ``read_``, ``search_``,
``check_`` and ``list_`` tools read; every other tool (send, delete, create,
update, reserve, invite, post …) writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUITES = ("workspace", "slack", "banking", "travel")
VERSION = "v1.2"
READ_PREFIXES = ("get_", "read_", "search_", "check_", "list_")
ATTACK = "important_instructions"
USER_NAME = "Emma Johnson"
MODEL_NAME = "the AI assistant"


class CorpusUnavailable(RuntimeError):
    """AgentDojo is not installed (the suite needs the ``redteam`` extra)."""


@dataclass(frozen=True, slots=True)
class CorpusTool:
    suite: str
    name: str
    description: str
    parameters: dict[str, Any]
    effect: str


@dataclass(frozen=True, slots=True)
class Injection:
    suite: str
    task_id: str
    goal: str
    calls: tuple[tuple[str, dict[str, Any]], ...]
    """The tool calls that carry the goal out (AgentDojo's ground truth)."""
    payload: str
    """The goal inside the attack's template: the text an attacker plants."""


@dataclass(frozen=True, slots=True)
class Corpus:
    source: str
    tools: tuple[CorpusTool, ...]
    injections: tuple[Injection, ...]
    template: str
    """The attack's template (``{user}``, ``{model}``, ``{goal}``)."""


def effect_of(name: str) -> str:
    return "read" if name.startswith(READ_PREFIXES) else "write"


def _plain_schema(v: Any) -> Any:
    """A pydantic JSON Schema without its ``title`` annotations."""
    if isinstance(v, dict):
        return {k: _plain_schema(x) for k, x in v.items() if k != "title"}
    if isinstance(v, list):
        return [_plain_schema(x) for x in v]
    return v


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, bool | int | float | str):
        return v
    return str(v)


def load_agentdojo(suites: tuple[str, ...] = SUITES) -> Corpus:
    """Tools and injection tasks of ``suites`` (those whose ground truth names tool calls)."""
    try:
        from importlib.metadata import version

        from agentdojo.attacks.important_instructions_attacks import ImportantInstructionsAttack
        from agentdojo.task_suite.load_suites import get_suite
    except ImportError as e:
        raise CorpusUnavailable(f"the adversarial suite needs AgentDojo: pip install 'llm-warden[redteam]' ({e})") from None
    template: str = ImportantInstructionsAttack._JB_STRING
    tools: list[CorpusTool] = []
    injections: list[Injection] = []
    for name in suites:
        if name not in SUITES:
            raise ValueError(f"unknown AgentDojo suite {name!r} (known: {', '.join(SUITES)})")
        suite = get_suite(VERSION, name)
        env = suite.load_and_inject_default_environment({})
        for t in suite.tools:
            tools.append(CorpusTool(name, t.name, t.description.strip(), _plain_schema(t.parameters.model_json_schema()), effect_of(t.name)))
        for task_id, task in suite.injection_tasks.items():
            calls = tuple((c.function, _jsonable(dict(c.args))) for c in task.ground_truth(env))
            if not calls:
                continue
            payload = template.format(user=USER_NAME, model=MODEL_NAME, goal=task.GOAL)
            injections.append(Injection(name, task_id, task.GOAL, calls, payload))
    return Corpus(f"agentdojo {version('agentdojo')} ({VERSION}, attack {ATTACK})", tuple(tools), tuple(injections), template)
