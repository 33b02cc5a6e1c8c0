// Signs in to the gateway with the official TypeScript SDK's OAuth client (v1 @modelcontextprotocol/sdk or
// v2 @modelcontextprotocol/client): discovery, dynamic registration, code + PKCE at the gateway's dev issuer,
// whose sign-in page is "clicked" here with plain HTTP; then a tool call, and a refresh after the access
// token is made invalid. Usage: node ts_oauth_client.mjs v1|v2 URL IDENTITY
// Prints one JSON object: the client id, the tools, the echo results, both access tokens.
const [, , version, url, identity] = process.argv;

async function load() {
  if (version === "v1") {
    const { Client } = await import("@modelcontextprotocol/sdk/client/index.js");
    const { StreamableHTTPClientTransport } = await import("@modelcontextprotocol/sdk/client/streamableHttp.js");
    const { UnauthorizedError } = await import("@modelcontextprotocol/sdk/client/auth.js");
    return { Client, StreamableHTTPClientTransport, UnauthorizedError };
  }
  return await import("@modelcontextprotocol/client");
}

const { Client, StreamableHTTPClientTransport, UnauthorizedError } = await load();
const redirectUrl = "http://127.0.0.1:1/callback"; // never fetched: the code is read from the redirect
const state = { client: undefined, tokens: undefined, verifier: undefined, discovery: undefined, code: undefined, iss: undefined };

async function signIn(authorizationUrl) {
  const page = await fetch(authorizationUrl);
  if (page.status !== 200) throw new Error(`sign-in page: HTTP ${page.status} ${await page.text()}`);
  const form = new URLSearchParams(authorizationUrl.searchParams);
  form.append("identity", identity);
  form.append("decision", "allow");
  for (const scope of (authorizationUrl.searchParams.get("scope") || "").split(" ").filter(Boolean)) {
    form.append("grant_scope", scope);
  }
  const action = `${authorizationUrl.origin}${authorizationUrl.pathname}`;
  const done = await fetch(action, { method: "POST", body: form, redirect: "manual" });
  const location = new URL(done.headers.get("location"));
  state.code = location.searchParams.get("code");
  state.iss = location.searchParams.get("iss");
}

const provider = {
  get redirectUrl() { return redirectUrl; },
  get clientMetadata() {
    return {
      client_name: `castellan e2e ts ${version}`,
      redirect_uris: [redirectUrl],
      grant_types: ["authorization_code", "refresh_token"],
      response_types: ["code"],
      token_endpoint_auth_method: "none",
    };
  },
  clientInformation() { return state.client; },
  saveClientInformation(info) { state.client = info; },
  tokens() { return state.tokens; },
  saveTokens(tokens) { state.tokens = tokens; },
  redirectToAuthorization: signIn,
  saveCodeVerifier(verifier) { state.verifier = verifier; },
  codeVerifier() { return state.verifier; },
  saveDiscoveryState(discovery) { state.discovery = discovery; }, // v2: binds the callback to the issuer
  discoveryState() { return state.discovery; },
};

function connect() {
  const transport = new StreamableHTTPClientTransport(new URL(url), { authProvider: provider });
  const client = new Client({ name: `castellan-e2e-ts-oauth-${version}`, version: "1.0.0" });
  return { transport, client };
}

let { transport, client } = connect();
try {
  await client.connect(transport);
} catch (error) {
  if (!(error instanceof UnauthorizedError) || !state.code) throw error;
  // code + PKCE verifier for tokens; v2 also checks the response's issuer (RFC 9207)
  await (version === "v1"
    ? transport.finishAuth(state.code)
    : transport.finishAuth(new URLSearchParams({ code: state.code, iss: state.iss })));
  ({ transport, client } = connect());
  await client.connect(transport);
}
const listed = await client.listTools();
const echo = await client.callTool({ name: "echo", arguments: { text: `signed in with ts ${version}` } });
const first = state.tokens.access_token;
state.tokens = { ...state.tokens, access_token: "expired.access.token" }; // the next call gets a 401
const again = await client.callTool({ name: "echo", arguments: { text: "after the refresh" } });
console.log(JSON.stringify({
  clientId: state.client.client_id,
  iss: state.iss,
  tools: listed.tools.map((t) => t.name).sort(),
  echo,
  again,
  first,
  refreshed: state.tokens.access_token,
}));
await client.close();
