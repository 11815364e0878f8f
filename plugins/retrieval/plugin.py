"""The ``retrieval`` plugin: permission-scoped context injected into chat requests, with citations.

- ``on_request``: the query is the last user message (``query_turns`` = 2 adds
  the previous user turn); the principal's best readable chunks within the
  budget go into one system message after the application's own system
  messages.  Skipped with ``x-warden-retrieval: off`` or outside the
  configured routes/models.  Streaming and non-streaming alike (request side).
  Before injecting, every chosen chunk is re-checked against its document in
  the store of record by code the search does not share
  (:mod:`~plugins.retrieval.slo`); a chunk that fails is removed (rule
  ``retrieval.acl_recheck``).
- ``on_response``: ``[n]`` markers of the final answer are mapped to document
  ids (``ex.citations``); non-streaming answers get ``x-warden-citations``
  (and ``x-warden-citations-invalid`` for numbers never provided).

Everything retrieval decided is on the exchange (``ex.retrieval``,
``ex.retrieved`` with scores, ranks, injected flag, citation number and the
reason of each exclusion, ``ex.citations``) so the audit record explains it.
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import hashlib
import logging
import time
from typing import Any

from llm_warden.plugins.retrieval.acl import Reader
from llm_warden.plugins.retrieval.citations import header_value, map_citations
from llm_warden.plugins.retrieval.config import RetrievalConfig
from llm_warden.plugins.retrieval.inject import SearchResult, build_query, insert_context, render_context
from llm_warden.plugins.retrieval.pgstore import MIGRATIONS
from llm_warden.plugins.retrieval.service import RetrievalService, build_service
from llm_warden.plugins.retrieval.slo import RECHECK_RULE, Recheck, SloMetrics, recheck, renumber
from llm_warden.proxy.errors import ConfigError, ServiceUnavailable, WardenError
from llm_warden.proxy.exchange import Exchange, RetrievalSummary, StateKey
from llm_warden.proxy.plugin import Plugin, PluginContext

log = logging.getLogger("warden.retrieval")


@functools.lru_cache(maxsize=8)
def _template_digest(template: str) -> str:
    """SHA-256 of the injection template (recorded with every exchange it shaped)."""
    return hashlib.sha256(template.encode()).hexdigest()

OFF_HEADER = "x-warden-retrieval"
RECHECK: StateKey[Recheck] = StateKey("retrieval.acl_recheck", Recheck)
RESTART_KEYS = ("store", "store_timeout_s", "db", "index_dir", "embedder", "embedding_base_url", "embedding_api_key_env", "embedding_model", "embedding_dim", "chunk_tokens")


class RetrievalPlugin(Plugin):
    """Permission-scoped retrieval (see the module docstring)."""

    name = "retrieval"
    config_section = "retrieval"
    config_type = RetrievalConfig
    db_migrations = {"retrieval": MIGRATIONS}

    section: RetrievalConfig

    def __init__(self, section: RetrievalConfig | None) -> None:
        super().__init__(section or RetrievalConfig())
        self.service: RetrievalService | None = None
        self.slo: SloMetrics | None = None

    async def start(self, ctx: PluginContext) -> None:
        """Open the store and engines (crash repair, re-embed on a model change), register the admin API."""
        from llm_warden.plugins.retrieval.admin import register_admin_routes

        self.service = build_service(self.section, ctx.config)
        await self.service.start(background_sync=True)
        if not self.service.owner:
            await self.service.close()
            raise ServiceUnavailable(f"another process owns the retrieval index at {self.service.index_dir}", rule="retrieval.index_dir")
        ctx.services["retrieval"] = self.service
        register_admin_routes(ctx, self.service)
        metrics = ctx.services.get("metrics")
        if metrics is not None:
            service = self.service
            metrics.gauge("warden_retrieval_index_documents", "Documents in the retrieval store.", callback=lambda: float(service.documents))
            metrics.gauge(
                "warden_retrieval_index_staleness_seconds",
                "Age of the oldest change not yet searchable (0 when the indexes are up to date).",
                callback=service.staleness_s,
            )
            self.slo = SloMetrics(metrics, lambda: self.section.slo)
            if self.service.indexes is not None:
                # After the start's own catch-up: what a replica applies while it follows is what "became servable" means.
                self.service.indexes.on_servable = self.slo.servable

    def ready(self) -> str | None:
        """Not ready while the local indexes are not caught up with the store of record (``max_lag_s``)."""
        if self.service is None:
            return "retrieval is not started"
        return self.service.not_ready()

    async def stop(self) -> None:
        if self.service is not None:
            await self.service.close()
            self.service = None

    async def reload(self, section: Any, **extra_sections: Any) -> None:
        """Apply search/injection settings live; storage and embedder settings need a restart."""
        new: RetrievalConfig = section or RetrievalConfig()
        for key in RESTART_KEYS:
            if getattr(new, key) != getattr(self.section, key):
                raise ConfigError(f"retrieval.{key}", "changing it needs a restart")
        self.section = new
        if self.service is not None:
            self.service.cfg = new
            if self.service.follower is not None:
                self.service.follower.interval_s = new.sync_interval_s

    def applies(self, ex: Exchange) -> bool:
        """Whether retrieval runs for this exchange's route and model."""
        cfg = self.section
        if ex.route not in cfg.routes and ex.path not in cfg.routes:
            return False
        if cfg.models:
            return ex.model is not None and any(fnmatch.fnmatchcase(ex.model, p) for p in cfg.models)
        return True

    async def on_request(self, ex: Exchange) -> None:
        """Search for the principal and inject one system message of numbered, delimited context."""
        cfg = self.section
        if not cfg.enabled or self.service is None or not self.applies(ex):
            return
        if ex.request_headers.get(OFF_HEADER, "").strip().lower() in ("off", "false", "0", "no"):
            ex.retrieval = RetrievalSummary(skipped="header")
            return
        if ex.principal is None or not isinstance(ex.body, dict):
            ex.retrieval = RetrievalSummary(skipped="no_principal" if ex.principal is None else "no_body")
            return
        if not self.service.has_documents(ex.principal.tenant):
            ex.retrieval = RetrievalSummary(skipped="no_documents")
            return
        query = build_query(ex.body.get("messages"), cfg.query_turns, cfg.query_max_chars)
        if not query.strip():
            ex.retrieval = RetrievalSummary(skipped="no_query")
            return
        reader = Reader.from_principal(ex.principal)
        t0 = time.perf_counter()
        try:
            result = await self.service.search(reader, query)
            checked = await recheck(self.service.store, ex.principal, result.hits)
        except Exception as e:
            detail = e.message if isinstance(e, WardenError) else f"{e.__class__.__name__}"
            ex.retrieval = RetrievalSummary(skipped="error", query=query, mode=cfg.mode, error=detail)
            if cfg.on_error == "fail":
                raise ServiceUnavailable(f"retrieval failed: {detail}", rule="retrieval.on_error") from None
            log.warning("retrieval failed for %s, forwarding without context: %s", ex.request_id, detail)
            return
        if checked.removed:
            self._withhold(ex, result, checked)
        if self.slo is not None:
            self.slo.rechecked(checked)
        if result.hits:
            ex.set_body(insert_context(ex.body, render_context(result.hits, cfg.template)))
            ex.prompt_template_sha256 = _template_digest(cfg.template)
        ex.retrieved = [h.to_retrieved() for h in result.hits] + [h.to_retrieved() for h in result.excluded]
        excluded: dict[str, int] = {}
        for h in result.excluded:
            excluded[h.excluded_reason or "unknown"] = excluded.get(h.excluded_reason or "unknown", 0) + 1
        ex.retrieval = RetrievalSummary(
            query=query,
            mode=cfg.mode,
            top_k=cfg.top_k,
            candidates=result.candidates,
            injected=len(result.hits),
            excluded=excluded,
            context_tokens=result.context_tokens,
            timings_ms={k.removesuffix("_ms"): round(v, 3) for k, v in result.timings.items()},
        )
        ex.timings["retrieval_s"] = time.perf_counter() - t0

    @staticmethod
    def _withhold(ex: Exchange, result: SearchResult, checked: Recheck) -> None:
        """Remove the chunks the independent re-check refused (fail closed) and renumber the rest."""
        log.error("retrieval: %s: the ACL re-check against the store of record removed %d chunk(s): %s", ex.request_id, len(checked.removed),
                  "; ".join(f"{c}: {w}" for c, w in sorted(checked.removed.items())))
        kept = []
        for h in result.hits:
            if h.chunk_id in checked.removed:
                h.injected, h.citation, h.excluded_reason = False, None, RECHECK_RULE
                result.excluded.append(h)
                result.context_tokens -= h.cost()
            else:
                kept.append(h)
        result.hits = kept
        renumber(kept)
        ex.slots[RECHECK] = checked

    async def on_response(self, ex: Exchange) -> None:
        """Map ``[n]`` markers to documents; header on non-streaming answers."""
        if not ex.retrieved:
            return
        ex.citations = map_citations(ex.response_text, ex.retrieved)
        if self.section.citations_header and not ex.stream and ex.citations:
            valid, invalid = header_value(ex.citations)
            if valid:
                ex.response_headers["x-warden-citations"] = valid
            if invalid:
                ex.response_headers["x-warden-citations-invalid"] = invalid

    async def on_complete(self, ex: Exchange) -> None:
        """Record citations when the answer ended without ``on_response``; count the answer (never raises)."""
        try:
            if ex.retrieved and not ex.citations and ex.response_text:
                ex.citations = map_citations(ex.response_text, ex.retrieved)
            if self.slo is not None:
                self.slo.answered(ex)
        except Exception:
            log.exception("retrieval bookkeeping (citations, answer metrics) failed for %s", ex.request_id)

    def audit_fields(self, ex: Exchange) -> dict[str, Any] | None:
        """The chunks the ACL re-check removed, with why (only when it removed any)."""
        checked = ex.slots.get(RECHECK)
        return None if checked is None else {"acl_recheck": checked.as_dict()}

    @classmethod
    def add_cli(cls, sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
        """``warden ingest``, ``warden search``, ``warden index rebuild|status``."""
        from llm_warden.plugins.retrieval.cli import add_cli

        add_cli(sub)
