"""The embedded audit store: SQLite (WAL).

Records are projected and redacted on the event loop (:mod:`proxy.audit.record`);
one writer task then hands them in groups to the writer process
(:mod:`proxy.audit.writer`), which owns the write connection: every record
queued while a commit runs goes into the next group, so sync durability costs
one fsync per group, not per request.  Each group is one ``BEGIN IMMEDIATE``
transaction that reads the chain head, appends, moves the head and (every
``checkpoint_every`` records) writes a signed checkpoint — so several
processes writing one database keep one correct chain.  The schema, start-up
repair and retention (:mod:`proxy.audit.upkeep`) run on an aiosqlite connection of the server's own;
queries on a second one.

Durability:
  - ``sync`` (``synchronous=FULL``): ``record_exchange`` returns after the
    commit that holds the record; if the commit fails it raises
    :class:`~proxy.errors.AuditUnavailable` (HTTP 503, rule ``audit.durability``).
  - ``batch`` (``synchronous=NORMAL``): returns once queued; a full queue makes
    callers wait (backpressure); a failed commit is retried, never dropped.
    If the store is down *and* the queue is full, callers get 503.

Admin actions and feedback (``record_event``) always wait for their commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiosqlite
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from llm_warden.proxy.audit.base import ReaderQueries
from llm_warden.proxy.audit.chain import (
    append_checkpoint_file,
    genesis_hash,
    load_or_create_key,
    load_private_key,
    repair_checkpoint_file,
    verifier_key,
)
from llm_warden.proxy.audit.liveness import LiveLock
from llm_warden.proxy.audit.reader import AuditReader
from llm_warden.proxy.audit.record import Prepared, Projector, RecordStageError
from llm_warden.proxy.audit.upkeep import SCHEMA, file_sizes, forget_stale_writers, note_size, prune_delete, prune_mark, wall_us
from llm_warden.proxy.audit.writer import AppendResult, WriterError, WriterGone
from llm_warden.proxy.audit.writer_process import WriterProcess
from llm_warden.proxy.config import AuditConfig
from llm_warden.proxy.errors import AuditUnavailable, ConfigError
from llm_warden.proxy.exchange import Exchange

if TYPE_CHECKING:
    from llm_warden.proxy.audit.base import AuditSink
    from llm_warden.proxy.config import Config

log = logging.getLogger("warden.audit")

_STOP = object()
_WAKE = object()
_PRUNE_EVERY_S = 3600.0
FRAME_BYTES = 64 << 20
"""Record bytes per frame to the writer (besides ``batch_max_records``): bounds what one frame holds
in memory and keeps it far below the 4 GiB a frame's u32 length can say."""
MAX_RECORD_BYTES = 1 << 30
"""A projected exchange larger than this is recorded as ``exchange_oversized`` (who, what, how big)."""


@dataclasses.dataclass(slots=True)
class _Item:
    prepared: Prepared
    future: asyncio.Future[None] | None


def _groups(items: list[_Item], max_records: int) -> list[list[_Item]]:
    """``items`` in order, cut into groups of at most ``max_records`` records and about ``FRAME_BYTES``."""
    out: list[list[_Item]] = []
    group: list[_Item] = []
    size = 0
    for it in items:
        if group and (len(group) >= max_records or size >= FRAME_BYTES):
            out.append(group)
            group, size = [], 0
        group.append(it)
        size += len(it.prepared.body)
    if group:
        out.append(group)
    return out


class SQLiteAuditLog(ReaderQueries):
    """The SQLite audit store; implements :class:`~proxy.audit.base.AuditSink`.

    ``upstream_key`` (rule ``upstream_key``) and ``held_secrets`` (every other
    secret Warden holds, :func:`proxy.secrets.secret_values`; rule
    ``secret_value``) are removed by value from every record.

    Attributes for metrics: ``failures`` (failed commits), ``records_written``,
    ``queue_depth``, ``healthy`` and the hook ``on_commit(seconds, records)``
    called after every successful group commit.
    """

    prune_chunk = 2000
    """Records deleted per retention transaction (a few ms to tens of ms of write lock)."""
    prune_pause_s = 0.01
    """Least pause between two retention chunks (it is at least as long as the chunk took)."""
    stale_writer_s = 86_400.0
    """A writer's batch marker unchanged this long after a start first saw it is deleted (see :meth:`_forget_stale_writers`)."""

    def __init__(
        self,
        cfg: AuditConfig,
        path: Path,
        *,
        upstream_key: str | None = None,
        held_secrets: Iterable[str] = (),
        provider: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.path = Path(path)
        self.sync = cfg.durability == "sync"
        self.projector = Projector.for_audit(cfg, upstream_key=upstream_key, secrets=held_secrets, provider=provider)
        self.failures = 0
        self.records_written = 0
        self.on_commit: Callable[[float, int], None] | None = None
        self.origin = ""
        self.verifier = ""
        self.recovery: dict[str, Any] = {}
        self._healthy = False
        self._stopping = False
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=cfg.queue_max)
        self._retry: list[_Item] = []
        self._inflight: set[asyncio.Future[None]] = set()
        self._inflight_records = 0
        self._idle = False  # the writer task waits for the queue (only then does a retry need a _WAKE)
        self._exports: set[asyncio.Task[None]] = set()
        self._db: aiosqlite.Connection | None = None
        self._reader: AuditReader | None = None
        self._writer: asyncio.Task[None] | None = None
        self._pruner: asyncio.Task[None] | None = None
        self._key: Ed25519PrivateKey | None = None
        self._checkpoint_path = Path(cfg.checkpoint_file) if cfg.checkpoint_file else None
        self._wp: WriterProcess | None = None
        self._prune_lock = asyncio.Lock()
        self._export_lock = asyncio.Lock()
        self._file_through = 0  # every checkpoint in the database up to this size is in checkpoint_file
        self._seen_restarts = 0
        self.live_lock: LiveLock | None = None

    # -- AuditSink -----------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False while the store cannot be written (or before start / after stop)."""
        return self._healthy

    @property
    def queue_depth(self) -> int:
        """Records waiting for a commit."""
        return self._queue.qsize() + len(self._retry) + self._inflight_records

    @property
    def writer_restarts(self) -> int:
        """How often the writer process had to be started again."""
        return self._wp.restarts if self._wp is not None else 0

    @property
    def writer_pid(self) -> int | None:
        """The pid of the writer process while it runs."""
        return self._wp.pid if self._wp is not None else None

    @property
    def key_path(self) -> Path:
        """Where the signing key is generated when none is configured."""
        return self.path.with_name(self.path.name + ".ed25519")

    async def start(self) -> None:
        """Open the store, load the key, repair a torn tail, start the writer."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._key = await asyncio.to_thread(self._load_key)
        self.live_lock = await asyncio.to_thread(LiveLock, self.path)
        db = await aiosqlite.connect(str(self.path), isolation_level=None)
        self._db = db
        try:
            await db.execute("PRAGMA busy_timeout = 10000")
            await db.execute("PRAGMA journal_mode = WAL")
            await self._init_schema()
            await self._forget_stale_writers()
            self._wp = WriterProcess(
                str(self.path),
                synchronous="FULL" if self.sync and self.cfg.fsync else "NORMAL",
                origin=self.origin,
                every=self.cfg.checkpoint_every,
                group_max=self.cfg.batch_max_records,
                key=self._key,
                hide_env=[self.cfg.signing_key_env] if self.cfg.signing_key_env else [],
            )
            self._wp.on_commit = self._committed
            await self._wp.start()
            self._reader = AuditReader(await aiosqlite.connect(str(self.path)))
            await self._reader.db.execute("PRAGMA busy_timeout = 10000")
            await self._recover()
            await self._export_missing()
        except BaseException:
            await self._close()
            raise
        self._healthy = True
        self._writer = asyncio.create_task(self._run(), name="audit-writer")
        self._writer.add_done_callback(self._writer_ended)
        if self.cfg.retention_days:
            self._pruner = asyncio.create_task(self._prune_loop(), name="audit-pruner")
        log.info(
            "audit: %s (%s, %s content), origin %s, verifier key %s",
            self.path,
            self.cfg.durability,
            self.cfg.store_content,
            self.origin,
            self.verifier,
        )

    async def stop(self) -> None:
        """Flush every queued record, write a final checkpoint, close."""
        if self._stopping:
            return
        self._stopping = True
        if self._pruner is not None:
            self._pruner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pruner
        if self._writer is not None and not self._writer.done():
            await self._queue.put(_STOP)
            with contextlib.suppress(Exception):
                await self._writer
        if self._db is not None and self._healthy:
            try:
                await self.checkpoint("shutdown")
            except Exception:
                log.exception("audit: could not write the shutdown checkpoint")
        if self._exports:
            await asyncio.gather(*self._exports, return_exceptions=True)
        if self._reader is not None:
            await self._export_missing()
        await self._close()
        self._healthy = False

    async def record_exchange(self, ex: Exchange) -> None:
        """Record one finished exchange (sync: after its commit; batch: once queued)."""
        try:
            prep = self.projector.exchange(ex)
        except RecordStageError:
            raise
        except Exception as e:
            log.exception("audit: could not project exchange %s; recording a minimal record", ex.request_id)
            prep = self.projector.event(
                "exchange_unprojectable",
                ex.principal.summary() if ex.principal else {},
                {"request_id": ex.request_id, "status": ex.status, "route": ex.route, "error": f"{type(e).__name__}: {e}"},
                ts=ex.wall_time,
            )
        if len(prep.body) > MAX_RECORD_BYTES:
            log.error("audit: the record of exchange %s is %d bytes; recording its size only", ex.request_id, len(prep.body))
            prep = self.projector.event(
                "exchange_oversized",
                ex.principal.summary() if ex.principal else {},
                {"request_id": ex.request_id, "status": ex.status, "route": ex.route, "bytes": len(prep.body), "limit": MAX_RECORD_BYTES},
                ts=ex.wall_time,
            )
        await self._submit(prep, wait=self.sync)

    async def record_event(self, kind: str, actor: dict[str, Any], data: dict[str, Any]) -> None:
        """Record an admin action or feedback; returns after its commit."""
        await self._submit(self.projector.event(kind, actor, data, ts=time.time()), wait=True)

    # find / search / iter_records: ReaderQueries (proxy/audit/base.py), from self._reader.

    # -- writing -------------------------------------------------------------

    async def _submit(self, prep: Prepared, *, wait: bool) -> None:
        if self._stopping or self._writer is None or self._writer.done():
            raise AuditUnavailable("the audit log is not accepting records", rule="audit.durability")
        fut: asyncio.Future[None] | None = asyncio.get_running_loop().create_future() if wait else None
        item = _Item(prep, fut)
        if not self._healthy and self._queue.full():
            self.failures += 1
            raise AuditUnavailable("the audit log cannot be written and its queue is full", rule="audit.durability")
        if fut is not None and not self._inflight and not self._retry and self._queue.empty() and self._healthy:
            # Nothing ahead of it and the writer idle: send it now (one event-loop turn sooner than via the
            # writer task). Records that come while it commits queue up and share the next commit.
            try:
                self._dispatch([item])
            except Exception:
                log.exception("audit: could not hand a record to the writer")
                self._healthy = False
                self.failures += 1
                raise AuditUnavailable("the audit log cannot be written", rule="audit.durability") from None
        else:
            await self._queue.put(item)
        if fut is not None:
            await fut

    def _writer_ended(self, task: asyncio.Task[None]) -> None:
        """A writer that died of a bug must not leave requests waiting forever."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("audit: the writer task died", exc_info=task.exception())
        self._healthy = False
        err = AuditUnavailable("the audit log cannot be written", rule="audit.durability")
        while True:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if isinstance(item, _Item) and item.future is not None and not item.future.done():
                item.future.set_exception(err)

    async def _run(self) -> None:
        """Hand queued records to the writer process in groups, without waiting for commits.

        The writer process groups whatever arrives while it commits into its
        next transaction; this task only bounds what is in flight (about two
        groups, see :meth:`_wait_capacity`) and retries failed batch-mode records.
        """
        q = self._queue
        max_n = self.cfg.batch_max_records
        linger = 0.0 if self.sync else self.cfg.batch_max_ms / 1000.0
        while True:
            if self._retry:
                await self._flush_retry()
            self._idle = True
            try:
                first = await q.get()
            finally:
                self._idle = False
            if first is _WAKE:
                continue
            stop = first is _STOP
            batch: list[_Item] = [] if stop else [first]
            if not stop:
                if linger and q.qsize() < max_n - 1:
                    await asyncio.sleep(linger)
                size = len(first.prepared.body)
                while len(batch) < max_n and size < FRAME_BYTES:
                    try:
                        nxt = q.get_nowait()
                    except asyncio.QueueEmpty:
                        break
                    if nxt is _STOP:
                        stop = True
                        break
                    if nxt is not _WAKE:
                        batch.append(nxt)
                        size += len(nxt.prepared.body)
            if batch:
                try:
                    self._dispatch(batch)
                except BaseException:
                    err = AuditUnavailable("the audit log cannot be written", rule="audit.durability")
                    for it in batch:
                        if it.future is not None and not it.future.done():
                            it.future.set_exception(err)
                    raise
                await self._wait_capacity()
            if stop:
                while self._inflight:
                    await asyncio.wait(list(self._inflight))
                if self._retry:
                    await self._flush_retry(deadline=time.monotonic() + 5.0)
                return

    async def _wait_capacity(self) -> None:
        """Backpressure: wait while the socket is full or two groups' worth of records await their commit.

        Two groups keep the writer busy (one commits while the next forms)
        and bound what is held beyond the queue.
        """
        assert self._wp is not None
        await self._wp.drain()
        # Room for a whole next group (up to batch_max_records) before taking it, so that the bound of two
        # groups holds after small groups too.
        while self._inflight and self._inflight_records > self.cfg.batch_max_records:
            await asyncio.wait(list(self._inflight), return_when=asyncio.FIRST_COMPLETED)

    def _dispatch(self, batch: list[_Item]) -> asyncio.Future[None]:
        """Send a group to the writer process; returns a future that settles after its outcome is applied."""
        settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def then(result: AppendResult | None, exc: BaseException | None) -> None:
            self._inflight.discard(settled)
            self._inflight_records -= len(batch)
            self._settle(batch, result, exc)
            settled.set_result(None)

        if self._wp is None:
            self._settle(batch, None, WriterGone("the audit store is not open"))
            settled.set_result(None)
            return settled
        self._inflight.add(settled)
        self._inflight_records += len(batch)
        try:
            self._wp.submit([it.prepared for it in batch], then=then)
        except Exception as e:
            # Settled like a failed commit (sync: 503; batch: retried): an exception escaping here would leave
            # ``settled`` in _inflight for ever (stop() waits for it) or end the writer task with the batch.
            then(None, e)
        return settled

    def _settle(self, batch: list[_Item], result: AppendResult | None, exc: BaseException | None) -> None:
        """Apply a commit's outcome: release sync callers, or count the failure (503 / retry)."""
        if exc is not None:
            self.failures += 1
            if self._healthy:
                log.error("audit: commit of %d records failed: %s", len(batch), exc)
            self._healthy = False
            err = AuditUnavailable("the audit log cannot be written", rule="audit.durability")
            had_retry = bool(self._retry)
            for it in batch:
                if it.future is not None:
                    if not it.future.done():
                        it.future.set_exception(err)
                else:
                    self._retry.append(it)
            if self._retry and not had_retry and self._idle:
                # The writer task waits for new records: wake it.  Otherwise it checks the retry list before
                # its next wait (a _WAKE put while it retries would sit in the queue, one per failed retry,
                # and fill it).
                with contextlib.suppress(asyncio.QueueFull):
                    self._queue.put_nowait(_WAKE)
            return
        if not self._healthy and not self._stopping:
            log.warning("audit: the store is writable again")
        self._healthy = True
        self.records_written += len(batch)
        for it in batch:
            if it.future is not None and not it.future.done():
                it.future.set_result(None)
        if result is not None and result.note is not None:
            self._spawn_export(result.note)

    async def _flush_retry(self, deadline: float | None = None) -> None:
        """Retry records of failed batch commits, one group at a time with backoff, until written."""
        delay = 0.05
        while self._retry:
            if deadline is None and self._stopping:
                deadline = time.monotonic() + 5.0
            batch, self._retry = self._retry, []
            for group in _groups(batch, self.cfg.batch_max_records):
                await self._dispatch(group)
            if not self._retry:
                return
            if deadline is not None and time.monotonic() > deadline:
                log.error("audit: %d records could not be written before shutdown", len(self._retry))
                for it in self._retry:
                    if it.future is not None and not it.future.done():
                        it.future.set_exception(AuditUnavailable("the audit log cannot be written", rule="audit.durability"))
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _spawn_export(self, note: str) -> None:
        if self._checkpoint_path is None:
            return
        self._track_export(self._export_checkpoint(note))

    def _track_export(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._exports.add(task)
        task.add_done_callback(self._exports.discard)

    async def _append(self, preps: list[Prepared], *, checkpoint_reason: str | None = None) -> str | None:
        """Append records (and maybe a checkpoint) and wait for the commit; returns the checkpoint note."""
        if self._wp is None:
            raise AuditUnavailable("the audit store is not open", rule="audit.durability")
        try:
            return (await self._wp.append(preps, checkpoint_reason)).note
        except (WriterGone, WriterError) as e:
            raise AuditUnavailable(f"the audit log cannot be written: {e}", rule="audit.durability") from None

    def _committed(self, seconds: float, records: int) -> None:
        if self._wp is not None and self._wp.restarts != self._seen_restarts:
            # The first commit of a restarted writer: the notes of commits whose answers died with the old
            # one were never exported.
            self._seen_restarts = self._wp.restarts
            if self._checkpoint_path is not None and not self._stopping:
                self._track_export(self._export_missing())
        if self.on_commit is not None:
            try:
                self.on_commit(seconds, records)
            except Exception:
                log.exception("audit: on_commit hook failed")

    async def checkpoint(self, reason: str = "manual") -> str | None:
        """Sign the current head now (if it moved since the last checkpoint); returns the note."""
        note = await self._append([], checkpoint_reason=reason)
        if note is not None:
            await self._export_checkpoint(note)
        return note

    async def _export_checkpoint(self, note: str) -> None:
        if self._checkpoint_path is None:
            return
        async with self._export_lock:
            if note_size(note) <= self._file_through:
                return  # already appended by _export_missing
            try:
                await asyncio.to_thread(append_checkpoint_file, self._checkpoint_path, note)
            except OSError as e:
                log.error("audit: could not append the checkpoint to %s: %s", self._checkpoint_path, e)

    async def _export_missing(self) -> int:
        """Append to ``checkpoint_file`` every checkpoint in the database that it lacks; returns how many.

        A note reaches the file with the writer's answer; an answer lost with
        a writer that died after its commit, or a checkpoint written by
        another process on the database, leaves a gap.  Run at start, after a
        writer restart and at stop.  Checkpoints below ``pruned_through`` are
        skipped (verify does not compare them); the file gets whole notes, so
        it may end up out of size order, which verify does not mind.
        """
        path = self._checkpoint_path
        if path is None or self._reader is None:
            return 0
        db = self._reader.db
        try:
            async with self._export_lock:
                have = await asyncio.to_thread(file_sizes, path, self.origin)
                async with db.execute(
                    "SELECT size, note FROM checkpoints WHERE size >= "
                    "COALESCE((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'pruned_through'), 0) ORDER BY size"
                ) as cur:
                    rows = [(int(r[0]), str(r[1])) for r in await cur.fetchall()]
                missing = [note for size, note in rows if size not in have]
                if missing:
                    await asyncio.to_thread(append_checkpoint_file, path, "".join(missing))
                    log.warning("audit: appended %d checkpoint notes missing from %s", len(missing), path)
                if rows:
                    self._file_through = max(self._file_through, rows[-1][0])
        except (OSError, sqlite3.Error) as e:
            log.error("audit: could not bring %s up to date with the database's checkpoints: %s", path, e)
            return 0
        return len(missing)

    # -- start-up ------------------------------------------------------------

    def _load_key(self) -> Ed25519PrivateKey:
        cfg = self.cfg
        if cfg.signing_key_env:
            text = os.environ.get(cfg.signing_key_env)
            if not text:
                raise ConfigError("audit.signing_key_env", f"environment variable {cfg.signing_key_env} is not set")
            try:
                return load_private_key(text)
            except ValueError as e:
                raise ConfigError("audit.signing_key_env", str(e)) from None
        if cfg.signing_key_file:
            try:
                return load_private_key(Path(cfg.signing_key_file).read_text())
            except FileNotFoundError:
                raise ConfigError("audit.signing_key_file", f"{cfg.signing_key_file} does not exist") from None
            except ValueError as e:
                raise ConfigError("audit.signing_key_file", str(e)) from None
        key, created = load_or_create_key(self.key_path)
        if created:
            log.warning("audit: generated a signing key at %s (mode 0600); keep it safe and keep its public key elsewhere", self.key_path)
        return key

    async def _init_schema(self) -> None:
        db = self._db
        assert db is not None and self._key is not None
        await db.execute("BEGIN IMMEDIATE")
        try:
            for stmt in SCHEMA.split(";\n"):
                if stmt.strip():
                    await db.execute(stmt)
            async with db.execute("SELECT value FROM meta WHERE key = 'origin'") as cur:
                row = await cur.fetchone()
            if row is None:
                origin = self.cfg.origin or f"warden-audit/{secrets.token_hex(8)}"
                await db.execute(
                    "INSERT INTO meta (key, value) VALUES ('origin', ?), ('created_us', ?), ('schema', '1')", (origin, str(wall_us()))
                )
                await db.execute("INSERT INTO head (id, seq, hash) VALUES (1, 0, ?)", (genesis_hash(origin),))
            else:
                origin = str(row[0])
                if self.cfg.origin and self.cfg.origin != origin:
                    raise ConfigError("audit.origin", f"the database was created with origin {origin!r}")
            self.origin = origin
            self.verifier = verifier_key(origin, self._key.public_key())
            kid = self.verifier.split("+")[1]
            await db.execute("INSERT OR IGNORE INTO keys (key_id, verifier, added_us) VALUES (?,?,?)", (kid, self.verifier, wall_us()))
            await db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                await db.execute("ROLLBACK")
            raise
        if await asyncio.to_thread(self.key_path.exists):
            pub = self.key_path.with_name(self.key_path.name + ".pub")
            await asyncio.to_thread(pub.write_text, self.verifier + "\n")

    async def _forget_stale_writers(self) -> None:
        """Delete the batch markers of writers that stopped committing long ago (servers that crashed).

        Every server run's writer keeps ``meta['writer:<token>']`` (the highest
        batch id it committed, see :mod:`proxy.audit.writer`); a clean stop
        deletes it, a crash leaves it.  Only that run reads it — its writer,
        to skip resent frames, and the run itself after its writer died — and
        only in the seconds between a commit and learning its outcome.  Several
        processes may share the file, so whether an owner still runs cannot be
        told from here (another host's pid namespace, a container); instead
        each start notes the value it sees (``meta['writer-seen:<token>']`` =
        ``"<value> <µs>"``), and a marker whose value has not changed for
        ``stale_writer_s`` since a start first saw it is deleted, with its
        note.  Its owner, if it still runs, has committed nothing since, so no
        commit of it awaits an outcome; its next commit writes the marker
        again.  Notes whose marker is gone (a clean stop) are deleted too.
        """
        db = self._db
        assert db is not None
        forgotten = await forget_stale_writers(db, wall_us(), int(self.stale_writer_s * 1_000_000))
        if forgotten:
            self.recovery["stale_writer_markers"] = forgotten
            log.info("audit: deleted %d batch markers of writers idle for %.0f s or more (servers that did not stop cleanly)", forgotten, self.stale_writer_s)

    async def _recover(self) -> None:
        """Repair what a crash can leave: a torn checkpoint-file note, an unsealed tail."""
        if self._checkpoint_path is not None:
            torn = await asyncio.to_thread(repair_checkpoint_file, self._checkpoint_path)
            if torn is not None:
                self.recovery["checkpoint_file_torn"] = len(torn)
        db = self._db
        assert db is not None
        async with db.execute("SELECT seq FROM head WHERE id = 1") as cur:
            head = await cur.fetchone()
        async with db.execute("SELECT COALESCE(MAX(size), 0) FROM checkpoints") as cur:
            last = await cur.fetchone()
        if head is not None and last is not None and int(head[0]) > int(last[0]):
            self.recovery["unsealed_records"] = int(head[0]) - int(last[0])
            log.warning("audit: %d records after the last checkpoint (unclean stop); sealing them", self.recovery["unsealed_records"])
            await self.checkpoint("recovery")

    # -- retention -----------------------------------------------------------

    async def prune(self, now_us: int | None = None) -> int:
        """Delete records older than ``retention_days``, up to a checkpoint (kept).

        First one short transaction moves ``meta['pruned_through']`` to the
        newest checkpoint at or before the first young record; then the
        records at or below it are deleted in chunks of ``prune_chunk``, each
        its own short ``BEGIN IMMEDIATE`` transaction, with a pause between
        chunks at least as long as the chunk took.  So the write lock is never
        held for long: the writer process (and other Warden processes on the
        file) commit between chunks instead of waiting past their busy
        timeout.

        An interrupted prune (crash, stop) leaves records below the mark; the
        log still verifies (``partial_prune`` warning: the checkpoint at the
        mark vouches for them through the chain) and the next prune deletes
        them first.  Returns the pruned-through sequence number of the records
        this call deleted (0 when nothing was deleted).
        """
        if not self.cfg.retention_days:
            return 0
        db = self._db
        assert db is not None
        cutoff = (now_us or wall_us()) - self.cfg.retention_days * 86_400 * 1_000_000
        async with self._prune_lock:
            through = await prune_mark(db, cutoff)
            if not through:
                return 0
            deleted = await prune_delete(db, through, self.prune_chunk, self.prune_pause_s)
        if not deleted:
            return 0
        log.info("audit: retention pruned %d records through seq %d", deleted, through)
        await self.record_event("retention_prune", {"subject": "warden"}, {"through": through, "deleted": deleted, "cutoff_us": cutoff})
        return through

    async def _prune_loop(self) -> None:
        """Prune at once, then hourly: in the background, so that a backlog (retention turned on for a
        large log, a long downtime) does not hold up readiness while it is deleted chunk by chunk."""
        while True:
            try:
                await self.prune()
            except Exception:
                log.exception("audit: retention pruning failed")
            await asyncio.sleep(_PRUNE_EVERY_S)

    async def _close(self) -> None:
        if self._wp is not None:
            await self._wp.stop()
            self._wp = None
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
        if self._db is not None:
            await self._db.close()
            self._db = None
        if self.live_lock is not None:
            self.live_lock.release()  # last: the log is sealed and closed


def build_audit(cfg: Config) -> AuditSink | None:
    """The configured audit store, or ``None`` when ``[audit] enabled = false``."""
    a = cfg.audit
    if not a.enabled:
        return None
    resolved = dataclasses.replace(
        a,
        signing_key_file=str(cfg.resolve_path(a.signing_key_file)) if a.signing_key_file else "",
        checkpoint_file=str(cfg.resolve_path(a.checkpoint_file)) if a.checkpoint_file else "",
    )
    from llm_warden.proxy.secrets import secret_values

    return SQLiteAuditLog(
        resolved,
        cfg.resolve_path(a.path),
        upstream_key=cfg.upstream.api_key,
        held_secrets=secret_values(cfg),
        provider=cfg.upstream.provider_name,
    )
