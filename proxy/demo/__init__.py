"""``warden demo``: Warden on a built-in scripted provider, with sample documents, tools and a guided walk-through.

Nothing here is used by ``warden serve``: the demo starts Warden as any user
would, with a config of its own (:mod:`proxy.demo.content`) whose upstream is
the scripted provider (:mod:`proxy.demo.provider`).
"""
