// The playback end of the pipeline: an AudioWorkletProcessor that plays decoded PCM through jitter buffers, one
// per context (a "lane"), and mixes the lanes into its one output.
//
// Jitter buffer, per lane (all numbers are options of the node, defaults in web/player.js):
//   - target (default 120 ms): playback of a turn starts once this much audio is queued, or once the turn's audio
//     is complete (a short turn). After an underrun it waits for the target again before it resumes.
//   - max (default 6000 ms): more than this queued means the producer ran away from real time; the oldest audio is
//     dropped down to the target (counted as `droppedMs`). The server paces each context at most `lead_ms` (1500 ms
//     by default) ahead of real time, so in normal operation a lane stays below lead + target.
//   - an underrun is the queue running dry in the middle of a turn (its end not yet announced). A turn that ends
//     and the queue that then runs dry is not one; neither is the wait for the first fill of a turn.
// Turns of one lane play back to back with no gap: audio of the next turn queued behind the current one continues
// seamlessly. Lanes play independently (each fills, plays, underruns on its own); their samples are summed and the
// sum clipped to [-1, 1]. `mixedMs` counts the time two or more lanes were audible at once.
//
// Messages in (port): {type: "samples", lane, turn, data: Float32Array}, {type: "end", lane, turn} (no more audio
// for that turn), {type: "clear", id, lane?} (barge-in: drop everything of that lane, or of every lane without one,
// now; answered with {type: "cleared", id, played}). The lane is the context id ("" for the default context).
// Messages out: {type: "status", bufferMs, underruns, starts, droppedMs, state, turn, playedMs, played, mixedMs,
// clippedMs, lanes} every ~25 ms: the totals over all lanes (state: "playing" if any lane plays, else "filling" if
// any fills, else "idle"; turn/playedMs: the lane that played last), `played` maps turn -> ms actually played
// (rendered) so far, `lanes` maps lane -> {bufferMs, underruns, starts, droppedMs, state, turn, playedMs}.

const MAX_LANES = 32; // idle lanes beyond this are forgotten, oldest first
const MAX_PLAYED = 256; // turns whose played time is remembered

class Lane {
  constructor() {
    this.queue = []; // {turn, data, offset}
    this.buffered = 0; // samples queued
    this.state = "idle"; // idle (nothing to play) | filling (waiting for the target) | playing
    this.ended = new Set(); // turns whose audio is complete
    this.turn = null; // turn of the last sample rendered
    this.underruns = 0;
    this.starts = 0; // times playback started after waiting (first fill, or after an idle gap or an underrun)
    this.dropped = 0; // samples dropped on overflow
  }

  end(turn) {
    this.ended.add(turn);
    if (this.ended.size > 64) this.ended.delete(this.ended.values().next().value);
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

  clear() {
    for (const chunk of this.queue) this.end(chunk.turn);
    if (this.turn !== null) this.end(this.turn);
    this.queue = [];
    this.buffered = 0;
    this.state = "idle";
  }

  // the queued audio ends with a turn whose end was announced: nothing more will come before it plays out
  tailComplete() {
    return this.queue.length > 0 && this.ended.has(this.queue[this.queue.length - 1].turn);
  }
}

class PlayerProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = options.processorOptions || {};
    this.target = Math.round(((opts.targetMs ?? 120) * sampleRate) / 1000);
    this.max = Math.max(this.target * 2, Math.round(((opts.maxMs ?? 6000) * sampleRate) / 1000));
    this.statusEvery = Math.max(1, Math.round(((opts.statusMs ?? 25) * sampleRate) / 1000 / 128)); // quanta
    this.lanes = new Map(); // lane -> Lane
    this.played = new Map(); // turn -> samples rendered
    this.last = null; // the lane that rendered last
    this.mixed = 0; // samples during which two or more lanes were audible
    this.clipped = 0; // samples of the mix that had to be clipped
    this.scratch = new Float32Array(128);
    this.quanta = 0;
    this.port.onmessage = (event) => this.onMessage(event.data);
  }

  lane(name) {
    let lane = this.lanes.get(name);
    if (lane === undefined) {
      lane = new Lane();
      this.lanes.set(name, lane);
      if (this.lanes.size > MAX_LANES) {
        for (const [key, old] of this.lanes) {
          if (old.state === "idle" && key !== name) {
            this.lanes.delete(key);
            break;
          }
        }
      }
    }
    return lane;
  }

  onMessage(msg) {
    const name = msg.lane ?? "";
    if (msg.type === "samples") {
      const lane = this.lane(name);
      if (lane.ended.has(msg.turn)) return; // late audio of a finished or cleared turn
      lane.queue.push({ turn: msg.turn, data: msg.data, offset: 0 });
      lane.buffered += msg.data.length;
      if (lane.state === "idle") lane.state = "filling";
      if (lane.buffered > this.max) lane.drop(lane.buffered - this.target);
    } else if (msg.type === "end") {
      this.lane(name).end(msg.turn);
    } else if (msg.type === "clear") {
      if (msg.lane === undefined || msg.lane === null) for (const lane of this.lanes.values()) lane.clear();
      else this.lane(msg.lane).clear();
      this.port.postMessage({ type: "cleared", id: msg.id, played: this.playedMs() });
      this.postStatus();
    }
  }

  playedMs() {
    const out = {};
    for (const [turn, samples] of this.played) out[turn] = (samples * 1000) / sampleRate;
    return out;
  }

  postStatus() {
    const lanes = {};
    let bufferMs = 0, underruns = 0, starts = 0, droppedMs = 0, playing = false, filling = false;
    for (const [name, lane] of this.lanes) {
      const info = {
        bufferMs: (lane.buffered * 1000) / sampleRate,
        underruns: lane.underruns,
        starts: lane.starts,
        droppedMs: (lane.dropped * 1000) / sampleRate,
        state: lane.state,
        turn: lane.turn,
        playedMs: lane.turn === null ? 0 : ((this.played.get(lane.turn) ?? 0) * 1000) / sampleRate,
      };
      lanes[name] = info;
      bufferMs += info.bufferMs;
      underruns += info.underruns;
      starts += info.starts;
      droppedMs += info.droppedMs;
      playing ||= lane.state === "playing";
      filling ||= lane.state === "filling";
    }
    const last = this.last === null ? null : lanes[this.last] ?? null;
    this.port.postMessage({
      type: "status",
      bufferMs,
      underruns,
      starts,
      droppedMs,
      state: playing ? "playing" : filling ? "filling" : "idle",
      turn: last?.turn ?? null,
      playedMs: last?.playedMs ?? 0,
      played: this.playedMs(),
      mixedMs: (this.mixed * 1000) / sampleRate,
      clippedMs: (this.clipped * 1000) / sampleRate,
      lanes,
    });
  }

  // Render one lane into `into` (zeros where it has nothing); returns the number of samples it rendered.
  render(name, lane, into) {
    let pos = 0;
    if (lane.state === "filling" && (lane.buffered >= this.target || lane.tailComplete())) {
      lane.state = "playing";
      lane.starts += 1;
    }
    while (lane.state === "playing" && pos < into.length) {
      const chunk = lane.queue[0];
      if (chunk === undefined) {
        // dry: the normal end of a turn, or an underrun in the middle of one
        if (lane.turn !== null && lane.ended.has(lane.turn)) lane.state = "idle";
        else {
          lane.underruns += 1;
          lane.state = "filling";
        }
        break;
      }
      const n = Math.min(into.length - pos, chunk.data.length - chunk.offset);
      into.set(chunk.data.subarray(chunk.offset, chunk.offset + n), pos);
      pos += n;
      chunk.offset += n;
      lane.buffered -= n;
      if (lane.turn !== chunk.turn) {
        lane.turn = chunk.turn;
        if (!this.played.has(chunk.turn)) this.played.set(chunk.turn, 0);
        if (this.played.size > MAX_PLAYED) this.played.delete(this.played.keys().next().value);
      }
      this.played.set(chunk.turn, this.played.get(chunk.turn) + n);
      if (chunk.offset >= chunk.data.length) lane.queue.shift();
    }
    into.fill(0, pos);
    if (pos > 0) this.last = name;
    return pos;
  }

  process(inputs, outputs) {
    const out = outputs[0];
    const first = out[0];
    if (this.scratch.length !== first.length) this.scratch = new Float32Array(first.length);
    first.fill(0);
    let audible = 0; // lanes that rendered something in this quantum
    let overlap = 0; // samples of this quantum covered by two or more lanes (the shortest of the two longest)
    let longest = 0;
    for (const [name, lane] of this.lanes) {
      if (lane.state === "idle") continue;
      const n = this.render(name, lane, this.scratch);
      if (n === 0) continue;
      audible += 1;
      overlap = Math.max(overlap, Math.min(n, longest));
      longest = Math.max(longest, n);
      for (let i = 0; i < n; i++) first[i] += this.scratch[i];
    }
    if (audible > 1) {
      this.mixed += overlap;
      let clipped = 0;
      for (let i = 0; i < first.length; i++) {
        if (first[i] > 1) (first[i] = 1), clipped++;
        else if (first[i] < -1) (first[i] = -1), clipped++;
      }
      this.clipped += clipped;
    }
    for (let c = 1; c < out.length; c++) out[c].set(first);
    if (++this.quanta % this.statusEvery === 0) this.postStatus();
    return true;
  }
}

registerProcessor("shoal-player", PlayerProcessor);
