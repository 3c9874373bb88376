#!/usr/bin/env python3
"""Call tools through toolgate with the official MCP Python SDK (1.x or 2.x).

    export TOOLGATE_URL=http://127.0.0.1:8080/mcp
    export TOOLGATE_TOKEN=$(toolgate token --config toolgate.yaml --agent billing-bot)
    python examples/python_client.py billing__get_invoice '{"invoice_id": "INV-000042"}'

Lists the tools this agent may call, then calls one. A refusal from toolgate
arrives as a JSON-RPC error whose `data` says why (decision, rule,
request_id; hold_id when a human must approve): this prints it and exits 1.
"""

import asyncio
import json
import os
import sys
from contextlib import asynccontextmanager
from importlib.metadata import version

MAJOR = int(version("mcp").split(".")[0])

if MAJOR >= 2:
    from mcp.shared.exceptions import MCPError as RpcError
else:
    from mcp.shared.exceptions import McpError as RpcError


@asynccontextmanager
async def connect(url, token):
    """A connected client: 2.x `Client` (2026-07-28, falls back to 2025-11-25)
    or 1.x `ClientSession` (2025-11-25). Both have list_tools/call_tool."""
    headers = {"Authorization": f"Bearer {token}"}
    from mcp.client.streamable_http import streamable_http_client
    if MAJOR >= 2:
        import httpx2
        from mcp import Client

        async with httpx2.AsyncClient(headers=headers, timeout=60) as http:
            async with Client(streamable_http_client(url, http_client=http)) as client:
                yield client
    else:
        from mcp import ClientSession
        from mcp.shared._httpx_utils import create_mcp_http_client

        async with create_mcp_http_client(headers=headers) as http:
            async with streamable_http_client(url, http_client=http) as (read, write, _):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    yield session


def error_parts(e):
    err = getattr(e, "error", e)
    return getattr(err, "code", None), getattr(err, "message", str(e)), getattr(err, "data", None)


async def main(url, token, tool, args):
    async with connect(url, token) as client:
        tools = await client.list_tools()
        print("tools:", ", ".join(sorted(t.name for t in tools.tools)))
        try:
            result = await client.call_tool(tool, args)
        except RpcError as e:
            code, message, data = error_parts(e)
            print(json.dumps({"error": {"code": code, "message": message, "data": data}}))
            return 1
        text = "\n".join(c.text for c in result.content if getattr(c, "type", "") == "text")
        failed = bool(getattr(result, "is_error", getattr(result, "isError", False)))  # 2.x / 1.x spelling
        print(json.dumps({"ok": not failed, "text": text}))
        return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(asyncio.run(main(os.environ["TOOLGATE_URL"], os.environ["TOOLGATE_TOKEN"], sys.argv[1], json.loads(sys.argv[2]))))
