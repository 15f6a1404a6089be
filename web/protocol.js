// Protocol v1 for the browser: the same closed set of messages as realtime/protocol.py, with one encoder and one
// decoder, byte for byte the same frames as the Python codec (checked against tests/golden/ in the test suite).
//
// A message is a plain object with a `type`: {type: "text", text: "Hi.", speaker: 1}. `encode` writes it as a
// msgpack binary frame (Uint8Array) or a JSON text frame (string); `decode` reads either kind of frame back into a
// plain object, binary fields (audio.data, voice.create.audio, input.audio.data) as Uint8Array in both encodings.
//
// "input.audio" is a type of both directions, as in Python: the client's frame of the caller's audio {data}
// (InputAudio) and the server's relay of a phone call's audio to the application {data, ms, codec} (InputRelay).
// A message that gives a field only the server's has (ms, codec) is the relay; one with `data` alone, the frame.
//
// To match Python's bytes exactly, the encoder knows each field's kind, as the Python dataclasses do:
//   - fields are written in the dataclass's order, `type` first, absent (null/undefined) fields left out;
//   - float fields (audio.ms, turn.done.audio_ms, playback.played_ms, ...) are always floats: float64 in msgpack,
//     and in JSON written the way Python's repr writes them ("20.0", "1e-05"); integers stay integers;
//   - JSON is compact (no spaces) with non-ASCII left as is (Python's ensure_ascii=False), binary as base64;
//   - nested maps are typed by their key (MAPS): session output/engine/sampling/input, each entry of words.words,
//     visemes.visemes and session.ready.history (word timing: start_ms / end_ms are floats, a viseme id an integer).
// Python's decoder accepts an integer where a float is expected, so only the golden test cares about this.

import { Encoder } from "./vendor/msgpack/Encoder.mjs";
import { Decoder } from "./vendor/msgpack/Decoder.mjs";

export const PROTOCOL_VERSION = 1;

export const ERROR_CODES = Object.freeze([
  "bad_message", "unknown_type", "too_large", "not_started", "busy", "limit", "unauthorized",
  "quota", "engine_unavailable", "internal",
]);

export const MAX_SPEAKER = 63; // speaker indices are 0..63
export const MAX_SPEAKERS = 16; // entries in a speakers list
export const MAX_TEXT_CHARS = 20000; // per message

const ID_RE = /^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$/;

/** A message this codec refuses to write or cannot read; `code` is one of ERROR_CODES, as in Python. */
export class ProtocolError extends Error {
  constructor(code, message, fatal = false) {
    super(message);
    this.name = "ProtocolError";
    this.code = code;
    this.fatal = fatal;
  }
}

// ---------------------------------------------------------------------------------------------- the message set

// Nested maps whose field kinds are known (unknown keys are written by their JavaScript type).
const MAPS = {
  output: {
    codec: "str", sample_rate: "int", frame_ms: "int", lead_ms: "int", bitrate: "int", mix: "bool", timestamps: "str",
  },
  engine: { name: "str", sample_rate: "int", cloning: "bool", frame_ms: "float", timing: "str" },
  sampling: { temperature: "float", top_p: "float", top_k: "int", seed: "int", max_frames: "int" },
  input: { // the caller's audio (realtime/caller.py InputFormat)
    codec: "str", sample_rate: "int", vad: "onoff", barge_in: "bool", threshold: "float", min_speech_ms: "int",
    min_silence_ms: "int",
  },
  history: { turn: "int", speaker: "int", text: "str", state: "str", audio_ms: "int" }, // session.ready.history[i]
  parameters: {}, // call.started.parameters: the call's custom parameters, strings written as given
  word: { text: "str", start_ms: "float", end_ms: "float" }, // words.words[i]: turn-relative, the clock of audio.ms
  viseme: { id: "int", start_ms: "float" }, // visemes.visemes[i]: held until the next one's start_ms
};

/** output.timestamps: "visemes" includes words. */
export const TIMESTAMPS = Object.freeze(["none", "words", "visemes"]);

// [field, kind, required?] in the order of the Python dataclass fields.
const CLIENT = {
  "session.start": [
    ["session", "id"], ["speakers", "speakers"], ["output", "map:output"], ["sampling", "map:sampling"],
    ["input", "map:input"],
  ],
  text: [["text", "text", true], ["speaker", "speaker"], ["context", "id"]],
  flush: [["context", "id"]],
  "turn.end": [["context", "id"]],
  cancel: [["context", "id"]],
  playback: [["turn", "int", true], ["played_ms", "float", true], ["context", "id"]],
  "voice.create": [["audio", "bytes", true], ["text", "transcript", true], ["voice", "id"], ["sample_rate", "int"]],
  "session.update": [["speakers", "speakers"], ["output", "map:output"], ["sampling", "map:sampling"], ["input", "map:input"]],
  "input.audio": [["data", "bytes", true]], // one frame of the caller's audio, in the session's input.codec
  "input.commit": [["speaker", "speaker", true], ["text", "text", true], ["start_ms", "float", true], ["end_ms", "float", true]],
  ping: [],
};

const SERVER = {
  "session.ready": [
    ["session", "str", true], ["engine", "map:engine", true], ["output", "map:output", true], ["resumed", "bool", true],
    ["turns", "int", true], ["protocol", "int", true], ["speakers", "speakers", true], ["history", "list:history"],
    ["input", "map:input"],
  ],
  "turn.started": [["turn", "int", true], ["speaker", "int", true], ["context", "str"]],
  audio: [["turn", "int", true], ["seq", "int", true], ["ms", "float", true], ["data", "bytes", true], ["context", "str"]],
  segment: [
    ["turn", "int", true], ["text", "str", true], ["ms", "float", true], ["context", "str"], ["speaker", "int"],
    ["markup", "str"],
  ],
  words: [["turn", "int", true], ["words", "list:word", true], ["estimated", "bool", true], ["context", "str"]],
  visemes: [["turn", "int", true], ["visemes", "list:viseme", true], ["context", "str"]],
  "turn.done": [
    ["turn", "int", true], ["reason", "str", true], ["audio_ms", "float", true], ["frames", "int", true],
    ["ttfa_ms", "float"], ["context", "str"],
  ],
  "voice.created": [["voice", "str", true], ["seconds", "float", true], ["frames", "int", true]],
  error: [["code", "str", true], ["message", "str", true], ["fatal", "bool", true]],
  pong: [],
  "input.speech_started": [["ms", "float", true]], // the onset, on the input clock
  "input.speech_stopped": [["ms", "float", true]],
  "input.audio": [["data", "bytes", true], ["ms", "float", true], ["codec", "str", true]], // a call's audio, relayed
  "input.dtmf": [["digit", "str", true], ["ms", "float", true]],
  "call.started": [["call", "str", true], ["stream", "str", true], ["parameters", "map:parameters"]],
  "call.stopped": [["call", "str", true], ["reason", "str", true]], // hangup | disconnected
};

export const CLIENT_TYPES = Object.freeze(Object.keys(CLIENT));
export const SERVER_TYPES = Object.freeze(Object.keys(SERVER));

/** The binary field of a message type, if it has one. */
export const BINARY_FIELDS = Object.freeze({ audio: "data", "voice.create": "audio", "input.audio": "data" });

/** Defaults the Python dataclasses fill in when a field is not given (only for fields of the chosen schema). */
const DEFAULTS = {
  "session.ready": { protocol: PROTOCOL_VERSION, speakers: [] }, error: { fatal: false }, "input.audio": { codec: "mulaw" },
};

/** Rules across fields, checked after each field's kind, as Python's decoder checks them. */
const CHECKS = {
  "input.commit": (m) => {
    if (!m.text.trim()) throw new ProtocolError("bad_message", "input.commit.text (what the caller said) must not be empty");
    if (m.start_ms.value < 0 || m.end_ms.value <= m.start_ms.value) {
      throw new ProtocolError("bad_message", "input.commit needs 0 <= start_ms < end_ms");
    }
  },
};

// ---------------------------------------------------------------------------------------------- encoding

class F64 { // a number that must be written as a float, even when it is integral
  constructor(value) { this.value = value; }
}

class WireEncoder extends Encoder {
  doEncode(object, depth) {
    if (object instanceof F64) this.encodeNumberAsFloat(object.value); // float64: forceFloat32 is off
    else super.doEncode(object, depth);
  }
}

const encoder = new WireEncoder(); // not re-entrant use: encode() runs to completion
const decoder = new Decoder();

function bad(mtype, name, want, value) {
  const got = value === null ? "null" : Array.isArray(value) ? "list" : typeof value;
  return new ProtocolError("bad_message", `${mtype}.${name} must be ${want}, got ${got}`);
}

function isPlainObject(v) {
  return v !== null && typeof v === "object" && !Array.isArray(v) && !ArrayBuffer.isView(v) && !(v instanceof ArrayBuffer);
}

function toBytes(v) {
  if (v instanceof Uint8Array) return v;
  if (v instanceof ArrayBuffer) return new Uint8Array(v);
  if (ArrayBuffer.isView(v)) return new Uint8Array(v.buffer, v.byteOffset, v.byteLength);
  return null;
}

function checkInt(mtype, name, v, lo, hi) {
  if (typeof v !== "number" || !Number.isInteger(v)) throw bad(mtype, name, "an integer", v);
  if (v < lo || v > hi) throw new ProtocolError("bad_message", `${mtype}.${name} must be within [${lo}, ${hi}], got ${v}`);
  return v;
}

// value -> typed value (F64 for floats, Uint8Array for bytes), checking it on the way
function typed(mtype, name, kind, v) {
  switch (kind) {
    case "str":
      if (typeof v !== "string") throw bad(mtype, name, "a string", v);
      return v;
    case "text":
    case "transcript":
      if (typeof v !== "string") throw bad(mtype, name, "a string", v);
      if (v.length > MAX_TEXT_CHARS) throw new ProtocolError("limit", `${mtype}.${name} is longer than ${MAX_TEXT_CHARS} characters`);
      if (kind === "transcript" && !v.trim()) throw new ProtocolError("bad_message", `${mtype}.${name} (the transcript) must not be empty`);
      return v;
    case "id":
      if (typeof v !== "string") throw bad(mtype, name, "a string", v);
      if (!ID_RE.test(v)) throw new ProtocolError("bad_message", `${mtype}.${name} must be 1-64 characters of A-Z a-z 0-9 _ . : - (got ${JSON.stringify(v)})`);
      return v;
    case "int":
      if (typeof v !== "number" || !Number.isSafeInteger(v)) throw bad(mtype, name, "an integer", v);
      return v;
    case "speaker":
      return checkInt(mtype, name, v, 0, MAX_SPEAKER);
    case "float":
      if (typeof v !== "number" || !Number.isFinite(v)) throw bad(mtype, name, "a finite number", v);
      return new F64(v);
    case "bool":
      if (typeof v !== "boolean") throw bad(mtype, name, "a boolean", v);
      return v;
    case "onoff": // input.vad: "on" | "off" on the wire (booleans accepted, as the server does)
      if (v !== "on" && v !== "off" && typeof v !== "boolean") throw bad(mtype, name, '"on" or "off"', v);
      return v;
    case "bytes": {
      const b = toBytes(v);
      if (b === null) throw bad(mtype, name, "binary (Uint8Array)", v);
      return b;
    }
    case "speakers": {
      if (!Array.isArray(v)) throw bad(mtype, name, "a list", v);
      if (v.length > MAX_SPEAKERS) throw new ProtocolError("limit", `${mtype}.${name} has more than ${MAX_SPEAKERS} entries`);
      const seen = new Set();
      return v.map((entry, i) => {
        if (!isPlainObject(entry)) throw new ProtocolError("bad_message", `${mtype}.${name}[${i}] must be a map`);
        const speaker = checkInt(`${mtype}.${name}[${i}]`, "speaker", entry.speaker, 0, MAX_SPEAKER);
        if (seen.has(speaker)) throw new ProtocolError("bad_message", `${mtype}.${name} lists a speaker twice`);
        seen.add(speaker);
        const voice = entry.voice == null ? null : typed(`${mtype}.${name}[${i}]`, "voice", "id", entry.voice);
        return { speaker, voice }; // like Python's SpeakerSpec.to_wire: voice always present, null when unset
      });
    }
    default:
      if (kind.startsWith("map:")) return typedMap(mtype, name, MAPS[kind.slice(4)], v);
      if (kind.startsWith("list:")) {
        if (!Array.isArray(v)) throw bad(mtype, name, "a list", v);
        return v.map((entry, i) => typedMap(mtype, `${name}[${i}]`, MAPS[kind.slice(5)], entry));
      }
      throw new Error(`unknown field kind ${kind}`);
  }
}

// a map whose known keys are typed by `kinds`, written in the map's own order (as Python's dict)
function typedMap(mtype, name, kinds, v) {
  if (!isPlainObject(v)) throw bad(mtype, name, "a map", v);
  const out = {};
  for (const [key, value] of Object.entries(v)) {
    if (value === undefined) continue;
    out[key] = value !== null && kinds[key] ? typed(`${mtype}.${name}`, key, kinds[key], value) : plain(value);
  }
  return out;
}

// a value of no declared kind: numbers by their JavaScript type, containers recursively
function plain(v) {
  if (Array.isArray(v)) return v.map(plain);
  const b = toBytes(v);
  if (b !== null) return b;
  if (isPlainObject(v)) {
    const out = {};
    for (const [key, value] of Object.entries(v)) if (value !== undefined) out[key] = plain(value);
    return out;
  }
  return v;
}

// The fields of a message's type; for a type of both directions (input.audio), the server's when the message gives a
// field that only the server's has, else the client's.
function schema(msg) {
  const client = CLIENT[msg.type];
  const server = SERVER[msg.type];
  if (client === undefined && server === undefined) {
    throw new ProtocolError("unknown_type", `unknown message type ${JSON.stringify(msg.type)}`);
  }
  if (client === undefined || server === undefined) return client ?? server;
  const shared = new Set(client.map(([name]) => name));
  return server.some(([name]) => !shared.has(name) && msg[name] != null) ? server : client;
}

// The message as its typed wire map: `type` first, fields in schema order, absent fields left out.
function typedWire(msg) {
  if (!isPlainObject(msg) || typeof msg.type !== "string") {
    throw new ProtocolError("bad_message", "every message needs a string 'type'");
  }
  const fields = schema(msg);
  const defaults = DEFAULTS[msg.type] ?? {};
  const out = { type: msg.type };
  for (const [name, kind, required] of fields) {
    const value = msg[name] ?? defaults[name];
    if (value == null) {
      if (required) throw new ProtocolError("bad_message", `${msg.type}.${name} is required`);
      continue;
    }
    out[name] = typed(msg.type, name, kind, value);
  }
  CHECKS[msg.type]?.(out);
  return out;
}

function untype(v) {
  if (v instanceof F64) return v.value;
  if (Array.isArray(v)) return v.map(untype);
  if (isPlainObject(v)) return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, untype(x)]));
  return v;
}

/** The message as a plain map, as Python's `to_wire`: `type` first, binary fields as Uint8Array. Checks fields. */
export function toWire(msg) {
  return untype(typedWire(msg));
}

/**
 * One frame: a Uint8Array for "msgpack" (send as a binary frame), a string for "json" (a text frame).
 * Throws ProtocolError for an unknown type or a field of the wrong kind.
 */
export function encode(msg, encoding = "msgpack") {
  const wire = typedWire(msg);
  if (encoding === "msgpack") return encoder.encode(wire);
  if (encoding === "json") return jsonValue(wire);
  throw new Error(`unknown encoding ${encoding}`);
}

// JSON exactly as Python's json.dumps(separators=(",", ":"), ensure_ascii=False) writes the same map
function jsonValue(v) {
  if (v === null) return "null";
  if (v instanceof F64) return pyFloatRepr(v.value);
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : pyFloatRepr(v);
  if (typeof v === "string" || typeof v === "boolean") return JSON.stringify(v);
  if (v instanceof Uint8Array) return JSON.stringify(base64Encode(v));
  if (Array.isArray(v)) return `[${v.map(jsonValue).join(",")}]`;
  return `{${Object.entries(v).map(([k, x]) => `${JSON.stringify(k)}:${jsonValue(x)}`).join(",")}}`;
}

/** A float written as Python's repr writes it: shortest round-trip digits, "20.0", "1e-05", "1.5e+16". */
export function pyFloatRepr(x) {
  if (!Number.isFinite(x)) throw new ProtocolError("bad_message", `${x} is not a finite number`);
  if (Object.is(x, -0)) return "-0.0";
  const [digits, expText] = x.toExponential().split("e"); // shortest digits that round-trip, as Python's repr
  const exp = Number(expText);
  if (exp < -4 || exp >= 16) return `${digits}e${exp < 0 ? "-" : "+"}${String(Math.abs(exp)).padStart(2, "0")}`;
  const text = String(x); // positional for these exponents, same digits
  return /[.e]/.test(text) ? text : `${text}.0`;
}

// ---------------------------------------------------------------------------------------------- decoding

/** "msgpack" for a binary frame, "json" for a text frame. */
export function frameEncoding(frame) {
  return typeof frame === "string" ? "json" : "msgpack";
}

/**
 * A frame (ArrayBuffer / Uint8Array for binary, string for text) -> its map, binary fields as Uint8Array.
 * Like Python's `decode_server`: no field checks beyond being a map. Throws ProtocolError("bad_message").
 */
export function decode(frame) {
  let obj;
  const json = typeof frame === "string";
  if (json) {
    try {
      obj = JSON.parse(frame);
    } catch (exc) {
      throw new ProtocolError("bad_message", `text frame is not a JSON object: ${exc.message}`);
    }
  } else {
    const bytes = toBytes(frame);
    if (bytes === null) throw new ProtocolError("bad_message", "frame must be binary or text");
    try {
      obj = decoder.decode(bytes);
    } catch (exc) {
      throw new ProtocolError("bad_message", `binary frame is not a msgpack map: ${exc.message}`);
    }
  }
  if (!isPlainObject(obj)) {
    const got = obj === null ? "null" : Array.isArray(obj) ? "list" : typeof obj;
    throw new ProtocolError("bad_message", `a message must be a map, got ${got}`);
  }
  const binary = BINARY_FIELDS[obj.type];
  if (binary !== undefined) {
    if (json && typeof obj[binary] === "string") obj[binary] = base64Decode(obj[binary]);
    else if (!json && obj[binary] instanceof Uint8Array) obj[binary] = obj[binary].slice(); // own its bytes
  }
  return obj;
}

// ---------------------------------------------------------------------------------------------- base64

export function base64Encode(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

export function base64Decode(text) {
  let s;
  try {
    s = atob(text);
  } catch {
    throw new ProtocolError("bad_message", "binary field is not valid base64");
  }
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}
