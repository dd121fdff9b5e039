// The REST API and the live stream, with the session's token.
//
// The token is kept in sessionStorage (gone when the tab closes). Every call sends it as a bearer
// token; a 401 anywhere ends the session and brings back the sign-in form with the server's reason.

const TOKEN_KEY = "meterhub.token";

export const session = { token: null, name: null, scope: null, sites: null };

export function storedToken() {
  try {
    return sessionStorage.getItem(TOKEN_KEY);
  } catch {
    return null;
  }
}

export function isAdmin() {
  return session.scope === "admin";
}

export class ApiError extends Error {
  constructor(status, message, code = null, body = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.body = body;
  }
}

/** The session ended (401): the app shows the sign-in form with `message`. */
export function authLost(message) {
  session.token = null;
  session.name = null;
  session.scope = null;
  session.sites = null;
  try {
    sessionStorage.removeItem(TOKEN_KEY);
  } catch {
    /* storage unavailable: nothing to forget */
  }
  window.dispatchEvent(new CustomEvent("meterhub:auth-lost", { detail: { message } }));
}

async function request(path, { method = "GET", body, signal, token = session.token } = {}) {
  const headers = { Accept: "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
      credentials: "omit",
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "Cannot reach the meterhub server. Check the connection and try again.");
  }
  let data = null;
  const text = await response.text();
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!response.ok) {
    const message = data?.error?.message || `${response.status} ${response.statusText}`;
    throw new ApiError(response.status, message, data?.error?.code ?? null, data);
  }
  return data;
}

/** Call the API with the session's token; a 401 ends the session. */
export async function api(path, options = {}) {
  try {
    return await request(path, options);
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) authLost(err.message);
    throw err;
  }
}

/** Check a token (GET /ui/whoami) and start a session with it. Throws ApiError (401: bad token). */
export async function signIn(token) {
  const info = await request("/ui/whoami", { token });
  session.token = token;
  session.name = info.name;
  session.scope = info.scope;
  session.sites = info.sites || null; // a site-scoped token: only these sites
  try {
    sessionStorage.setItem(TOKEN_KEY, token);
  } catch {
    /* private mode without storage: the session lasts until reload */
  }
  return info;
}

export function signOut() {
  session.token = null;
  session.name = null;
  session.scope = null;
  session.sites = null;
  try {
    sessionStorage.removeItem(TOKEN_KEY);
  } catch {
    /* nothing stored */
  }
}

/** "?a=1&b=2" from an object (arrays repeat the key; null / undefined left out). */
export function qs(params) {
  const sp = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v === null || v === undefined || v === "") continue;
    if (Array.isArray(v)) v.forEach((x) => sp.append(k, x));
    else sp.set(k, v);
  }
  const s = sp.toString();
  return s ? `?${s}` : "";
}

/** Run `fn` over `items` with at most `limit` calls at once; results in order. */
export async function pool(items, limit, fn) {
  const out = new Array(items.length);
  let next = 0;
  const workers = Array.from({ length: Math.min(limit, items.length) }, async () => {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i], i);
    }
  });
  await Promise.all(workers);
  return out;
}

// --- product models (cached for the session) ---------------------------------------------------

const models = new Map();

export function model(name) {
  if (!models.has(name)) {
    const p = api(`/api/v1/models/${encodeURIComponent(name)}`).catch((err) => {
      models.delete(name);
      throw err;
    });
    models.set(name, p);
  }
  return models.get(name);
}

let allModels = null;

/** Every model the server knows (for alarm label descriptions). */
export function everyModel() {
  if (!allModels) {
    allModels = api("/api/v1/models")
      .then((list) => Promise.all(list.map((m) => model(m.model))))
      .catch((err) => {
        allModels = null;
        throw err;
      });
  }
  return allModels;
}

// --- the live stream ------------------------------------------------------------------------------

const liveListeners = new Set();

/** Subscribe to the live indicator ("on", "connecting", "error", "off"). */
export function onLiveState(fn) {
  liveListeners.add(fn);
  return () => liveListeners.delete(fn);
}

function setLive(state) {
  for (const fn of liveListeners) fn(state);
}

/**
 * Open GET /api/v1/stream (server-sent events). `cid`: one device, else the fleet (`dps`: report
 * only these data points). `onEvent(kind, data)`; `onResync(initial)` once the stream is connected
 * (initial = true: the first time, after the page's own first load) and after a reconnection or
 * dropped events: reload what is shown from the REST API. Returns {close()}.
 */
export function openStream({ cid = null, dps = null } = {}, { onEvent, onResync } = {}) {
  let source = null;
  let closed = false;
  let timer = null;
  let attempts = 0;
  let connectedOnce = false;

  const connect = () => {
    if (closed || !session.token) return;
    const url = new URL("/api/v1/stream", window.location.origin);
    if (cid) url.searchParams.set("cid", cid);
    for (const d of dps || []) url.searchParams.append("dp", d);
    url.searchParams.set("token", session.token);
    setLive("connecting");
    const es = new EventSource(url);
    source = es;
    es.addEventListener("hello", () => {
      attempts = 0;
      setLive("on");
      // Events between the page's first load and this moment were not streamed: catch up.
      if (onResync) onResync(!connectedOnce);
      connectedOnce = true;
    });
    for (const kind of ["report", "presence", "sync", "gateway"]) {
      es.addEventListener(kind, (e) => {
        let data;
        try {
          data = JSON.parse(e.data);
        } catch {
          return;
        }
        if (onEvent) onEvent(kind, data);
      });
    }
    es.addEventListener("overflow", () => onResync && onResync(false));
    es.addEventListener("bye", (e) => {
      let data = {};
      try {
        data = JSON.parse(e.data);
      } catch {
        /* keep {} */
      }
      if (data.status === 401) {
        es.close();
        authLost(data.reason || "The token is no longer valid.");
      }
    });
    es.onerror = () => {
      if (closed || source !== es) return;
      if (es.readyState === EventSource.CLOSED) {
        // Refused (401, 404, 503...): EventSource gives no status, so ask the server about the token.
        es.close();
        setLive("error");
        request("/ui/whoami")
          .then(() => schedule())
          .catch((err) => {
            if (err instanceof ApiError && err.status === 401) authLost(err.message);
            else schedule();
          });
      } else {
        setLive("connecting"); // the browser reconnects by itself
      }
    };
  };

  const schedule = () => {
    if (closed) return;
    attempts += 1;
    timer = setTimeout(connect, Math.min(30000, 1000 * 2 ** attempts));
  };

  connect();
  return {
    close() {
      closed = true;
      clearTimeout(timer);
      if (source) source.close();
      source = null;
      setLive("off");
    },
  };
}

/** Download a file from the API (a CSV export) with the session's token: fetch, then save the blob. */
export async function download(path, filename) {
  const headers = {};
  if (session.token) headers.Authorization = `Bearer ${session.token}`;
  const response = await fetch(path, { headers, cache: "no-store", credentials: "omit" });
  if (!response.ok) {
    if (response.status === 401) authLost("The session ended. Sign in again.");
    throw new ApiError(response.status, `${response.status} ${response.statusText}`);
  }
  const url = URL.createObjectURL(await response.blob());
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}
