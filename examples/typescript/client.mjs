#!/usr/bin/env node
// Call tools through toolgate with the official MCP TypeScript SDK
// (@modelcontextprotocol/sdk, protocol 2025-11-25).
//
//   npm ci
//   export TOOLGATE_URL=http://127.0.0.1:8080/mcp
//   export TOOLGATE_TOKEN=$(toolgate token --config toolgate.yaml --agent billing-bot)
//   node client.mjs billing__get_invoice '{"invoice_id": "INV-000042"}'
//
// Lists the tools this agent may call, then calls one. A refusal from
// toolgate arrives as a JSON-RPC error whose `data` says why (decision,
// rule, request_id; hold_id when a human must approve): this prints it and
// exits 1.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { McpError } from "@modelcontextprotocol/sdk/types.js";

const url = process.env.TOOLGATE_URL ?? "http://127.0.0.1:8080/mcp";
const token = process.env.TOOLGATE_TOKEN;
const [tool, args = "{}"] = process.argv.slice(2);
if (!token || !tool) {
  console.error("usage: TOOLGATE_TOKEN=... node client.mjs TOOL ['{\"json\": \"arguments\"}']");
  process.exit(2);
}

// The token goes on every request, exactly as to any bearer-protected API.
const transport = new StreamableHTTPClientTransport(new URL(url), {
  requestInit: { headers: { Authorization: `Bearer ${token}` } },
});
const client = new Client({ name: "toolgate-example", version: "1.0.0" });
await client.connect(transport);

const { tools } = await client.listTools();
console.log("tools:", tools.map((t) => t.name).sort().join(", "));

let code = 0;
try {
  const result = await client.callTool({ name: tool, arguments: JSON.parse(args) });
  console.log("result:", JSON.stringify(result));
} catch (e) {
  if (!(e instanceof McpError)) throw e;
  // data.decision is deny | hold | rate_limited; data.rule names the rule.
  console.log("refused:", JSON.stringify({ code: e.code, message: e.message, data: e.data }));
  code = 1;
}
await client.close();
process.exit(code);
