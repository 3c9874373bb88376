// Preloaded (`node --import ./inject-token.mjs`) into programs that cannot be
// told to send a header, such as the conformance runner: every HTTP request
// to TOOLGATE_URL's origin gets `Authorization: Bearer $TOOLGATE_TOKEN`, as
// an agent framework configured with a token would send it. It installs an
// undici global dispatcher, which both the built-in fetch (the SDK transport)
// and direct `undici.request` calls (the DNS-rebinding scenario) go through.
// Requests to any other origin are left alone.
import { Agent, setGlobalDispatcher } from "undici";

const target = process.env.TOOLGATE_URL && new URL(process.env.TOOLGATE_URL).origin;
const token = process.env.TOOLGATE_TOKEN;

function withAuth(headers) {
  const value = `Bearer ${token}`;
  if (headers == null) return { authorization: value };
  if (Array.isArray(headers)) {
    // Either flat [k, v, k, v] or [[k, v], ...].
    if (headers.length > 0 && Array.isArray(headers[0])) return [...headers, ["authorization", value]];
    return [...headers, "authorization", value];
  }
  if (typeof headers[Symbol.iterator] === "function") return [...headers, ["authorization", value]];
  return { ...headers, authorization: value };
}

if (target && token) {
  const agent = new Agent().compose((dispatch) => (opts, handler) => {
    const origin = typeof opts.origin === "string" ? opts.origin : opts.origin?.origin;
    if (origin && new URL(origin).origin === target) {
      opts = { ...opts, headers: withAuth(opts.headers) };
    }
    return dispatch(opts, handler);
  });
  setGlobalDispatcher(agent);
}
