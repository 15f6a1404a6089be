"""Benchmark of a synthesizer as the GPU check runs it: decode rate, aggregate rate, TTFA on a cached prefix, RTF.

    python -m engine.sglang.bench --preset s2pro                 # the SGLang backend, S2 Pro shapes, random weights
    python -m engine.sglang.bench --engine stub --frames 32     # the same measurements on the CPU stub (a smoke)

Measured (every number from timestamps taken where the audio chunks come out of ``synthesize``):

- decode frames/s per stream at each concurrency c: c streams of ``--frames`` frames started together; for each,
  the frames after its first chunk over the time from its first to its last chunk (p50 over streams);
- aggregate frames/s at c: all frames of the c streams over the wall time from the first start to the last chunk;
- TTFA of turn 1 and turn 5: ``--sessions`` conversations run concurrently, ``--turns`` turns each, every turn's
  request carrying the earlier turns (text and codes) as history, a ``--pause`` between turns; TTFA is the time from
  calling ``synthesize`` to its first chunk (p50 / p90 over sessions). From turn 2 on, the prompt starts with
  everything through the previous turn, which the SGLang backend has in its radix cache;
- real-time factor at concurrency 1: generation wall time over the duration of the audio made.

With random weights the model never ends a turn early (``ignore_end``), so every stream is exactly ``--frames`` long.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from engine.base import PastTurn, Sampling, SynthesisRequest, Synthesizer

__all__ = ["BenchPlan", "BenchReport", "StreamTrace", "format_report", "main", "percentile", "run_benchmark"]

FRAME_SECONDS = 2048 / 44100
TEXT = "The quick brown fox jumps over the lazy dog, and then it runs back home through the tall grass."
# The targets on an H200 (real model): what the report prints beside the numbers.
TARGETS = {
    "ttfa_turn5_p50_ms": ("<", 100.0, "TTFA p50 at 16 sessions on a cached prefix"),
    "aggregate_fps": (">", 3000.0, "aggregate frames/s"),
    "rtf_c1": ("<", 0.2, "real-time factor at concurrency 1"),
}


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between ranks; NaN for no values."""
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


@dataclass
class StreamTrace:
    start: float  # when synthesize was called
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival time, frames)

    @property
    def frames(self) -> int:
        return sum(n for _, n in self.chunks)

    @property
    def ttfa(self) -> float:
        return self.chunks[0][0] - self.start if self.chunks else float("nan")

    @property
    def end(self) -> float:
        return self.chunks[-1][0] if self.chunks else self.start

    @property
    def decode_fps(self) -> float:
        """Frames after the first chunk over the time from the first chunk to the last."""
        if len(self.chunks) < 2:
            return float("nan")
        span = self.chunks[-1][0] - self.chunks[0][0]
        return (self.frames - self.chunks[0][1]) / span if span > 0 else float("nan")


@dataclass(frozen=True)
class BenchPlan:
    concurrency: tuple[int, ...] = (1, 8, 32)
    frames: int = 256  # per stream in the rate runs
    sessions: int = 16  # concurrent conversations for TTFA
    turns: int = 5
    turn_frames: int = 48  # frames per conversation turn
    pause_s: float = 0.5  # between turns of a conversation (the listener's turn)
    warmup: bool = True

    def __post_init__(self) -> None:
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError("concurrency levels must be >= 1")
        if self.frames < 2 or self.turn_frames < 1 or self.sessions < 1 or self.turns < 1 or self.pause_s < 0:
            raise ValueError("frames >= 2, turn_frames >= 1, sessions >= 1, turns >= 1, pause_s >= 0")


@dataclass
class BenchReport:
    engine: str
    decode_fps_p50: dict[int, float]  # concurrency -> per-stream decode frames/s (p50)
    aggregate_fps: dict[int, float]  # concurrency -> all frames / wall time
    ttfa_ms: dict[int, dict[str, float]]  # turn -> {"p50", "p90"}
    rtf_c1: float
    cached_fraction: dict[int, float]  # turn -> mean cached share of the prompt (if the engine reports it)
    frames_total: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _frames_of(chunk: Any, sample_rate: int) -> int:
    if getattr(chunk, "codes", None) is not None:
        return int(chunk.codes.shape[1])
    return round(chunk.pcm.size / (FRAME_SECONDS * sample_rate))


async def _trace(synth: Synthesizer, request: SynthesisRequest) -> tuple[StreamTrace, np.ndarray | None]:
    trace = StreamTrace(time.perf_counter())
    codes: list[np.ndarray] = []
    async for chunk in synth.synthesize(request):
        trace.chunks.append((time.perf_counter(), _frames_of(chunk, synth.info.sample_rate)))
        if chunk.codes is not None:
            codes.append(chunk.codes)
    return trace, (np.concatenate(codes, axis=1) if codes else None)


async def _rate_run(synth: Synthesizer, streams: int, frames: int) -> list[StreamTrace]:
    requests = [
        SynthesisRequest(f"Stream {i}. {TEXT}", sampling=Sampling(max_frames=frames, seed=1000 + i), session=f"r{i}")
        for i in range(streams)
    ]
    results = await asyncio.gather(*(_trace(synth, r) for r in requests))
    return [trace for trace, _ in results]


async def _conversation(synth: Synthesizer, index: int, plan: BenchPlan) -> list[tuple[StreamTrace, float | None]]:
    history: list[PastTurn] = []
    out = []
    for turn in range(plan.turns):
        text = f"Session {index}, turn {turn + 1}. {TEXT}"
        request = SynthesisRequest(
            text,
            history=tuple(history),
            sampling=Sampling(max_frames=plan.turn_frames, seed=index * 100 + turn),
            session=f"conversation-{index}",
        )
        trace, codes = await _trace(synth, request)
        usage = getattr(synth, "last_usage", {}).get(request.session)
        out.append((trace, usage[1] / usage[0] if usage and usage[0] else None))
        history.append(PastTurn(0, text, codes))
        await asyncio.sleep(plan.pause_s)
    return out


async def run_benchmark(synth: Synthesizer, plan: BenchPlan, *, log: Callable[[str], None] = print) -> BenchReport:
    """Run every measurement on a started synthesizer."""
    if plan.warmup:
        log("warm-up ...")
        await _rate_run(synth, min(4, max(plan.concurrency)), 8)
    decode_fps, aggregate = {}, {}
    rtf_c1 = float("nan")
    total = 0
    for c in plan.concurrency:
        traces = await _rate_run(synth, c, plan.frames)
        frames = sum(t.frames for t in traces)
        total += frames
        wall = max(t.end for t in traces) - min(t.start for t in traces)
        decode_fps[c] = percentile([t.decode_fps for t in traces if not np.isnan(t.decode_fps)], 50)
        aggregate[c] = frames / wall if wall > 0 else float("nan")
        if c == 1:
            rtf_c1 = wall / (frames * FRAME_SECONDS) if frames else float("nan")
        log(f"concurrency {c:>3}: {decode_fps[c]:8.1f} frames/s per stream, {aggregate[c]:9.1f} frames/s aggregate")
    log(f"{plan.sessions} conversations x {plan.turns} turns ...")
    conversations = await asyncio.gather(*(_conversation(synth, i, plan) for i in range(plan.sessions)))
    ttfa, cached = {}, {}
    for turn in range(plan.turns):
        values = [1000 * conv[turn][0].ttfa for conv in conversations if conv[turn][0].chunks]
        ttfa[turn + 1] = {"p50": percentile(values, 50), "p90": percentile(values, 90)}
        shares = [conv[turn][1] for conv in conversations if conv[turn][1] is not None]
        if shares:
            cached[turn + 1] = float(statistics.fmean(shares))
        total += sum(conv[turn][0].frames for conv in conversations)
    return BenchReport(synth.info.name, decode_fps, aggregate, ttfa, rtf_c1, cached, total)


def _check(name: str, value: float) -> str:
    op, target, _ = TARGETS[name]
    if np.isnan(value):
        return "n/a"
    ok = value < target if op == "<" else value > target
    return f"{'meets' if ok else 'MISSES'} target {op} {target:g}"


def format_report(report: BenchReport, plan: BenchPlan) -> str:
    lines = [f"engine {report.engine}: {report.frames_total} frames generated", ""]
    lines.append("concurrency | decode frames/s per stream (p50) | aggregate frames/s")
    for c in plan.concurrency:
        lines.append(f"{c:>11} | {report.decode_fps_p50[c]:>32.1f} | {report.aggregate_fps[c]:>18.1f}")
    best = max(report.aggregate_fps.values())
    lines.append(f"aggregate frames/s (best): {best:.1f}   [{_check('aggregate_fps', best)}]")
    lines.append("")
    lines.append(f"TTFA over {plan.sessions} concurrent conversations (ms):")
    for turn in sorted(report.ttfa_ms):
        if turn in (1, plan.turns):
            share = report.cached_fraction.get(turn)
            cached = f", cached prefix {100 * share:.0f}% of the prompt" if share is not None else ""
            lines.append(
                f"  turn {turn}: p50 {report.ttfa_ms[turn]['p50']:.1f}, p90 {report.ttfa_ms[turn]['p90']:.1f}{cached}"
            )
    last = report.ttfa_ms[plan.turns]["p50"]
    lines.append(f"  turn {plan.turns} p50 {last:.1f} ms   [{_check('ttfa_turn5_p50_ms', last)}]")
    lines.append("")
    lines.append(f"real-time factor at concurrency 1: {report.rtf_c1:.3f}   [{_check('rtf_c1', report.rtf_c1)}]")
    lines.append("")
    lines.append("targets (H200, real model): " + "; ".join(f"{d} {op} {t:g}" for op, t, d in TARGETS.values()))
    return "\n".join(lines)


def _parse_levels(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.sglang.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=("sglang", "stub"), default="sglang")
    p.add_argument("--preset", default="s2pro", help="random-weight model preset (engine.dualar.presets)")
    p.add_argument("--model", help="a real S2 Pro checkpoint directory instead of the preset")
    p.add_argument("--concurrency", type=_parse_levels, default=(1, 8, 32))
    p.add_argument("--frames", type=int, default=256)
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--turn-frames", type=int, default=48)
    p.add_argument("--pause", type=float, default=0.5)
    p.add_argument("--attention-backend", default="fa3")
    p.add_argument("--max-seq-len", type=int, default=8192)
    p.add_argument("--json", help="also write the report as JSON to this file")
    return p


def _make_engine(args: argparse.Namespace, plan: BenchPlan) -> Synthesizer:
    if args.engine == "stub":
        from engine.stub import StubConfig, StubSynthesizer

        return StubSynthesizer(StubConfig(ttft_ms=5, frame_ms=1, chars_per_frame=0.1))
    from engine.sglang.synthesizer import SGLangConfig, SGLangSynthesizer

    running = max(64, max(plan.concurrency), plan.sessions)
    return SGLangSynthesizer(
        SGLangConfig(
            model=args.model,
            preset=None if args.model else args.preset,
            ignore_end=args.model is None,
            attention_backend=args.attention_backend,
            max_seq_len=args.max_seq_len,
            max_running_requests=running,
            cuda_graph_max_bs=running,
            frames_per_char=1000.0,  # the benchmark sets the length, not the text
        )
    )


async def _main(args: argparse.Namespace) -> int:
    plan = BenchPlan(
        concurrency=args.concurrency,
        frames=args.frames,
        sessions=args.sessions,
        turns=args.turns,
        turn_frames=args.turn_frames,
        pause_s=args.pause,
    )
    synth = _make_engine(args, plan)
    started = time.perf_counter()
    await synth.start()
    print(f"engine started in {time.perf_counter() - started:.1f} s", flush=True)
    try:
        report = await run_benchmark(synth, plan, log=lambda line: print(line, flush=True))
    finally:
        await synth.aclose()
    print()
    print(format_report(report, plan))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report.to_json(), f, indent=2)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(_main(args))
    except Exception as exc:  # EngineError (no GPU, no sglang) and start-up failures: one clear line
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
