"""The GCRA lives in :mod:`proxy.gcra` (the tools plugin rate-limits with it too).

The names below are re-exported for ``plugins/ratelimit/plugin.py`` and its
tests, which still import them from here.
"""

from proxy.gcra import LimitResult, parse_rate

__all__ = ["LimitResult", "parse_rate"]
