"""Permission-scoped retrieval: store of record, chunking, engines, injection and citations.

The plugin class is :class:`plugins.retrieval.plugin.RetrievalPlugin` (entry
point ``retrieval``); ``docs/retrieval.md`` describes the whole concern.
"""
