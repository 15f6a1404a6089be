// The playback end of the pipeline: an AudioWorkletProcessor that plays decoded PCM through a jitter buffer.
//
// Jitter buffer (all numbers are options of the node, defaults in web/player.js):
//   - target (default 120 ms): playback of a turn starts once this much audio is queued, or once the turn's audio
//     is complete (a short turn). After an underrun it waits for the target again before it resumes.
//   - max (default 6000 ms): more than this queued means the producer ran away from real time; the oldest audio is
//     dropped down to the target (counted as `droppedMs`). The server paces audio at most `lead_ms` (1500 ms by
//     default) ahead of real time, so in normal operation the buffer stays below lead + target.
//   - an underrun is the queue running dry in the middle of a turn (its end not yet announced). A turn that ends
//     and the queue that then runs dry is not one; neither is the wait for the first fill of a turn.
// Turns play back to back with no gap: audio of the next turn queued behind the current one continues seamlessly.
//
// Messages in (port): {type: "samples", turn, data: Float32Array}, {type: "end", turn} (no more audio for that
// turn), {type: "clear", id} (barge-in: drop everything now; answered with {type: "cleared", id, played}).
// Messages out: {type: "status", bufferMs, underruns, starts, droppedMs, state, turn, playedMs, played} every ~25 ms,
// where `played` maps turn -> ms actually played (rendered) so far.

class PlayerProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = options.processorOptions || {};
    this.target = Math.round(((opts.targetMs ?? 120) * sampleRate) / 1000);
    this.max = Math.max(this.target * 2, Math.round(((opts.maxMs ?? 6000) * sampleRate) / 1000));
    this.statusEvery = Math.max(1, Math.round(((opts.statusMs ?? 25) * sampleRate) / 1000 / 128)); // quanta
    this.queue = []; // {turn, data, offset}
    this.buffered = 0; // samples queued
    this.state = "idle"; // idle (nothing to play) | filling (waiting for the target) | playing
    this.ended = new Set(); // turns whose audio is complete
    this.played = new Map(); // turn -> samples rendered
    this.turn = null; // turn of the last sample rendered
    this.underruns = 0;
    this.starts = 0; // times playback started after waiting (first fill, or after an idle gap or an underrun)
    this.dropped = 0; // samples dropped on overflow
    this.quanta = 0;
    this.port.onmessage = (event) => this.onMessage(event.data);
  }

  onMessage(msg) {
    if (msg.type === "samples") {
      if (this.ended.has(msg.turn)) return; // late audio of a finished or cleared turn
      this.queue.push({ turn: msg.turn, data: msg.data, offset: 0 });
      this.buffered += msg.data.length;
      if (this.state === "idle") this.state = "filling";
      if (this.buffered > this.max) this.drop(this.buffered - this.target);
    } else if (msg.type === "end") {
      this.ended.add(msg.turn);
      if (this.ended.size > 64) this.ended.delete(this.ended.values().next().value);
    } else if (msg.type === "clear") {
      for (const chunk of this.queue) this.ended.add(chunk.turn);
      if (this.turn !== null) this.ended.add(this.turn);
      this.queue = [];
      this.buffered = 0;
      this.state = "idle";
      this.port.postMessage({ type: "cleared", id: msg.id, played: this.playedMs() });
      this.postStatus();
    }
  }

  drop(samples) {
    while (samples > 0 && this.queue.length) {
      const chunk = this.queue[0];
      const n = Math.min(samples, chunk.data.length - chunk.offset);
      chunk.offset += n;
      samples -= n;
      this.buffered -= n;
      this.dropped += n;
      if (chunk.offset >= chunk.data.length) this.queue.shift();
    }
  }

  // the queued audio ends with a turn whose end was announced: nothing more will come before it plays out
  tailComplete() {
    return this.queue.length > 0 && this.ended.has(this.queue[this.queue.length - 1].turn);
  }

  playedMs() {
    const out = {};
    for (const [turn, samples] of this.played) out[turn] = (samples * 1000) / sampleRate;
    return out;
  }

  postStatus() {
    const turn = this.turn;
    this.port.postMessage({
      type: "status",
      bufferMs: (this.buffered * 1000) / sampleRate,
      underruns: this.underruns,
      starts: this.starts,
      droppedMs: (this.dropped * 1000) / sampleRate,
      state: this.state,
      turn,
      playedMs: turn === null ? 0 : ((this.played.get(turn) ?? 0) * 1000) / sampleRate,
      played: this.playedMs(),
    });
  }

  process(inputs, outputs) {
    const out = outputs[0];
    const first = out[0];
    let pos = 0;
    if (this.state === "filling" && (this.buffered >= this.target || this.tailComplete())) {
      this.state = "playing";
      this.starts += 1;
    }
    while (this.state === "playing" && pos < first.length) {
      const chunk = this.queue[0];
      if (chunk === undefined) {
        // dry: the normal end of a turn, or an underrun in the middle of one
        if (this.turn !== null && this.ended.has(this.turn)) this.state = "idle";
        else {
          this.underruns += 1;
          this.state = "filling";
        }
        break;
      }
      const n = Math.min(first.length - pos, chunk.data.length - chunk.offset);
      first.set(chunk.data.subarray(chunk.offset, chunk.offset + n), pos);
      pos += n;
      chunk.offset += n;
      this.buffered -= n;
      if (this.turn !== chunk.turn) {
        this.turn = chunk.turn;
        if (!this.played.has(chunk.turn)) this.played.set(chunk.turn, 0);
        if (this.played.size > 64) this.played.delete(this.played.keys().next().value);
      }
      this.played.set(chunk.turn, this.played.get(chunk.turn) + n);
      if (chunk.offset >= chunk.data.length) this.queue.shift();
    }
    first.fill(0, pos);
    for (let c = 1; c < out.length; c++) out[c].set(first);
    if (++this.quanta % this.statusEvery === 0) this.postStatus();
    return true;
  }
}

registerProcessor("shoal-player", PlayerProcessor);
