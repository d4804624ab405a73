// The dashboard's side of the REST API: the key (from the sign-in field or the URL fragment, kept in this
// tab's sessionStorage), JSON calls with the Authorization header, and Server-Sent Events read from a
// fetch() body, because the browser's EventSource cannot send headers and keys never go in URLs.

const KEY_ITEM = "hpsearch.apiKey";
export const API = "/api/v1";

export class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : `HTTP ${status}`);
    this.status = status;
  }
}

/** The URL fragment's `name=value` pairs (a fragment never reaches the server). */
export function fragment() {
  return new URLSearchParams(location.hash.replace(/^#/, ""));
}

/** Move a `#key=...` fragment into sessionStorage and drop it from the address bar and history. */
export function takeKeyFromFragment() {
  const params = fragment();
  const key = params.get("key");
  if (!key) return;
  sessionStorage.setItem(KEY_ITEM, key);
  params.delete("key");
  const rest = params.toString();
  history.replaceState(null, "", location.pathname + location.search + (rest ? `#${rest}` : ""));
}

const REJECTED_EVENT = "hpsearch:key-rejected";
let rejectedKey = null; // the key the API last answered 401 to

export const apiKey = () => sessionStorage.getItem(KEY_ITEM) || "";
export const setApiKey = (key) => {
  rejectedKey = null;
  if (key) sessionStorage.setItem(KEY_ITEM, key);
  else sessionStorage.removeItem(KEY_ITEM);
};
export const keyRejected = () => Boolean(rejectedKey) && rejectedKey === apiKey();

/** A 401 to a request that carried a key: that key is wrong or revoked, and the sign-in bar says so. */
function noteRejected(status) {
  if (status !== 401 || !apiKey() || keyRejected()) return;
  rejectedKey = apiKey();
  window.dispatchEvent(new CustomEvent(REJECTED_EVENT));
}

function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

export async function getJSON(path, { signal } = {}) {
  const response = await fetch(API + path, { headers: headers({ Accept: "application/json" }), signal });
  if (!response.ok) {
    let detail = null;
    try { detail = (await response.json()).detail; } catch { /* not JSON */ }
    noteRejected(response.status);
    throw new ApiError(response.status, detail);
  }
  return response.json();
}

export async function postJSON(path, body = undefined) {
  const init = body === undefined ? { method: "POST", headers: headers() }
    : { method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body) };
  const response = await fetch(API + path, init);
  if (!response.ok) {
    noteRejected(response.status);
    throw new ApiError(response.status, (await response.json().catch(() => ({}))).detail);
  }
  return response.json();
}

/** Fetch a file with the key and hand it to the browser as a download. */
export async function download(path, filename) {
  const response = await fetch(API + path, { headers: headers() });
  if (!response.ok) throw new ApiError(response.status);
  const url = URL.createObjectURL(await response.blob());
  const link = Object.assign(document.createElement("a"), { href: url, download: filename });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * A Server-Sent Events stream over fetch(): reconnects with Last-Event-ID, stops on the server's `end`
 * event, and gives up after `maxFailures` failed connections in a row (the caller then polls instead).
 */
export class EventStream {
  constructor(path, { onEvent, onOpen = () => {}, onClose = () => {}, onFallback = () => {}, maxFailures = 3 }) {
    Object.assign(this, { path, onEvent, onOpen, onClose, onFallback, maxFailures });
    this.lastEventId = null;
    this.retryMs = 2000;
    this.controller = new AbortController();
  }

  stop() { this.controller.abort(); }

  async run() {
    let failures = 0;
    while (!this.controller.signal.aborted) {
      try {
        const extra = { Accept: "text/event-stream" };
        if (this.lastEventId) extra["Last-Event-ID"] = this.lastEventId;
        const response = await fetch(API + this.path, { headers: headers(extra), signal: this.controller.signal,
                                                         cache: "no-store" });
        if (response.status === 401 || response.status === 404) {
          this.onClose(response.status);
          return;
        }
        if (!response.ok || !response.body) throw new ApiError(response.status);
        failures = 0;
        this.onOpen();
        if (await this.read(response.body.getReader())) {
          this.onClose("end");
          return;
        }
      } catch (error) {
        if (this.controller.signal.aborted) return;
        failures += 1;
        if (failures >= this.maxFailures) {
          this.onFallback(error);
          return;
        }
      }
      this.onClose("reconnecting");
      await sleep(this.retryMs);
    }
  }

  /** Read SSE blocks until the body ends (false) or an `end` event arrives (true). */
  async read(reader) {
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (this.dispatch(block)) {
          reader.cancel().catch(() => {});
          return true;
        }
      }
    }
  }

  dispatch(block) {
    let event = "message";
    let id = null;
    const data = [];
    for (const line of block.split("\n")) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
      else if (field === "id") id = value;
      else if (field === "retry" && /^\d+$/.test(value)) this.retryMs = Number(value);
    }
    if (id !== null) this.lastEventId = id;
    if (data.length) this.onEvent(event, JSON.parse(data.join("\n")));
    return event === "end";
  }
}

// ---- small DOM and formatting helpers --------------------------------------------------------------------

/** Create an element; children are nodes or text (never parsed as HTML). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.flat().filter((c) => c !== null && c !== undefined).map(
    (c) => (c instanceof Node ? c : document.createTextNode(String(c)))));
  return node;
}

export function formatValue(value, digits = 4) {
  if (value === null || value === undefined) return "—";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return String(value);
  const abs = Math.abs(value);
  if (abs !== 0 && (abs < 1e-3 || abs >= 1e5)) return value.toExponential(2);
  return value.toPrecision(digits).replace(/\.?0+$/, "");
}

export function formatDuration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} min`;
}

/** Bytes in decimal units, as the quota counts them: 4.4 MB, 1.2 GB. */
export function formatBytes(bytes) {
  if (bytes === null || bytes === undefined) return "—";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

export function formatAge(iso) {
  const seconds = (Date.now() - Date.parse(iso)) / 1000;
  if (seconds < 60) return "just now";
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return `${Math.floor(seconds / 86400)} d ago`;
}

export function escapeHTML(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;",
                                                     "'": "&#39;" })[c]);
}

/** The sign-in bar shared by both pages: a password field, or who is signed in and a sign-out button. */
export function mountSignIn(container, onChange) {
  const render = () => {
    container.replaceChildren();
    const key = apiKey();
    if (key && !keyRejected()) {
      container.append(el("span", { class: "who" }, `signed in · ${key.slice(0, 10)}…`),
        el("button", { type: "button", onclick: () => { setApiKey(""); render(); onChange(); } }, "Sign out"));
      return;
    }
    if (key) container.append(el("span", { class: "who rejected", id: "key-rejected" }, `key ${key.slice(0, 10)}… rejected`));
    const input = el("input", { type: "password", placeholder: "API key", autocomplete: "off", id: "api-key" });
    const form = el("form", { class: "signin", onsubmit: (event) => {
      event.preventDefault();
      setApiKey(input.value.trim());
      render();
      onChange();
    } }, input, el("button", { type: "submit", class: "primary" }, "Sign in"));
    container.append(form);
  };
  window.addEventListener(REJECTED_EVENT, render);
  render();
}

/** Run fn at most once per `ms`, trailing: bursts of events cost one redraw. */
export function throttle(fn, ms) {
  let timer = null;
  let last = 0;
  return () => {
    if (timer) return;
    const wait = Math.max(0, last + ms - Date.now());
    timer = setTimeout(() => { timer = null; last = Date.now(); fn(); }, wait);
  };
}
