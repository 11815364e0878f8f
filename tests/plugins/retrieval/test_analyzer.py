"""The lexical analyzer's acronym-plural rule, and the rebuild of an index whose terms another analyzer made."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_warden.plugins.retrieval import lexical, tokenize
from llm_warden.plugins.retrieval.acl import Acl, IndexedChunk, Reader
from llm_warden.plugins.retrieval.applier import STATE_FILE
from llm_warden.plugins.retrieval.lexical import LexicalIndex
from llm_warden.plugins.retrieval.records import DocumentInput
from llm_warden.plugins.retrieval.tokenize import ANALYZER, fold_acronym_plurals, index_terms, query_terms
from tests.plugins.retrieval.conftest import ServiceFactory

READER = Reader("acme", "ann")


@pytest.mark.parametrize(("text", "folded"), [
    ("RXRs", "RXR"), ("mRNAs", "mRNA"), ("GPUs", "GPU"), ("IDs", "ID"), ("PhDs", "PhD"), ("COVID19s", "COVID19"),
    ("the RXRs, (mRNAs).", "the RXR, (mRNA)."), ("foo_RXRs", "foo_RXR"),
    # not acronym plurals: left alone
    ("Gas", "Gas"), ("Kansas", "Kansas"), ("MyClass", "MyClass"), ("iPads", "iPads"), ("Ms", "Ms"), ("US", "US"),
    ("AWS", "AWS"), ("HTTPHeaders", "HTTPHeaders"), ("RXRsx", "RXRsx"), ("xRXRs2", "xRXRs2"),
])
def test_acronym_plurals_fold_to_the_singular(text: str, folded: str) -> None:
    assert fold_acronym_plurals(text) == folded


def test_snowball_alone_keeps_acronym_plurals_apart() -> None:
    """Why the rule exists: the English Snowball stemmer does not strip these plurals."""
    assert tokenize._analyzer(stopwords=False).analyze("RXRs mRNAs RXR mRNA") == ["rxrs", "mrnas", "rxr", "mrna"]
    assert index_terms("RXRs mRNAs RXR mRNA") == ["rxr", "mrna", "rxr", "mrna"]
    assert query_terms("the RXRs") == query_terms("RXR") == ["rxr"]


def test_a_query_for_either_form_finds_the_other() -> None:
    ix = LexicalIndex(None)
    ix.upsert([
        IndexedChunk("acme/a#0", "acme", "a", "RXRs form heterodimers with PPAR.", Acl(public=True)),
        IndexedChunk("acme/b#0", "acme", "b", "Each mRNA is read by ribosomes.", Acl(public=True)),
        IndexedChunk("acme/c#0", "acme", "c", "Natural gas prices in Kansas.", Acl(public=True)),
    ])
    ix.commit()
    assert [c for c, _ in ix.search(READER, "RXR heterodimer", 10)] == ["acme/a#0"]
    assert [c for c, _ in ix.search(READER, "stability of mRNAs", 10)] == ["acme/b#0"]
    assert [c for c, _ in ix.search(READER, "kansas", 10)] == ["acme/c#0"]
    ix.set_acl("acme", "a", Acl(public=True))
    ix.commit()
    assert [c for c, _ in ix.search(READER, "RXR", 10)] == ["acme/a#0"], "re-added from the stored body, still folded"


async def test_an_index_made_by_the_previous_analyzer_is_rebuilt_at_start(service_factory: ServiceFactory, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        m.setattr(lexical, "fold_acronym_plurals", lambda text: text)  # the analyzer before the rule
        old = await service_factory("idx", mode="bm25", embedder=False)
        await old.upsert(DocumentInput("acme", "a", "RXRs form heterodimers with PPAR.", Acl(public=True)))
        assert (await old.search(READER, "RXR")).hits == []
        await old.close()
    state_path = tmp_path / "idx-index" / STATE_FILE
    state = json.loads(state_path.read_text())
    state.pop("lexical_analyzer")  # what a state file written before analyzers were versioned holds
    state_path.write_text(json.dumps(state))

    new = await service_factory("idx", mode="bm25", embedder=False)
    assert [h.doc_id for h in (await new.search(READER, "RXR")).hits] == ["a"]
    assert json.loads(state_path.read_text())["lexical_analyzer"] == ANALYZER
