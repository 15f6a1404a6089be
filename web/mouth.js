// A small mouth that moves with the voice: the `visemes` of the turn being heard (output.timestamps "visemes"),
// each held until the next one's start_ms, looked up on the player's clock like the captions.
//
// The 15 Oculus/Meta OVR visemes map onto a few shapes, drawn by style.css (`.mouth[data-shape=...]`):
// closed (sil, PP), bite (FF: lower lip under the teeth), tongue (TH), teeth (DD kk CH SS nn: narrow, teeth
// showing), wide (aa), mid (E), smile (ih), round (oh) and pucker (ou, RR).

export const VISEMES = Object.freeze([
  "sil", "PP", "FF", "TH", "DD", "kk", "CH", "SS", "nn", "RR", "aa", "E", "ih", "oh", "ou",
]);

export const VISEME_SHAPES = Object.freeze([
  "closed", "closed", "bite", "tongue", "teeth", "teeth", "teeth", "teeth", "teeth", "pucker", "wide", "mid", "smile",
  "round", "pucker",
]);

/** The viseme id held `ms` into the turn (0, silence, before the first and without visemes). */
export function visemeAt(entry, ms) {
  let id = 0;
  for (const seg of entry?.segments ?? []) {
    for (const v of seg.visemes ?? []) {
      if (v.start_ms > ms) return id;
      id = v.id;
    }
  }
  return id;
}

export class Mouth {
  /** @param {SVGElement} el the `.mouth` drawing (see index.html) */
  constructor(el) {
    this.el = el;
    this.id = -1;
    this.set(0);
  }

  /** Show viseme `id` (0-14). */
  set(id) {
    if (id === this.id) return;
    this.id = id;
    this.el.dataset.viseme = VISEMES[id] ?? "sil";
    this.el.dataset.shape = VISEME_SHAPES[id] ?? "closed";
  }
}
