// One protocol v1 connection that comes back by itself: a WebSocket to /v1/realtime, msgpack (default) or JSON
// frames, a ping every 30 s (the server closes idle connections after 120 s), and reconnection with exponential
// back-off (0.5 s doubling to 10 s, ±20 % jitter) after a drop. Each (re)connection first sends the message
// returned by `hello()` (a session.start that resumes the session).
//
// Events: "open", "message" (detail: the decoded map), "close" (detail: {code, reason, retryMs}; retryMs is null
// when it will not reconnect), "error" (detail: text, for frames it could not read).

import { decode, encode } from "./protocol.js";

const PING_MS = 30000;
const BACKOFF_MS = [500, 1000, 2000, 4000, 8000, 10000];
const NO_RETRY = new Set([1008]); // policy: wrong or missing API key; retrying would not help

export class Connection extends EventTarget {
  constructor(url, { encoding = "msgpack", hello }) {
    super();
    this.url = url;
    this.encoding = encoding;
    this.hello = hello;
    this.ws = null;
    this.attempt = 0;
    this.stopped = false;
    this._retry = null;
  }

  get open() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  connect() {
    this.stopped = false;
    clearTimeout(this._retry);
    const ws = (this.ws = new WebSocket(this.url));
    ws.binaryType = "arraybuffer";
    let ping = null;
    ws.onopen = () => {
      this.send(this.hello());
      ping = setInterval(() => this.send({ type: "ping" }), PING_MS);
      this.dispatchEvent(new Event("open"));
    };
    ws.onmessage = (event) => {
      if (this.ws !== ws) return; // a socket being replaced: its last frames belong to the old session
      let msg;
      try {
        msg = decode(event.data);
      } catch (exc) {
        this.dispatchEvent(new CustomEvent("error", { detail: `unreadable frame from the server: ${exc.message}` }));
        return;
      }
      this.dispatchEvent(new CustomEvent("message", { detail: msg }));
    };
    ws.onclose = (event) => {
      clearInterval(ping);
      if (this.ws !== ws) return; // an old socket, replaced by reconnect()
      this.ws = null;
      let retryMs = null;
      if (!this.stopped && !NO_RETRY.has(event.code)) {
        const base = BACKOFF_MS[Math.min(this.attempt, BACKOFF_MS.length - 1)];
        retryMs = Math.round(base * (0.8 + 0.4 * Math.random()));
        this.attempt += 1;
        this._retry = setTimeout(() => this.connect(), retryMs);
      }
      this.dispatchEvent(new CustomEvent("close", { detail: { code: event.code, reason: event.reason, retryMs } }));
    };
  }

  /** The session is up: the next drop starts the back-off from the beginning again. */
  established() {
    this.attempt = 0;
  }

  /** Send a message; false if the socket is not open (nothing is queued). Throws ProtocolError for a bad message. */
  send(msg) {
    const frame = encode(msg, this.encoding);
    if (!this.open) return false;
    this.ws.send(frame);
    return true;
  }

  /** Drop the socket and connect again now (e.g. to start another session). */
  reconnect() {
    const old = this.ws;
    this.ws = null;
    old?.close(1000);
    this.connect();
  }

  close() {
    this.stopped = true;
    clearTimeout(this._retry);
    this.ws?.close(1000);
  }
}
