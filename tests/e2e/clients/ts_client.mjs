// Drives the gateway with the official TypeScript SDK client: v1 (@modelcontextprotocol/sdk) or
// v2 (@modelcontextprotocol/client). Usage: node ts_client.mjs v1|v2 URL TOKEN
// Prints one JSON object: the tool names listed, the echo result, and the result of a denied call.
const [, , version, url, token] = process.argv;

async function load() {
  if (version === "v1") {
    const { Client } = await import("@modelcontextprotocol/sdk/client/index.js");
    const { StreamableHTTPClientTransport } = await import("@modelcontextprotocol/sdk/client/streamableHttp.js");
    return { Client, StreamableHTTPClientTransport };
  }
  return await import("@modelcontextprotocol/client");
}

const { Client, StreamableHTTPClientTransport } = await load();
const transport = new StreamableHTTPClientTransport(new URL(url), {
  requestInit: { headers: { Authorization: `Bearer ${token}` } },
});
const client = new Client({ name: `castellan-e2e-ts-${version}`, version: "1.0.0" });
await client.connect(transport);
const listed = await client.listTools();
const echo = await client.callTool({ name: "echo", arguments: { text: `hello from ts ${version}` } });
const denied = await client.callTool({ name: "echo", arguments: { text: "please drop table users" } });
console.log(JSON.stringify({ tools: listed.tools.map((t) => t.name).sort(), echo, denied }));
await client.close();
