"""Citations: ``[n]`` markers in the answer mapped back to the injected chunks.

A marker ``[n]`` (also ``[1, 3]`` and ``[1][2]``) names the ``n``-th injected
context entry.  Each distinct number becomes one record ``{n, doc_id,
chunk_id, valid}``; a number that was never provided is ``valid: false``
(an invalid citation: the model cited something it was not given).
"""

from __future__ import annotations

from urllib.parse import quote

from llm_warden.proxy.exchange import CITATION_MARKER as _MARKER_RE
from llm_warden.proxy.exchange import Citation, RetrievedChunk

MAX_CITATIONS = 100


def find_markers(text: str) -> list[int]:
    """Distinct citation numbers in order of first appearance (at most ``MAX_CITATIONS``)."""
    seen: dict[int, None] = {}
    for m in _MARKER_RE.finditer(text):
        for part in m.group(1).split(","):
            seen.setdefault(int(part), None)
            if len(seen) >= MAX_CITATIONS:
                return list(seen)
    return list(seen)


def map_citations(text: str | None, retrieved: list[RetrievedChunk]) -> list[Citation]:
    """Citations for the markers in ``text`` against the injected chunks."""
    if not text:
        return []
    provided = {c.citation: c for c in retrieved if c.injected and c.citation is not None}
    out: list[Citation] = []
    for n in find_markers(text):
        chunk = provided.get(n)
        if chunk is None:
            out.append(Citation(n, False))
        else:
            out.append(Citation(n, True, chunk.doc_id, chunk.chunk_id))
    return out


def header_value(citations: list[Citation]) -> tuple[str, str]:
    """(``x-warden-citations``, ``x-warden-citations-invalid``) values: ``1=doc-a,3=doc-b`` and ``7,9``.

    Document ids are percent-encoded so a comma, ``=`` or line break in an id
    cannot forge another entry or header.
    """
    valid = ",".join(f"{c.n}={quote(str(c.doc_id), safe='-._~/:@')}" for c in citations if c.valid)
    invalid = ",".join(str(c.n) for c in citations if not c.valid)
    return valid, invalid
