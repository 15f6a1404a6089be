// The microphone: capture (capture-worklet.js), a speech detector for barge-in, and a recorder for reference voices.

export const FRAME_MS = 20;

/** Microphone capture on an AudioContext: calls onFrame(Float32Array) every FRAME_MS. */
export class Mic {
  constructor(ctx, { constraints = {}, onFrame }) {
    this.ctx = ctx;
    this.constraints = constraints;
    this.onFrame = onFrame;
    this.stream = null;
    this.source = null;
    this.node = null;
    this.sink = null;
  }

  async start() {
    if (!navigator.mediaDevices?.getUserMedia) throw new Error("this browser has no microphone access (getUserMedia)");
    this.stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, ...this.constraints } });
    await this.ctx.audioWorklet.addModule(new URL("./capture-worklet.js", import.meta.url));
    this.source = this.ctx.createMediaStreamSource(this.stream);
    this.node = new AudioWorkletNode(this.ctx, "shoal-capture", {
      numberOfOutputs: 1,
      outputChannelCount: [1],
      processorOptions: { frameMs: FRAME_MS },
    });
    this.node.port.onmessage = (event) => this.onFrame(event.data.data);
    // a node must reach the destination to be pulled; a muted gain keeps the mic out of the speakers
    this.sink = this.ctx.createGain();
    this.sink.gain.value = 0;
    this.source.connect(this.node).connect(this.sink).connect(this.ctx.destination);
    if (this.ctx.state === "suspended") await this.ctx.resume();
  }

  get sampleRate() {
    return this.ctx.sampleRate;
  }

  stop() {
    this.source?.disconnect();
    this.node?.disconnect();
    this.sink?.disconnect();
    if (this.node) this.node.port.onmessage = null;
    this.stream?.getTracks().forEach((t) => t.stop());
    this.stream = this.source = this.node = this.sink = null;
  }
}

/** Level of a frame in dBFS (RMS; -100 for digital silence). */
export function levelDb(frame) {
  let sum = 0;
  for (let i = 0; i < frame.length; i++) sum += frame[i] * frame[i];
  return 10 * Math.log10(sum / Math.max(1, frame.length) + 1e-10);
}

/**
 * An energy speech detector, deliberately simple, for barge-in:
 *   - each 20 ms frame's RMS level (dBFS) is compared with a running noise floor;
 *   - the floor follows quiet frames quickly (20 % of the way per frame) and loud ones slowly (1 % per frame, a
 *     time constant of about 2 s), so steady noise becomes floor while speech, which comes in bursts, stays above;
 *   - a frame is voiced when it is `marginDb` (12 dB) above the floor and louder than `minDb` (-50 dBFS);
 *   - speech starts after `onsetFrames` (5 = 100 ms) voiced frames in a row and ends after `hangFrames`
 *     (15 = 300 ms) unvoiced ones. `onSpeech` fires once at each start.
 * Played-back audio is kept out by the browser's echo canceller (getUserMedia echoCancellation).
 */
export class SpeechDetector {
  constructor({ marginDb = 12, minDb = -50, onsetFrames = 5, hangFrames = 15, onSpeech = () => {} } = {}) {
    Object.assign(this, { marginDb, minDb, onsetFrames, hangFrames, onSpeech });
    this.floorDb = -70;
    this.levelDb = -100;
    this.voicedRun = 0;
    this.quietRun = 0;
    this.speaking = false;
  }

  push(frame) {
    const level = (this.levelDb = levelDb(frame));
    const voiced = level > Math.max(this.floorDb + this.marginDb, this.minDb);
    this.floorDb += (level - this.floorDb) * (level < this.floorDb ? 0.2 : 0.01);
    if (voiced) {
      this.voicedRun += 1;
      this.quietRun = 0;
      if (!this.speaking && this.voicedRun >= this.onsetFrames) {
        this.speaking = true;
        this.onSpeech();
      }
    } else {
      this.quietRun += 1;
      this.voicedRun = 0;
      if (this.speaking && this.quietRun >= this.hangFrames) this.speaking = false;
    }
  }
}

/** Collects frames; `wav()` gives a 16-bit mono WAV file of what was recorded. */
export class Recorder {
  constructor(sampleRate) {
    this.sampleRate = sampleRate;
    this.frames = [];
    this.samples = 0;
    this.peak = 0;
  }

  push(frame) {
    this.frames.push(frame);
    this.samples += frame.length;
    for (let i = 0; i < frame.length; i++) this.peak = Math.max(this.peak, Math.abs(frame[i]));
  }

  get peakDb() {
    return 20 * Math.log10(this.peak + 1e-10);
  }

  get seconds() {
    return this.samples / this.sampleRate;
  }

  wav() {
    const n = this.samples;
    const buf = new ArrayBuffer(44 + 2 * n);
    const v = new DataView(buf);
    const text = (off, s) => [...s].forEach((c, i) => v.setUint8(off + i, c.charCodeAt(0)));
    text(0, "RIFF");
    v.setUint32(4, 36 + 2 * n, true);
    text(8, "WAVE");
    text(12, "fmt ");
    v.setUint32(16, 16, true);
    v.setUint16(20, 1, true); // PCM
    v.setUint16(22, 1, true); // mono
    v.setUint32(24, this.sampleRate, true);
    v.setUint32(28, this.sampleRate * 2, true);
    v.setUint16(32, 2, true);
    v.setUint16(34, 16, true);
    text(36, "data");
    v.setUint32(40, 2 * n, true);
    let off = 44;
    for (const frame of this.frames) {
      for (let i = 0; i < frame.length; i++, off += 2) {
        v.setInt16(off, Math.max(-32768, Math.min(32767, Math.round(frame[i] * 32767))), true);
      }
    }
    return new Uint8Array(buf);
  }
}
