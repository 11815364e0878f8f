"""Fixtures for the retrieval pipeline tests: a real embeddings endpoint and services on temp files."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from llm_warden.plugins.retrieval.config import RetrievalConfig
from llm_warden.plugins.retrieval.embed import Embedder, UpstreamEmbedder
from llm_warden.plugins.retrieval.embed_local import LocalEmbedder
from llm_warden.plugins.retrieval.service import RetrievalService
from tests.fakeprovider import FakeProvider

EMBED_DIM = 32

ServiceFactory = Callable[..., Awaitable[RetrievalService]]


@pytest.fixture
async def embed_provider() -> AsyncIterator[FakeProvider]:
    fp = FakeProvider(embedding_dim=EMBED_DIM)
    await fp.start()
    yield fp
    await fp.stop()


@pytest.fixture
async def service_factory(tmp_path: Path, embed_provider: FakeProvider) -> AsyncIterator[ServiceFactory]:
    """Start RetrievalServices on files under tmp_path (``name`` picks a separate db/index)."""
    started: list[RetrievalService] = []

    async def make(name: str = "idx", *, start: bool = True, own_engines: bool = True, embedder: bool | str = True, **cfg: Any) -> RetrievalService:
        """``embedder``: True = the fake provider's embeddings endpoint, False = none, a string = that ``embedder`` setting."""
        if isinstance(embedder, str):
            cfg["embedder"] = embedder
        elif not embedder:
            cfg.setdefault("embedder", "none")
            cfg.setdefault("mode", "bm25")
        conf = RetrievalConfig(**cfg)
        conf.validate("retrieval")
        emb: Embedder | None = None
        if conf.embedder == "upstream":
            emb = UpstreamEmbedder(embed_provider.base_url, "sk-test", conf.embedding_model, conf.embedding_dim or None, conf.embedding_batch, conf.embedding_timeout_s)
        elif conf.embedder == "local":
            emb = LocalEmbedder()
        svc = RetrievalService(conf, tmp_path / f"{name}.db", tmp_path / f"{name}-index", emb)
        if start:
            await svc.start(own_engines=own_engines)
        started.append(svc)
        return svc

    yield make
    for svc in reversed(started):
        await svc.close()


@pytest.fixture
async def pg_dsn() -> AsyncIterator[str]:
    """A fresh schema of this test's own, migrated to the retrieval schema (skipped without PostgreSQL unless CI)."""
    from tests.plugins.retrieval.pg import fresh_schema

    async with fresh_schema() as dsn:
        yield dsn


@pytest.fixture
async def pg_factory(pg_dsn: str, tmp_path: Path, embed_provider: FakeProvider) -> AsyncIterator[ServiceFactory]:
    """Start replicas on the test's PostgreSQL schema, each with its own index folder (``name``) and connection name."""
    from llm_warden.plugins.retrieval.pgstore import PostgresStore
    from tests.plugins.retrieval.pg import schema_of

    started: list[RetrievalService] = []

    async def make(name: str = "a", *, start: bool = True, own_engines: bool = True, embedder: bool = True, background_sync: bool = True,
                   dsn: str | None = None, **cfg: Any) -> RetrievalService:
        if not embedder:
            cfg.setdefault("embedder", "none")
            cfg.setdefault("mode", "bm25")
        conf = RetrievalConfig(store="postgres", **cfg)
        conf.validate("retrieval")
        emb = None
        if conf.embedder == "upstream":
            emb = UpstreamEmbedder(embed_provider.base_url, "sk-test", conf.embedding_model, conf.embedding_dim or None, conf.embedding_batch, conf.embedding_timeout_s)
        store = PostgresStore(dsn or pg_dsn, pool_max=3, timeout_s=conf.store_timeout_s, application_name=f"{schema_of(pg_dsn)}-{name}")
        svc = RetrievalService(conf, None, tmp_path / f"{name}-index", emb, store=store)
        if start:
            await svc.start(own_engines=own_engines, background_sync=background_sync)
        started.append(svc)
        return svc

    yield make
    for svc in reversed(started):
        await svc.close()
