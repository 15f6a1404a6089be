// Playback: wire audio -> PCM -> the jitter buffer in player-worklet.js -> speakers.
//
// Opus packets are decoded with WebCodecs' AudioDecoder; where WebCodecs (or its Opus) is missing the app asks the
// server for PCM16 instead, which needs no decoder (the telephony codecs mu-law and A-law are understood too). One
// AudioContext runs at the stream's sample rate. Each turn is a fresh Opus stream on the server, so the decoder is
// flushed at the end of a turn (its last samples reach the buffer before the turn's end marker) and reset on barge-in
// (queued packets are dropped at once). Decoded audio is tagged with its turn through the chunk timestamp.
//
// Concurrent contexts: each context's turns are separate Opus streams from separate encoders on the server, so each
// context gets its own AudioDecoder, and its PCM goes to its own lane (jitter buffer) in the worklet, which mixes the
// lanes. The default context is the lane "". Barge-in clears one lane (one context) or all of them.

import { alawToFloat, mulawToFloat } from "./g711.js";

export const JITTER_TARGET_MS = 120; // start (and restart after an underrun) once this much audio is queued
export const JITTER_MAX_MS = 6000; // beyond this the oldest audio is dropped (server lead_ms is 1500 by default)

const PCM_DECODERS = { pcm16: pcm16ToFloat, mulaw: mulawToFloat, alaw: alawToFloat }; // codecs without a decoder object

const TURN_US = 2 ** 34; // chunk timestamp = turn * TURN_US + TURN_US / 2 + ms * 1000 (µs); TURN_US ≈ 4.8 h

/** Whether this browser can decode Opus with WebCodecs (at 48 kHz mono, what the app asks for). */
export async function opusSupported() {
  if (typeof AudioDecoder === "undefined") return false;
  try {
    const { supported } = await AudioDecoder.isConfigSupported({ codec: "opus", sampleRate: 48000, numberOfChannels: 1 });
    return supported === true;
  } catch {
    return false;
  }
}

export class Player {
  constructor({ targetMs = JITTER_TARGET_MS, maxMs = JITTER_MAX_MS, onStatus = () => {}, onError = () => {} } = {}) {
    this.targetMs = targetMs;
    this.maxMs = maxMs;
    this.onStatus = onStatus;
    this.onError = onError;
    this.ctx = null;
    this.node = null;
    this.output = null; // the session's output settings (codec, sample_rate, ...)
    this.minTurn = 0; // audio of earlier turns is dropped (they were cancelled)
    this.lanes = new Map(); // context -> {decoder, minTurn, packetsReceived, packetsDecoded, decodeErrors}
    this.status = { bufferMs: 0, underruns: 0, starts: 0, droppedMs: 0, state: "idle", turn: null, playedMs: 0, played: {},
      mixedMs: 0, clippedMs: 0, lanes: {} };
    this.packetsReceived = 0;
    this.packetsDecoded = 0;
    this.bytesReceived = 0;
    this.audioMsReceived = 0;
    this.decodeErrors = 0;
    this._clears = new Map();
    this._clearId = 0;
  }

  /** Prepare for a session's output format; (re)creates the AudioContext when the sample rate changes. */
  async configure(output) {
    this.output = output;
    if (this.ctx === null || this.ctx.sampleRate !== output.sample_rate) {
      if (this.ctx !== null) await this.ctx.close();
      this.ctx = new AudioContext({ sampleRate: output.sample_rate, latencyHint: "interactive" });
      await this.ctx.audioWorklet.addModule(new URL("./player-worklet.js", import.meta.url));
      this.node = new AudioWorkletNode(this.ctx, "shoal-player", {
        numberOfInputs: 0,
        outputChannelCount: [1],
        processorOptions: { targetMs: this.targetMs, maxMs: this.maxMs },
      });
      this.node.port.onmessage = (event) => this._onWorklet(event.data);
      this.node.connect(this.ctx.destination);
    }
    for (const context of this.lanes.keys()) this._resetDecoder(context);
    this.resume();
  }

  /** Browsers start audio only after a user gesture (unless told otherwise): call from click/key handlers. */
  resume() {
    if (this.ctx !== null && this.ctx.state === "suspended") this.ctx.resume().catch(() => {});
  }

  get context() {
    return this.ctx;
  }

  /** The per-context state (created on first use): its decoder, the turns it drops, its counters. */
  lane(context = "") {
    let lane = this.lanes.get(context);
    if (lane === undefined) {
      lane = { decoder: null, minTurn: 0, packetsReceived: 0, packetsDecoded: 0, decodeErrors: 0, refusedTurn: null };
      this.lanes.set(context, lane);
    }
    return lane;
  }

  _resetDecoder(context) {
    const lane = this.lane(context);
    if (lane.decoder !== null && lane.decoder.state !== "closed") lane.decoder.close();
    lane.decoder = null;
    if (this.output === null || this.output.codec !== "opus") return;
    const decoder = new AudioDecoder({
      output: (data) => this._onDecoded(context, data),
      error: (exc) => {
        this.decodeErrors += 1;
        lane.decodeErrors += 1;
        this.onError(`Opus decoder${context ? ` (${context})` : ""}: ${exc.message}`);
        if (lane.decoder === decoder) this._resetDecoder(context); // a closed decoder stays closed: a new one
      },
    });
    decoder.configure({ codec: "opus", sampleRate: this.output.sample_rate, numberOfChannels: 1 });
    lane.decoder = decoder;
  }

  _drops(context, turn) {
    return turn < this.minTurn || turn < this.lane(context).minTurn;
  }

  /** One `audio` message from the server (its `context` picks the decoder and the lane). */
  push(msg) {
    const context = msg.context ?? "";
    if (this._drops(context, msg.turn) || this.output === null) return;
    const lane = this.lane(context);
    this.packetsReceived += 1;
    lane.packetsReceived += 1;
    this.bytesReceived += msg.data.byteLength;
    this.audioMsReceived += this.output.frame_ms;
    const codec = this.output.codec;
    if (codec === "opus") {
      if (lane.decoder === null || lane.decoder.state !== "configured") this._resetDecoder(context);
      const timestamp = msg.turn * TURN_US + TURN_US / 2 + Math.round(msg.ms * 1000);
      lane.decoder.decode(new EncodedAudioChunk({ type: "key", timestamp, data: msg.data }));
    } else {
      const decode = PCM_DECODERS[codec];
      if (decode === undefined) { // a codec this page never asks for: say so once per turn, play nothing
        if (lane.refusedTurn !== msg.turn) this.onError(`output.codec ${codec} cannot be played here`);
        lane.refusedTurn = msg.turn;
        return;
      }
      const pcm = decode(msg.data);
      this.packetsDecoded += 1;
      lane.packetsDecoded += 1;
      this._post(context, msg.turn, pcm);
    }
  }

  _onDecoded(context, data) {
    const turn = Math.floor(data.timestamp / TURN_US);
    try {
      if (this._drops(context, turn)) return;
      const pcm = new Float32Array(data.numberOfFrames);
      data.copyTo(pcm, { planeIndex: 0, format: "f32-planar" });
      this.packetsDecoded += 1;
      this.lane(context).packetsDecoded += 1;
      this._post(context, turn, pcm);
    } finally {
      data.close();
    }
  }

  _post(context, turn, pcm) {
    this.node.port.postMessage({ type: "samples", lane: context, turn, data: pcm }, [pcm.buffer]);
  }

  /** The server finished the turn (`turn.done`): once its last samples are in the buffer, mark its end. */
  async endTurn(turn, context = "") {
    const decoder = this.lane(context).decoder;
    if (decoder !== null && decoder.state === "configured") {
      try {
        await decoder.flush();
      } catch {
        return; // reset by a barge-in meanwhile: clear() has ended the turn
      }
    }
    this.node?.port.postMessage({ type: "end", lane: context, turn });
  }

  /**
   * Barge-in: silence within one render quantum, drop queued packets and audio of turns before `nextTurn`, of
   * `context` only (a string) or of every context (null). Resolves with {turn: ms actually played} for the turns
   * played so far.
   */
  clear(nextTurn, context = null) {
    if (context === null) {
      this.minTurn = Math.max(this.minTurn, nextTurn);
      for (const name of this.lanes.keys()) this._resetDecoder(name);
    } else {
      const lane = this.lane(context);
      lane.minTurn = Math.max(lane.minTurn, nextTurn);
      this._resetDecoder(context);
    }
    if (this.node === null) return Promise.resolve({});
    const id = ++this._clearId;
    return new Promise((resolve) => {
      this._clears.set(id, resolve);
      this.node.port.postMessage(context === null ? { type: "clear", id } : { type: "clear", id, lane: context });
    });
  }

  /** A new session: turn numbers start again, in every context. */
  restart() {
    this.minTurn = 0;
    for (const lane of this.lanes.values()) lane.minTurn = 0;
  }

  _onWorklet(msg) {
    if (msg.type === "status") {
      this.status = msg;
      this.onStatus(msg);
    } else if (msg.type === "cleared") {
      const resolve = this._clears.get(msg.id);
      this._clears.delete(msg.id);
      resolve?.(msg.played);
    }
  }

  /** Per-context numbers: the decoder's counters with the worklet lane's. */
  contextStats() {
    const out = {};
    for (const [context, lane] of this.lanes) {
      const st = this.status.lanes?.[context];
      out[context] = {
        packetsReceived: lane.packetsReceived,
        packetsDecoded: lane.packetsDecoded,
        decodeErrors: lane.decodeErrors,
        bufferMs: st?.bufferMs ?? 0,
        underruns: st?.underruns ?? 0,
        playbackStarts: st?.starts ?? 0,
        droppedMs: st?.droppedMs ?? 0,
        playback: st?.state ?? "idle",
        turn: st?.turn ?? null,
        playedMs: st?.playedMs ?? 0,
      };
    }
    return out;
  }

  /** Average bitrate of the audio received so far, in kbit/s. */
  get bitrateKbps() {
    return this.audioMsReceived > 0 ? (this.bytesReceived * 8) / this.audioMsReceived : 0;
  }
}

function pcm16ToFloat(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = new Float32Array(bytes.byteLength >> 1);
  for (let i = 0; i < out.length; i++) out[i] = view.getInt16(2 * i, true) / 32768;
  return out;
}
