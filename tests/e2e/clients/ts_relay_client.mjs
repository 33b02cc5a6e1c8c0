// The official TypeScript SDK client (v1) answering what an upstream asks through the gateway:
// sampling and elicitation requests, and progress. Usage: node ts_relay_client.mjs URL TOKEN
// Prints one JSON object: what it was asked, the two tools' texts, the progress it saw.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { CreateMessageRequestSchema, ElicitRequestSchema } from "@modelcontextprotocol/sdk/types.js";

const [, , url, token] = process.argv;
const transport = new StreamableHTTPClientTransport(new URL(url), {
  requestInit: { headers: { Authorization: `Bearer ${token}` } },
});
const client = new Client(
  { name: "castellan-e2e-ts-relay", version: "1.0.0" },
  { capabilities: { sampling: {}, elicitation: {} } },
);
const asked = [];
client.setRequestHandler(CreateMessageRequestSchema, async () => {
  asked.push("sampling");
  return { role: "assistant", content: { type: "text", text: "a sampled answer from ts" }, model: "ts-model", stopReason: "endTurn" };
});
client.setRequestHandler(ElicitRequestSchema, async () => {
  asked.push("elicitation");
  return { action: "accept", content: { name: "Grace Hopper", check: true } };
});
await client.connect(transport);
const text = (r) => r.content.map((c) => c.text ?? "").join("");
const sample = await client.callTool({ name: "everything.trigger-sampling-request", arguments: { prompt: "hi from ts" } });
const elicit = await client.callTool({ name: "everything.trigger-elicitation-request", arguments: {} });
const progress = [];
await client.callTool(
  { name: "everything.trigger-long-running-operation", arguments: { duration: 0.6, steps: 3 } },
  undefined,
  { onprogress: (p) => progress.push(p.progress) },
);
console.log(JSON.stringify({ asked, sample: text(sample), elicit: text(elicit), progress }));
await client.close();
