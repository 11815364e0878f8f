"""The text analyzer shared by indexing, querying and the ranking guard.

The lexical index stores chunk text with tantivy's built-in ``en_stem`` analyzer
(Unicode word split, tokens of 40+ bytes dropped, lowercase, English Snowball
stemmer). Queries go through the *same* chain built from tantivy's own
components plus an English stopword filter, so a query term is exactly the term
the index holds. Stopwords are dropped from queries only: they are in almost
every chunk, add nothing to ranking and dominate the cost of an ORed query.

Before either chain, :func:`fold_acronym_plurals` writes the plural of an acronym
as its singular (``RXRs`` -> ``RXR``, ``mRNAs`` -> ``mRNA``, ``GPUs`` -> ``GPU``): the
Snowball stemmer removes a plural ``s`` only after a vowel that is not right before
it, so it leaves ``rxrs`` and ``mrnas`` as terms of their own and a query for one
form never finds the other.  A word is folded when it ends in a lower-case ``s``
after a capital letter or a digit and has at least two capitals before that ``s``;
ordinary words (``Gas``, ``Kansas``) and class names (``MyClass``) are untouched.
The lexical index records :data:`ANALYZER` and is rebuilt when it changes.
"""

from __future__ import annotations

import re
import threading

import tantivy

INDEX_TOKENIZER = "en_stem"
"""Name of tantivy's built-in analyzer used for the body field."""

ANALYZER = "en_stem+acronym_plurals/1"
"""The analysis the lexical index's terms were made with; a change rebuilds the index from the store."""

_ACRONYM_PLURAL = re.compile(r"(?<![^\W_])([^\W_]*?[A-Z0-9])s(?![^\W_])")


def _fold(m: re.Match[str]) -> str:
    stem = m.group(1)
    return stem if sum(ch.isupper() for ch in stem) >= 2 else m.group(0)


def fold_acronym_plurals(text: str) -> str:
    """``text`` with acronym plurals written as their singular (see the module docstring)."""
    return _ACRONYM_PLURAL.sub(_fold, text)

MAX_QUERY_CHARS = 32_768
"""Query text beyond this many characters is ignored (bounded work per request)."""

MAX_QUERY_TERMS = 64
"""At most this many distinct query terms are searched (the rarest are kept)."""

ENGLISH_STOPWORDS: frozenset[str] = frozenset(
    """
    a about above after again against all am an and any are aren't as at be because been before being below
    between both but by can can't cannot could couldn't did didn't do does doesn't doing don't down during each
    few for from further had hadn't has hasn't have haven't having he he'd he'll he's her here here's hers herself
    him himself his how how's i i'd i'll i'm i've if in into is isn't it it's its itself let's me more most mustn't
    my myself no nor not of off on once only or other ought our ours ourselves out over own same shan't she she'd
    she'll she's should shouldn't so some such than that that's the their theirs them themselves then there there's
    these they they'd they'll they're they've this those through to too under until up very was wasn't we we'd
    we'll we're we've were weren't what what's when when's where where's which while who who's whom why why's with
    won't would wouldn't you you'd you'll you're you've your yours yourself yourselves
    s t d ll m o re ve y just also
    """.split()
)
"""English stopwords dropped from queries (the Snowball list; contractions split by the tokenizer)."""


def _analyzer(stopwords: bool) -> tantivy.TextAnalyzer:
    builder = tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple()).filter(tantivy.Filter.remove_long(40))
    builder = builder.filter(tantivy.Filter.lowercase())
    if stopwords:
        builder = builder.filter(tantivy.Filter.custom_stopword(sorted(ENGLISH_STOPWORDS)))
    return builder.filter(tantivy.Filter.stemmer("english")).build()


class _Analyzers(threading.local):
    """One analyzer pair per thread: tantivy analyzers are stateful token streams."""

    def __init__(self) -> None:
        self.index = _analyzer(stopwords=False)
        self.query = _analyzer(stopwords=True)


_ANALYZERS = _Analyzers()


def index_terms(text: str) -> list[str]:
    """The terms tantivy's ``en_stem`` indexes for ``text``, in order, with repeats."""
    return list(_ANALYZERS.index.analyze(fold_acronym_plurals(text)))


def query_terms(text: str) -> list[str]:
    """The distinct searchable terms of user text, in first-seen order, stopwords dropped.

    Never raises on any string: the text is only tokenized, never parsed as query
    syntax. At most :data:`MAX_QUERY_CHARS` characters are read.
    """
    seen: dict[str, None] = {}
    for term in _ANALYZERS.query.analyze(fold_acronym_plurals(text[:MAX_QUERY_CHARS])):
        seen.setdefault(term, None)
    return list(seen)
