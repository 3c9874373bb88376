// The TypeScript SDK client as an agent framework uses it, through toolgate:
// it declares sampling and elicitation and answers both, asks for progress,
// and prints one JSON line per step for tests/interop_node.rs.
//
//   TOOLGATE_URL=... TOOLGATE_TOKEN=... node sdk_client.mjs
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import {
  CreateMessageRequestSchema,
  ElicitRequestSchema,
} from "@modelcontextprotocol/sdk/types.js";

const out = (step, value) => console.log(JSON.stringify({ step, ...value }));
const transport = new StreamableHTTPClientTransport(new URL(process.env.TOOLGATE_URL), {
  requestInit: { headers: { Authorization: `Bearer ${process.env.TOOLGATE_TOKEN}` } },
});
const client = new Client(
  { name: "toolgate-interop", version: "1.0.0" },
  { capabilities: { sampling: {}, elicitation: {} } },
);
const asked = [];
client.setRequestHandler(CreateMessageRequestSchema, async (req) => {
  asked.push({ method: req.method, text: req.params.messages[0]?.content?.text });
  return {
    role: "assistant",
    content: { type: "text", text: "sampled by the agent" },
    model: "agent-model",
  };
});
client.setRequestHandler(ElicitRequestSchema, async (req) => {
  asked.push({ method: req.method, message: req.params.message });
  return { action: "decline" };
});
await client.connect(transport);
out("connected", { version: transport.protocolVersion ?? null });

const { tools } = await client.listTools();
out("tools", { names: tools.map((t) => t.name).sort(), tools });

async function call(name, args, options = {}) {
  try {
    const result = await client.callTool({ name, arguments: args }, undefined, options);
    out(name, { result });
  } catch (e) {
    out(name, { error: { code: e.code, message: e.message, data: e.data } });
  }
}

await call("trigger-sampling-request", { prompt: "what is 2+2", maxTokens: 10 });
await call("trigger-elicitation-request", {});
const progress = [];
await call("trigger-long-running-operation", { duration: 1, steps: 3 }, {
  onprogress: (p) => progress.push(p),
});
out("progress", { progress });
await call("get-tiny-image", {});
await call("get-structured-content", { location: "New York" });
await call("get-resource-reference", { resourceType: "Text", resourceId: 1 });
await call("get-annotated-message", { messageType: "error", includeImage: true });
await call("get-env", {});
out("asked", { asked });
await client.close();
