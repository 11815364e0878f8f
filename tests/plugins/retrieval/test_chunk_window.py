"""Chunks fit the embedder's window in its own wordpieces, title and heading path included."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from llm_warden.plugins.retrieval.acl import Acl
from llm_warden.plugins.retrieval.chunking import approx_tokens, chunk_text
from llm_warden.plugins.retrieval.embed_local import MAX_TOKENS, LocalEmbedder
from llm_warden.plugins.retrieval.records import DocumentInput, index_head, index_text
from tests.plugins.retrieval.conftest import ServiceFactory

TITLE = "Retinoid X receptor heterodimerization and 9-cis-retinoic acid signalling in CD4+ T-lymphocytes: a systematic review"
SENTENCES = [
    "RXRα/PPARγ heterodimers bind DR-1 elements and recruit SRC-1 (NCoA-1) coactivators in 3T3-L1 preadipocytes.",
    "Knockdown of RXRs by siRNA reduced IL-6, TNF-α and IFN-γ mRNAs 2.7-fold (p<0.001, n=12) after LPS stimulation.",
    "In Apoe−/− mice, bexarotene (LG100268) raised HDL-C by 38% but increased hepatic SREBP-1c and triglycerides.",
    "ChIP-seq of HepG2 cells identified 4,218 RXR-bound loci, 61% overlapping LXRβ peaks within ±500 bp of TSSs.",
    "Single-cell RNA-seq (10x Chromium v3) resolved FOXP3+ Tregs whose CTLA-4 expression depended on RARα signalling.",
]


def scientific_markdown(paragraphs: int = 6) -> str:
    parts = ["# Background", ""]
    for p in range(paragraphs):
        parts.append(" ".join(SENTENCES[(p + i) % len(SENTENCES)] for i in range(9)))
        parts.append("")
        if p == 2:
            parts += ["## Methods and statistical analysis of heterodimer occupancy", ""]
    return "\n".join(parts)


@pytest.fixture(scope="module")
def embedder() -> Iterator[LocalEmbedder]:
    yield LocalEmbedder()


def over_window(e: LocalEmbedder, title: str, chunks: list[tuple[tuple[str, ...], str]]) -> list[int]:
    return [n for p, t in chunks if (n := e.special_tokens + e.count_tokens(index_text(title, p, t))) > MAX_TOKENS]


def test_the_estimate_without_the_title_lets_chunks_exceed_the_window(embedder: LocalEmbedder) -> None:
    """What the window check guards against: sized by the character estimate and without the title, chunks overflow."""
    chunks = chunk_text(scientific_markdown(), "markdown", 200)
    assert all(c.tokens <= 200 for c in chunks)
    wordpieces = sum(embedder.count_tokens(c.text) for c in chunks)
    assert wordpieces > 1.1 * sum(approx_tokens(c.text) for c in chunks), "the estimate under-counts this prose by over 10%"
    assert over_window(embedder, TITLE, [(c.heading_path, c.text) for c in chunks])


def test_chunks_sized_with_the_models_tokenizer_and_the_title_fit(embedder: LocalEmbedder) -> None:
    def reserve(path: tuple[str, ...]) -> int:
        return embedder.special_tokens + embedder.count_tokens(index_head(TITLE, path))

    chunks = chunk_text(scientific_markdown(), "markdown", 250, count=embedder.count_tokens, window=MAX_TOKENS, reserve=reserve)
    assert len(chunks) > 3
    assert over_window(embedder, TITLE, [(c.heading_path, c.text) for c in chunks]) == []
    assert all(c.tokens == embedder.count_tokens(c.text) for c in chunks)


def test_the_estimate_counts_the_title_too() -> None:
    chunks = chunk_text(scientific_markdown(), "markdown", 200, window=220, reserve=lambda path: approx_tokens(index_head(TITLE, path)))
    assert all(approx_tokens(index_text(TITLE, c.heading_path, c.text)) <= 220 for c in chunks)


async def test_no_stored_chunk_exceeds_the_local_embedders_window(service_factory: ServiceFactory, embedder: LocalEmbedder) -> None:
    svc = await service_factory(embedder="local", mode="hybrid", chunk_tokens=250)
    text = scientific_markdown(10) + "\n\n| gene | fold change | p |\n|---|---|---|\n" + "\n".join(
        f"| RXR{chr(65 + i % 3)}-{i} | {1 + i / 10:.1f} | <0.0{i % 9 + 1} |" for i in range(80)) + "\n\n```r\n" + "\n".join(
        f"fit_{i} <- glm(RXRa_expr ~ dose_{i} + batch, family = poisson(link = 'log'), data = cohort[[{i}]])" for i in range(60)) + "\n```\n"
    await svc.upsert(DocumentInput("acme", "review", text, Acl(public=True), title=TITLE, uri="review.md"))
    rows = [r for batch, _ in [b async for b in svc.store.iter_chunks(with_vector=False)] for r in batch]
    assert len(rows) > 5 and sum(r.kind == "code" for r in rows) > 1
    assert max(embedder.special_tokens + embedder.count_tokens(r.index_text) for r in rows) <= MAX_TOKENS
    assert all(r.tokens == embedder.count_tokens(r.text) for r in rows)
