"""The GPU check, in one process: equality checks, the GPU-marked tests, the benchmark, one report.

    python3 -m engine.gpucheck --out DIR              # on the lent GPU machine (scripts/gpu-check.sh calls this)
    python3 -m engine.gpucheck --dry-run --out DIR    # the same code path: tiny preset, float32, CPU

Written for the machine as it is: the image's python3 (3.12), torch 2.11 + CUDA 13, triton, no network, nothing
installed; sglang only where it happens to be importable (then its backend's numbers are added). Every section is
timed and caught: a failing section is recorded in the report and the next one runs, so one call always brings
back a report. Everything goes to ``--out``: ``gpu-check.json`` (every number), ``gpu-check.txt`` (the table,
each number beside its target and the published anchors), ``gpu-check.png`` (a plot; matplotlib when importable,
else a small built-in PNG writer) and ``tests.log``.

What is measured (``s2pro`` preset: random weights, real shapes, bfloat16; the dry run: ``tiny``, float32, CPU):

- graphs == eager: the CUDA-graph decode (``engine.dualar.cuda_graphs``) against the same step run eagerly, codes
  identical at 1, 3 and 8 streams; and greedy codes against ``generate.stream`` (the reference loop) until the first
  repetition-aware redraw (random in both, from different random numbers).
- decode: frames/s per stream at concurrency 1, 8, 32 through the graphed decoder, and the aggregate; eager at
  concurrency 1 beside it (what the graphs buy).
- prefill: slow-AR tokens/s over one prompt.
- TTFA: 16 conversations at once through the batching scheduler with its prefix cache (the server's engine; its
  decode step as CUDA graphs on a GPU, the report says which), turn 1 (a voice reference and text, nothing cached)
  and turn 5 (four turns of history cached): submit to first frame, plus the codec's decode of a first chunk
  (2 frames), p50 and max.
- RTF at concurrency 1: graphed decode of a turn plus its streaming codec decode, over the audio's duration.
- codec: streaming decode cost per chunk size (1, 2, 4, 8 frames) and its real-time factor.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import struct
import sys
import time
import traceback
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["ANCHORS", "TARGETS", "Plan", "check_graphs_equal_eager", "main", "run_check", "write_png_bars"]

# The targets Shoal promises (DESIGN.md) and what others published, shown beside every number.
TARGETS = {
    "ttfa_turn5_p50_ms": ("<", 100.0, "TTFA on a cached prefix at 16 sessions"),
    "aggregate_fps_max": (">", 3000.0, "decode frames/s, all streams"),
    "rtf_c1": ("<", 0.2, "real-time factor at concurrency 1"),
}
ANCHORS = {
    "Fish Audio S2 Pro (published)": "RTF 0.195, TTFA ~100 ms",
    "sglang-omni S2 Pro (published)": "63 tokens/s and ~140 ms TTFA at batch 1",
}
FRAME_SECONDS = 2048 / 44100  # one codec frame


class Plan:
    """Sizes of one run: the real one on a GPU, or the dry run's tiny one on a CPU."""

    def __init__(self, dry_run: bool) -> None:
        self.dry_run = dry_run
        self.preset = "tiny" if dry_run else "s2pro"
        self.device = "cpu" if dry_run else "cuda"
        self.dtype = "float32" if dry_run else "bfloat16"
        self.concurrency = (1, 8, 32)
        self.decode_frames = 16 if dry_run else 128
        self.eager_frames = 8 if dry_run else 32
        self.prompt_len = 96 if dry_run else 320
        self.prefill_len = 256 if dry_run else 2048
        self.sessions = 16
        self.turns = 5
        self.turn_frames = 6 if dry_run else 48
        self.voice_frames = 40 if dry_run else 215
        self.rtf_frames = 32 if dry_run else 256
        self.max_seq_len = 2048 if dry_run else 4096
        self.equality_frames = 12 if dry_run else 48

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


# ------------------------------------------------------------------------------------------------ helpers


def _sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def build_model(preset: str, device: str, dtype: str, seed: int = 0) -> Any:
    """Random weights of a preset, drawn on the device itself (an s2pro model in seconds, not minutes on a CPU)."""
    import torch

    from engine.dualar.model import DualAR
    from engine.dualar.presets import preset_config

    with torch.device("meta"):
        model = DualAR(preset_config(preset))
    model = model.to_empty(device=device).to(getattr(torch, dtype))
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    model.init_buffers()
    return model.requires_grad_(False).eval()


def random_prompt(model: Any, length: int, seed: int) -> Any:
    import torch

    from engine.dualar.bench import random_prompt as make

    return make(model.config, length, torch.Generator().manual_seed(seed))


def _prompts(model: Any) -> Any:
    from engine.dualar.presets import byte_level_tokenizer
    from engine.dualar.prompt import PromptBuilder

    c = model.config
    return PromptBuilder(byte_level_tokenizer(c.num_semantic_tokens), semantic_begin_id=c.semantic_begin_id,
                         num_codebooks=c.num_codebooks, codebook_size=c.codebook_size)


# ------------------------------------------------------------------------------------------------ checks


def check_graphs_equal_eager(preset: str, *, device: str, dtype: str, frames: int,
                             streams: tuple[int, ...] = (1, 3, 8), model: Any = None) -> dict[str, Any]:
    """Codes of the graphed decoder vs the same step run eagerly (identical, or not), and greedy codes vs
    ``generate.stream`` until the first repetition-aware redraw. Without CUDA only the second part runs."""
    import torch

    from engine.base import Sampling
    from engine.dualar.cuda_graphs import GraphedDecoder
    from engine.dualar.generate import stream

    model = model if model is not None else build_model(preset, device, dtype)
    length = 64 if preset == "tiny" else 256
    settings = [Sampling(temperature=0.0, seed=0), Sampling(temperature=0.8, top_p=0.8, top_k=30, seed=7),
                Sampling(temperature=1.0, seed=3)]
    result: dict[str, Any] = {"preset": preset, "device": device, "dtype": dtype, "frames": frames, "cases": []}

    def run(decoder: GraphedDecoder, n: int) -> Any:
        first = [decoder.start(i, random_prompt(model, length + i, seed=i), settings[i % 3], allow_end=False)
                 for i in range(n)]
        out = [torch.stack(first)]
        for _ in range(frames - 1):
            out.append(decoder.step(n).clone())
        for i in range(n):
            decoder.stop(i)
        return torch.stack(out, dim=1).cpu()

    graphs = torch.device(device).type == "cuda"
    equal = True
    if graphs:
        eager = GraphedDecoder(model, max_batch=max(streams), max_seq_len=length + max(streams) + frames + 8,
                               use_graphs=False)
        graphed = GraphedDecoder(model, max_batch=max(streams), max_seq_len=length + max(streams) + frames + 8)
        started = time.perf_counter()
        graphed.capture()
        result["capture_s"] = round(time.perf_counter() - started, 2)
        for n in streams:
            a, b = run(eager, n), run(graphed, n)
            same = bool(torch.equal(a, b))
            equal &= same
            result["cases"].append({"streams": n, "identical": same,
                                    "frames_differing": int((a != b).any(dim=-1).sum())})
    else:
        result["cases"].append({"skipped": "no CUDA: graphs are not captured (the eager step is what the CPU tests "
                                           "check)"})
    # greedy vs the reference loop, stream 0 alone
    decoder = GraphedDecoder(model, max_batch=1, max_seq_len=length + frames + 8, use_graphs=graphs)
    prompt = random_prompt(model, length, seed=0)
    ours = [decoder.start(0, prompt, settings[0], allow_end=False)]
    redrawn = [bool(decoder.state.ras[0])]
    for _ in range(frames - 1):
        ours.append(decoder.step(1)[0].clone())
        redrawn.append(bool(decoder.state.ras[0]))
    decoder.stop(0)
    reference = list(stream(model, prompt.to(model.slow.norm.weight.device), Sampling(temperature=0.0, seed=0,
                                                                                     max_frames=frames)))
    agree = 0
    for mine, theirs in zip(ours, reference, strict=False):
        if not torch.equal(mine[1:].cpu(), theirs.cpu()):
            break
        agree += 1
    # frames before the first repetition-aware redraw must match (the redraw is random, from other numbers)
    comparable = min(redrawn.index(True) if True in redrawn else len(ours), len(reference))
    result["greedy_frames_equal_to_reference"] = agree
    result["greedy_frames_before_first_redraw"] = comparable
    result["reference_frames"] = len(reference)
    result["equal"] = equal and agree >= comparable
    return result


# ------------------------------------------------------------------------------------------------ benchmark


def bench_decode(model: Any, plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    import torch

    from engine.base import Sampling
    from engine.dualar.cuda_graphs import GraphedDecoder

    sampling = Sampling(temperature=0.8, top_p=0.8, top_k=30, seed=1)
    graphs = plan.device == "cuda"
    top = max(plan.concurrency)
    seq = plan.max_seq_len  # the server's cache length: the graphed step attends over all of it
    out: dict[str, Any] = {"graphed": graphs, "per_stream_fps": {}, "aggregate_fps": {}, "step_ms": {}}
    decoder = GraphedDecoder(model, max_batch=top, max_seq_len=seq, use_graphs=graphs)
    started = time.perf_counter()
    decoder.capture()
    out["capture_s"] = round(time.perf_counter() - started, 2)
    for n in plan.concurrency:
        for row in range(n):
            decoder.start(row, random_prompt(model, plan.prompt_len + row, seed=row), sampling, allow_end=False)
        for _ in range(2):
            decoder.step(n)
        _sync(plan.device)
        started = time.perf_counter()
        for _ in range(plan.decode_frames):
            decoder.step(n)
        _sync(plan.device)
        elapsed = time.perf_counter() - started
        for row in range(n):
            decoder.stop(row)
        out["per_stream_fps"][n] = plan.decode_frames / elapsed
        out["aggregate_fps"][n] = n * plan.decode_frames / elapsed
        out["step_ms"][n] = 1000 * elapsed / plan.decode_frames
        log(f"decode c={n}: {out['per_stream_fps'][n]:.1f} frames/s per stream, "
            f"{out['aggregate_fps'][n]:.0f} aggregate ({out['step_ms'][n]:.2f} ms/step)")
    # eager, concurrency 1: what the graphs buy
    eager = GraphedDecoder(model, max_batch=1, max_seq_len=seq, use_graphs=False)
    eager.start(0, random_prompt(model, plan.prompt_len, seed=0), sampling, allow_end=False)
    eager.step(1)
    _sync(plan.device)
    started = time.perf_counter()
    for _ in range(plan.eager_frames):
        eager.step(1)
    _sync(plan.device)
    out["eager_fps_c1"] = plan.eager_frames / (time.perf_counter() - started)
    log(f"decode eager c=1: {out['eager_fps_c1']:.1f} frames/s")
    del decoder, eager
    return out


def bench_prefill(model: Any, plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    import torch

    device = model.slow.norm.weight.device
    model.setup_caches(1, plan.max_seq_len)
    prompt = random_prompt(model, plan.prefill_len, seed=5).to(device)[None]
    positions = torch.arange(plan.prefill_len, device=device)
    times = []
    with torch.inference_mode():
        for _ in range(4):
            _sync(device)
            started = time.perf_counter()
            model.slow(prompt, positions, slice(0, 1))
            _sync(device)
            times.append(time.perf_counter() - started)
    best = statistics.median(times[1:])
    out = {"tokens": plan.prefill_len, "ms": 1000 * best, "tokens_per_s": plan.prefill_len / best}
    log(f"prefill {plan.prefill_len} tokens: {out['ms']:.1f} ms, {out['tokens_per_s']:.0f} tokens/s")
    return out


def bench_codec(plan: Plan, log: Callable[[str], None]) -> tuple[dict[str, Any], Any]:
    import numpy as np
    import torch

    from engine.dualar.bench import _random_codes, codec_config
    from engine.dualar.presets import random_codec

    codec = random_codec(plan.preset, device=plan.device)
    generator = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {"chunk_ms": {}}
    for size in (1, 2, 4, 8):
        decoder = codec.stream()
        times = []
        for _ in range(6):
            codes = _random_codes(codec_config(plan.preset), size, generator).numpy().astype(np.int16)
            _sync(plan.device)
            started = time.perf_counter()
            decoder.decode(codes)
            _sync(plan.device)
            times.append(time.perf_counter() - started)
        out["chunk_ms"][size] = 1000 * statistics.median(times[1:])
    out["rtf"] = out["chunk_ms"][8] / 1000 / (8 * FRAME_SECONDS)
    log("codec streaming decode: " + ", ".join(f"{k} frames {v:.1f} ms" for k, v in out["chunk_ms"].items())
        + f"; RTF {out['rtf']:.3f}")
    return out, codec


def bench_rtf(model: Any, codec: Any, plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    """One turn at concurrency 1: graphed decode of ``rtf_frames`` frames, then their streaming codec decode in the
    synthesizer's growing chunks (1, 2, 4, then 8), serially (the server overlaps them: this is the upper bound)."""
    import numpy as np

    from engine.base import Sampling
    from engine.dualar.cuda_graphs import GraphedDecoder

    decoder = GraphedDecoder(model, max_batch=1, max_seq_len=plan.max_seq_len,  # as the server's cache
                             use_graphs=plan.device == "cuda")
    decoder.capture()
    prompt = random_prompt(model, plan.prompt_len, seed=9)
    _sync(plan.device)
    started = time.perf_counter()
    frames = [decoder.start(0, prompt, Sampling(temperature=0.8, top_p=0.8, top_k=30, seed=2), allow_end=False)]
    for _ in range(plan.rtf_frames - 1):
        frames.append(decoder.step(1)[0])
    codes = np.stack([f[1:].cpu().numpy() for f in frames], axis=1).astype(np.int16)
    _sync(plan.device)
    model_s = time.perf_counter() - started
    stream = codec.stream()
    started, done, size = time.perf_counter(), 0, 1
    while done < codes.shape[1]:
        stream.decode(codes[:, done : done + size])
        done, size = done + size, min(size * 2, 8)
    _sync(plan.device)
    codec_s = time.perf_counter() - started
    audio_s = plan.rtf_frames * FRAME_SECONDS
    out = {"frames": plan.rtf_frames, "model_s": model_s, "codec_s": codec_s, "audio_s": audio_s,
           "rtf": (model_s + codec_s) / audio_s, "rtf_model_only": model_s / audio_s}
    log(f"RTF c=1 ({plan.rtf_frames} frames, prefill included): {out['rtf']:.3f} "
        f"(model {out['rtf_model_only']:.3f})")
    return out


def bench_ttfa(model: Any, codec_first_chunk_ms: float, plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    """16 conversations at once through the batching scheduler (prefix cache on; its decode step graphed on CUDA,
    captured before turn 1), turns 1..5."""
    import numpy as np
    import torch

    from engine.base import PastTurn, Sampling, SynthesisRequest, VoiceRef
    from engine.dualar.scheduler import Scheduler, SchedulerConfig

    prompts = _prompts(model)
    c = model.config
    model.setup_caches(plan.sessions, plan.max_seq_len)  # before the scheduler: its graphs are captured over these
    scheduler = Scheduler(model, SchedulerConfig(max_batch_size=plan.sessions, output_frames=1 << 16,
                                                 prefix_cache_bytes=8 << 30))
    decode = (f"CUDA graphs (padded batch sizes {', '.join(map(str, scheduler.decoder.sizes))})"
              if scheduler.graphed and scheduler.decoder is not None else "eager")
    log(f"TTFA: the scheduler's decode step is {decode}")
    rng = np.random.default_rng(0)
    voices = []
    for _ in range(plan.sessions):
        codes = rng.integers(0, c.codebook_size, (c.num_codebooks, plan.voice_frames)).astype(np.int16)
        voices.append(VoiceRef(voice=f"speaker-{len(voices)}", text="A sentence the speaker read for their voice.", codes=codes))
    history: list[list[PastTurn]] = [[] for _ in range(plan.sessions)]
    lines = ["Did you bring the maps we talked about last night?", "I did, but the coastal one got soaked.",
             "Then we follow the river to the bridge.", "That bridge washed out two winters ago.",
             "Right. The ferry, then, if the keeper is awake."]
    turns: dict[int, dict[str, float]] = {}
    for turn in range(1, plan.turns + 1):
        seqs = []
        for i in range(plan.sessions):
            request = SynthesisRequest(lines[(turn - 1) % len(lines)], voices=[voices[i]], history=history[i],
                                       sampling=Sampling(temperature=0.8, top_p=0.8, top_k=30, seed=100 * i + turn,
                                                         max_frames=plan.turn_frames))
            seqs.append(scheduler.submit(prompts.build_request(request), request.sampling))
        while any(s.finish is None for s in seqs):
            scheduler.step()
        _sync(plan.device)
        ttfa = [1000 * (s.first_frame_at - s.submitted_at) for s in seqs if s.first_frame_at is not None]
        reused = [s.reused / s.prompt_len for s in seqs]
        for i, s in enumerate(seqs):
            frames = scheduler.take(s, 1 << 20).frames
            if frames:
                codes = torch.stack(frames, dim=1).numpy().astype(np.int16)
                history[i] = [*history[i], PastTurn(0, lines[(turn - 1) % len(lines)], codes)]
        turns[turn] = {"engine_p50_ms": statistics.median(ttfa), "engine_max_ms": max(ttfa),
                       "p50_ms": statistics.median(ttfa) + codec_first_chunk_ms,
                       "max_ms": max(ttfa) + codec_first_chunk_ms, "cached_fraction": statistics.mean(reused),
                       "prompt_len": statistics.mean(s.prompt_len for s in seqs)}
        log(f"TTFA turn {turn} ({plan.sessions} at once, prompts ~{turns[turn]['prompt_len']:.0f}, "
            f"{100 * turns[turn]['cached_fraction']:.0f}% cached): p50 {turns[turn]['p50_ms']:.1f} ms, "
            f"max {turns[turn]['max_ms']:.1f} ms (first frame + codec first chunk {codec_first_chunk_ms:.1f} ms)")
    return {"sessions": plan.sessions, "turns": turns, "codec_first_chunk_ms": codec_first_chunk_ms,
            "prefill_chunk": scheduler.config.prefill_chunk, "prefix_cache_bytes": scheduler.config.prefix_cache_bytes,
            "decode": decode, "graphed": scheduler.graphed}


def bench_sglang(plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    import asyncio

    from engine.sglang.bench import BenchPlan, run_benchmark
    from engine.sglang.synthesizer import SGLangConfig, SGLangSynthesizer

    bench_plan = BenchPlan(concurrency=plan.concurrency, frames=plan.decode_frames, sessions=plan.sessions,
                           turns=plan.turns, turn_frames=plan.turn_frames)

    async def go() -> dict[str, Any]:
        running = max(64, max(plan.concurrency), plan.sessions)
        synth = SGLangSynthesizer(SGLangConfig(preset=plan.preset, ignore_end=True, max_running_requests=running,
                                               cuda_graph_max_bs=running, frames_per_char=1000.0))
        await synth.start()
        try:
            report = await run_benchmark(synth, bench_plan, log=log)
        finally:
            await synth.aclose()
        return report.to_json()

    return asyncio.run(go())


# ------------------------------------------------------------------------------------------------ tests


def run_tests(out: Path, dry_run: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """The GPU-marked tests, in this process, if pytest is importable (it is on the lent machines' image)."""
    try:
        import pytest
    except ImportError:
        return {"skipped": "pytest is not importable; the equality checks above ran without it"}
    root = Path(__file__).resolve().parents[1]
    files = ["tests/engine/dualar/test_cuda_graphs.py", "tests/engine/dualar/test_scheduler_graphs.py"]
    notes = []
    try:
        import pytest_asyncio  # noqa: F401
    except ImportError:
        notes.append("pytest-asyncio is not importable: the async contract suites are not run (carry its wheel)")
    else:
        files.append("tests/engine/test_contract.py")  # its GPU cases: S2 Pro torch on CUDA, and SGLang
        try:
            import sglang  # noqa: F401
        except ImportError:
            notes.append("sglang is not importable: its GPU tests are not run")
        else:
            files.append("tests/engine/sglang")
    args = [*(str(root / f) for f in files), "-q", "-rs", "-p", "no:cacheprovider", "--rootdir", str(root)]
    try:
        import pytest_timeout  # noqa: F401  (on the GPU image): one stuck test must not eat the window
    except ImportError:
        pass
    else:
        args.append("--timeout=120")
    if not dry_run:
        args[len(files):len(files)] = ["-m", "gpu"]
    log_path = out / "tests.log"
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as f:
        saved = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = f
        try:
            code = pytest.main(args)
        finally:
            sys.stdout, sys.stderr = saved
    tail = log_path.read_text(encoding="utf-8").strip().splitlines()[-1:] or [""]
    log(f"tests ({', '.join(files)}): exit {int(code)}; {tail[0]}")
    return {"files": files, "exit_code": int(code), "summary": tail[0], "notes": notes,
            "seconds": round(time.perf_counter() - started, 1)}


# ------------------------------------------------------------------------------------------------ report


def _verdict(key: str, value: float | None) -> str:
    op, target, _ = TARGETS[key]
    if value is None or math.isnan(value):
        return "not measured"
    met = value < target if op == "<" else value > target
    return f"{'MET' if met else 'NOT MET'} (target {op} {target:g})"


def summary_lines(report: dict[str, Any]) -> list[str]:
    r = report
    env, plan = r["environment"], r["plan"]
    lines = [f"Shoal GPU check — {'DRY RUN (tiny preset, CPU, float32): not GPU numbers' if plan['dry_run'] else 'GPU run'}",
             f"machine: {env.get('device_name')} | torch {env.get('torch')} | python {env.get('python')} | "
             f"preset {plan['preset']} {plan['dtype']} on {plan['device']}", ""]
    for name, section in r["sections"].items():
        if section.get("error"):
            lines.append(f"[{name}] FAILED: {section['error']}")
    eq = r["sections"].get("equality", {}).get("result")
    if eq:
        cases = ", ".join(f"{c['streams']} streams {'identical' if c['identical'] else 'DIFFER'}"
                          for c in eq["cases"] if "streams" in c) or eq["cases"][0].get("skipped", "")
        lines.append(f"graphs == eager: {cases}; greedy frames equal to generate.stream: "
                     f"{eq['greedy_frames_equal_to_reference']} of the {eq['greedy_frames_before_first_redraw']} before the "
                     f"first repetition-aware redraw ({'OK' if eq['equal'] else 'MISMATCH'})")
    key = r["key"]
    dec = r["sections"].get("decode", {}).get("result")
    if dec:
        for n in plan["concurrency"]:
            lines.append(f"decode c={n:<2}: {dec['per_stream_fps'][n]:8.1f} frames/s per stream, "
                         f"{dec['aggregate_fps'][n]:9.0f} aggregate  ({'CUDA graphs' if dec['graphed'] else 'eager'})")
        lines.append(f"decode eager c=1: {dec['eager_fps_c1']:.1f} frames/s")
    pre = r["sections"].get("prefill", {}).get("result")
    if pre:
        lines.append(f"prefill: {pre['tokens_per_s']:.0f} tokens/s ({pre['tokens']} tokens in {pre['ms']:.1f} ms)")
    ttfa = r["sections"].get("ttfa", {}).get("result")
    if ttfa:
        lines.append(f"TTFA scheduler decode step: {ttfa.get('decode', 'eager')}")
        for turn in (1, max(ttfa["turns"])):
            t = ttfa["turns"][turn]
            lines.append(f"TTFA turn {turn} ({ttfa['sessions']} at once, {100 * t['cached_fraction']:.0f}% cached): "
                         f"p50 {t['p50_ms']:.1f} ms, max {t['max_ms']:.1f} ms")
    rtf = r["sections"].get("rtf", {}).get("result")
    if rtf:
        lines.append(f"RTF c=1: {rtf['rtf']:.3f} (model alone {rtf['rtf_model_only']:.3f})")
    codec = r["sections"].get("codec", {}).get("result")
    if codec:
        lines.append("codec streaming decode: " + ", ".join(f"{k}f {v:.1f} ms" for k, v in codec["chunk_ms"].items())
                     + f"; RTF {codec['rtf']:.3f}")
    sg = r["sections"].get("sglang", {})
    if sg.get("result"):
        s = sg["result"]
        lines.append("sglang backend: " + ", ".join(f"c={k} {v:.0f} agg" for k, v in s["aggregate_fps"].items())
                     + f"; RTF c=1 {s['rtf_c1']:.3f}")
    elif sg.get("skipped"):
        lines.append(f"sglang backend: skipped ({sg['skipped']})")
    tests = r["sections"].get("tests", {}).get("result") or {}
    if tests:
        lines.append(f"tests: {tests.get('summary') or tests.get('skipped')}" +
                     (f" ({'; '.join(tests['notes'])})" if tests.get("notes") else ""))
    lines += ["", "targets:"]
    for k, (_, _, what) in TARGETS.items():
        value = key.get(k)
        shown = "-" if value is None else f"{value:.3f}" if k == "rtf_c1" else f"{value:.1f}"
        lines.append(f"  {what}: {shown} -> {_verdict(k, value)}" + (" [dry run: says nothing about a GPU]"
                                                                    if plan["dry_run"] else ""))
    lines += ["published anchors (other systems, other machines):"]
    lines += [f"  {name}: {text}" for name, text in ANCHORS.items()]
    return lines


def write_png_bars(path: Path, bars: list[tuple[str, float]], title: str) -> str:
    """A bar chart as a PNG: matplotlib when importable, else a plain-pixel one (bars only, labels in the report)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4))
        ax.bar([b[0] for b in bars], [b[1] for b in bars], color="#3b7dd8")
        ax.set_title(title)
        ax.set_ylabel("frames/s")
        for i, (_, v) in enumerate(bars):
            ax.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return "matplotlib"
    except ImportError:
        pass
    width, height, pad = 64 * max(1, len(bars)), 200, 8
    top = max((v for _, v in bars), default=1.0) or 1.0
    rows = []
    for y in range(height):
        row = bytearray()
        for x in range(width):
            i, inside = divmod(x, 64)
            value = bars[i][1] if i < len(bars) else 0.0
            filled = pad <= inside < 64 - pad and height - y <= value / top * (height - 10)
            row += b"\x3b\x7d\xd8" if filled else b"\xff\xff\xff"
        rows.append(b"\x00" + bytes(row))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(b"".join(rows), 9)) + chunk(b"IEND", b"")
    path.write_bytes(png)
    return "built-in"


# ------------------------------------------------------------------------------------------------ main


def _environment(plan: Plan) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda_available": torch.cuda.is_available(), "host": platform.node()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env |= {"device_name": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                "cuda": torch.version.cuda}
    else:
        env["device_name"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    try:
        import sglang

        env["sglang"] = getattr(sglang, "__version__", "unknown")
    except Exception as exc:  # noqa: BLE001 - any import failure means: no SGLang numbers
        env["sglang"] = f"not importable ({type(exc).__name__})"
    return env


def run_check(out: Path, *, dry_run: bool, skip_tests: bool = False, log: Callable[[str], None] = print) -> dict:
    import torch

    plan = Plan(dry_run)
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("gpucheck: no CUDA GPU visible to torch (use --dry-run for the CPU rehearsal)")
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"plan": plan.to_json(), "environment": _environment(plan), "sections": {},
                              "targets": {k: {"op": op, "value": v, "what": w} for k, (op, v, w) in TARGETS.items()},
                              "anchors": ANCHORS, "key": {}}

    def section(name: str, fn: Callable[[], Any]) -> Any:
        log(f"== {name}")
        started = time.perf_counter()
        entry: dict[str, Any] = {}
        try:
            entry["result"] = fn()
        except Exception as exc:  # noqa: BLE001 - recorded; the other sections still run
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc()
            log(f"{name} FAILED: {entry['error']}")
        entry["seconds"] = round(time.perf_counter() - started, 2)
        report["sections"][name] = entry
        _write(out, report)  # a partial report survives a later crash or timeout
        return entry.get("result")

    model = section("model", lambda: build_model(plan.preset, plan.device, plan.dtype))
    report["sections"]["model"]["result"] = None if model is None else {
        "parameters": sum(p.numel() for p in model.parameters())}
    if model is not None:
        section("equality", lambda: check_graphs_equal_eager(plan.preset, device=plan.device, dtype=plan.dtype,
                                                             frames=plan.equality_frames, model=model))
        section("decode", lambda: bench_decode(model, plan, log))
        section("prefill", lambda: bench_prefill(model, plan, log))
    codec_result = section("codec", lambda: bench_codec(plan, log))
    codec = None
    if codec_result is not None:
        report["sections"]["codec"]["result"], codec = codec_result
    if model is not None and codec is not None:
        section("rtf", lambda: bench_rtf(model, codec, plan, log))
        first_chunk = report["sections"]["codec"]["result"]["chunk_ms"][1]  # the server's first chunk: 1 frame
        section("ttfa", lambda: bench_ttfa(model, first_chunk, plan, log))
    del model, codec
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if not skip_tests:
        section("tests", lambda: run_tests(out, dry_run, log))
    try:
        import sglang  # noqa: F401

        has_sglang = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        has_sglang = False
    if has_sglang:
        section("sglang", lambda: bench_sglang(plan, log))
    else:
        report["sections"]["sglang"] = {"skipped": "sglang is not importable here (or no CUDA)"}

    s = report["sections"]
    key = report["key"]
    if s.get("decode", {}).get("result"):
        key["aggregate_fps_max"] = max(s["decode"]["result"]["aggregate_fps"].values())
    if s.get("ttfa", {}).get("result"):
        turns = s["ttfa"]["result"]["turns"]
        key["ttfa_turn5_p50_ms"] = turns[max(turns)]["p50_ms"]
    if s.get("rtf", {}).get("result"):
        key["rtf_c1"] = s["rtf"]["result"]["rtf"]
    dec = s.get("decode", {}).get("result")
    if dec:
        bars = [(f"c{n}/stream", v) for n, v in dec["per_stream_fps"].items()]
        bars += [(f"c{n} total", v) for n, v in dec["aggregate_fps"].items()]
        report["plot"] = write_png_bars(out / "gpu-check.png", bars, f"decode frames/s ({plan.preset}, "
                                        f"{report['environment']['device_name']})")
    _write(out, report)
    text = "\n".join(summary_lines(report))
    (out / "gpu-check.txt").write_text(text + "\n", encoding="utf-8")
    log("")
    log(text)
    return report


def _write(out: Path, report: dict[str, Any]) -> None:
    """The report so far (after each section: a later crash or timeout still leaves it)."""
    (out / "gpu-check.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    try:
        (out / "gpu-check.txt").write_text("\n".join(summary_lines(report)) + "\n", encoding="utf-8")
    except Exception:  # noqa: BLE001 - a partial report may not summarise; the JSON has it all
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m engine.gpucheck", description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny preset, float32, on the CPU: the same code path")
    parser.add_argument("--out", type=Path, required=True, help="folder for the report, plot and logs")
    parser.add_argument("--skip-tests", action="store_true", help="no pytest section")
    args = parser.parse_args(argv)
    report = run_check(args.out, dry_run=args.dry_run, skip_tests=args.skip_tests,
                       log=lambda line: print(line, flush=True))
    failed = [name for name, s in report["sections"].items() if s.get("error")]
    tests = report["sections"].get("tests", {}).get("result") or {}
    equality = (report["sections"].get("equality", {}).get("result") or {}).get("equal", False)
    return 1 if failed or tests.get("exit_code", 0) not in (0, 5) or not equality else 0


if __name__ == "__main__":
    sys.exit(main())
