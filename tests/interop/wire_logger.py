#!/usr/bin/env python3
"""Raw-HTTP logging reverse proxy for capturing MCP Streamable HTTP traffic.

    python wire_logger.py LISTEN_PORT UPSTREAM_URL LOGFILE

Forwards every request to UPSTREAM_URL (same path + query), streaming the response body
back (so SSE works), and appends one JSON object per exchange to LOGFILE (JSON lines):
    {"n":1,"method":"POST","path":"/mcp","req_headers":[[k,v],...],"req_body":"...",
     "status":200,"resp_headers":[[k,v],...],"resp_body":"..."}

Research-only fault injection (env):
    INJECT_RPC_ERROR_TOOL=name   tools/call for this tool is answered by the proxy itself with
                                 HTTP 200 application/json {"jsonrpc":"2.0","id":<id>,"error":{"code":-32003,...}}
    INJECT_RPC_ERROR_STATUS=N    use HTTP status N instead of 200 for that injected error
    INJECT_GET_405=1             GET (standalone SSE stream) answered 405 (no upstream call)
    INJECT_401=1                 every request answered 401 + WWW-Authenticate: Bearer (no upstream call)
Prints "READY <port>" once listening.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys

import httpx
import uvicorn
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

LISTEN_PORT = int(sys.argv[1])
UPSTREAM = sys.argv[2].rstrip("/")
LOGFILE = sys.argv[3]
_counter = itertools.count(1)
_client = httpx.AsyncClient(timeout=httpx.Timeout(30, read=300))
HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


def _log(rec: dict) -> None:
    with open(LOGFILE, "a") as f:
        f.write(json.dumps(rec) + "\n")


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    req = Request(scope, receive)
    body = await req.body()
    n = next(_counter)
    rec = {
        "n": n,
        "method": req.method,
        "path": req.url.path,
        "req_headers": [[k, v] for k, v in req.headers.items()],
        "req_body": body.decode("utf-8", "replace"),
    }

    if os.environ.get("INJECT_401") == "1":
        resp = Response(
            json.dumps({"error": "invalid_token", "error_description": "missing or bad bearer token"}),
            status_code=401,
            media_type="application/json",
            headers={"www-authenticate": 'Bearer error="invalid_token"'},
        )
        rec.update(status=401, resp_headers=[[k, v] for k, v in resp.headers.items()], resp_body=resp.body.decode())
        _log(rec)
        await resp(scope, receive, send)
        return

    if os.environ.get("INJECT_GET_405") == "1" and req.method == "GET":
        resp = Response(status_code=405, headers={"allow": "POST, DELETE"})
        rec.update(status=405, resp_headers=[[k, v] for k, v in resp.headers.items()], resp_body="", injected=True)
        _log(rec)
        await resp(scope, receive, send)
        return

    tool = os.environ.get("INJECT_RPC_ERROR_TOOL")
    if tool and req.method == "POST" and body:
        try:
            msg = json.loads(body)
        except ValueError:
            msg = None
        if isinstance(msg, dict) and msg.get("method") == "tools/call" and (msg.get("params") or {}).get("name") == tool:
            err = {
                "jsonrpc": "2.0",
                "id": msg.get("id"),
                "error": {
                    "code": -32003,
                    "message": "Rate limit exceeded",
                    "data": {"tool": tool, "retry_after_ms": 1000, "policy": "demo"},
                },
            }
            resp = Response(json.dumps(err), status_code=int(os.environ.get("INJECT_RPC_ERROR_STATUS", "200")),
                            media_type="application/json")
            rec.update(status=resp.status_code, resp_headers=[[k, v] for k, v in resp.headers.items()],
                       resp_body=resp.body.decode(), injected=True)
            _log(rec)
            await resp(scope, receive, send)
            return

    fwd_headers = [(k, v) for k, v in req.headers.items() if k.lower() not in HOP]
    url = UPSTREAM + req.url.path + (("?" + req.url.query) if req.url.query else "")
    upstream_req = _client.build_request(req.method, url, headers=fwd_headers, content=body)
    upstream = await _client.send(upstream_req, stream=True)
    rec["status"] = upstream.status_code
    rec["resp_headers"] = [[k, v] for k, v in upstream.headers.items()]
    chunks: list[bytes] = []

    async def gen():
        try:
            async for chunk in upstream.aiter_raw():
                chunks.append(chunk)
                yield chunk
        finally:
            await upstream.aclose()
            rec["resp_body"] = b"".join(chunks).decode("utf-8", "replace")
            _log(rec)

    resp_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP}
    await StreamingResponse(gen(), status_code=upstream.status_code, headers=resp_headers)(scope, receive, send)


async def main():
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=LISTEN_PORT, log_level="warning"))
    t = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    print(f"READY {server.servers[0].sockets[0].getsockname()[1]}", flush=True)
    await t


if __name__ == "__main__":
    asyncio.run(main())
