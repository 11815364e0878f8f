"""The MCP gateway: upstream MCP servers served at ``/mcp/{server}`` through the one pipeline.

- :mod:`proxy.mcp.config` — ``[mcp]`` and ``[[mcp.servers]]``;
- :mod:`proxy.mcp.jsonrpc` — bounded JSON-RPC parsing, the method allow-lists, error bodies;
- :mod:`proxy.mcp.sessions` — sealed session ids (principal-bound, readable by every replica);
- :mod:`proxy.mcp.upstream` — Streamable HTTP upstreams and supervised stdio servers;
- :mod:`proxy.mcp.pins` — tool description/schema digests and the operator-accepted store;
- :mod:`proxy.mcp.gateway` — lifecycle, admin API, metrics;
- :mod:`proxy.mcp.flow` — the flow the pipeline runs for an MCP route.

The protocol adapter (wire format of replies and refusals) is
:mod:`proxy.protocols.mcp`.  See docs/mcp.md.
"""
