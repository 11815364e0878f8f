"""The golden-set case schema: a YAML list (or ``cases:`` mapping) or JSONL, one case per object.

A case::

    id: refund-window                     # unique in the file; [A-Za-z0-9._:-], at most 128
    description: "..."                    # optional
    tags: [golden, billing]               # optional
    principal:                            # who asks (the runner mints a token with these claims)
      tenant: acme
      user: alice
      groups: [staff]
      scopes: [billing:read]
    messages:                             # OpenAI chat messages, as the application sends them
      - {role: user, content: "How long is the refund window?"}
    tools: [...]                          # optional: tools offered, OpenAI format
    model: gpt-4o-mini                    # optional (else --model, else the run's default)
    stream: false                         # optional: send the case streamed
    params: {temperature: 0}              # optional: other body fields (never messages/tools/model/stream)
    expect:
      cited: [doc-refunds]                # documents that must be cited
      not_cited: [doc-hr-salaries]        # documents that must not be cited
      not_injected: [doc-hr-salaries]     # documents that must not be put in the model's context
      tool_calls:                         # tool calls that must be relayed to the application
        - {name: lookup_order, arguments: {order_id: "42"}}   # arguments: a subset that must match
      tools_refused:                      # tool calls Warden must refuse (deny / repair / hold), by rule
        - {name: delete_order, rule: tools.read_only}
      no_tool_calls: true                 # no tool call at all may be relayed
      answer:
        contains: ["30 days"]             # each must appear (case-insensitive unless case_sensitive)
        not_contains: ["salary"]
        regex: ["\\b30 days\\b"]          # each must match (Python re, search)
        exact: "..."                      # the whole answer, stripped
        json_schema: {...}                # the answer parses as JSON and validates
        case_sensitive: false
      refusal: true                       # Warden must refuse (any status >= 400) — or:
      # refusal: {status: 403, rule: policy.read_only}
      # refusal: optional                 # answered or refused, either passes (the other checks still apply)
      max_latency_ms: 3000
      max_total_tokens: 2000

Every key is checked: an unknown key, a wrong type or a missing required one is
an error naming the case and the key (:class:`CaseError`), never a silently
skipped check.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema_rs
import orjson
import yaml

_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_CASE_KEYS = {"id", "description", "tags", "principal", "messages", "tools", "model", "stream", "params", "expect", "source"}
_PRINCIPAL_KEYS = {"tenant", "user", "groups", "scopes"}
_EXPECT_KEYS = {
    "cited",
    "not_cited",
    "not_injected",
    "tool_calls",
    "tools_refused",
    "no_tool_calls",
    "answer",
    "refusal",
    "max_latency_ms",
    "max_total_tokens",
}
_ANSWER_KEYS = {"contains", "not_contains", "regex", "exact", "json_schema", "case_sensitive"}
_RESERVED_PARAMS = {"messages", "tools", "model", "stream"}
MAX_CASES = 100_000


class CaseError(ValueError):
    """A case file that does not follow the schema; the message names the case and the key."""


@dataclass(frozen=True, slots=True)
class CasePrincipal:
    tenant: str
    user: str
    groups: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "user": self.user, "groups": list(self.groups), "scopes": list(self.scopes)}


@dataclass(frozen=True, slots=True)
class ToolExpectation:
    name: str
    arguments: dict[str, Any] | None = None
    rule: str | None = None


@dataclass(frozen=True, slots=True)
class AnswerChecks:
    contains: tuple[str, ...] = ()
    not_contains: tuple[str, ...] = ()
    regex: tuple[str, ...] = ()
    exact: str | None = None
    json_schema: dict[str, Any] | None = None
    case_sensitive: bool = False


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int | None = None
    rule: str | None = None
    optional: bool = False
    """Either outcome passes (``refusal: optional``)."""


@dataclass(frozen=True, slots=True)
class Expect:
    cited: tuple[str, ...] = ()
    not_cited: tuple[str, ...] = ()
    not_injected: tuple[str, ...] = ()
    tool_calls: tuple[ToolExpectation, ...] = ()
    tools_refused: tuple[ToolExpectation, ...] = ()
    no_tool_calls: bool = False
    answer: AnswerChecks | None = None
    refusal: Refusal | None = None
    max_latency_ms: float | None = None
    max_total_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Case:
    id: str
    principal: CasePrincipal
    messages: list[dict[str, Any]]
    expect: Expect
    description: str = ""
    tags: tuple[str, ...] = ()
    tools: list[dict[str, Any]] | None = None
    model: str | None = None
    stream: bool = False
    params: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] | None = None
    """Where the case came from (``export --from-audit`` keeps the request id, reviewer and time)."""

    def as_dict(self) -> dict[str, Any]:
        """The case in the file schema (what ``export`` writes)."""
        out: dict[str, Any] = {"id": self.id}
        if self.description:
            out["description"] = self.description
        if self.tags:
            out["tags"] = list(self.tags)
        out["principal"] = self.principal.as_dict()
        out["messages"] = self.messages
        if self.tools is not None:
            out["tools"] = self.tools
        if self.model:
            out["model"] = self.model
        if self.stream:
            out["stream"] = True
        if self.params:
            out["params"] = self.params
        out["expect"] = _expect_dict(self.expect)
        if self.source:
            out["source"] = self.source
        return out


def _expect_dict(e: Expect) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in ("cited", "not_cited", "not_injected"):
        v = getattr(e, k)
        if v:
            out[k] = list(v)
    if e.tool_calls:
        out["tool_calls"] = [{k: v for k, v in (("name", t.name), ("arguments", t.arguments)) if v is not None} for t in e.tool_calls]
    if e.tools_refused:
        out["tools_refused"] = [{k: v for k, v in (("name", t.name), ("rule", t.rule)) if v is not None} for t in e.tools_refused]
    if e.no_tool_calls:
        out["no_tool_calls"] = True
    if e.answer is not None:
        a = e.answer
        ans: dict[str, Any] = {}
        for k in ("contains", "not_contains", "regex"):
            if getattr(a, k):
                ans[k] = list(getattr(a, k))
        if a.exact is not None:
            ans["exact"] = a.exact
        if a.json_schema is not None:
            ans["json_schema"] = a.json_schema
        if a.case_sensitive:
            ans["case_sensitive"] = True
        out["answer"] = ans
    if e.refusal is not None:
        r = e.refusal
        if r.optional:
            out["refusal"] = "optional"
        else:
            out["refusal"] = True if r.status is None and r.rule is None else {k: v for k, v in (("status", r.status), ("rule", r.rule)) if v is not None}
    if e.max_latency_ms is not None:
        out["max_latency_ms"] = e.max_latency_ms
    if e.max_total_tokens is not None:
        out["max_total_tokens"] = e.max_total_tokens
    return out


def load_cases(path: str | Path) -> list[Case]:
    """Read and validate a case file (``.jsonl``: one JSON object a line; else YAML)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CaseError(f"case file {p} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CaseError(f"cannot read case file {p}: {e}") from None
    raw: list[Any] = []
    if p.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                raw.append(orjson.loads(line))
            except orjson.JSONDecodeError as e:
                raise CaseError(f"{p}:{n}: not valid JSON ({e})") from None
    else:
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise CaseError(f"{p}: not valid YAML ({e})") from None
        if isinstance(doc, dict) and set(doc) == {"cases"}:
            doc = doc["cases"]
        if not isinstance(doc, list):
            raise CaseError(f"{p}: expected a list of cases (or a mapping with one key 'cases')")
        raw = doc
    if len(raw) > MAX_CASES:
        raise CaseError(f"{p}: {len(raw)} cases, more than {MAX_CASES}")
    cases = [parse_case(c, f"{p}[{i}]") for i, c in enumerate(raw)]
    seen: set[str] = set()
    for c in cases:
        if c.id in seen:
            raise CaseError(f"{p}: case id {c.id!r} appears twice")
        seen.add(c.id)
    return cases


def _strs(v: Any, where: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise CaseError(f"{where}: must be a string or a list of strings")
    return tuple(v)


def _keys(d: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise CaseError(f"{where}: must be a mapping")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise CaseError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
    return d


def _number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
        raise CaseError(f"{where}: must be a non-negative number")
    return float(v)


def _tool_expectations(v: Any, where: str, extra: str) -> tuple[ToolExpectation, ...]:
    if not isinstance(v, list):
        raise CaseError(f"{where}: must be a list")
    out = []
    for i, t in enumerate(v):
        w = f"{where}[{i}]"
        if isinstance(t, str):
            out.append(ToolExpectation(t))
            continue
        d = _keys(t, {"name", extra}, w)
        name = d.get("name")
        if not isinstance(name, str) or not name:
            raise CaseError(f"{w}.name: required, a string")
        x = d.get(extra)
        if extra == "arguments" and x is not None and not isinstance(x, dict):
            raise CaseError(f"{w}.arguments: must be a mapping")
        if extra == "rule" and x is not None and not isinstance(x, str):
            raise CaseError(f"{w}.rule: must be a string")
        out.append(ToolExpectation(name, arguments=x if extra == "arguments" else None, rule=x if extra == "rule" else None))
    return tuple(out)


def _answer(v: Any, where: str) -> AnswerChecks:
    d = _keys(v, _ANSWER_KEYS, where)
    regex = _strs(d.get("regex"), f"{where}.regex")
    for r in regex:
        try:
            re.compile(r)
        except re.error as e:
            raise CaseError(f"{where}.regex: {r!r} is not a valid regular expression ({e})") from None
    exact = d.get("exact")
    if exact is not None and not isinstance(exact, str):
        raise CaseError(f"{where}.exact: must be a string")
    schema = d.get("json_schema")
    if schema is not None:
        if not isinstance(schema, dict):
            raise CaseError(f"{where}.json_schema: must be a mapping (a JSON Schema)")
        try:
            jsonschema_rs.validator_for(schema)
        except (ValueError, jsonschema_rs.ValidationError) as e:
            raise CaseError(f"{where}.json_schema: not a valid JSON Schema ({e})") from None
    cs = d.get("case_sensitive", False)
    if not isinstance(cs, bool):
        raise CaseError(f"{where}.case_sensitive: must be true or false")
    return AnswerChecks(_strs(d.get("contains"), f"{where}.contains"), _strs(d.get("not_contains"), f"{where}.not_contains"), regex, exact, schema, cs)


def _expect(v: Any, where: str) -> Expect:
    d = _keys(v if v is not None else {}, _EXPECT_KEYS, where)
    refusal: Refusal | None = None
    r = d.get("refusal")
    if r is True:
        refusal = Refusal()
    elif r == "optional":
        refusal = Refusal(optional=True)
    elif isinstance(r, dict):
        rd = _keys(r, {"status", "rule"}, f"{where}.refusal")
        st = rd.get("status")
        if st is not None and (isinstance(st, bool) or not isinstance(st, int) or not 400 <= st <= 599):
            raise CaseError(f"{where}.refusal.status: must be an HTTP error status (400-599)")
        rule = rd.get("rule")
        if rule is not None and not isinstance(rule, str):
            raise CaseError(f"{where}.refusal.rule: must be a string")
        refusal = Refusal(st, rule)
    elif r not in (None, False):
        raise CaseError(f"{where}.refusal: must be true, false, \"optional\" or a mapping with status / rule")
    no_calls = d.get("no_tool_calls", False)
    if not isinstance(no_calls, bool):
        raise CaseError(f"{where}.no_tool_calls: must be true or false")
    mt = d.get("max_total_tokens")
    if mt is not None and (isinstance(mt, bool) or not isinstance(mt, int) or mt < 0):
        raise CaseError(f"{where}.max_total_tokens: must be a non-negative integer")
    return Expect(
        cited=_strs(d.get("cited"), f"{where}.cited"),
        not_cited=_strs(d.get("not_cited"), f"{where}.not_cited"),
        not_injected=_strs(d.get("not_injected"), f"{where}.not_injected"),
        tool_calls=_tool_expectations(d.get("tool_calls", []), f"{where}.tool_calls", "arguments"),
        tools_refused=_tool_expectations(d.get("tools_refused", []), f"{where}.tools_refused", "rule"),
        no_tool_calls=no_calls,
        answer=_answer(d["answer"], f"{where}.answer") if d.get("answer") is not None else None,
        refusal=refusal,
        max_latency_ms=_number(d["max_latency_ms"], f"{where}.max_latency_ms") if d.get("max_latency_ms") is not None else None,
        max_total_tokens=mt,
    )


def parse_case(raw: Any, where: str) -> Case:
    """One case object, validated (``where`` names it in errors until its id is known)."""
    d = _keys(raw, _CASE_KEYS, where)
    cid = d.get("id")
    if not isinstance(cid, str) or not _ID.match(cid):
        raise CaseError(f"{where}.id: required, 1-128 characters of A-Z a-z 0-9 . _ : -")
    where = f"case {cid!r}"
    pr = _keys(d.get("principal"), _PRINCIPAL_KEYS, f"{where}.principal")
    for k in ("tenant", "user"):
        if not isinstance(pr.get(k), str) or not pr[k]:
            raise CaseError(f"{where}.principal.{k}: required, a non-empty string")
    principal = CasePrincipal(pr["tenant"], pr["user"], _strs(pr.get("groups"), f"{where}.principal.groups"), _strs(pr.get("scopes"), f"{where}.principal.scopes"))
    msgs = d.get("messages")
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in msgs):
        raise CaseError(f"{where}.messages: required, a non-empty list of messages with a role")
    tools = d.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise CaseError(f"{where}.tools: must be a list of tool objects (OpenAI format)")
    model = d.get("model")
    if model is not None and not isinstance(model, str):
        raise CaseError(f"{where}.model: must be a string")
    stream = d.get("stream", False)
    if not isinstance(stream, bool):
        raise CaseError(f"{where}.stream: must be true or false")
    params = d.get("params") or {}
    if not isinstance(params, dict):
        raise CaseError(f"{where}.params: must be a mapping")
    reserved = sorted(set(params) & _RESERVED_PARAMS)
    if reserved:
        raise CaseError(f"{where}.params: {reserved[0]!r} is a case key of its own, not a param")
    desc = d.get("description", "")
    if not isinstance(desc, str):
        raise CaseError(f"{where}.description: must be a string")
    source = d.get("source")
    if source is not None and not isinstance(source, dict):
        raise CaseError(f"{where}.source: must be a mapping")
    return Case(
        id=cid,
        principal=principal,
        messages=msgs,
        expect=_expect(d.get("expect"), f"{where}.expect"),
        description=desc,
        tags=_strs(d.get("tags"), f"{where}.tags"),
        tools=tools,
        model=model,
        stream=stream,
        params=params,
        source=source,
    )
