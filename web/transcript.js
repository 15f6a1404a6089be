// The conversation as the user sees it: one entry per turn, its text cut into the segments the server announced,
// the segment being heard highlighted (one per context playing at once). Kept in localStorage per session, so a
// reload shows the history again.
//
// With word timing (output.timestamps) each segment also holds its `words` ({text, start_ms, end_ms}, turn time)
// and `visemes` ({id, start_ms}); each word is a span of its own, so a barge-in marks unheard exactly the words
// whose start_ms is not before what was played (the server keeps the others in the stored turn).

const STORE_PREFIX = "shoal.transcript.";
const MAX_TURNS = 500;
const TAG = /(\[[^\[\]]*\]|<\|speaker:\d+\|>)/;
const WORD = /[\p{L}\p{N}]/u; // a word: a whitespace-separated run with a letter or a digit (as the server counts)

function chip(tag) {
  const el = document.createElement("span");
  el.className = "chip";
  const speaker = /^<\|speaker:(\d+)\|>$/.exec(tag);
  el.textContent = speaker ? `→ speaker ${speaker[1]}` : tag;
  return el;
}

/** Text with inline tags as chips: "[whisper] hi" -> <span class=chip>[whisper]</span> hi */
export function renderMarkup(parent, text) {
  for (const part of text.split(TAG)) {
    if (part) parent.append(TAG.test(part) ? chip(part) : part);
  }
}

/**
 * A segment as the user reads it: its markup (tags as chips) with each timed word in a `.w` span carrying its
 * `data-start` (ms); without words, just the markup. Returns the word spans, one per entry of `seg.words`.
 */
export function renderSegment(parent, seg) {
  const source = seg.markup ?? seg.text;
  const words = seg.words ?? [];
  if (!words.length) {
    renderMarkup(parent, source);
    return [];
  }
  const parts = source.split(TAG).filter(Boolean);
  const runs = parts.flatMap((part) => (TAG.test(part) ? [] : part.split(/\s+/).filter((run) => WORD.test(run))));
  const spans = [];
  const word = (text) => {
    const span = document.createElement("span");
    span.className = "w";
    span.textContent = text;
    span.dataset.start = String(words[spans.length].start_ms);
    spans.push(span);
    return span;
  };
  if (runs.length !== words.length) {
    // the markup does not split into the server's words: show the words themselves
    words.forEach((w, i) => parent.append(...(i ? [" "] : []), word(w.text)));
    return spans;
  }
  for (const part of parts) {
    if (TAG.test(part)) parent.append(chip(part));
    else for (const run of part.split(/(\s+)/)) if (run) parent.append(WORD.test(run) ? word(run) : run);
  }
  return spans;
}

/** Index of the word being heard `ms` into the turn: the last one that started before (-1 before the first). A
 * barge-in at `ms` leaves exactly the words up to this one heard, as the server cuts the stored turn. */
export function wordAt(words, ms) {
  let index = -1;
  for (let i = 0; i < (words?.length ?? 0); i++) if (words[i].start_ms < ms) index = i;
  return index;
}

export class Transcript {
  constructor(list, { speakerLabel = (n) => `Speaker ${n}` } = {}) {
    this.list = list;
    this.speakerLabel = speakerLabel;
    this.session = null;
    this.turns = new Map(); // turn -> entry
    this.playing = new Map(); // turn -> index of the segment being heard
  }

  /** Show the stored history of `session` (serverTurns: how many turns the server has stored; serverHistory: the
   * last turns' text as session.ready carries them on resume, used where this browser kept nothing). */
  load(session, serverTurns, serverHistory = []) {
    this.session = session;
    this.turns.clear();
    this.list.replaceChildren();
    let saved = [];
    try {
      saved = JSON.parse(localStorage.getItem(STORE_PREFIX + session) || "[]");
    } catch {
      saved = [];
    }
    const known = saved.filter((t) => t.turn < serverTurns);
    const have = new Set(known.map((t) => t.turn));
    for (const h of serverHistory) {
      if (have.has(h.turn) || h.turn >= serverTurns) continue;
      const segments = h.text ? [{ text: h.text, ms: 0 }] : [];
      known.push({ turn: h.turn, speaker: h.speaker, sent: h.text, segments, reason: h.state, ttfaMs: null,
        clientTtfaMs: null, audioMs: h.audio_ms, heardMs: null });
    }
    known.sort((a, b) => a.turn - b.turn);
    const missing = serverTurns - known.length;
    if (missing > 0) {
      const note = document.createElement("li");
      note.className = "note";
      note.textContent = `${missing} earlier turn${missing > 1 ? "s" : ""} of this session ${missing > 1 ? "are" : "is"} stored on the server but not in this browser.`;
      this.list.append(note);
    }
    for (const entry of known) {
      if (!entry.reason) entry.reason = "interrupted"; // the page went away while it played
      this.turns.set(entry.turn, entry);
      this.list.append(this.render(entry));
    }
    this.scroll();
  }

  clear() {
    this.turns.clear();
    this.list.replaceChildren();
  }

  save() {
    if (this.session === null) return;
    const entries = [...this.turns.values()].slice(-MAX_TURNS).map(({ el, segments, ...rest }) => ({
      ...rest,
      segments: segments.map(({ visemes, ...seg }) => seg),
    }));
    try {
      localStorage.setItem(STORE_PREFIX + this.session, JSON.stringify(entries));
    } catch {
      // storage full or disabled: the transcript just is not kept
    }
  }

  startTurn(turn, speaker, sent = "", context = "") {
    const entry = { turn, speaker, context, sent, segments: [], reason: null, ttfaMs: null, clientTtfaMs: null, audioMs: null, heardMs: null };
    this.turns.set(turn, entry);
    this.list.append(this.render(entry));
    this.scroll();
    this.save();
    return entry;
  }

  /** A `segment` message: its clean text, where it starts, and its markup (tags and instructions included). */
  addSegment(msg) {
    const entry = this.turns.get(msg.turn) ?? this.startTurn(msg.turn, msg.speaker ?? 0);
    entry.segments.push({ text: msg.text, ms: msg.ms, markup: msg.markup ?? null, words: null, visemes: null });
    this.refresh(entry);
    this.save();
  }

  /** A `words` or `visemes` message: the timing of the turn's latest segment (each comes after its segment). */
  addTiming(msg) {
    const entry = this.turns.get(msg.turn);
    const seg = entry?.segments.at(-1);
    if (!seg) return;
    if (msg.type === "visemes") {
      seg.visemes = msg.visemes; // for the mouth while it plays: not drawn, not kept
      return;
    }
    seg.words = msg.words;
    this.refresh(entry);
    this.save();
  }

  done(turn, msg, clientTtfaMs) {
    const entry = this.turns.get(turn);
    if (!entry) return;
    Object.assign(entry, { reason: msg.reason, ttfaMs: msg.ttfa_ms ?? null, audioMs: msg.audio_ms, clientTtfaMs });
    this.refresh(entry);
    this.save();
  }

  /** Barge-in: the listener heard `ms` of the turn; later segments are shown as unheard. */
  cut(turn, ms) {
    const entry = this.turns.get(turn);
    if (!entry) return;
    entry.heardMs = ms;
    this.refresh(entry);
    this.save();
  }

  /** Unfinished turns after a dropped connection: the server stored them cut at what it had sent. */
  interruptOpen() {
    for (const entry of this.turns.values()) {
      if (entry.reason === null) {
        entry.reason = "interrupted";
        this.refresh(entry);
      }
    }
    this.save();
  }

  /** The entry of `turn` (undefined if this page does not know it). */
  entry(turn) {
    return this.turns.get(turn);
  }

  /** Highlight the segments playing now (from the player's status): `playing` lists {turn, playedMs}, one per
   * context that is audible. */
  highlight(playing) {
    const now = new Map();
    for (const { turn, playedMs } of playing) {
      const entry = this.turns.get(turn);
      if (entry) now.set(turn, segmentAt(entry, playedMs));
    }
    for (const [turn, index] of this.playing) {
      if (now.get(turn) === index) continue;
      const entry = this.turns.get(turn);
      if (entry && !now.has(turn)) this.markPlaying(entry, -1);
    }
    for (const [turn, index] of now) {
      if (this.playing.get(turn) !== index) this.markPlaying(this.turns.get(turn), index);
    }
    this.playing = now;
  }

  markPlaying(entry, index) {
    if (!entry.el) return;
    entry.el.classList.toggle("speaking", index >= 0);
    entry.el.querySelectorAll(".seg").forEach((seg, i) => {
      seg.classList.toggle("playing", i === index);
      if (index >= 0) seg.classList.toggle("played", i < index);
    });
  }

  refresh(entry) {
    const old = entry.el;
    const el = this.render(entry);
    old?.replaceWith(el);
    if (this.playing.has(entry.turn)) this.markPlaying(entry, this.playing.get(entry.turn));
    this.scroll();
  }

  render(entry) {
    const li = document.createElement("li");
    li.className = `turn spk-${entry.speaker % 8}`;
    li.dataset.turn = entry.turn;
    li.dataset.speaker = entry.speaker;
    if (entry.context) li.dataset.context = entry.context;
    const meta = document.createElement("div");
    meta.className = "meta";
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = this.speakerLabel(entry.speaker);
    const info = document.createElement("span");
    info.className = "info";
    info.textContent = describe(entry);
    meta.append(who);
    if (entry.context) {
      const context = document.createElement("span");
      context.className = "context";
      context.textContent = entry.context;
      context.title = "the context this turn was spoken in (scene mode)";
      meta.append(context);
    }
    meta.append(info);
    const p = document.createElement("p");
    p.className = "text";
    if (entry.segments.length) {
      entry.segments.forEach((seg, i) => {
        const span = document.createElement("span");
        span.className = "seg";
        const words = renderSegment(span, seg);
        if (entry.heardMs !== null) {
          // heard: the words that started before the cut (without word timing: the segments that did)
          for (const w of words) w.classList.toggle("unheard", Number(w.dataset.start) >= entry.heardMs);
          if (seg.ms >= entry.heardMs && words.every((w) => w.classList.contains("unheard"))) span.classList.add("unheard");
        }
        if (i) p.append(" ");
        p.append(span);
      });
      const rest = entry.reason !== null && entry.reason !== "complete" ? unsaid(entry) : "";
      if (rest) {
        // stopped before the server got to it: what the listener never heard at all
        const span = document.createElement("span");
        span.className = "unsaid unheard";
        renderMarkup(span, rest);
        p.append(" ", span);
      }
    } else {
      const span = document.createElement("span");
      span.className = "seg pending";
      renderMarkup(span, entry.sent || "…");
      p.append(span);
    }
    li.append(meta, p);
    if (entry.reason) li.classList.add(`reason-${entry.reason}`);
    entry.el = li;
    return li;
  }

  scroll() {
    this.list.scrollTop = this.list.scrollHeight;
  }
}

/** Index of the segment being heard `ms` into the turn (-1 before the first). */
export function segmentAt(entry, ms) {
  let index = -1;
  for (let i = 0; i < entry.segments.length; i++) if (entry.segments[i].ms <= ms) index = i;
  return index;
}

// the part of the text this page sent that no segment covers (the server cuts segments out of it in order)
function unsaid(entry) {
  if (!entry.sent) return "";
  let cursor = 0;
  for (const seg of entry.segments) {
    const said = seg.markup ?? seg.text;
    const at = entry.sent.indexOf(said, cursor);
    if (at < 0) return "";
    cursor = at + said.length;
  }
  return entry.sent.slice(cursor).trim();
}

function describe(entry) {
  const parts = [`turn ${entry.turn}`];
  if (entry.reason === null) parts.push("speaking…");
  else if (entry.reason === "cancelled") parts.push(entry.heardMs !== null ? `stopped at ${(entry.heardMs / 1000).toFixed(1)} s` : "stopped");
  else if (entry.reason !== "complete") parts.push(entry.reason);
  if (entry.audioMs && entry.reason !== "cancelled") parts.push(`${(entry.audioMs / 1000).toFixed(1)} s`);
  if (entry.ttfaMs !== null && entry.ttfaMs !== undefined) parts.push(`TTFA ${Math.round(entry.ttfaMs)} ms`);
  return parts.join(" · ");
}
