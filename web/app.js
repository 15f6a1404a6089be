// The voice chat page: wires the protocol connection, the player, the microphone, the scene and the page together,
// and exposes `window.shoal` for automation (say / cancel / stats / scene).
//
// Page address options: ?session=ID resumes a session (the page keeps it there, so a reload resumes),
// ?token=TOKEN for a server started with API keys (a short-lived token from POST /v1/tokens or `shoal token`,
// see web/README.md; not the API key itself), ?wire=json for JSON text frames instead of msgpack,
// ?codec=pcm16 to skip WebCodecs and take PCM16 (what a browser without WebCodecs Opus gets anyway),
// ?mode=scene to open in scene mode, ?timestamps=none|words|visemes for the word timing asked for (default
// visemes: the live caption follows the words, the mouth the visemes).

import { Caption } from "./caption.js";
import { Connection } from "./connection.js";
import { FRAME_MS, Mic, Recorder, SpeechDetector, levelDb } from "./mic.js";
import { JITTER_MAX_MS, JITTER_TARGET_MS, Player, opusSupported } from "./player.js";
import { Mouth, visemeAt } from "./mouth.js";
import { MAX_SPEAKER, MAX_SPEAKERS, TIMESTAMPS } from "./protocol.js";
import { MAX_CHARACTERS, Scene } from "./scene.js";
import { Transcript } from "./transcript.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const VOICES_KEY = "shoal.voices";
const TOKEN_MS = 40; // "stream as tokens": one word every 40 ms, about an LLM's pace
const VOICE_MAX_S = 30; // recording stops by itself here
const VOICE_MIN_S = 10; // below this, registering warns (the server takes 1-60 s)
const timestamps = TIMESTAMPS.includes(params.get("timestamps")) ? params.get("timestamps") : "visemes";

const state = {
  session: params.get("session"),
  engine: null,
  output: null,
  speakers: [{ speaker: 0, voice: null }, { speaker: 1, voice: null }],
  confirmedSpeakers: null, // as the server last confirmed them (a refused session.update goes back to these)
  ready: false, // session.ready received on this connection
  resumed: false,
  serverTurns: 0,
  expectReady: "start", // what the next session.ready answers: "start" or "update"
  maxTurn: -1, // highest turn index seen
  active: new Map(), // turn -> {speaker, context, t0, firstAudioMs, pending}
  queued: new Set(), // turns asked for, not yet being sent (behind a turn streamed token by token)
  waiting: [], // turns sent, turn.started not yet received: {text, speaker, context, t0, resolve, sent, cancelled}
  streaming: null, // {aborted} while a turn is being sent token by token
  sendChain: Promise.resolve(),
  turnsDone: 0,
  lastDone: null,
  contextDone: {}, // context -> its last turn.done ("" for the default context)
  clientTtfaMs: null,
  bargeIns: 0,
  playbackReports: [], // the last playback messages sent: {turn, played_ms}
  wordsMessages: 0,
  visemesMessages: 0,
  callerFrames: 0, // a joined phone call's audio frames relayed to the page
  errors: [],
  voices: loadVoices(),
  voiceAudio: null, // bytes to register
  registering: false,
};

// ------------------------------------------------------------------------------------------------ pieces

const player = new Player({
  targetMs: JITTER_TARGET_MS,
  maxMs: JITTER_MAX_MS,
  onStatus: (status) => {
    const playing = Object.values(status.lanes ?? {}).filter((l) => l.state === "playing" && l.turn !== null);
    transcript.highlight(playing.map((l) => ({ turn: l.turn, playedMs: l.playedMs })));
    scene.update(status, transcript);
    caption.update(status, transcript);
    const lane = status.lanes?.[""];
    mouth.set(lane?.state === "playing" && lane.turn !== null ? visemeAt(transcript.entry(lane.turn), lane.playedMs) : 0);
  },
  onError: (text) => log(text, "error"),
});
const transcript = new Transcript($("transcript"), { speakerLabel: speakerLabel });
const caption = new Caption($("caption")); // the default context's: what the chat is hearing now
const mouth = new Mouth($("mouth"));
const scene = new Scene($("cast"), {
  onSay: (character) => sayLine(character),
  onStop: (character) => cancel("stop", character.context),
  speakerLabel: speakerLabel,
});
let codec = "opus";
let conn = null;

function wsUrl() {
  const url = new URL("/v1/realtime", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if (params.get("token")) url.searchParams.set("token", params.get("token"));
  return url.href;
}

function outputRequest() {
  const format = codec === "opus"
    ? { codec: "opus", sample_rate: 48000, frame_ms: 20 }
    : { codec: "pcm16", sample_rate: 24000, frame_ms: 20 };
  return timestamps === "none" ? format : { ...format, timestamps };
}

function hello() {
  state.ready = false;
  state.expectReady = "start";
  const msg = { type: "session.start", output: outputRequest() };
  if (state.session) msg.session = state.session;
  else msg.speakers = state.speakers;
  return msg;
}

// ------------------------------------------------------------------------------------------------ messages

function onMessage(msg) {
  switch (msg.type) {
    case "session.ready":
      return onReady(msg);
    case "turn.started":
      return onTurnStarted(msg);
    case "segment":
      return transcript.addSegment(msg);
    case "words":
    case "visemes":
      if (msg.type === "words") state.wordsMessages += 1;
      else state.visemesMessages += 1;
      return transcript.addTiming(msg);
    case "audio":
      return onAudio(msg);
    case "turn.done":
      return onTurnDone(msg);
    case "voice.created":
      return onVoiceCreated(msg);
    case "error":
      return onError(msg);
    case "pong":
      return undefined;
    case "call.started": // a phone call joined this session (/v1/twilio): it hears the audio from now on
    case "call.stopped":
    case "input.speech_started":
    case "input.speech_stopped":
    case "input.dtmf":
    case "input.audio":
      return onCaller(msg);
    default:
      log(`unknown message type ${msg.type}`, "error");
  }
}

async function onReady(msg) {
  const answer = state.expectReady;
  state.expectReady = "start";
  state.engine = msg.engine;
  state.output = msg.output;
  if (msg.speakers.length) state.speakers = msg.speakers.map((s) => ({ speaker: s.speaker, voice: s.voice ?? null }));
  state.confirmedSpeakers = state.speakers;
  if (answer === "start") {
    if (state.session !== msg.session) player.restart(); // a new session: turn numbers start again
    state.session = msg.session;
    state.resumed = msg.resumed;
    state.serverTurns = msg.turns;
    state.maxTurn = Math.max(state.maxTurn, msg.turns - 1);
    const url = new URL(location.href);
    url.searchParams.set("session", msg.session);
    history.replaceState(null, "", url);
    $("session-id").textContent = msg.session;
    if (transcript.session !== msg.session) transcript.load(msg.session, msg.turns, msg.history ?? []);
    log(`${msg.resumed ? "resumed" : "started"} session ${msg.session} (${msg.turns} turns stored), engine ${msg.engine.name}`);
    conn.established();
  } else {
    log("session updated");
  }
  await player.configure(msg.output);
  state.ready = true;
  renderSpeakers();
  renderEngine();
  setConn("connected", "connected");
}

function onTurnStarted(msg) {
  const context = msg.context ?? "";
  state.maxTurn = Math.max(state.maxTurn, msg.turn);
  const at = state.waiting.findIndex((p) => p.context === context); // turns of one context start in order
  const pending = at >= 0 ? state.waiting.splice(at, 1)[0] : null;
  if (pending?.cancelled) {
    // stopped before it began: drop its audio
    const lane = player.lane(context);
    lane.minTurn = Math.max(lane.minTurn, msg.turn + 1);
  }
  state.active.set(msg.turn, { speaker: msg.speaker, context, t0: pending?.t0 ?? performance.now(), firstAudioMs: null, pending });
  transcript.startTurn(msg.turn, msg.speaker, pending?.text ?? "", context);
  scene.startTurn(context, msg.turn);
  if (context === "") {
    caption.start(msg.turn);
    $("live").style.setProperty("--c", `var(--s${msg.speaker % 8})`);
  }
}

function onAudio(msg) {
  const turn = state.active.get(msg.turn);
  if (turn && turn.firstAudioMs === null) {
    turn.firstAudioMs = performance.now() - turn.t0;
    state.clientTtfaMs = turn.firstAudioMs;
  }
  player.push(msg);
}

function onTurnDone(msg) {
  const turn = state.active.get(msg.turn);
  state.active.delete(msg.turn);
  player.endTurn(msg.turn, msg.context ?? "");
  state.turnsDone += 1;
  state.serverTurns = Math.max(state.serverTurns, msg.turn + 1);
  state.lastDone = msg;
  state.contextDone[msg.context ?? ""] = msg;
  transcript.done(msg.turn, msg, turn?.firstAudioMs ?? null);
  log(`turn ${msg.turn}${msg.context ? ` (${msg.context})` : ""} ${msg.reason}: ${(msg.audio_ms / 1000).toFixed(2)} s in ${msg.frames} packets, TTFA ${fmtMs(msg.ttfa_ms)}`);
  turn?.pending?.resolve?.(msg);
}

function onError(msg) {
  state.errors.push(msg);
  const text = `${msg.fatal ? "fatal " : ""}error ${msg.code}: ${msg.message}`;
  log(text, "error");
  showBanner(text);
  if (state.expectReady === "update" && !msg.fatal) {
    // most likely the answer to our session.update (an unknown voice, a turn under way): back to what holds
    state.expectReady = "start";
    if (state.confirmedSpeakers) state.speakers = state.confirmedSpeakers;
    renderSpeakers();
  }
  if (state.registering) {
    state.registering = false;
    setVoiceStatus(`not registered: ${msg.message}`);
    updateRegisterButton();
  }
}

function onOpen() {
  setConn("connecting", "starting session…");
}

function onClose(event) {
  const { code, reason, retryMs } = event.detail;
  state.ready = false;
  // turns in flight are over: the server stores them cut at what it had sent
  for (const [turn, info] of state.active) {
    player.endTurn(turn, info.context);
    info.pending?.resolve?.({ type: "turn.done", turn, reason: "disconnected" });
  }
  for (const pending of state.waiting) pending.resolve?.({ type: "turn.done", turn: null, reason: "disconnected" });
  state.active.clear();
  state.waiting = [];
  if (state.streaming) state.streaming.aborted = true;
  transcript.interruptOpen();
  const why = `closed (${code}${reason ? `: ${reason}` : ""})`;
  if (retryMs === null) {
    setConn("closed", `disconnected ${why}`);
    log(`connection ${why}`, "error");
    const last = state.errors.at(-1);
    const cause = last?.fatal ? ` after error ${last.code}: ${last.message}` : "";
    showBanner(`Disconnected ${why}${cause}. Reload the page to try again.`);
  } else {
    setConn("reconnecting", `reconnecting in ${(retryMs / 1000).toFixed(1)} s`);
    log(`connection ${why}; reconnecting in ${(retryMs / 1000).toFixed(1)} s`, code === 1000 ? "" : "error");
  }
}

// ------------------------------------------------------------------------------------------------ turns

function currentSpeaker() {
  return Number($("speaker").value || 0);
}

/**
 * Send one whole turn; resolves with its turn.done (reason "disconnected" if the connection drops first). With
 * `context` the turn is spoken in that context, at once, beside the turns of other contexts (scene mode); without,
 * in the default context, one turn at a time on the wire (a turn streamed token by token finishes sending first).
 */
function say(text, speaker = currentSpeaker(), { tokens = false, context = "" } = {}) {
  if (typeof text !== "string" || !text.trim()) return Promise.reject(new Error("nothing to say"));
  if (!state.ready || !conn.open) return Promise.reject(new Error("not connected"));
  player.resume();
  const pending = { text, speaker, context, t0: 0, sent: false, cancelled: false };
  const done = new Promise((resolve) => (pending.resolve = resolve));
  state.queued.add(pending);
  const failed = (exc) => {
    log(`could not send: ${exc.message}`, "error");
    showBanner(exc.message);
    state.waiting = state.waiting.filter((p) => p !== pending);
    pending.resolve({ type: "turn.done", turn: null, reason: "error" });
  };
  if (context) sendTurn(pending, tokens).catch(failed);
  else state.sendChain = state.sendChain.then(() => sendTurn(pending, tokens)).catch(failed);
  return done;
}

async function sendTurn(pending, tokens) {
  state.queued.delete(pending);
  if (pending.cancelled || !conn.open) {
    return pending.resolve({ type: "turn.done", turn: null, reason: pending.cancelled ? "cancelled" : "disconnected" });
  }
  const context = pending.context ? { context: pending.context } : {};
  state.waiting.push(pending);
  pending.t0 = performance.now();
  if (!tokens) {
    conn.send({ type: "text", text: pending.text, speaker: pending.speaker, ...context });
    pending.sent = true;
    conn.send({ type: "turn.end", ...context });
    return;
  }
  const stream = (state.streaming = { aborted: false });
  try {
    const words = pending.text.match(/\s*\S+/g) ?? [];
    for (let i = 0; i < words.length; i++) {
      if (stream.aborted) break;
      if (i) await sleep(TOKEN_MS);
      if (stream.aborted) break;
      conn.send({ type: "text", text: words[i], speaker: pending.speaker, ...context });
      pending.sent = true;
    }
    if (!stream.aborted) conn.send({ type: "turn.end", ...context });
  } finally {
    if (state.streaming === stream) state.streaming = null;
  }
  if (!pending.sent) {
    // stopped before its first word: the server never saw it
    state.waiting = state.waiting.filter((p) => p !== pending);
    pending.resolve({ type: "turn.done", turn: null, reason: "cancelled" });
  }
}

/** Scene mode: one character's line, in its own context. */
function sayLine(character) {
  if (!character.text.trim()) return Promise.resolve(null);
  if (!state.ready) {
    showBanner("Not connected yet: say it again once connected.");
    return Promise.resolve(null);
  }
  return say(character.text, character.speaker, { context: character.context });
}

/** Scene mode: every character's line at once; resolves with their turn.done messages, in character order. */
function playScene() {
  return Promise.all(scene.characters.map((c) => sayLine(c)));
}

function somethingToStop(context = null) {
  const mine = (x) => context === null || x.context === context;
  const lanes = player.status.lanes ?? {};
  const audible = context === null ? player.status.state !== "idle" : (lanes[context]?.state ?? "idle") !== "idle";
  return (
    [...state.active.values()].some(mine) || state.waiting.some(mine) || [...state.queued].some(mine) ||
    (context === null && state.streaming !== null) || audible
  );
}

/**
 * Barge-in: stop the voice now, tell the server, report how much of each turn was heard. Without `context` every
 * context stops (`cancel`, then a `playback` per turn); with one, only that context (scene mode's per-character
 * Stop): its lane is silenced first, then `playback` reports what its listener heard, then `cancel {context}`.
 */
async function cancel(source = "stop", context = null) {
  if (context === "") context = null; // the protocol's cancel without a context stops every context
  player.resume();
  if (!somethingToStop(context)) return false;
  const mine = (x) => context === null || x.context === context;
  if (context === null && state.streaming) state.streaming.aborted = true;
  for (const pending of [...state.waiting, ...state.queued]) if (mine(pending)) pending.cancelled = true;
  const turns = new Map(); // turn -> context
  for (const [turn, info] of state.active) if (mine(info)) turns.set(turn, info.context);
  for (const [lane, info] of Object.entries(player.status.lanes ?? {})) {
    if (info.state !== "idle" && info.turn !== null && (context === null || lane === context)) turns.set(info.turn, lane);
  }
  if (context === null && conn.open) conn.send({ type: "cancel" });
  const played = await player.clear(state.maxTurn + 1, context);
  for (const [turn, ctx] of [...turns].sort((a, b) => a[0] - b[0])) {
    const ms = Math.round((played[turn] ?? 0) * 10) / 10;
    const report = { type: "playback", turn, played_ms: ms, ...(ctx ? { context: ctx } : {}) };
    if (conn.open && conn.send(report)) {
      state.playbackReports = [...state.playbackReports.slice(-9), { turn, played_ms: ms, context: ctx }];
    }
    transcript.cut(turn, ms);
  }
  if (context !== null && conn.open) conn.send({ type: "cancel", ...(context ? { context } : {}) });
  if (source === "voice") state.bargeIns += 1;
  const heard = [...turns.keys()].map((t) => `turn ${t} ${fmtMs(played[t] ?? 0)}`).join(", ");
  log(`stopped${context ? ` ${context}` : ""} (${source})${turns.size ? `: heard ${heard}` : ""}`);
  return true;
}

// ------------------------------------------------------------------------------------------------ speakers & voices

function speakerLabel(n) {
  const s = state.speakers.find((x) => x.speaker === n);
  return `Speaker ${n}${s?.voice ? ` (${s.voice})` : ""}`;
}

function renderSpeakers() {
  const pick = $("speaker");
  const chosen = pick.value;
  pick.replaceChildren(...state.speakers.map((s) => new Option(`Speaker ${s.speaker}`, String(s.speaker))));
  if ([...pick.options].some((o) => o.value === chosen)) pick.value = chosen;
  const list = $("speakers");
  list.replaceChildren(
    ...state.speakers.map((s) => {
      const li = document.createElement("li");
      li.style.setProperty("--c", `var(--s${s.speaker % 8})`);
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = `Speaker ${s.speaker}`;
      const select = document.createElement("select");
      select.setAttribute("aria-label", `Voice of speaker ${s.speaker}`);
      select.dataset.speaker = s.speaker;
      const builtin = state.engine && !state.engine.cloning ? "built-in voice" : "default voice";
      const ids = new Set(state.voices.map((v) => v.voice));
      if (s.voice) ids.add(s.voice);
      select.append(new Option(builtin, ""), ...[...ids].map((id) => new Option(id, id)));
      select.value = s.voice ?? "";
      select.onchange = () => updateSpeakers(state.speakers.map((x) => (x.speaker === s.speaker ? { ...x, voice: select.value || null } : x)));
      li.append(swatch, label, select);
      if (state.speakers.length > 1) {
        const remove = document.createElement("button");
        remove.type = "button";
        remove.className = "ghost small";
        remove.textContent = "✕";
        remove.title = `Remove speaker ${s.speaker}`;
        remove.onclick = () => updateSpeakers(state.speakers.filter((x) => x.speaker !== s.speaker));
        li.append(remove);
      }
      return li;
    }),
  );
  $("add-speaker").disabled = state.speakers.length >= MAX_SPEAKERS;
  scene.setSpeakers(state.speakers.map((s) => s.speaker));
}

function updateSpeakers(speakers) {
  if (state.active.size || state.waiting.length) {
    showBanner("Voices can change between turns: wait for the current turn to finish (or stop it).");
    renderSpeakers();
    return;
  }
  if (!state.ready) return;
  state.expectReady = "update";
  conn.send({ type: "session.update", speakers });
  state.speakers = speakers; // the server's session.ready confirms (or an error says why not)
  renderSpeakers();
}

function loadVoices() {
  try {
    const voices = JSON.parse(localStorage.getItem(VOICES_KEY) || "[]");
    return Array.isArray(voices) ? voices.filter((v) => typeof v?.voice === "string") : [];
  } catch {
    return [];
  }
}

function renderVoices() {
  $("voices").replaceChildren(
    ...state.voices.map((v) => {
      const li = document.createElement("li");
      const code = document.createElement("code");
      code.textContent = v.voice;
      li.append(code, ` · ${v.seconds.toFixed(1)} s reference`);
      return li;
    }),
  );
}

// The caller's side, when a phone call joins the session this page drives: the call is then the listener (the
// session's audio goes to it, not to this page) and its caller the input; the page notes the call's events.
function onCaller(msg) {
  if (msg.type === "input.audio") {
    state.callerFrames += 1; // the call's audio relayed, 50 frames a second: counted, not logged
    return;
  }
  const text = {
    "call.started": () => `phone call ${msg.call} joined: it hears the session now, and its caller can interrupt`,
    "call.stopped": () => `phone call ${msg.call} ended (${msg.reason}): the audio comes back here`,
    "input.speech_started": () => `the caller started speaking (${(msg.ms / 1000).toFixed(2)} s into the call)`,
    "input.speech_stopped": () => `the caller stopped speaking (${(msg.ms / 1000).toFixed(2)} s into the call)`,
    "input.dtmf": () => `the caller pressed ${msg.digit}`,
  }[msg.type];
  log(text());
}

function onVoiceCreated(msg) {
  state.registering = false;
  state.voices = [{ voice: msg.voice, seconds: msg.seconds }, ...state.voices.filter((v) => v.voice !== msg.voice)].slice(0, 50);
  localStorage.setItem(VOICES_KEY, JSON.stringify(state.voices));
  const cloning = state.engine?.cloning;
  setVoiceStatus(`Registered ${msg.voice} (${msg.seconds.toFixed(1)} s).${cloning ? "" : " The built-in voice gives it a voice of its own."}`);
  log(`voice ${msg.voice} registered: ${msg.seconds.toFixed(1)} s, ${msg.frames} codec frames`);
  renderVoices();
  renderSpeakers();
  updateRegisterButton();
}

let recording = null; // {mic, recorder}

async function toggleRecording() {
  if (recording) return stopRecording();
  player.resume();
  const ctx = player.context;
  if (!ctx) return showBanner("Connect first: recording uses the page's audio engine.");
  const recorder = new Recorder(ctx.sampleRate);
  const mic = new Mic(ctx, {
    constraints: { echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    onFrame: (frame) => {
      recorder.push(frame);
      setMeter($("voice-level"), levelDb(frame));
      $("voice-timer").textContent = `${recorder.seconds.toFixed(1)} s`;
      if (recorder.seconds >= VOICE_MAX_S) stopRecording();
    },
  });
  recording = { mic, recorder };
  try {
    await mic.start();
  } catch (exc) {
    recording = null;
    showBanner(`Microphone: ${exc.message}`);
    return;
  }
  $("voice-record").textContent = "■ Stop";
  $("voice-record").classList.add("recording");
  setVoiceStatus("recording… read the transcript aloud");
}

function stopRecording() {
  if (!recording) return;
  const { mic, recorder } = recording;
  recording = null;
  mic.stop();
  $("voice-record").textContent = "● Record";
  $("voice-record").classList.remove("recording");
  setMeter($("voice-level"), -100);
  if (recorder.samples === 0) return setVoiceStatus("nothing recorded");
  setVoiceAudio(recorder.wav(), `recorded ${recorder.seconds.toFixed(1)} s, peak ${Math.round(recorder.peakDb)} dBFS${recorder.peakDb < -40 ? " (very quiet: check the microphone)" : ""}${recorder.seconds < VOICE_MIN_S ? ` — ${VOICE_MIN_S}–${VOICE_MAX_S} s works best` : ""}`);
}

function setVoiceAudio(bytes, status) {
  state.voiceAudio = bytes;
  const preview = $("voice-preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(new Blob([bytes]));
  preview.hidden = false;
  setVoiceStatus(status);
  updateRegisterButton();
}

function registerVoice() {
  const text = $("voice-text").value.trim();
  const id = $("voice-id").value.trim();
  if (!state.voiceAudio || !text || !state.ready) return;
  const msg = { type: "voice.create", audio: state.voiceAudio, text };
  if (id) msg.voice = id;
  try {
    conn.send(msg);
  } catch (exc) {
    return setVoiceStatus(exc.message);
  }
  state.registering = true;
  setVoiceStatus("registering…");
  updateRegisterButton();
}

function updateRegisterButton() {
  $("voice-register").disabled = !state.voiceAudio || !$("voice-text").value.trim() || state.registering || !state.ready;
}

function setVoiceStatus(text) {
  $("voice-status").textContent = text;
}

// ------------------------------------------------------------------------------------------------ mic barge-in

let bargeMic = null;
const detector = new SpeechDetector({
  onSpeech: () => {
    $("mic-meter").classList.add("speech");
    if (somethingToStop()) cancel("voice");
  },
});

async function setBargeIn(on) {
  if (!on) {
    bargeMic?.stop();
    bargeMic = null;
    $("mic-meter").hidden = true;
    return;
  }
  const ctx = player.context;
  if (!ctx) {
    $("mic-bargein").checked = false;
    return showBanner("Connect first: the microphone uses the page's audio engine.");
  }
  bargeMic = new Mic(ctx, {
    constraints: { echoCancellation: true, noiseSuppression: true, autoGainControl: false },
    onFrame: (frame) => {
      detector.push(frame);
      setMeter($("mic-level"), detector.levelDb);
      if (!detector.speaking) $("mic-meter").classList.remove("speech");
    },
  });
  try {
    await bargeMic.start();
    $("mic-meter").hidden = false;
    log(`mic barge-in on: energy detector, ${FRAME_MS} ms frames`);
  } catch (exc) {
    bargeMic = null;
    $("mic-bargein").checked = false;
    showBanner(`Microphone: ${exc.message}`);
  }
}

// ------------------------------------------------------------------------------------------------ page

function setConn(kind, text) {
  $("conn").dataset.state = kind;
  $("conn-text").textContent = text;
}

function showBanner(text) {
  $("banner-text").textContent = text;
  $("banner").hidden = false;
}

function log(text, kind = "") {
  const li = document.createElement("li");
  if (kind) li.className = kind;
  const time = document.createElement("time");
  time.textContent = new Date().toLocaleTimeString([], { hour12: false });
  li.append(time, text);
  const list = $("log");
  list.append(li);
  while (list.children.length > 200) list.firstChild.remove();
  list.scrollTop = list.scrollHeight;
}

function setMeter(el, db) {
  el.style.width = `${Math.max(0, Math.min(100, ((db + 70) / 60) * 100))}%`;
}

function fmtMs(ms) {
  return ms === null || ms === undefined ? "—" : `${Math.round(ms)} ms`;
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function renderEngine() {
  const e = state.engine;
  $("st-engine").textContent = e ? `${e.name} · ${e.sample_rate / 1000} kHz` : "—";
  const o = state.output;
  $("st-codec").textContent = o ? `${o.codec === "opus" ? "Opus" : o.codec.toUpperCase()} · ${o.sample_rate / 1000} kHz · ${o.frame_ms} ms` : "—";
  $("st-timing").textContent = o?.timestamps ? `${o.timestamps} · ${e?.timing ?? "?"}` : "—";
  const note = $("cloning-note");
  note.hidden = !e || e.cloning;
  note.textContent = e && !e.cloning
    ? `This server speaks with the built-in voice (${e.name}), which cannot clone voices. You can still register one: it gets a stable, distinct built-in voice of its own, and a cloning engine (S2 Pro) will speak in the recorded voice.`
    : "";
}

function renderStats() {
  const s = stats();
  $("st-ttfa").textContent = fmtMs(s.ttfaMs);
  $("st-client-ttfa").textContent = fmtMs(s.clientTtfaMs);
  $("st-packets").textContent = String(s.packetsDecoded);
  $("st-mixed").textContent = s.mixedMs > 0 ? `${(s.mixedMs / 1000).toFixed(1)} s` : "—";
  renderContexts(s.contexts);
  scene.updateCounters(s.contexts);
  $("st-buffer").textContent = `${Math.round(s.bufferMs)} ms`;
  $("st-buffer-bar").style.width = `${Math.min(100, (s.bufferMs / 2000) * 100)}%`;
  $("st-underruns").textContent = String(s.underruns);
  $("st-bitrate").textContent = s.bitrateKbps ? `${s.bitrateKbps.toFixed(1)} kbit/s` : "—";
  $("st-turns").textContent = String(s.turnsDone);
  $("st-reason").textContent = s.reason ?? "—";
}

/** The per-context table of the stats panel: shown once a named context (scene mode) has played. */
function renderContexts(contexts) {
  const names = Object.keys(contexts).sort();
  const table = $("st-contexts");
  table.hidden = !names.some((n) => n !== "");
  if (table.hidden) return;
  table.tBodies[0].replaceChildren(
    ...names.map((name) => {
      const c = contexts[name];
      const tr = document.createElement("tr");
      for (const value of [name || "default", c.packetsDecoded, c.underruns, `${Math.round(c.bufferMs)} ms`]) {
        const td = document.createElement("td");
        td.textContent = String(value);
        tr.append(td);
      }
      return tr;
    }),
  );
}

/** The stats panel's numbers (and a little more), for people and for tests. */
function stats() {
  const st = player.status;
  return {
    connected: state.ready && conn !== null && conn.open,
    session: state.session,
    resumed: state.resumed,
    turns: state.serverTurns, // turns the session has (stored or under way)
    engine: state.engine?.name ?? null,
    codec: state.output?.codec ?? null,
    ttfaMs: state.lastDone?.ttfa_ms ?? null, // server-measured, last finished turn
    clientTtfaMs: state.clientTtfaMs, // first text sent -> first audio received, last turn
    packetsReceived: player.packetsReceived,
    packetsDecoded: player.packetsDecoded,
    bufferMs: st.bufferMs,
    underruns: st.underruns,
    playbackStarts: st.starts, // 1 for turns played back to back with no gap
    droppedMs: st.droppedMs,
    playback: st.state, // idle | filling | playing
    playedMs: Object.values(st.played ?? {}).reduce((a, b) => a + b, 0),
    mixedMs: st.mixedMs ?? 0, // time two or more contexts were heard at once (summed into one output)
    clippedMs: st.clippedMs ?? 0, // samples of that mix clipped to [-1, 1]
    // per context ("" is the default one): packetsReceived, packetsDecoded, decodeErrors, bufferMs, underruns,
    // playbackStarts, droppedMs, playback, turn, playedMs, and its last turn.done as `done` {turn, reason, frames, audio_ms}
    contexts: Object.fromEntries(
      Object.entries(player.contextStats()).map(([name, c]) => {
        const d = state.contextDone[name];
        return [name, { ...c, done: d ? { turn: d.turn, reason: d.reason, frames: d.frames, audio_ms: d.audio_ms } : null }];
      }),
    ),
    bitrateKbps: player.bitrateKbps,
    turnsDone: state.turnsDone,
    reason: state.lastDone?.reason ?? null,
    bargeIns: state.bargeIns,
    playbackReports: state.playbackReports,
    timestamps: state.output?.timestamps ?? "none", // as the server confirmed it
    timing: state.engine?.timing ?? null, // exact | estimated | none
    wordsMessages: state.wordsMessages,
    visemesMessages: state.visemesMessages,
    callerFrames: state.callerFrames,
    errors: state.errors.map((e) => ({ code: e.code, message: e.message, fatal: e.fatal })),
  };
}

/** Chat (one composer, the default context) or scene (characters, a context each). */
function setMode(mode) {
  const isScene = mode === "scene";
  $("tab-chat").setAttribute("aria-selected", String(!isScene));
  $("tab-scene").setAttribute("aria-selected", String(isScene));
  $("composer").hidden = isScene;
  $("scene").hidden = !isScene;
  document.body.dataset.mode = mode;
  const url = new URL(location.href);
  if (isScene) url.searchParams.set("mode", "scene");
  else url.searchParams.delete("mode");
  history.replaceState(null, "", url);
}

function insertTag(tag) {
  const box = $("text");
  const start = box.selectionStart ?? box.value.length;
  const end = box.selectionEnd ?? start;
  const before = box.value.slice(0, start);
  const pad = before && !/\s$/.test(before) ? " " : "";
  const insert = `${pad}${tag} `;
  box.setRangeText(insert, start, end, "end");
  box.focus();
}

function submit() {
  const text = $("text").value;
  if (!text.trim()) return;
  if (!state.ready) return showBanner("Not connected yet: the text is kept, send it again once connected.");
  $("text").value = "";
  say(text, currentSpeaker(), { tokens: $("stream-tokens").checked });
}

async function main() {
  const forced = params.get("codec");
  codec = forced === "pcm16" || forced === "opus" ? forced : (await opusSupported()) ? "opus" : "pcm16";
  const encoding = params.get("wire") === "json" ? "json" : "msgpack";
  $("jitter-note").textContent = `Jitter buffer: playback starts at ${JITTER_TARGET_MS} ms queued, holds at most ${JITTER_MAX_MS / 1000} s. ` +
    (codec === "opus" ? "Opus decoded with WebCodecs." : "PCM16 (no WebCodecs Opus here).") + ` Wire: ${encoding}.`;
  renderSpeakers();
  renderVoices();

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    submit();
  });
  $("text").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submit();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") {
      event.preventDefault();
      cancel("esc");
    }
  });
  document.addEventListener("pointerdown", () => player.resume());
  $("stop").addEventListener("click", () => cancel("stop"));
  $("scene-stop").addEventListener("click", () => cancel("stop"));
  $("play-scene").addEventListener("click", () => {
    player.resume();
    playScene();
  });
  $("add-character").addEventListener("click", () => {
    scene.add();
    $("add-character").disabled = scene.characters.length >= MAX_CHARACTERS;
  });
  $("cast").addEventListener("click", () => ($("add-character").disabled = scene.characters.length >= MAX_CHARACTERS));
  $("tab-chat").addEventListener("click", () => setMode("chat"));
  $("tab-scene").addEventListener("click", () => setMode("scene"));
  setMode(params.get("mode") === "scene" ? "scene" : "chat");
  $("tags").addEventListener("click", (event) => {
    const tag = event.target.closest("button")?.dataset.tag;
    if (tag) insertTag(tag);
  });
  $("add-speaker").addEventListener("click", () => {
    const used = new Set(state.speakers.map((s) => s.speaker));
    let next = 0;
    while (used.has(next) && next <= MAX_SPEAKER) next += 1;
    if (next <= MAX_SPEAKER) updateSpeakers([...state.speakers, { speaker: next, voice: null }]);
  });
  $("new-session").addEventListener("click", () => {
    const url = new URL(location.href);
    url.searchParams.delete("session");
    history.replaceState(null, "", url);
    state.session = null;
    state.speakers = [{ speaker: 0, voice: null }, { speaker: 1, voice: null }];
    state.maxTurn = -1;
    state.contextDone = {};
    transcript.session = null;
    transcript.clear();
    caption.start(null);
    player.clear(0); // silence now; the new session's session.ready resets the turn numbering
    conn.reconnect();
  });
  $("banner-close").addEventListener("click", () => ($("banner").hidden = true));
  $("mic-bargein").addEventListener("change", (event) => setBargeIn(event.target.checked));
  $("voice-record").addEventListener("click", toggleRecording);
  $("voice-file").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    if (file) setVoiceAudio(new Uint8Array(await file.arrayBuffer()), `${file.name} (${Math.round(file.size / 1024)} KB)`);
  });
  $("voice-text").addEventListener("input", updateRegisterButton);
  $("voice-register").addEventListener("click", registerVoice);

  conn = new Connection(wsUrl(), { encoding, hello });
  conn.addEventListener("open", onOpen);
  conn.addEventListener("message", (event) => onMessage(event.detail));
  conn.addEventListener("close", onClose);
  conn.addEventListener("error", (event) => log(event.detail, "error"));
  conn.connect();
  setInterval(renderStats, 200);
}

window.shoal = {
  say,
  cancel: (context = null) => cancel("api", context),
  stats,
  scene: {
    play: playScene, // every character's line at once -> [turn.done, ...]
    say: (i) => sayLine(scene.characters[i]), // one character's line -> its turn.done
    stop: (i) => cancel("api", scene.characters[i].context), // one character's barge-in
    characters: () => scene.characters.map(({ context, name, speaker, text, turn }) => ({ context, name, speaker, text, turn })),
    mode: setMode,
  },
};

main().catch((exc) => {
  log(`page failed to start: ${exc.message}`, "error");
  showBanner(`The page failed to start: ${exc.message}`);
});
