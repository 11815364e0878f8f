"""Warden, installed: the repository's ``proxy/`` (the core) is ``llm_warden.proxy``, its ``plugins/`` ``llm_warden.plugins``.

The folders stay at the top of the checkout; ``.pkg/llm_warden`` holds this file and
links to them, so that what an install puts in site-packages claims one name of
Warden's own rather than the generic ``proxy`` and ``plugins``.
"""
