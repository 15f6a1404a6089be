// Scene mode: several characters speaking at once, each in a context of its own ("char-0", "char-1", ...), each
// with its line, its Say and Stop buttons, and a caption line showing the segment its listener is hearing now.
//
// The scene only renders and reports clicks: app.js sends the turns, and calls `update` with the player's status
// (every ~25 ms) so each caption (caption.js) follows the worklet's clock for its own context, word by word with
// word timing. A caption freezes on the segment (and the word) where a barge-in cut that character off.

import { Caption } from "./caption.js";

export const MAX_CHARACTERS = 4;

const LINES = [
  "Halt! Who goes there? Stand where you are, and keep your hands where I can see them.",
  "Only a traveller, friend. I am looking for the road to the harbour, nothing more.",
  "Don't listen to him, captain. He has been asking about the ships all morning.",
  "Enough, all of you! The gate closes at sunset, and it is nearly dark.",
];

export class Scene {
  /**
   * @param {HTMLElement} list the <ol> the characters go in
   * @param {{onSay: Function, onStop: Function, speakerLabel: Function}} handlers onSay(character) and
   *   onStop(character) for a character's buttons; speakerLabel(n) names a speaker in the pickers
   */
  constructor(list, { onSay, onStop, speakerLabel }) {
    this.list = list;
    this.onSay = onSay;
    this.onStop = onStop;
    this.speakerLabel = speakerLabel;
    this.speakers = [0, 1];
    this.characters = [];
    this.counter = 0;
    this.add(0);
    this.add(1);
  }

  /** A character with a context of its own (ids are never reused within a page, so a removed one's late audio
   * cannot reach a new one). */
  add(speaker) {
    if (this.characters.length >= MAX_CHARACTERS) return null;
    const n = this.counter++;
    const character = {
      context: `char-${n}`,
      name: `Character ${n + 1}`,
      speaker: speaker ?? this.speakers[this.characters.length % this.speakers.length] ?? 0,
      text: LINES[n % LINES.length],
      turn: null, // the last turn started in its context
      caption: null,
      el: null,
    };
    this.characters.push(character);
    this.list.append(this.render(character));
    this.refreshRemove();
    return character;
  }

  remove(character) {
    if (this.characters.length <= 2) return; // a scene has two characters at least
    this.characters = this.characters.filter((c) => c !== character);
    character.el.remove();
    this.refreshRemove();
  }

  byContext(context) {
    return this.characters.find((c) => c.context === context);
  }

  /** The session's speakers changed: refresh the pickers (a character whose speaker went away takes the first). */
  setSpeakers(speakers) {
    this.speakers = speakers.length ? speakers : [0];
    for (const c of this.characters) {
      if (!this.speakers.includes(c.speaker)) c.speaker = this.speakers[0];
      this.fillPicker(c);
      this.paint(c);
    }
  }

  /** A turn started in a character's context: its caption waits for that turn's audio. */
  startTurn(context, turn) {
    const c = this.byContext(context);
    if (!c) return;
    c.turn = turn;
    c.caption.start(turn);
  }

  /**
   * Captions from the player's status: for each character, the segment being heard in its context's lane, or
   * the segment where it was cut (struck through), or its last segment once it has finished.
   */
  update(status, transcript) {
    for (const c of this.characters) {
      const mode = c.caption.update(status, transcript);
      const badge = c.el.querySelector(".state");
      if (badge.dataset.state === mode) continue;
      badge.dataset.state = mode;
      badge.textContent = { idle: "", pending: "starting…", live: "speaking", cut: "stopped", done: "done" }[mode];
    }
  }

  /** Per-character counters (packets decoded, underruns) from `stats().contexts`. */
  updateCounters(contexts) {
    for (const c of this.characters) {
      const s = contexts[c.context];
      c.el.querySelector(".counters").textContent = s
        ? `${s.packetsDecoded} packets · ${s.underruns} underrun${s.underruns === 1 ? "" : "s"} · ${Math.round(s.bufferMs)} ms buffered`
        : "";
    }
  }

  // ------------------------------------------------------------------ DOM

  render(c) {
    const li = document.createElement("li");
    li.className = "character";
    li.dataset.context = c.context;
    li.innerHTML = `
      <div class="head">
        <span class="swatch"></span>
        <strong class="name"></strong>
        <select class="pick" aria-label="Speaker"></select>
        <span class="state"></span>
        <button type="button" class="ghost small remove" title="Remove this character">✕</button>
      </div>
      <p class="caption" data-state="idle" aria-live="off"><span class="line">—</span></p>
      <div class="say">
        <input type="text" class="text" maxlength="2000">
        <button type="button" class="secondary small say-btn">Say</button>
        <button type="button" class="danger small stop-btn">Stop</button>
      </div>
      <div class="counters"></div>`;
    c.el = li;
    c.caption = new Caption(li.querySelector(".caption"), c.context);
    li.querySelector(".name").textContent = c.name;
    const input = li.querySelector(".text");
    input.value = c.text;
    input.placeholder = `What ${c.name.toLowerCase()} says`;
    input.setAttribute("aria-label", `Line of ${c.name}`);
    input.addEventListener("input", () => (c.text = input.value));
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.isComposing) {
        event.preventDefault();
        this.onSay(c);
      }
    });
    li.querySelector(".say-btn").addEventListener("click", () => this.onSay(c));
    li.querySelector(".stop-btn").addEventListener("click", () => this.onStop(c));
    li.querySelector(".stop-btn").title = `Stop ${c.name} only`;
    li.querySelector(".remove").addEventListener("click", () => this.remove(c));
    const pick = li.querySelector(".pick");
    pick.addEventListener("change", () => {
      c.speaker = Number(pick.value);
      this.paint(c);
    });
    this.fillPicker(c);
    this.paint(c);
    return li;
  }

  fillPicker(c) {
    const pick = c.el.querySelector(".pick");
    pick.replaceChildren(...this.speakers.map((n) => new Option(this.speakerLabel(n), String(n))));
    pick.value = String(c.speaker);
  }

  paint(c) {
    c.el.style.setProperty("--c", `var(--s${c.speaker % 8})`);
  }

  refreshRemove() {
    for (const c of this.characters) c.el.querySelector(".remove").hidden = this.characters.length <= 2;
  }
}
