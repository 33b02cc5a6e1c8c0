// Drives the gateway's resources, prompts and completions with the official TypeScript SDK client: v1
// (@modelcontextprotocol/sdk) or v2 (@modelcontextprotocol/client). Usage: node ts_surface.mjs v1|v2 URL TOKEN
// [--lists-only]. Prints one JSON object: what was listed, read, got and completed, and the error (or null)
// of reading server-everything's features document.
const [, , version, url, token, listsOnly] = process.argv;

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
const client = new Client({ name: `castellan-e2e-ts-surface-${version}`, version: "1.0.0" });
await client.connect(transport);
const out = {};
out.resources = (await client.listResources()).resources.map((r) => r.uri).sort();
out.templates = (await client.listResourceTemplates()).resourceTemplates.map((t) => t.uriTemplate).sort();
if (listsOnly !== "--lists-only") {
  out.read = await client.readResource({ uri: "demo://resource/static/document/architecture.md" });
  out.templated = await client.readResource({ uri: "demo://resource/dynamic/text/7" });
  out.prompts = (await client.listPrompts()).prompts.map((p) => p.name).sort();
  out.prompt = await client.getPrompt({ name: "everything.args-prompt", arguments: { city: "Lisbon" } });
  out.completion = await client.complete({
    ref: { type: "ref/prompt", name: "everything.completable-prompt" },
    argument: { name: "department", value: "E" },
  });
}
try {
  await client.readResource({ uri: "demo://resource/static/document/features.md" });
  out.refused = null;
} catch (error) {
  out.refused = { code: error.code, message: error.message, data: error.data ?? null };
}
console.log(JSON.stringify(out));
await client.close();
