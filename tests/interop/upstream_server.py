#!/usr/bin/env python3
"""Tiny upstream MCP server for toolgate interop tests.

Works with whichever PyPI `mcp` SDK is installed:
  * mcp 1.x  -> `mcp.server.fastmcp.FastMCP`   (speaks 2024-11-05 .. 2025-11-25, initialize handshake)
  * mcp 2.x  -> `mcp.server.mcpserver.MCPServer` (speaks 2026-07-28 server/discover AND the
                                                  legacy initialize handshake on the same endpoint)

Transport: MCP Streamable HTTP at path /mcp on 127.0.0.1.

Usage:
    python upstream_server.py [PORT]            # PORT default: $UPSTREAM_PORT or 0 (= pick a free port)

Environment knobs (all optional):
    UPSTREAM_PORT          port if not given on argv (0 = ephemeral)
    UPSTREAM_HOST          bind address, default 127.0.0.1
    UPSTREAM_JSON=1        answer POSTs with application/json instead of text/event-stream (SDK default: SSE)
    UPSTREAM_STATELESS=1   SDK "stateless_http" mode (no Mcp-Session-Id issued)
    UPSTREAM_RESUMABLE=1   (1.x only) keep events in an in-memory EventStore, with a 100 ms `retry`: the SDK
                           then sends priming events, and a tool may close its stream for the client to resume
                           with a GET that sends Last-Event-ID (2025-11-25 SSE polling)
    UPSTREAM_TLS_CERT, UPSTREAM_TLS_KEY
                           serve HTTPS (uvicorn's TLS) with this PEM certificate chain and key
    UPSTREAM_DNS_PROTECT=1 keep the SDK's DNS-rebinding protection (Host must be 127.0.0.1:*/localhost:*/[::1]:*,
                           else HTTP 421). Default here: OFF, so a proxy may forward any Host header.

Readiness: once the socket is listening, prints exactly one line to stdout and flushes:
    READY <port>
Then keeps serving until killed (SIGTERM/SIGINT).

Tools:
    get_invoice(invoice_id: str) -> {"invoice_id": <id>, "amount": 42.5, "currency": "EUR", "status": "open"}
    refund(invoice_id: str, amount: float) -> {"ok": true, "invoice_id": <id>, "refunded": <amount>}
        amount <= 0  -> tool error (CallToolResult.isError = true, text "amount must be positive")
    echo(text: str) -> <text>
    confirm_refund(invoice_id: str) -> "refunded <id>" once the client confirms (asks with an
        elicitation: mid-call on 1.x; as an input_required round on 2026-07-28 with 2.x)
    reveal() -> "revealed" (1.x only): adds the tool `hidden() -> "found"` at runtime and sends
        notifications/tools/list_changed with the SDK's `ctx.session.send_tool_list_changed()`,
        which carries no related request id, so the 1.x transport sends it on the standalone GET
        stream of the calling session only (dropped if that session has none open)
    polled_report(steps: int) -> "report of <steps> steps" (1.x, UPSTREAM_RESUMABLE=1): logs, closes
        its own event stream with `ctx.close_sse_stream()`, works on, logs again and answers; the
        client hears the rest only if it resumes the stream
"""

from __future__ import annotations

import asyncio
import os
import sys
from importlib.metadata import version as _dist_version

MCP_VERSION = _dist_version("mcp")
MCP_MAJOR = int(MCP_VERSION.split(".")[0])

HOST = os.environ.get("UPSTREAM_HOST", "127.0.0.1")
PORT = int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ.get("UPSTREAM_PORT", "0"))
JSON_RESPONSE = os.environ.get("UPSTREAM_JSON", "") == "1"
STATELESS = os.environ.get("UPSTREAM_STATELESS", "") == "1"
DNS_PROTECT = os.environ.get("UPSTREAM_DNS_PROTECT", "") == "1"
RESUMABLE = os.environ.get("UPSTREAM_RESUMABLE", "") == "1"

if MCP_MAJOR >= 2:
    from mcp.server.mcpserver import MCPServer as _Server
    from mcp.server.mcpserver.exceptions import ToolError
else:
    from mcp.server.fastmcp import FastMCP as _Server
    from mcp.server.fastmcp.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings

if DNS_PROTECT:
    _security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=["127.0.0.1:*", "localhost:*", "[::1]:*"],
        allowed_origins=["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"],
    )
else:
    _security = TransportSecuritySettings(enable_dns_rebinding_protection=False)

if MCP_MAJOR >= 2:
    mcp = _Server("toolgate-upstream", version=MCP_VERSION)
else:
    _resumable = {}
    if RESUMABLE:
        from mcp.server.streamable_http import EventMessage, EventStore

        class _Events(EventStore):
            """Every event in memory, in order (a test's lifetime)."""

            def __init__(self) -> None:
                self._events: list[tuple[str, str, object]] = []

            async def store_event(self, stream_id, message):
                event_id = str(len(self._events) + 1)
                self._events.append((event_id, stream_id, message))
                return event_id

            async def replay_events_after(self, last_event_id, send_callback):
                at = next((i for i, e in enumerate(self._events) if e[0] == last_event_id), None)
                if at is None:
                    return None
                stream_id = self._events[at][1]
                for event_id, sid, message in self._events[at + 1 :]:
                    if sid == stream_id and message is not None:
                        await send_callback(EventMessage(message, event_id))
                return stream_id

        _resumable = {"event_store": _Events(), "retry_interval": 100}
    mcp = _Server(
        "toolgate-upstream",
        **_resumable,
        host=HOST,
        json_response=JSON_RESPONSE,
        stateless_http=STATELESS,
        transport_security=_security,
        log_level="WARNING",
    )


@mcp.tool()
def get_invoice(invoice_id: str) -> dict:
    """Look up an invoice by id."""
    return {"invoice_id": invoice_id, "amount": 42.5, "currency": "EUR", "status": "open"}


@mcp.tool()
def refund(invoice_id: str, amount: float) -> dict:
    """Refund (part of) an invoice."""
    if amount <= 0:
        raise ToolError("amount must be positive")
    return {"ok": True, "invoice_id": invoice_id, "refunded": amount}


@mcp.tool()
def echo(text: str) -> str:
    """Echo the text back."""
    return text


if MCP_MAJOR < 2:
    # Asks the user before refunding, mid-call (2025-11-25 elicitation/create).
    from pydantic import BaseModel

    from mcp.server.fastmcp import Context

    class Confirmation(BaseModel):
        ok: bool

    @mcp.tool()
    async def confirm_refund(invoice_id: str, ctx: Context) -> str:
        """Refund an invoice once the user confirms."""
        answer = await ctx.elicit(message=f"Refund invoice {invoice_id}?", schema=Confirmation)
        ok = answer.action == "accept" and answer.data is not None and answer.data.ok
        return f"refunded {invoice_id}" if ok else f"kept {invoice_id}"

    def hidden() -> str:
        """Offered once `reveal` was called."""
        return "found"

    _revealed = {"done": False}

    @mcp.tool()
    async def reveal(ctx: Context) -> str:
        """Offer one more tool (`hidden`) and tell the client the tool list changed."""
        if not _revealed["done"]:
            mcp.add_tool(hidden)
            _revealed["done"] = True
        await ctx.session.send_tool_list_changed()
        return "revealed"

if MCP_MAJOR < 2 and RESUMABLE:

    @mcp.tool()
    async def polled_report(steps: int, ctx: Context) -> str:
        """Work in steps, closing the stream for the client to come back for the answer."""
        await ctx.info(f"starting {steps} steps")
        await ctx.close_sse_stream()
        await asyncio.sleep(0.3)
        await ctx.info(f"finished {steps} steps")
        return f"report of {steps} steps"

if MCP_MAJOR >= 2:
    # Asks the user before refunding: on 2026-07-28 the SDK answers the first
    # round with an `input_required` result and completes on the retry that
    # carries the answer; on 2025-11-25 it sends `elicitation/create` mid-call.
    from typing import Annotated

    from pydantic import BaseModel

    from mcp.server.mcpserver import Elicit, Resolve

    class Confirmation(BaseModel):
        ok: bool

    def _ask(invoice_id: str) -> Elicit[Confirmation]:
        return Elicit(f"Refund invoice {invoice_id}?", Confirmation)

    @mcp.tool()
    def confirm_refund(invoice_id: str, confirmation: Annotated[Confirmation, Resolve(_ask)]) -> str:
        """Refund an invoice once the user confirms."""
        return f"refunded {invoice_id}" if confirmation.ok else f"kept {invoice_id}"


def _build_app():
    if MCP_MAJOR >= 2:
        return mcp.streamable_http_app(
            streamable_http_path="/mcp",
            json_response=JSON_RESPONSE,
            stateless_http=STATELESS,
            transport_security=_security,
            host=HOST,
        )
    return mcp.streamable_http_app()


async def _main() -> None:
    import uvicorn

    app = _build_app()
    tls = {}
    if os.environ.get("UPSTREAM_TLS_CERT"):
        tls = {
            "ssl_certfile": os.environ["UPSTREAM_TLS_CERT"],
            "ssl_keyfile": os.environ["UPSTREAM_TLS_KEY"],
        }
    config = uvicorn.Config(app, host=HOST, port=PORT, log_level="warning", lifespan="on", **tls)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()  # re-raise startup error
            raise SystemExit("uvicorn exited before start")
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    print(f"READY {port}", flush=True)
    await task


if __name__ == "__main__":
    try:
        asyncio.run(_main())
    except KeyboardInterrupt:
        pass
