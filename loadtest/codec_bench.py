"""The codec's floor per stream: what encoding one real-time stream costs, and what each Opus complexity sounds like.

``python -m loadtest.codec_bench [--json F]`` times, on this machine and in this process (no server, no socket):

- libopus alone (through the gateway's own ctypes call, on whole frames: no resampling, no framing), per 20 ms
  frame at 48 kHz, for complexity 0..10: microseconds per frame and the share of one core
  a real-time stream needs (``pct = us / frame_us * 100``), with a quality number for each: the SNR and the
  correlation of the decoded audio against the input PCM, aligned by the encoder's lookahead, and the log-spectral
  distance (dB) over 20 ms frames, which follows what a listener hears better than the waveform SNR does;
- the gateway's whole encode path (``realtime.audio.AudioEncoder.push``) per frame, fed in engine-sized chunks
  (2048 samples at 44.1 kHz, the S2 Pro codec frame and the stub's), for Opus at the server's complexity, PCM16
  and mu-law: resampling, framing and encoding together;
- libsoxr alone (44.1 -> 48 kHz, HQ, streaming): per engine chunk, and per 20 ms frame if it were called once a frame.

The audio is the built-in espeak-ng voice reading a few sentences (22.05 kHz, upsampled to 48 kHz once), or the
stub's tone if espeak-ng is not installed. Each timing is the best of ``--repeats`` passes over the clip (the
least disturbed by a neighbour on a shared machine). ``codec_floor_pct`` in the JSON is the libopus-only cost of a
stream at the server's complexity: the part of the per-stream CPU no Python change can remove.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import opuslib_next
import soxr

from realtime.audio import OPUS_COMPLEXITY, AudioEncoder, OutputFormat, decode_opus

RATE = 48000
CHUNK_44K = 2048  # the engine's chunk: one S2 Pro codec frame at 44.1 kHz (the stub's too)
TEXT = (
    "Thank you for calling. Your order shipped this morning and should arrive on Thursday. "
    "Is there anything else I can help you with today? The weather in Lisbon will be sunny, with a high of 24 degrees."
)


def speech() -> tuple[np.ndarray, str]:
    """Speech-like float32 mono at 48 kHz, and where it came from."""
    try:
        from engine.base import SynthesisRequest
        from engine.espeak import SAMPLE_RATE, EspeakConfig, EspeakSynthesizer

        async def say() -> np.ndarray:
            synth = EspeakSynthesizer(EspeakConfig(workers=1))
            await synth.start()
            try:
                async with asyncio.timeout(60):
                    chunks = [c.pcm async for c in synth.synthesize(SynthesisRequest(TEXT))]
            finally:
                await synth.aclose()
            return np.concatenate(chunks)

        pcm = asyncio.run(say())
        return soxr.resample(pcm, SAMPLE_RATE, RATE, "HQ").astype(np.float32), "espeak-ng (22.05 kHz, resampled)"
    except Exception as exc:  # noqa: BLE001 - the stub's tone is the documented fallback
        from engine.stub import _tone

        print(f"codec_bench: espeak-ng unavailable ({exc}); using the stub's tone", file=sys.stderr)
        return _tone(196.0, 0, 10 * RATE, RATE), "stub tone"


def _frames(x: np.ndarray, spf: int) -> np.ndarray:
    n = x.size // spf
    return np.ascontiguousarray(x[: n * spf].reshape(n, spf), dtype=np.float32)


def _best(fn: Any, repeats: int) -> float:
    """Best wall time of ``repeats`` calls, in seconds."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def aligned(x: np.ndarray, y: np.ndarray, delay: int, search: int = 16) -> tuple[np.ndarray, np.ndarray, int]:
    """``x`` and ``y`` shifted back by the codec's ``delay``, refined within +-``search`` samples by cross-correlation
    (libopus' lookahead is the CELT path's delay; its SILK and hybrid paths come out 2 samples earlier)."""
    n = min(x.size, y.size - delay - search)
    a = x[:n].astype(np.float64)
    lag = max(range(max(0, delay - search), delay + search + 1), key=lambda L: float(np.dot(a, y[L : L + n])))
    return a, y[lag : lag + n].astype(np.float64), lag


def quality(x: np.ndarray, y: np.ndarray, delay: int, spf: int) -> dict[str, float]:
    """Decoded ``y`` against input ``x`` (aligned): SNR (dB), correlation, and log-spectral distance (dB RMS over
    frames of ``spf`` samples with speech, bins within 60 dB of the frame's peak)."""
    a, b, lag = aligned(x, y, delay)
    snr = 10 * math.log10(float(np.sum(a * a)) / max(float(np.sum((a - b) ** 2)), 1e-20))
    corr = float(np.corrcoef(a, b)[0, 1])
    win = np.hanning(spf)
    la = 20 * np.log10(np.abs(np.fft.rfft(_frames(a.astype(np.float32), spf) * win, axis=1)) + 1e-9)
    lb = 20 * np.log10(np.abs(np.fft.rfft(_frames(b.astype(np.float32), spf) * win, axis=1)) + 1e-9)
    loud = la.max(axis=1) > la.max() - 50  # frames with speech, not the pauses
    keep = la[loud] > la[loud].max(axis=1, keepdims=True) - 60
    lsd = float(np.sqrt(np.mean(((la[loud] - lb[loud]) ** 2)[keep])))
    return {"snr_db": round(snr, 2), "corr": round(corr, 4), "lsd_db": round(lsd, 2), "lag": lag}


def opus_rows(x: np.ndarray, frame_ms: int, bitrate: int, repeats: int) -> list[dict[str, Any]]:
    spf = RATE * frame_ms // 1000
    frames = _frames(x, spf)
    rows = []
    for complexity in range(11):
        fmt = OutputFormat(sample_rate=RATE, frame_ms=frame_ms, bitrate=bitrate)

        def encode() -> list[bytes]:  # libopus through the gateway's own call (AudioEncoder._encode_opus)
            return AudioEncoder(fmt, RATE, complexity=complexity)._encode_opus(frames)

        packets = encode()
        seconds = _best(encode, repeats)
        us = seconds / len(frames) * 1e6
        y = decode_opus(packets, RATE)
        rows.append({
            "complexity": complexity,
            "us_per_frame": round(us, 1),
            "pct_per_stream": round(us / (frame_ms * 1000) * 100, 3),
            "kbps": round(sum(map(len, packets)) * 8 / (len(packets) * frame_ms), 1),
            **quality(frames.reshape(-1), y, AudioEncoder(fmt, RATE).codec_delay, RATE // 50),
        })
    return rows


def path_rows(x48: np.ndarray, frame_ms: int, repeats: int, complexity: int) -> list[dict[str, Any]]:
    """The gateway's AudioEncoder.push fed engine chunks at 44.1 kHz, per output frame, and libsoxr alone."""
    x44 = soxr.resample(x48, RATE, 44100, "HQ").astype(np.float32)
    chunks = [x44[i : i + CHUNK_44K] for i in range(0, x44.size - CHUNK_44K + 1, CHUNK_44K)]
    audio_s = len(chunks) * CHUNK_44K / 44100
    rows = []
    for codec, rate in (("opus", RATE), ("pcm16", RATE), ("pcm16", 44100), ("mulaw", 8000)):
        fmt = OutputFormat(codec=codec, sample_rate=rate, frame_ms=frame_ms)

        def run() -> int:
            enc = AudioEncoder(fmt, 44100, complexity=complexity)
            return sum(len(enc.push(c)) for c in chunks)

        n = run()
        seconds = _best(run, repeats)
        rows.append({"path": f"AudioEncoder {codec} {rate} Hz" + (" (no resampling)" if rate == 44100 else ""),
                     "us_per_frame": round(seconds / n * 1e6, 1), "pct_per_stream": round(seconds / audio_s * 100, 3)})
    for size, label in ((CHUNK_44K, "per engine chunk"), (44100 * frame_ms // 1000, f"per {frame_ms} ms frame")):
        pieces = [x44[i : i + size] for i in range(0, x44.size - size + 1, size)]

        def resample() -> None:
            rs = soxr.ResampleStream(44100, RATE, 1, dtype="float32", quality="HQ")
            for p in pieces:
                rs.resample_chunk(p)

        seconds = _best(resample, repeats)
        rows.append({"path": f"soxr 44.1 -> 48 kHz HQ, {label}", "us_per_call": round(seconds / len(pieces) * 1e6, 1),
                     "pct_per_stream": round(seconds / (len(pieces) * size / 44100) * 100, 3)})
    return rows


def floor_pct(sample_rate: int = RATE, frame_ms: int = 20, bitrate: int | None = None, seconds: float = 2.0,
              repeats: int = 3) -> float:
    """libopus alone for one real-time stream of the stub's tone (what ``--serve stub`` encodes), at the server's
    complexity and this format: percent of a core. Cheap (about 0.05 s): every Opus load-test run records it as the
    floor its server CPU per stream is set against."""
    from engine.stub import _tone

    fmt = OutputFormat(sample_rate=sample_rate, frame_ms=frame_ms, bitrate=bitrate or OutputFormat().bitrate)
    frames = _frames(np.array(_tone(196.0, 0, int(seconds * sample_rate), sample_rate)), fmt.samples_per_frame)
    encoder = AudioEncoder(fmt, sample_rate)
    best = _best(lambda: encoder._encode_opus(frames), repeats)
    return round(best / (len(frames) * frame_ms / 1000) * 100, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.codec_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--frame-ms", type=int, default=20, choices=(10, 20, 40, 60))
    parser.add_argument("--bitrate", type=int, default=OutputFormat().bitrate)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    x, source = speech()
    print(f"audio: {source}, {x.size / RATE:.1f} s; Opus {args.bitrate // 1000} kb/s, {args.frame_ms} ms frames, "
          f"application AUDIO, signal VOICE; libopus {opuslib_next.api.libopus._name}")
    opus = opus_rows(x, args.frame_ms, args.bitrate, args.repeats)
    print(f"\n{'complexity':>10} {'us/frame':>9} {'% core/stream':>14} {'kb/s':>6} {'SNR dB':>7} {'corr':>7} {'LSD dB':>7}")
    for r in opus:
        mark = "  <- server" if r["complexity"] == OPUS_COMPLEXITY else ""
        print(f"{r['complexity']:>10} {r['us_per_frame']:>9.1f} {r['pct_per_stream']:>14.3f} {r['kbps']:>6.1f} "
              f"{r['snr_db']:>7.2f} {r['corr']:>7.4f} {r['lsd_db']:>7.2f}{mark}")
    paths = path_rows(x, args.frame_ms, args.repeats, OPUS_COMPLEXITY)
    print(f"\n{'path (engine chunks of 2048 samples at 44.1 kHz)':<52} {'us':>8} {'% core/stream':>14}")
    for r in paths:
        us = r.get("us_per_frame", r.get("us_per_call"))
        unit = "/frame" if "us_per_frame" in r else "/call"
        print(f"{r['path']:<52} {us:>8.1f}{unit:<6} {r['pct_per_stream']:>8.3f}")
    chosen = next(r for r in opus if r["complexity"] == OPUS_COMPLEXITY)
    result = {
        "audio": source, "seconds": round(x.size / RATE, 2), "frame_ms": args.frame_ms, "bitrate": args.bitrate,
        "complexity": OPUS_COMPLEXITY, "codec_floor_pct": chosen["pct_per_stream"], "opus": opus, "paths": paths,
    }
    print(f"\ncodec floor at complexity {OPUS_COMPLEXITY}: {chosen['pct_per_stream']:.3f} % of a core per stream")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
