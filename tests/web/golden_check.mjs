// The JavaScript half of the golden test: web/protocol.js against tests/golden/. Runs the same in Chromium and in
// node; tests/web/test_protocol_js.py hands it the cases and the frames (base64 / text) and asserts on the result.
//
//   checkGolden(protocol, {cases: [{name, message, msgpack, json}], floats: [[x, pythonRepr]]}) -> [failure, ...]

function unbox(v) {
  if (Array.isArray(v)) return v.map(unbox);
  if (v !== null && typeof v === "object") {
    const keys = Object.keys(v);
    if (keys.length === 1 && keys[0] === "$bytes") return fromBase64(v.$bytes);
    return Object.fromEntries(keys.map((k) => [k, unbox(v[k])]));
  }
  return v;
}

function fromBase64(text) {
  const s = atob(text);
  return Uint8Array.from(s, (c) => c.charCodeAt(0));
}

function hex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// an order-preserving rendering, bytes as hex, so that key order and byte content both count
function show(v) {
  if (v instanceof Uint8Array) return `bytes(${hex(v)})`;
  if (Array.isArray(v)) return `[${v.map(show).join(",")}]`;
  if (v !== null && typeof v === "object") return `{${Object.keys(v).map((k) => `${k}:${show(v[k])}`).join(",")}}`;
  return JSON.stringify(v);
}

function expectThrows(failures, label, code, fn) {
  try {
    fn();
  } catch (exc) {
    if (exc.name !== "ProtocolError" || exc.code !== code) failures.push(`${label}: threw ${exc.name} ${exc.code}: ${exc.message}`);
    return;
  }
  failures.push(`${label}: did not throw ${code}`);
}

export function checkGolden(protocol, data) {
  const failures = [];
  for (const c of data.cases) {
    const message = unbox(c.message);
    const golden = fromBase64(c.msgpack);
    const where = (what) => `${c.name}: ${what}`;
    try {
      const wire = protocol.toWire(message);
      if (show(wire) !== show(message)) failures.push(where(`toWire ${show(wire)} != ${show(message)}`));
      const binary = protocol.encode(message, "msgpack");
      if (!(binary instanceof Uint8Array)) failures.push(where("msgpack frame is not a Uint8Array"));
      else if (hex(binary) !== hex(golden)) failures.push(where(`msgpack ${hex(binary)} != golden ${hex(golden)}`));
      const text = protocol.encode(message, "json");
      if (text !== c.json) failures.push(where(`json ${text} != golden ${c.json}`));
      for (const [label, frame] of [["msgpack", golden], ["msgpack ArrayBuffer", golden.slice().buffer], ["json", c.json]]) {
        const back = protocol.decode(frame);
        if (show(back) !== show(message)) failures.push(where(`decode(${label}) ${show(back)} != ${show(message)}`));
      }
      if (protocol.frameEncoding(c.json) !== "json" || protocol.frameEncoding(golden) !== "msgpack") {
        failures.push(where("frameEncoding"));
      }
    } catch (exc) {
      failures.push(where(`threw ${exc.name}: ${exc.message}`));
    }
  }
  for (const [x, repr] of data.floats) {
    const got = protocol.pyFloatRepr(x);
    if (got !== repr) failures.push(`pyFloatRepr(${x}) = ${got}, Python writes ${repr}`);
  }
  // the one documented error, with the same codes as the Python codec
  expectThrows(failures, "unknown type", "unknown_type", () => protocol.encode({ type: "nope" }));
  expectThrows(failures, "no type", "bad_message", () => protocol.encode({ text: "hi" }));
  expectThrows(failures, "speaker out of range", "bad_message", () => protocol.encode({ type: "text", text: "hi", speaker: 64 }));
  expectThrows(failures, "missing field", "bad_message", () => protocol.encode({ type: "playback", turn: 1 }));
  expectThrows(failures, "float not finite", "bad_message", () => protocol.encode({ type: "playback", turn: 1, played_ms: NaN }));
  expectThrows(failures, "bad voice id", "bad_message", () => protocol.encode({ type: "session.start", speakers: [{ speaker: 0, voice: "no spaces" }] }));
  expectThrows(failures, "speaker twice", "bad_message", () => protocol.encode({ type: "session.update", speakers: [{ speaker: 1 }, { speaker: 1 }] }));
  expectThrows(failures, "empty transcript", "bad_message", () => protocol.encode({ type: "voice.create", audio: new Uint8Array(4), text: " " }));
  expectThrows(failures, "text too long", "limit", () => protocol.encode({ type: "text", text: "x".repeat(20001) }));
  expectThrows(failures, "word not a map", "bad_message", () => protocol.encode({ type: "words", turn: 0, words: ["Hi"], estimated: false }));
  expectThrows(failures, "word time not a number", "bad_message", () => protocol.encode({ type: "words", turn: 0, words: [{ text: "Hi", start_ms: "0", end_ms: 1 }], estimated: false }));
  expectThrows(failures, "visemes not a list", "bad_message", () => protocol.encode({ type: "visemes", turn: 0, visemes: { id: 0, start_ms: 0 } }));
  expectThrows(failures, "input.vad neither on nor off", "bad_message", () => protocol.encode({ type: "session.start", input: { vad: 1 } }));
  expectThrows(failures, "input.threshold not a number", "bad_message", () => protocol.encode({ type: "session.update", input: { threshold: "high" } }));
  expectThrows(failures, "input.commit empty", "bad_message", () => protocol.encode({ type: "input.commit", speaker: 1, text: " ", start_ms: 0, end_ms: 5 }));
  expectThrows(failures, "input.commit backwards", "bad_message", () => protocol.encode({ type: "input.commit", speaker: 1, text: "Hi", start_ms: 5, end_ms: 5 }));
  expectThrows(failures, "input.audio relay without ms", "bad_message", () => protocol.encode({ type: "input.audio", data: new Uint8Array(2), codec: "alaw" }));
  // input.audio in both directions: the client's frame is {data}; with ms it is the server's relay, codec mulaw by default
  const bytes = new Uint8Array([1, 2]);
  const frame = show(protocol.toWire({ type: "input.audio", data: bytes }));
  if (frame !== "{type:\"input.audio\",data:bytes(0102)}") failures.push(`input.audio frame: ${frame}`);
  const relay = show(protocol.toWire({ codec: "mulaw", ms: 20, data: bytes, type: "input.audio" }));
  const relayDefault = show(protocol.toWire({ type: "input.audio", data: bytes, ms: 20 }));
  for (const got of [relay, relayDefault]) {
    if (got !== "{type:\"input.audio\",data:bytes(0102),ms:20,codec:\"mulaw\"}") failures.push(`input.audio relay: ${got}`);
  }
  expectThrows(failures, "not JSON", "bad_message", () => protocol.decode("{not json"));
  expectThrows(failures, "JSON list", "bad_message", () => protocol.decode("[1,2]"));
  expectThrows(failures, "msgpack list", "bad_message", () => protocol.decode(new Uint8Array([0x92, 0x01, 0x02])));
  expectThrows(failures, "msgpack truncated", "bad_message", () => protocol.decode(new Uint8Array([0x81, 0xa4, 0x74])));
  expectThrows(failures, "msgpack extra bytes", "bad_message", () => protocol.decode(new Uint8Array([0x80, 0x80])));
  expectThrows(failures, "bad base64", "bad_message", () => protocol.decode('{"type":"audio","data":"*"}'));
  return failures;
}
