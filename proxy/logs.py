"""Structured JSON logs on stdout: one line per event, no secrets, no prompt text.

:func:`setup_logging` installs one handler on the root logger.  Records are
handed to a queue and written by a background thread, so a slow stdout (a
full pipe, a busy log collector) never blocks the event loop.  Every line
passes through a scrubber that masks bearer tokens, JWTs, ``sk-`` style keys
and every secret value registered with :func:`add_secrets` (all the secrets
the configuration resolves, see :func:`proxy.secrets.secret_values`),
wherever they appear — a message, an extra field or a traceback.

The per-request line is built by :func:`request_line` from the finished
exchange: request id, trace id, tenant, route, model, status, latency,
upstream time, tool decisions and the refusal rule.  Prompt and answer text
are never read.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import re
import sys
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TextIO

import orjson

from llm_warden.proxy.secrets import MIN_SECRET_CHARS

if TYPE_CHECKING:
    from llm_warden.proxy.config import LoggingConfig
    from llm_warden.proxy.exchange import Exchange

_STD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {"message", "asctime", "taskName"}

# Bearer credentials, JWT-shaped strings (three base64url parts, header starting "eyJ") and API keys.
_SECRET_RE = re.compile(
    r"(?i:bearer)\s+[A-Za-z0-9._~+/=-]{8,}"
    r"|\b(?:sk|pk|rk)-[A-Za-z0-9_-]{16,}"
)
# JWT-shaped: a dotted base64url run, matched from the start of the run with possessive
# quantifiers so hostile text ("eyJeyJeyJ...") costs linear time; masked when it holds "eyJ".
_JWT_RUN_RE = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{7,}+\.[A-Za-z0-9_-]{4,}+\.[A-Za-z0-9_-]*+")


def _mask_jwt(m: re.Match[str]) -> str:
    return REDACTED if "eyJ" in m.group() else m.group()
REDACTED = "[redacted]"


class SecretScrubber:
    """Masks credentials in log text: known secret values plus token-shaped patterns."""

    def __init__(self) -> None:
        self.values: list[str] = []

    def add(self, value: str | None) -> None:
        """Never write ``value`` (at least ``MIN_SECRET_CHARS`` characters; shorter ones would mask ordinary words).

        The scrubber runs on the finished JSON line, where a value holding a
        quote, a backslash or a control character appears escaped: that
        spelling is registered too.  Longer values are replaced first, so a
        secret containing another is masked whole.
        """
        if not value or len(value) < MIN_SECRET_CHARS:
            return
        forms = [value]
        try:
            forms.append(orjson.dumps(value).decode()[1:-1])
        except TypeError:  # a lone surrogate (an undecodable byte in an environment variable) has no JSON spelling
            pass
        for form in forms:
            if form not in self.values:
                self.values.append(form)
        self.values.sort(key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for v in self.values:
            if v in text:
                text = text.replace(v, REDACTED)
        if "earer" in text or "k-" in text:
            text = _SECRET_RE.sub(REDACTED, text)
        if "eyJ" in text:
            text = _JWT_RUN_RE.sub(_mask_jwt, text)
        return text


_scrubber = SecretScrubber()


def add_secret(value: str | None) -> None:
    """Register a secret value (the provider key, the admin token) that must never reach the logs."""
    _scrubber.add(value)


def add_secrets(values: Iterable[str]) -> None:
    """Register every secret value the configuration resolves (:func:`proxy.secrets.secret_values`)."""
    for v in values:
        _scrubber.add(v)


class JSONFormatter(logging.Formatter):
    """One JSON object per record: ``ts``, ``level``, ``logger``, ``msg``, extra fields, ``exc``."""

    def __init__(self, scrub: SecretScrubber | None = None) -> None:
        super().__init__()
        self.scrub = scrub if scrub is not None else _scrubber

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STD and v is not None:
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        return self.scrub(orjson.dumps(out, default=str).decode())


class _QueueHandler(logging.handlers.QueueHandler):
    """Hands records to the writer thread, resolved so they no longer hold live objects."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record.msg = record.getMessage()
        record.args = None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return record


class _Writer:
    """The background writer: a QueueListener around a stream handler, stopped (flushed) at exit."""

    def __init__(self, stream: TextIO) -> None:
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.stream_handler = logging.StreamHandler(stream)
        self.stream_handler.setFormatter(JSONFormatter())
        self.queue_handler = _QueueHandler(self.queue)
        self.listener = logging.handlers.QueueListener(self.queue, self.stream_handler, respect_handler_level=False)
        self.listener.start()
        self.running = True
        atexit.register(self.stop)

    def stop(self) -> None:
        """Write what is queued, then let later records (interpreter exit) go straight to the stream."""
        if self.running:
            self.running = False
            root = logging.getLogger()
            if self.queue_handler in root.handlers:
                root.removeHandler(self.queue_handler)
                root.addHandler(self.stream_handler)
            self.listener.stop()
            self.stream_handler.flush()


_writer: list[_Writer] = []


def setup_logging(level: str = "info", *, stream: TextIO | None = None, background: bool = True) -> None:
    """JSON lines on stdout (or ``stream``) for the whole process, at ``level``.

    With ``background`` (the default) a thread does the writing; call
    :func:`shutdown_logging` (also run at exit) to flush it.
    """
    shutdown_logging()
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    out = stream if stream is not None else sys.stdout
    handler: logging.Handler
    if background:
        w = _Writer(out)
        _writer.append(w)
        handler = w.queue_handler
    else:
        handler = logging.StreamHandler(out)
        handler.setFormatter(JSONFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def shutdown_logging() -> None:
    """Flush and stop the background writer, if one runs."""
    while _writer:
        _writer.pop().stop()


def request_line(ex: Exchange, status: int, total_s: float, upstream_s: float, cfg: LoggingConfig) -> dict[str, Any]:
    """The fields of one request's log line (no prompt, answer, token or key)."""
    p = ex.principal
    line: dict[str, Any] = {
        "request_id": ex.request_id,
        "trace_id": ex.trace_id,
        "tenant": p.tenant if p else None,
        "route": ex.route,
        "method": ex.method,
        "path": ex.path,
        "model": ex.model,
        "status": status,
        "latency_ms": round(total_s * 1000, 3),
        "upstream_ms": round(upstream_s * 1000, 3),
        "turns": len(ex.turns),
        "stream": ex.stream,
    }
    if cfg.include_subject and p is not None:
        line["subject"] = p.subject
    if ex.response_model and ex.response_model != ex.model:
        line["response_model"] = ex.response_model
    ttft = ex.timings.get("ttft")
    if ttft is not None:
        line["ttft_ms"] = round(ttft * 1000, 3)
    if ex.usage is not None:
        line["tokens_in"] = ex.usage.prompt_tokens
        line["tokens_out"] = ex.usage.completion_tokens
    if ex.error is not None:
        line["rule"] = ex.error.rule
        line["error"] = ex.error.code
    elif ex.error_detail or any(t.error_kind for t in ex.turns):
        line["error"] = "upstream_error"
    if ex.tool_decisions:
        line["decisions"] = [{"tool": d.call.name[:64], "decision": d.decision.kind, "rule": d.decision.rule, "turn": d.turn} for d in ex.tool_decisions]
    if ex.retrieval is not None:
        r = ex.retrieval
        line["retrieval"] = {"skipped": r.skipped} if r.skipped is not None else {"injected": r.injected, "excluded": dict(r.excluded)}
    if ex.citations:
        line["citations_invalid"] = sum(1 for c in ex.citations if not c.valid)
    if ex.client_disconnected:
        line["client_disconnected"] = True
    if ex.cut is not None:
        line["cut"] = ex.cut
    return line
