// A caption line: the segment a listener is hearing now, on the player's clock (samples the worklet rendered for
// the turn, compared with the segments' `ms` and, with word timing, the words' `start_ms`), never on message
// arrival. The chat has one for the default context (with the mouth beside it); scene mode has one per character.
//
// States (`data-state`): idle (no turn yet), pending (a turn started, its audio not playing), live (playing: the
// word being heard is `.w.now`, the ones before `.said`), cut (a barge-in stopped it: frozen on the segment and the
// word where it was cut, the words not heard `.unheard`; without word timing the line is struck through), done
// (a complete turn played out: its last segment). `data-segment` and `data-word` give the indices shown.

import { renderSegment, segmentAt, wordAt } from "./transcript.js";

/**
 * What a caption shows of the turn `entry` given `lane` (the worklet's status of its context) and `played` (ms of the
 * turn rendered): {mode, index, ms}, the segment `index` and the turn time `ms` its words are marked at (null: none).
 */
export function captionState(entry, lane, played) {
  if (!entry) return { mode: "idle", index: -1, ms: null };
  if (entry.heardMs !== null) {
    return { mode: "cut", index: Math.max(0, segmentAt(entry, entry.heardMs)), ms: entry.heardMs };
  }
  if (lane?.turn === entry.turn && lane.state === "playing") {
    return { mode: "live", index: segmentAt(entry, played), ms: played };
  }
  if (entry.reason !== null && entry.reason !== "complete") {
    return { mode: "cut", index: Math.max(0, segmentAt(entry, played)), ms: played };
  }
  if (entry.reason === "complete" && played > 0 && (lane?.turn !== entry.turn || lane.state === "idle")) {
    return { mode: "done", index: entry.segments.length - 1, ms: null };
  }
  return { mode: "pending", index: -1, ms: null };
}

export class Caption {
  /** @param {HTMLElement} el the caption element (a `.caption` holding one `.line`) @param {string} context its lane */
  constructor(el, context = "") {
    this.el = el;
    this.context = context;
    this.turn = null; // the last turn started in its context
    this.key = "";
  }

  /** A turn started in this caption's context: the caption waits for its audio. */
  start(turn) {
    this.turn = turn;
    this.key = "";
  }

  /** Follow the player's status (every ~25 ms). Returns the mode shown. */
  update(status, transcript) {
    const lane = status.lanes?.[this.context];
    // the turn being heard, else the last one started (a context's turns may queue behind each other)
    const turn = lane?.state === "playing" && lane.turn !== null ? lane.turn : this.turn;
    const entry = turn === null ? undefined : transcript.entry(turn);
    const played = status.played?.[turn] ?? 0;
    const { mode, index, ms } = captionState(entry, lane, played);
    const seg = index >= 0 ? entry.segments[index] : undefined;
    const word = seg && ms !== null ? wordAt(seg.words, ms) : -1;
    const key = `${turn}|${mode}|${index}|${word}|${seg?.words?.length ?? 0}|${seg?.text ?? ""}`;
    if (key === this.key) return mode;
    this.key = key;
    this.el.dataset.state = mode;
    this.el.dataset.segment = String(index);
    this.el.dataset.word = String(word);
    const line = document.createElement("span");
    line.className = "line";
    if (seg) {
      const spans = renderSegment(line, seg);
      line.classList.toggle("timed", spans.length > 0);
      spans.forEach((span, i) => {
        if (mode === "done" || i < word) span.classList.add("said");
        else if (i === word) span.classList.add("now");
        else if (mode === "cut") span.classList.add("unheard");
      });
    } else {
      line.textContent = mode === "idle" ? "—" : "…";
    }
    this.el.replaceChildren(line);
    return mode;
  }
}
