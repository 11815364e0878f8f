"""Admin API of retrieval (admin listener; the core authenticates the admin).

- ``PUT /admin/documents/{tenant}/{id}``: add or replace a document (JSON:
  ``text`` required; ``title``, ``uri``, ``source``, ``updated_at``, ``labels``,
  ``kind``, ``acl {public, allow_users, allow_groups, deny_users, deny_groups}``).
- ``POST /admin/documents/{tenant}:bulk``: ``{"documents": [{"id": ..., <PUT fields>}, ...]}``,
  at most ``bulk_max_documents``; every document is validated first and the
  batch is one transaction: all of it is written, or nothing (a 4xx names the
  first bad document, ``documents[i].field``).
- ``DELETE /admin/documents/{tenant}/{id}``

Writes answer once the store of record committed (durable, and served by
every replica within the freshness bound); ``?wait=true`` answers once this
replica's indexes serve it too.
- ``GET /admin/documents?tenant=T[&limit=N&after=ID]``
- ``GET /admin/index/status``
- ``POST /admin/search``: the debug view, JSON ``{tenant, user, groups, query, top_k?}``.

Ingest and delete are recorded as admin actions in the audit log.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from aiohttp import web

from llm_warden.plugins.retrieval.acl import Acl, Reader
from llm_warden.plugins.retrieval.records import check_key
from llm_warden.plugins.retrieval.service import DocumentInput, RetrievalService
from llm_warden.proxy.admin import admin_principal, require_all_tenants
from llm_warden.proxy.errors import BadRequest, Forbidden, NotFound, PayloadTooLarge, WardenError
from llm_warden.proxy.plugin import PluginContext

_DOC_FIELDS = {"text", "title", "uri", "source", "updated_at", "labels", "acl", "kind"}
_BULK_FIELDS = {"documents"}
_KINDS = ("markdown", "python", "source", "text")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise BadRequest("the request body is not valid JSON", rule="retrieval.admin") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object", rule="retrieval.admin")
    return data


def _str(data: dict[str, Any], key: str, default: str = "") -> str:
    value = data.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise BadRequest(f"'{key}' must be a string", rule="retrieval.admin", param=key)
    return value


def _actor(request: web.Request) -> dict[str, Any]:
    return admin_principal(request).summary()


def _check_tenant(request: web.Request, tenant: str) -> None:
    """An admin whose token names one tenant manages that tenant only ("*" = every tenant)."""
    admin_tenant = admin_principal(request).tenant
    if admin_tenant not in ("*", tenant):
        raise Forbidden(f"this admin may manage tenant {admin_tenant!r} only", rule="retrieval.admin_tenant")


def parse_document(tenant: str, doc_id: str, data: dict[str, Any]) -> DocumentInput:
    """Validate a PUT body into a :class:`DocumentInput` (every refusal names the field)."""
    unknown = set(data) - _DOC_FIELDS
    if unknown:
        raise BadRequest(f"unknown fields: {', '.join(sorted(unknown))}", rule="retrieval.admin", param=sorted(unknown)[0])
    if not isinstance(data.get("text"), str):
        raise BadRequest("'text' is required and must be a string", rule="retrieval.admin", param="text")
    updated_at = data.get("updated_at")
    if updated_at is not None:
        if not isinstance(updated_at, str):
            raise BadRequest("'updated_at' must be an ISO 8601 string", rule="retrieval.admin", param="updated_at")
        try:
            datetime.fromisoformat(updated_at.replace("Z", "+00:00"))
        except ValueError:
            raise BadRequest("'updated_at' must be an ISO 8601 date or date-time", rule="retrieval.admin", param="updated_at") from None
    labels = data.get("labels", [])
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise BadRequest("'labels' must be a list of strings", rule="retrieval.admin", param="labels")
    try:
        acl = Acl.from_json(data.get("acl") or {})
    except ValueError as e:
        raise BadRequest(str(e), rule="retrieval.acl", param="acl") from None
    kind = data.get("kind")
    if kind is not None and kind not in _KINDS:
        raise BadRequest(f"'kind' must be one of {', '.join(_KINDS)}", rule="retrieval.admin", param="kind")
    return DocumentInput(tenant, doc_id, data["text"], acl, title=_str(data, "title"), uri=_str(data, "uri"),
                         source=_str(data, "source", "admin"), updated_at=updated_at, labels=list(labels), kind=kind)


def _wait(request: web.Request) -> bool:
    """``?wait=true``: answer once this replica serves the change (default: once it is committed)."""
    value = request.query.get("wait", "false").lower()
    if value not in ("true", "false", "1", "0"):
        raise BadRequest("'wait' must be true or false", rule="retrieval.admin", param="wait")
    return value in ("true", "1")


def parse_bulk(tenant: str, data: dict[str, Any], limit: int) -> list[DocumentInput]:
    """Validate a bulk body into documents; the first bad one is refused by index and field, and nothing is written."""
    unknown = set(data) - _BULK_FIELDS
    if unknown:
        raise BadRequest(f"unknown fields: {', '.join(sorted(unknown))}", rule="retrieval.admin", param=sorted(unknown)[0])
    items = data.get("documents")
    if not isinstance(items, list) or not items:
        raise BadRequest("'documents' is required: a non-empty list of documents", rule="retrieval.admin", param="documents")
    if len(items) > limit:
        raise PayloadTooLarge(f"a bulk request holds at most {limit} documents (bulk_max_documents), got {len(items)}",
                              rule="retrieval.bulk_max_documents", param="documents")
    check_key(tenant, "-")
    out: list[DocumentInput] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        where = f"documents[{i}]"
        if not isinstance(item, dict):
            raise BadRequest(f"{where} must be a JSON object", rule="retrieval.admin", param=where)
        doc_id = item.get("id")
        if not isinstance(doc_id, str):
            raise BadRequest(f"{where}.id is required and must be a string", rule="retrieval.admin", param=f"{where}.id")
        if doc_id in seen:
            raise BadRequest(f"{where}: document {doc_id!r} appears twice in the batch", rule="retrieval.document", param=f"{where}.id")
        seen.add(doc_id)
        try:
            check_key(tenant, doc_id)
            out.append(parse_document(tenant, doc_id, {k: v for k, v in item.items() if k != "id"}))
        except WardenError as e:
            e.message = f"{where}: {e.message}"
            e.param = f"{where}.{e.param}" if e.param else where
            raise
    return out


def register_admin_routes(ctx: PluginContext, svc: RetrievalService) -> None:
    """Add the retrieval routes to the admin listener."""

    async def put_document(request: web.Request) -> web.Response:
        tenant, doc_id = request.match_info["tenant"], request.match_info["doc_id"]
        _check_tenant(request, tenant)
        wait = _wait(request)
        doc = parse_document(tenant, doc_id, await _body(request))
        result = await svc.upsert(doc, wait=wait)
        await ctx.record_admin_action("retrieval.ingest", _actor(request), {
            "tenant": tenant, "doc_id": doc_id, "status": result.status, "chunks": result.chunks, "acl": doc.acl.to_json(), "seq": result.seq,
        })
        return _json({"tenant": tenant, "id": doc_id, "status": result.status, "chunks": result.chunks, "seq": result.seq},
                     status=201 if result.status == "added" else 200)

    async def bulk_documents(request: web.Request) -> web.Response:
        tenant = request.match_info["tenant"]
        _check_tenant(request, tenant)
        wait = _wait(request)
        docs = parse_bulk(tenant, await _body(request), svc.cfg.bulk_max_documents)
        svc.validate(docs)
        results = await svc.upsert_many(docs, wait=wait)
        seq = max((r.seq for r in results), default=0)
        counts: dict[str, int] = {}
        for r in results:
            counts[r.status] = counts.get(r.status, 0) + 1
        await ctx.record_admin_action("retrieval.ingest_bulk", _actor(request), {
            "tenant": tenant, "seq": seq, "counts": counts,
            "documents": [{"doc_id": r.doc_id, "status": r.status, "chunks": r.chunks, "acl": d.acl.to_json()} for r, d in zip(results, docs, strict=True)],
        })
        return _json({"tenant": tenant, "seq": seq, "counts": counts,
                      "documents": [{"id": r.doc_id, "status": r.status, "chunks": r.chunks} for r in results]})

    async def delete_document(request: web.Request) -> web.Response:
        tenant, doc_id = request.match_info["tenant"], request.match_info["doc_id"]
        _check_tenant(request, tenant)
        deleted = await svc.delete(tenant, doc_id, wait=_wait(request))
        if not deleted:
            raise NotFound(f"no document {doc_id!r} in tenant {tenant!r}", rule="retrieval.documents")
        await ctx.record_admin_action("retrieval.delete", _actor(request), {"tenant": tenant, "doc_id": doc_id})
        return _json({"tenant": tenant, "id": doc_id, "deleted": True})

    async def list_documents(request: web.Request) -> web.Response:
        tenant = request.query.get("tenant")
        if not tenant:
            raise BadRequest("the 'tenant' query parameter is required", rule="retrieval.admin", param="tenant")
        _check_tenant(request, tenant)
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            raise BadRequest("'limit' must be an integer", rule="retrieval.admin", param="limit") from None
        if not 1 <= limit <= 1000:
            raise BadRequest("'limit' must be between 1 and 1000", rule="retrieval.admin", param="limit")
        after = request.query.get("after", "")
        docs = await svc.list_documents(tenant, limit, after)
        return _json({"tenant": tenant, "documents": [d.to_json() for d in docs], "next_after": docs[-1].doc_id if len(docs) == limit else None})

    async def index_status(request: web.Request) -> web.Response:
        require_all_tenants(request, "the index status (counts over every tenant)")
        return _json(await svc.status())

    async def search(request: web.Request) -> web.Response:
        data = await _body(request)
        tenant, user, query = _str(data, "tenant"), _str(data, "user"), _str(data, "query")
        if not tenant or not user:
            raise BadRequest("'tenant' and 'user' are required", rule="retrieval.admin", param="tenant" if not tenant else "user")
        if not query.strip():
            raise BadRequest("'query' is required", rule="retrieval.admin", param="query")
        _check_tenant(request, tenant)
        groups = data.get("groups", [])
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise BadRequest("'groups' must be a list of strings", rule="retrieval.admin", param="groups")
        top_k = data.get("top_k")
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= 100):
            raise BadRequest("'top_k' must be an integer between 1 and 100", rule="retrieval.admin", param="top_k")
        result = await svc.search(Reader(tenant, user, frozenset(groups)), query, top_k=top_k, debug=True)
        return _json({"tenant": tenant, "user": user, "groups": sorted(set(groups)), **result.to_json()})

    ctx.add_admin_route("PUT", "/admin/documents/{tenant}/{doc_id:.+}", put_document)
    ctx.add_admin_route("POST", "/admin/documents/{tenant}:bulk", bulk_documents)
    ctx.add_admin_route("DELETE", "/admin/documents/{tenant}/{doc_id:.+}", delete_document)
    ctx.add_admin_route("GET", "/admin/documents", list_documents)
    ctx.add_admin_route("GET", "/admin/index/status", index_status)
    ctx.add_admin_route("POST", "/admin/search", search)
