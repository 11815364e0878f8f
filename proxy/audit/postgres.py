"""The audit store on PostgreSQL: every replica of a fleet writes one database, each to a chain of its own.

Records are projected and redacted on the event loop (:mod:`proxy.audit.record`,
the same :class:`Projector` as the SQLite store), queued, and appended by one
writer task in groups: every record queued while a commit runs goes into the
next group (group commit), up to ``batch_max_records``.  A group is one
statement on the writer's own connection — the records, the chain head and,
when due, a signed checkpoint (:mod:`proxy.audit.pg_chain`) — so sync
durability costs one round trip and one WAL flush per group.

Each running process appends to its own chain (``audit_chains``), named by
an origin ``<[audit] origin or "warden-audit">/<host>/<random>`` that is
created at start and closed at stop: replicas never serialise on each
other's appends, and ``warden audit verify`` checks every chain.

Durability (``synchronous_commit`` of the store's sessions):
  - ``sync``: ``record_exchange`` returns after the commit that holds the
    record (``synchronous_commit = on``; ``off`` with ``fsync = false``); when
    it cannot be written it raises :class:`~proxy.errors.AuditUnavailable`
    (HTTP 503, rule ``audit.durability``).  A lost connection is retried once
    on a new one (the chain head tells whether the lost commit landed).
  - ``batch`` (``synchronous_commit = off``): returns once queued; a full
    queue makes callers wait (backpressure); a failed commit is retried,
    never dropped.  If the store is down *and* the queue is full, callers get 503.

Admin actions and feedback (``record_event``) always wait for their commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import asyncpg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from llm_warden.proxy.audit import pg_chain, pg_upkeep
from llm_warden.proxy.audit.base import ReaderQueries
from llm_warden.proxy.audit.chain import append_checkpoint_file, verifier_key
from llm_warden.proxy.audit.pg_chain import Appended, ChainMoved, Head
from llm_warden.proxy.audit.pg_reader import PgAuditReader
from llm_warden.proxy.audit.record import Prepared, Projector, RecordStageError
from llm_warden.proxy.config import AuditConfig, DatabaseConfig
from llm_warden.proxy.db.migrate import COMPONENTS, check_schema, latest_version
from llm_warden.proxy.errors import AuditUnavailable, ConfigError
from llm_warden.proxy.exchange import Exchange

log = logging.getLogger("warden.audit")

_STOP = object()
_MAINTAIN_EVERY_S = 3600.0
MAX_RECORD_BYTES = 256 << 20
"""A projected exchange larger than this is recorded as ``exchange_oversized`` (a bytea parameter, and a
group's arrays, must stay far below PostgreSQL's 1 GiB field limit)."""
GROUP_BYTES = 64 << 20
"""Record bytes per group (besides ``batch_max_records``): bounds one statement's size in memory."""
_TRANSIENT_PG = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
)
"""Server errors after which the same group may well commit on a new connection (a restart, a failover).
Every error that is not the server's (a cut connection, a timeout, a client protocol state broken by one) is
treated so too: the chain head tells whether the statement landed, so a retry never writes it twice."""


@dataclasses.dataclass(slots=True)
class _Item:
    prepared: Prepared
    future: asyncio.Future[None] | None


def _unavailable(why: str = "the audit log cannot be written") -> AuditUnavailable:
    return AuditUnavailable(why, rule="audit.durability")


class PostgresAuditLog(ReaderQueries):
    """The PostgreSQL audit store; implements :class:`~proxy.audit.base.AuditSink`.

    Attributes for metrics as the SQLite store: ``failures`` (failed commits),
    ``records_written``, ``queue_depth``, ``healthy``, ``writer_restarts``
    (the writer's connection had to be opened again) and the hook
    ``on_commit(seconds, records)``.  ``origin`` names this run's chain.
    """

    commit_timeout_s = 10.0
    """Longest wait for one group's statement (then its outcome is read from the chain head)."""
    prune_chunk = 2000
    """Records deleted per retention call (each its own short transaction)."""
    prune_pause_s = 0.01
    """Least pause between two retention chunks (it is at least as long as the chunk took)."""

    def __init__(
        self,
        cfg: AuditConfig,
        database: DatabaseConfig,
        *,
        dsn: str | None = None,
        upstream_key: str | None = None,
        held_secrets: Iterable[str] = (),
        provider: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.database = database
        self.sync = cfg.durability == "sync"
        self.projector = Projector.for_audit(cfg, upstream_key=upstream_key, secrets=held_secrets, provider=provider)
        self.failures = 0
        self.records_written = 0
        self.writer_restarts = 0
        self.on_commit: Callable[[float, int], None] | None = None
        self.origin = ""
        self.verifier = ""
        self.recovery: dict[str, Any] = {}
        self._dsn = dsn
        self._conninfo = ""
        self._settings: dict[str, str] = {}
        self._healthy = False
        self._stopping = False
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=cfg.queue_max)
        self._retry: list[_Item] = []
        self._limbo: tuple[Appended, list[_Item]] | None = None  # a group whose commit is in doubt, and its batch records
        self._room = asyncio.Event()  # set when the writer took records from the queue or the store's health changed
        self._inflight = 0
        self._pool: asyncpg.Pool | None = None
        self._wconn: Any = None  # the writer's own connection (holds the chain's advisory lock)
        self._wlock = asyncio.Lock()  # the writer connection and the head: one user at a time
        self._head: Head | None = None
        self._stale = False  # the head in memory may be wrong (an outcome could not be read): read it first
        self._locked = False  # the writer connection holds the chain's advisory lock
        self._key: Ed25519PrivateKey | None = None
        self._reader: PgAuditReader | None = None
        self._writer: asyncio.Task[None] | None = None
        self._maintainer: asyncio.Task[None] | None = None
        self._checkpoint_path = Path(cfg.checkpoint_file) if cfg.checkpoint_file else None
        self._export_lock = asyncio.Lock()
        self._exports: set[asyncio.Task[None]] = set()

    # -- AuditSink -----------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False while the store cannot be written (or before start / after stop)."""
        return self._healthy

    @property
    def queue_depth(self) -> int:
        """Records waiting for a commit (queued, being committed, or waiting for a retry)."""
        return self._queue.qsize() + len(self._retry) + self._inflight + (len(self._limbo[1]) if self._limbo is not None else 0)

    @property
    def chain_id(self) -> int | None:
        """This run's chain in ``audit_chains``."""
        return self._head.chain_id if self._head is not None else None

    async def start(self) -> None:
        """Check the schema, open this run's chain, seal chains of dead processes, start the writer."""
        self._key = await asyncio.to_thread(pg_upkeep.load_fleet_key, self.cfg)
        dsn = self._dsn or self.database.dsn
        if not dsn:
            raise ConfigError("database.dsn_env", f"environment variable {self.database.dsn_env} is not set")
        if self.database.pool_max < 2:
            raise ConfigError("database.pool_max", "the postgres audit store needs at least 2 connections (the writer's and a reader's)")
        self._settings = {"application_name": "warden-audit", "synchronous_commit": "on" if self.sync and self.cfg.fsync else "off"}
        self._conninfo = dsn
        # The writer's connection is its own (held for the run); the pool serves queries and upkeep: pool_max in all.
        size = self.database.pool_max - 1
        try:
            self._pool = await asyncpg.create_pool(
                dsn, min_size=min(max(self.database.pool_min - 1, 1), size), max_size=size, server_settings=self._settings
            )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            raise _unavailable(f"cannot open the audit database: {type(e).__name__}: {e}") from None
        try:
            async with self._pool.acquire() as conn:
                await check_schema(conn, "audit", latest_version(COMPONENTS["audit"]))
                origin = pg_chain.new_origin(self.cfg.origin, secrets.token_hex(8))
                self._head = await pg_chain.create_chain(conn, origin, self._key, f"{origin.split('/')[-2]} pid {os.getpid()}")
            self.origin = self._head.origin
            self.verifier = verifier_key(self.origin, self._key.public_key())
            await self._lock_chain(await self._writer_conn())
            self._reader = PgAuditReader(self._pool)
            await self._seal_orphans()
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            await self._close()  # e.g. a role without its grants: "permission denied for table audit_chains"
            raise _unavailable(f"cannot open the audit store: {type(e).__name__}: {e}") from None
        except BaseException:
            await self._close()
            raise
        self._healthy = True
        self._writer = asyncio.create_task(self._run(), name="audit-writer")
        self._writer.add_done_callback(self._writer_ended)
        self._maintainer = asyncio.create_task(self._maintain(), name="audit-maintenance")
        log.info("audit: postgres (%s, %s content), chain %s, verifier key %s", self.cfg.durability, self.cfg.store_content, self.origin, self.verifier)

    async def stop(self) -> None:
        """Flush every queued record, write a final checkpoint, close the chain."""
        if self._stopping:
            return
        self._stopping = True
        if self._maintainer is not None:
            self._maintainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintainer
        self._room.set()
        if self._writer is not None and not self._writer.done():
            await self._queue.put(_STOP)
            with contextlib.suppress(Exception):
                await self._writer
        if self._head is not None and self._healthy:
            try:
                await self.checkpoint("shutdown")
                async with self._wlock:
                    conn = await self._writer_conn()
                    await conn.execute("UPDATE audit_chains SET closed_us = $2 WHERE chain_id = $1", self._head.chain_id, pg_chain.wall_us())
            except Exception:
                log.exception("audit: could not seal and close chain %s (the next start of any replica seals it)", self.origin)
        await self._close()
        self._healthy = False

    async def record_exchange(self, ex: Exchange) -> None:
        """Record one finished exchange (sync: after its commit; batch: once queued)."""
        await self._submit(project_exchange(self.projector, ex), wait=self.sync)

    async def record_event(self, kind: str, actor: dict[str, Any], data: dict[str, Any]) -> None:
        """Record an admin action or feedback; returns after its commit."""
        await self._submit(self.projector.event(kind, actor, data, ts=time.time()), wait=True)

    # find / search / iter_records: ReaderQueries (proxy/audit/base.py), from self._reader.

    # -- writing ---------------------------------------------------------------------

    async def _submit(self, prep: Prepared, *, wait: bool) -> None:
        if self._stopping or self._writer is None or self._writer.done():
            raise _unavailable("the audit log is not accepting records")
        if not self._healthy and self._queue.full():
            self.failures += 1
            raise _unavailable("the audit log cannot be written and its queue is full")
        fut: asyncio.Future[None] | None = asyncio.get_running_loop().create_future() if wait else None
        # Backpressure: wait while the queue is full, never drop; but once the store is down too, refuse
        # (also a caller that was already waiting), rather than wait for ever.
        while self._queue.full():
            if not self._healthy or self._stopping:
                self.failures += 1
                raise _unavailable("the audit log cannot be written and its queue is full")
            self._room.clear()
            await self._room.wait()
        self._queue.put_nowait(_Item(prep, fut))
        if fut is not None:
            await fut

    def _writer_ended(self, task: asyncio.Task[None]) -> None:
        """A writer that died of a bug must not leave requests waiting forever."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("audit: the writer task died", exc_info=task.exception())
        self._healthy = False
        items = list(self._retry)
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        for it in items:
            if isinstance(it, _Item) and it.future is not None and not it.future.done():
                it.future.set_exception(_unavailable())

    async def _run(self) -> None:
        """Commit queued records in groups: what queued during the last commit (batch: and ``batch_max_ms``) goes in the next."""
        q = self._queue
        max_n = self.cfg.batch_max_records
        linger = 0.0 if self.sync else self.cfg.batch_max_ms / 1000.0
        while True:
            if self._retry or self._limbo is not None:
                await self._drain_retry()
            first = await q.get()
            if first is _STOP:
                await self._drain_retry()
                return
            group = [first]
            if linger and q.qsize() < max_n - 1:
                await asyncio.sleep(linger)
            size = len(first.prepared.body)
            stop = False
            while len(group) < max_n and size < GROUP_BYTES and not q.empty():
                nxt = q.get_nowait()
                if nxt is _STOP:
                    stop = True
                    break
                group.append(nxt)
                size += len(nxt.prepared.body)
            self._room.set()
            await self._commit(group)
            if stop:
                await self._drain_retry()
                return

    async def _drain_retry(self) -> None:
        """Retry failed batch records, a group at a time with backoff, until written (batch mode never drops).

        New records wait meanwhile (the queue fills: backpressure; 503 once it is
        full while the store is down).  Once stopping, retries end after 5 s and
        what is left is reported lost.
        """
        delay = 0.05
        deadline: float | None = None
        max_n = self.cfg.batch_max_records
        while self._retry or self._limbo is not None:
            if deadline is None and self._stopping:
                deadline = time.monotonic() + 5.0
            if self._retry:
                group, self._retry = self._retry[:max_n], self._retry[max_n:]
                ok = await self._commit(group)
            else:
                async with self._wlock:
                    ok = await self._resolve_limbo() is None
            if ok:
                delay = 0.05
                continue
            if deadline is not None and time.monotonic() > deadline:
                self._give_up()
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _give_up(self) -> None:
        if self._limbo is not None:
            log.error("audit: %d records may or may not have been written (their commit's outcome could not be read)", len(self._limbo[1]))
            self._limbo = None
        if self._retry:
            log.error("audit: %d records could not be written before shutdown", len(self._retry))
        for it in self._retry:
            if it.future is not None and not it.future.done():
                it.future.set_exception(_unavailable())
        self._retry = []

    async def _commit(self, group: list[_Item]) -> bool:
        """Append one group; True when committed.  A failure fails the waiting callers and keeps the others for a retry."""
        self._inflight += len(group)
        t0 = time.perf_counter()
        limbo: Appended | None = None
        try:
            async with self._wlock:
                err = await self._resolve_limbo()
                if err is None:
                    err, limbo = await self._append([it.prepared for it in group])
        finally:
            self._inflight -= len(group)
        if err is not None:
            self.failures += 1
            if self._healthy:
                log.error("audit: commit of %d records failed: %s", len(group), err, exc_info=err)
            self._healthy = False
            self._room.set()
            for it in group:
                if it.future is not None and not it.future.done():
                    it.future.set_exception(_unavailable())
            keep = [it for it in group if it.future is None]
            if limbo is not None:
                # Whether this group landed is unknown: the head decides once it can be read again (never a retry
                # before that, which could write it twice).
                self._limbo = (limbo, keep)
            else:
                self._retry[:0] = keep  # ahead of anything queued since: order is kept across a retry
            return False
        if not self._healthy and not self._stopping:
            log.warning("audit: the store is writable again")
        self._healthy = True
        self.records_written += len(group)
        for it in group:
            if it.future is not None and not it.future.done():
                it.future.set_result(None)
        if self.on_commit is not None:
            try:
                self.on_commit(time.perf_counter() - t0, len(group))
            except Exception:
                log.exception("audit: on_commit hook failed")
        return True

    async def _resolve_limbo(self) -> BaseException | None:
        """Settle a group whose outcome could not be read (holding ``_wlock``): written, or queued for a retry."""
        if self._limbo is None:
            return None
        batch, items = self._limbo
        try:
            await self._resync(await self._writer_conn())
        except Exception as e:
            return e
        self._limbo = None
        head = self._head
        assert head is not None
        if head.seq == batch.seq and head.hash == batch.hash:
            log.warning("audit: a group of %d records whose commit was in doubt had been committed", batch.records)
            self.records_written += len(items)
            if batch.note is not None:
                head.sealed = max(head.sealed, batch.seq)
                self._export(batch.note)
        else:
            self._retry[:0] = items
        return None

    async def _append(self, preps: list[Prepared]) -> tuple[BaseException | None, Appended | None]:
        """Append ``preps`` on the writer connection (holding ``_wlock``).

        Returns ``(None, None)`` when committed, else the error and, when the
        statement may have committed but the head could not be read to tell,
        the group as sent.  Tries twice: after a lost connection (the head
        says whether the lost statement committed) or a moved head, once more
        on a fresh connection.
        """
        head = self._head
        assert head is not None and self._key is not None
        err: BaseException | None = None
        for _attempt in range(2):
            batch: Appended | None = None
            try:
                conn = await self._writer_conn()
                if self._stale:
                    await self._resync(conn)
                if not self._locked:
                    await self._lock_chain(conn)
                batch = pg_chain.prepare_append(head, preps, self._key, self.cfg.checkpoint_every)
                await pg_chain.append(conn, head, batch, self.commit_timeout_s)
            except ChainMoved as e:
                err = e
                self._stale = True
                continue
            except Exception as e:
                err = e
                if isinstance(e, asyncpg.PostgresError) and not isinstance(e, _TRANSIENT_PG):
                    return err, None  # the server refused the statement: rolled back, the connection and the head are fine
                await self._drop_writer_conn()
                if batch is None:
                    continue
                landed = await self._landed(batch)
                if landed:
                    self._advance(batch)
                    return None, None
                if landed is None:
                    return err, batch
                continue
            self._advance(batch)
            return None, None
        return err, None

    def _advance(self, batch: Appended) -> None:
        head = self._head
        assert head is not None
        head.seq, head.hash = batch.seq, batch.hash
        if batch.note is not None:
            head.sealed = batch.seq
            self._export(batch.note)

    async def _landed(self, batch: Appended) -> bool | None:
        """Whether a statement whose answer was lost committed (the head moved to its end); ``None``: unknown."""
        try:
            conn = await self._writer_conn()
            await self._resync(conn)
        except Exception as e:
            log.error("audit: cannot read the chain head after a failed commit: %s", e)
            return None
        head = self._head
        assert head is not None
        return head.seq == batch.seq and head.hash == batch.hash

    async def _resync(self, conn: Any) -> None:
        head = self._head
        assert head is not None
        head.seq, head.hash, head.sealed = await pg_chain.read_head(conn, head.chain_id)
        self._stale = False

    async def _writer_conn(self) -> Any:
        """The writer's connection (a new one after a loss), holding the chain's advisory lock (its liveness signal)."""
        if self._wconn is not None and not self._wconn.is_closed():
            return self._wconn
        if self._pool is None:
            raise _unavailable("the audit store is not open")
        if self._wconn is not None:
            await self._drop_writer_conn()
        self._wconn = await asyncpg.connect(self._conninfo, server_settings=self._settings, timeout=self.commit_timeout_s)
        self._locked = False
        self._stale = True
        return self._wconn

    async def _lock_chain(self, conn: Any) -> None:
        """Take the chain's advisory lock on the writer connection (what tells other replicas this chain is alive).

        It can be busy for a moment: the backend of a connection just dropped
        still holds it, or a starting replica is checking the chain.  Appends
        do not need it; the next commit tries again.
        """
        self._locked = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", pg_chain.lock_key(self.origin), timeout=self.commit_timeout_s))

    async def _drop_writer_conn(self) -> None:
        conn, self._wconn = self._wconn, None
        if conn is not None:
            conn.terminate()  # a statement may still be in flight on it: never use it again
            self.writer_restarts += 1
        self._stale = True

    async def checkpoint(self, reason: str = "manual") -> str | None:
        """Sign the current head now (if it moved since the last checkpoint); returns the note."""
        async with self._wlock:
            conn = await self._writer_conn()
            if self._stale:
                await self._resync(conn)
            assert self._head is not None and self._key is not None
            note = await pg_chain.checkpoint(conn, self._head, self._key, reason, self.commit_timeout_s)
        if note is not None:
            self._export(note)
        return note

    def _export(self, note: str) -> None:
        if self._checkpoint_path is None:
            return
        path = self._checkpoint_path

        async def write() -> None:
            async with self._export_lock:
                try:
                    await asyncio.to_thread(append_checkpoint_file, path, note)
                except OSError as e:
                    log.error("audit: could not append the checkpoint to %s: %s", path, e)

        task = asyncio.get_running_loop().create_task(write())
        self._exports.add(task)
        task.add_done_callback(self._exports.discard)

    # -- start-up, upkeep --------------------------------------------------------------

    async def _seal_orphans(self) -> None:
        """Seal and close the chains of processes that died (see :func:`pg_chain.seal_orphans`)."""
        assert self._pool is not None and self._key is not None and self._head is not None
        try:
            async with self._pool.acquire() as conn:
                sealed = await pg_upkeep.seal_orphans(conn, self._key, self._head.chain_id, self.commit_timeout_s)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            log.error("audit: could not seal the chains of dead processes: %s", e)
            return
        if sealed:
            self.recovery["sealed_chains"] = [origin for origin, _ in sealed]
        for _origin, note in sealed:
            if note is not None:
                self._export(note)

    async def _maintain(self) -> None:
        """Hourly (and now): seal orphaned chains, prune to ``retention_days``."""
        while True:
            try:
                if self.cfg.retention_days:
                    await self.prune()
            except Exception:
                log.exception("audit: retention pruning failed")
            await asyncio.sleep(_MAINTAIN_EVERY_S)
            await self._seal_orphans()

    async def prune(self, now_us: int | None = None) -> int:
        """Delete records older than ``retention_days`` from every chain, each up to a checkpoint (kept); returns how many.

        One replica at a time, through the schema owner's functions (see :func:`pg_upkeep.prune_chains`).
        """
        if not self.cfg.retention_days or self._pool is None:
            return 0
        cutoff = (now_us or pg_chain.wall_us()) - self.cfg.retention_days * 86_400 * 1_000_000
        async with self._pool.acquire() as conn:
            done = await pg_upkeep.prune_chains(conn, cutoff, self.prune_chunk, self.prune_pause_s)
        total = sum(int(c["deleted"]) for c in done)
        if total:
            log.info("audit: retention pruned %d records from %d chains", total, len(done))
            await self.record_event("retention_prune", {"subject": "warden"}, {"chains": done, "deleted": total, "cutoff_us": cutoff})
        return total

    async def _close(self) -> None:
        if self._exports:
            await asyncio.gather(*list(self._exports), return_exceptions=True)
        if self._wconn is not None:
            conn, self._wconn = self._wconn, None
            try:
                await conn.close(timeout=5.0)  # the session ends: its advisory lock goes with it
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                conn.terminate()
        self._reader = None
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 10.0)
            except (TimeoutError, OSError, asyncpg.InterfaceError):
                pool.terminate()


def project_exchange(projector: Projector, ex: Exchange) -> Prepared:
    """The record of ``ex``; a minimal stand-in when it cannot be projected or is too large (as the SQLite store)."""
    try:
        prep = projector.exchange(ex)
    except RecordStageError:
        raise
    except Exception as e:
        log.exception("audit: could not project exchange %s; recording a minimal record", ex.request_id)
        return projector.event(
            "exchange_unprojectable",
            ex.principal.summary() if ex.principal else {},
            {"request_id": ex.request_id, "status": ex.status, "route": ex.route, "error": f"{type(e).__name__}: {e}"},
            ts=ex.wall_time,
        )
    if len(prep.body) > MAX_RECORD_BYTES:
        log.error("audit: the record of exchange %s is %d bytes; recording its size only", ex.request_id, len(prep.body))
        return projector.event(
            "exchange_oversized",
            ex.principal.summary() if ex.principal else {},
            {"request_id": ex.request_id, "status": ex.status, "route": ex.route, "bytes": len(prep.body), "limit": MAX_RECORD_BYTES},
            ts=ex.wall_time,
        )
    return prep
