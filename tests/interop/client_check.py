#!/usr/bin/env python3
"""MCP client probe for toolgate interop tests (works with PyPI `mcp` 1.x and 2.x).

Connects with the installed SDK's own Streamable HTTP client, runs scenarios, and prints
ONE JSON OBJECT PER LINE on stdout (keys sorted, compact separators). Nothing else is
printed on stdout; SDK logging goes to stderr.

Environment:
    TOOLGATE_URL     required, e.g. http://127.0.0.1:8080/mcp
    TOOLGATE_TOKEN   optional; sent as "Authorization: Bearer <token>" on every HTTP request
    TOOLGATE_MODE    2.x only: "auto" (default: server/discover probe, falls back to initialize),
                     "legacy" (initialize handshake only), or "2026-07-28" (pin modern, no probe).
                     Ignored by 1.x (which always does the initialize handshake).
    TOOLGATE_TIMEOUT per-request read timeout in seconds (default 30)
    TOOLGATE_CONFIRM answer every elicitation with accept {"ok": true}, printing
                     {"scenario":"elicited","message":...} for each

Usage:
    client_check.py SCENARIO [SCENARIO ...]
Scenarios (argv tokens, consumed left to right):
    list_tools                      -> {"scenario":"list_tools","ok":true,"tools":["echo","get_invoice","refund"]}
    call TOOL ARGS_JSON             -> see "call result" below (repeatable)
    wait_tools_changed SECONDS      -> {"scenario":"tools_changed","ok":true|false}: whether a
                                       notifications/tools/list_changed arrived (within SECONDS) since
                                       connecting or the last list_tools (the SDK's own GET stream on
                                       the session-based revisions)
    listen                          -> 2.x on 2026-07-28: {"scenario":"listen","ok":true,"honored":{...}}
                                       (subscriptions/listen for tool and prompt list changes; the
                                       acknowledged subset)
    calls N TOOL ARGS_JSON          -> N back-to-back sequential calls, e.g. to trip a rate limit:
        {"scenario":"calls","tool":T,"n":N,"codes":[0,0,-32003,...],"ok_count":k,"error_count":m,
         "errors":[<first error object, or omitted if none>]}
        codes[i] is 0 for a JSON-RPC success (even if the tool result has isError=true),
        otherwise the JSON-RPC error code of call i.

First line is always the connect line:
    {"scenario":"connect","ok":true,"sdk":"1.30.0","sdk_major":1,"protocol_version":"2025-11-25",
     "server_name":"toolgate-upstream","era":"handshake"|"modern"}
    or, if connecting fails (exit status 3):
    {"scenario":"connect","ok":false,"code":<int|null>,"message":"...","data":<any>,"exception":"TypeName",
     "http_status":<int|null>}
    http_status is filled when the SDK raised an HTTPStatusError (1.x does that for any non-2xx,
    non-404 HTTP answer, e.g. 401/429); the 2.x SDK instead maps a non-2xx answer without a JSON-RPC
    body to code -32603 "Server returned an error response" (404 -> -32601 / -32600), so there
    http_status is null.

call result:
    JSON-RPC success:
      {"scenario":"call","tool":T,"ok":true,"is_error":false|true,"text":"<all text content joined by \\n>",
       "structured":<structuredContent or null>,"result":<see below>}
      "result" = structured["result"] if structured is exactly {"result": x} (SDK wrapping of non-object
      returns), else structured if not null, else the text parsed as JSON if it starts with "{" or "[" and
      parses, else the text. (Both SDKs return a `-> dict` tool's value as JSON text with structured=null.)
      is_error=true means the TOOL failed (CallToolResult.isError), e.g. refund with amount <= 0.
    JSON-RPC error (the SDK raised McpError / MCPError):
      {"scenario":"call","tool":T,"ok":false,"code":-32003,"message":"...","data":<error.data or null>}

Exit status:
    0  every scenario ran (JSON-RPC errors are reported, not fatal)
    1  an unexpected exception during a scenario: a line
       {"scenario":<name>,"ok":false,"exception":..,"code":..,"message":..,"data":..,"http_status":..}
       is printed (e.g. a 1.x client whose transport died on an HTTP 429/401), remaining scenarios are skipped
    2  usage error
    3  connect failed
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from contextlib import asynccontextmanager
from importlib.metadata import version as _dist_version
from typing import Any

MCP_VERSION = _dist_version("mcp")
MCP_MAJOR = int(MCP_VERSION.split(".")[0])

if MCP_MAJOR >= 2:
    from mcp.shared.exceptions import MCPError as _RpcError  # .code/.message/.data, .error: ErrorData
else:
    from mcp.shared.exceptions import McpError as _RpcError  # .error: ErrorData(code, message, data)


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str) + "\n")
    sys.stdout.flush()


def rpc_error_fields(exc: BaseException) -> dict | None:
    """Return {"code","message","data"} if exc (or a sub-exception of an ExceptionGroup) is a JSON-RPC error."""
    if isinstance(exc, _RpcError):
        err = exc.error
        return {"code": err.code, "message": err.message, "data": err.data}
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = rpc_error_fields(sub)
            if found is not None:
                return found
    return None


def _dump(obj: Any) -> Any:
    if obj is None:
        return None
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json", by_alias=True, exclude_none=True)
    return obj


def summarize_result(res: Any) -> dict:
    is_error = bool(getattr(res, "isError", None) or getattr(res, "is_error", None))
    texts = [c.text for c in (res.content or []) if getattr(c, "type", None) == "text"]
    structured = getattr(res, "structuredContent", None)
    if structured is None:
        structured = getattr(res, "structured_content", None)
    structured = _dump(structured)
    text = "\n".join(texts)
    if isinstance(structured, dict) and set(structured) == {"result"}:
        result = structured["result"]
    elif structured is not None:
        result = structured
    else:
        result = text
        if text[:1] in ("{", "["):
            try:
                result = json.loads(text)
            except ValueError:
                pass
    return {"ok": True, "is_error": is_error, "text": text, "structured": structured, "result": result}


class Facade:
    """Uniform view over the 1.x ClientSession and the 2.x Client (both expose list_tools/call_tool)."""

    def __init__(self, session: Any, info: dict, tools_changed: asyncio.Event):
        self.session, self.info, self.tools_changed = session, info, tools_changed

    async def list_tools(self) -> list[str]:
        self.tools_changed.clear()
        res = await self.session.list_tools()
        return sorted(t.name for t in res.tools)

    async def call_tool(self, name: str, args: dict) -> Any:
        return await self.session.call_tool(name, args)


@asynccontextmanager
async def connect(url: str, token: str | None, mode: str, timeout: float):
    """Yield a connected Facade. Everything runs in the caller's task (the SDKs need that)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    tools_changed = asyncio.Event()

    async def on_message(msg):  # noqa: ANN001 - a notification, a server request, or an exception
        if getattr(getattr(msg, "root", msg), "method", None) == "notifications/tools/list_changed":
            tools_changed.set()

    if MCP_MAJOR >= 2:
        import httpx2
        from mcp import Client
        from mcp.client.streamable_http import streamable_http_client
        from mcp_types.version import MODERN_PROTOCOL_VERSIONS

        async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(timeout, read=max(timeout, 300))) as http:
            extra = {"message_handler": on_message}
            if os.environ.get("TOOLGATE_CONFIRM"):
                import mcp_types

                async def confirm(_ctx, params):  # noqa: ANN001
                    emit({"scenario": "elicited", "message": params.message})
                    return mcp_types.ElicitResult(action="accept", content={"ok": True})

                extra["elicitation_callback"] = confirm
            async with Client(
                streamable_http_client(url, http_client=http),
                mode=mode,
                read_timeout_seconds=timeout,
                cache=None,
                **extra,
            ) as client:
                s = client.session
                pv = s.protocol_version
                server_info = getattr(client, "server_info", None) or getattr(s, "server_info", None)
                yield Facade(
                    client,
                    {
                        "protocol_version": pv,
                        "era": "modern" if pv in MODERN_PROTOCOL_VERSIONS else "handshake",
                        "server_name": getattr(server_info, "name", None),
                    },
                    tools_changed,
                )
    else:
        from datetime import timedelta

        from mcp import ClientSession
        from mcp.client.streamable_http import streamable_http_client
        from mcp.shared._httpx_utils import create_mcp_http_client

        extra = {"message_handler": on_message}
        if os.environ.get("TOOLGATE_CONFIRM"):
            from mcp import types as mcp_types

            async def confirm(_ctx, params):  # noqa: ANN001
                emit({"scenario": "elicited", "message": params.message})
                return mcp_types.ElicitResult(action="accept", content={"ok": True})

            extra["elicitation_callback"] = confirm
        async with create_mcp_http_client(headers=headers) as http:
            async with streamable_http_client(url, http_client=http) as (read, write, _get_sid):
                async with ClientSession(
                    read, write, read_timeout_seconds=timedelta(seconds=timeout), **extra
                ) as session:
                    init = await session.initialize()
                    yield Facade(
                        session,
                        {
                            "protocol_version": init.protocolVersion,
                            "era": "handshake",
                            "server_name": init.serverInfo.name,
                        },
                        tools_changed,
                    )


async def one_call(conn: Facade, tool: str, args: dict) -> dict:
    try:
        res = await conn.call_tool(tool, args)
    except Exception as exc:  # noqa: BLE001
        fields = rpc_error_fields(exc)
        if fields is None:
            raise
        return {"ok": False, **fields}
    return summarize_result(res)


def http_status_of(exc: BaseException) -> int | None:
    """HTTP status from an httpx/httpx2 HTTPStatusError anywhere inside exc (1.x raises these on non-2xx)."""
    resp = getattr(exc, "response", None)
    if resp is not None and hasattr(resp, "status_code") and type(exc).__name__ == "HTTPStatusError":
        return resp.status_code
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            st = http_status_of(sub)
            if st is not None:
                return st
    return None


def leaf_exception(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def parse_scenarios(argv: list[str]) -> list[tuple]:
    out: list[tuple] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "list_tools":
            out.append(("list_tools",))
            i += 1
        elif tok == "call":
            out.append(("call", argv[i + 1], json.loads(argv[i + 2])))
            i += 3
        elif tok == "calls":
            out.append(("calls", int(argv[i + 1]), argv[i + 2], json.loads(argv[i + 3])))
            i += 4
        elif tok == "listen":
            out.append(("listen",))
            i += 1
        elif tok == "wait_tools_changed":
            out.append(("wait_tools_changed", float(argv[i + 1])))
            i += 2
        else:
            raise ValueError(f"unknown scenario {tok!r}")
    return out


async def run_scenarios(conn: Facade, scenarios: list[tuple], state: dict) -> None:
    for sc in scenarios:
        state["current"] = sc[0]
        if sc[0] == "list_tools":
            emit({"scenario": "list_tools", "ok": True, "tools": await conn.list_tools()})
        elif sc[0] == "call":
            _, tool, args = sc
            state["tool"] = tool
            emit({"scenario": "call", "tool": tool, **(await one_call(conn, tool, args))})
        elif sc[0] == "calls":
            _, n, tool, args = sc
            state["tool"] = tool
            codes: list[int] = []
            errors: list[dict] = []
            for _ in range(n):
                r = await one_call(conn, tool, args)
                codes.append(0 if r["ok"] else r["code"])
                if not r["ok"] and not errors:
                    errors.append({k: r[k] for k in ("code", "message", "data")})
            line = {
                "scenario": "calls",
                "tool": tool,
                "n": n,
                "codes": codes,
                "ok_count": sum(1 for c in codes if c == 0),
                "error_count": sum(1 for c in codes if c != 0),
            }
            if errors:
                line["errors"] = errors
            emit(line)
        elif sc[0] == "wait_tools_changed":
            try:
                await asyncio.wait_for(conn.tools_changed.wait(), timeout=sc[1])
                emit({"scenario": "tools_changed", "ok": True})
            except asyncio.TimeoutError:
                emit({"scenario": "tools_changed", "ok": False})
        elif sc[0] == "listen":
            # 2.x on 2026-07-28: open subscriptions/listen, report the ack.
            async with conn.session.listen(tools_list_changed=True, prompts_list_changed=True) as sub:
                emit({"scenario": "listen", "ok": True, "honored": _dump(sub.honored)})
    state["current"] = "close"


async def amain(argv: list[str]) -> int:
    try:
        scenarios = parse_scenarios(argv)
        url = os.environ["TOOLGATE_URL"]
    except (ValueError, IndexError, KeyError) as exc:
        sys.stderr.write(f"usage error: {exc!r}\n{__doc__}")
        return 2
    token = os.environ.get("TOOLGATE_TOKEN") or None
    mode = os.environ.get("TOOLGATE_MODE", "auto")
    timeout = float(os.environ.get("TOOLGATE_TIMEOUT", "30"))

    state = {"current": "connect", "connected": False}
    try:
        async with connect(url, token, mode, timeout) as conn:
            state["connected"] = True
            emit({"scenario": "connect", "ok": True, "sdk": MCP_VERSION, "sdk_major": MCP_MAJOR, **conn.info})
            await run_scenarios(conn, scenarios, state)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - CancelledError/ExceptionGroup from a dead 1.x transport too
        if state["current"] == "close":
            # All scenarios reported; a failure while tearing down is logged, not fatal.
            sys.stderr.write(f"close failed: {exc!r}\n")
            return 0
        fields = rpc_error_fields(exc)
        leaf = leaf_exception(exc)
        line: dict = {"scenario": state["current"], "ok": False, "exception": type(leaf).__name__}
        if state["current"] in ("call", "calls"):
            line["tool"] = state.get("tool")
        if fields is not None:
            line.update(fields)
        else:
            line.update(code=None, message=str(leaf), data=None)
        line["http_status"] = http_status_of(exc)
        emit(line)
        return 1 if state["connected"] else 3
    return 0


def main() -> None:
    logging.basicConfig(level=os.environ.get("TOOLGATE_LOGLEVEL", "WARNING"), stream=sys.stderr)
    sys.exit(asyncio.run(amain(sys.argv[1:])))


if __name__ == "__main__":
    main()
