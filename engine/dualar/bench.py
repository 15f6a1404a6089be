"""``shoal bench engine``: speed of the dual AR and its codec on random weights of a size preset.

    shoal bench engine --preset small                       # CPU, float32
    shoal bench engine --preset s2pro --device cuda --dtype bfloat16 --json s2pro.json
    python -m engine.dualar.bench --preset tiny              # the same, without the shoal command

Measured, each as the median over ``repeats`` runs after one warm-up run, under ``torch.inference_mode``:

- prefill: the slow AR over a prompt of ``prompt_len`` positions, two thirds of them audio (a voice reference),
  filling the KV cache; tokens/s.
- first frame / first audio: :func:`generate.prefill` (slow AR prefill, main-token sampling, the 10-step fast AR),
  then the codec's streaming decode of that one frame: the engine's share of time to first audio.
- decode: ``frames`` calls of :func:`generate.decode_step` at batch 1 (one slow step + the fast AR loop, sampled at
  the server defaults); frames/s. Real time needs 21.5 frames/s.
- codec: streaming decode of ``frames`` random frames in the synthesizer's growing chunks (1, 2, 4, then 8);
  real-time factor = decode time / audio duration (below 1 is faster than real time).
- peak memory: the process's RSS high-water mark (``getrusage``), and on CUDA ``max_memory_allocated``.

The weights are random (``presets.random_model``; the codec's default initialisation): the numbers say how fast
the shapes run, never anything about the voice. torch is imported inside the functions so that ``shoal`` builds
its parser without loading it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from engine.dualar.codec import CodecConfig
    from engine.dualar.config import ModelConfig

__all__ = ["DEFAULTS", "add_parser", "bench_engine", "codec_config", "format_table", "main", "random_prompt", "run"]

PRESET_NAMES = ("tiny", "small", "s2pro")
# (prompt_len, frames, repeats): a prompt with a ~10 s voice reference (215 frames) and a sentence of text.
DEFAULTS: dict[str, tuple[int, int, int]] = {"tiny": (320, 64, 3), "small": (320, 32, 3), "s2pro": (320, 64, 3)}
CHUNKS = (1, 2, 4, 8)  # streaming decode chunk sizes, as the synthesizer grows them (then 8 each)
SERVER_SAMPLING = {"temperature": 0.8, "top_p": 0.8, "top_k": 30}


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    from engine.dualar.loader import resolve_dtype  # torch loads only when a benchmark runs

    return resolve_dtype(dtype)


def _device(device: str) -> torch.device:
    from engine.dualar.loader import resolve_device

    return resolve_device(device)


def codec_config(preset: str) -> CodecConfig:
    """The codec that goes with a model preset: tiny = the fixture's, small = CPU-sized, s2pro = the real one."""
    from engine.dualar.codec import CodecConfig

    return {"tiny": CodecConfig.tiny, "small": CodecConfig.small, "s2pro": CodecConfig.s2pro}[preset]()


def random_prompt(config: ModelConfig, length: int, generator: torch.Generator) -> torch.Tensor:
    """(1 + C, length) int64: text bytes, a voice reference's audio span (two thirds), text bytes again."""
    import torch

    c = config.num_codebooks
    audio = length * 2 // 3
    before = (length - audio) // 2
    prompt = torch.zeros(1 + c, length, dtype=torch.long)
    prompt[0] = torch.randint(32, 127, (length,), generator=generator)  # printable byte tokens
    codes = torch.randint(0, config.codebook_size, (c, audio), generator=generator)
    prompt[0, before : before + audio] = config.semantic_begin_id + codes[0]
    prompt[1:, before : before + audio] = codes
    return prompt


def _random_codes(config: CodecConfig, frames: int, generator: torch.Generator) -> torch.Tensor:
    import torch

    semantic = torch.randint(0, config.semantic_codebook_size, (1, frames), generator=generator)
    residual = torch.randint(
        0, config.residual_codebook_size, (config.n_residual_codebooks, frames), generator=generator
    )
    return torch.cat([semantic, residual])  # (10, frames)


def _chunk_sizes(frames: int) -> list[int]:
    sizes: list[int] = []
    while sum(sizes) < frames:
        sizes.append(min(CHUNKS[min(len(sizes), len(CHUNKS) - 1)], frames - sum(sizes)))
    return sizes


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class _Clock:
    """perf_counter timings that wait for the GPU first (a no-op on the CPU)."""

    def __init__(self, device: torch.device) -> None:
        import torch

        self.sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def time(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        start = self.now()
        out = fn()
        return self.now() - start, out


def _cpu_name() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on every platform
        return None


def bench_engine(
    preset: str,
    *,
    device: str = "cpu",
    dtype: torch.dtype | str = "float32",
    prompt_len: int | None = None,
    frames: int | None = None,
    repeats: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure one preset (see the module docstring); returns the numbers as a flat dict (JSON-ready).

    ``prompt_len``, ``frames`` and ``repeats`` default per preset (:data:`DEFAULTS`). ``dtype`` is the model's
    (float32 or bfloat16; ``torch.dtype`` or its name); the codec runs in float32, as the synthesizer runs it.
    ``log`` receives one line per phase (progress for long runs).
    """
    import torch

    from engine.base import Sampling
    from engine.dualar.codec import Codec, ModifiedDAC
    from engine.dualar.generate import decode_step, make_sampler, prefill
    from engine.dualar.presets import preset_config, random_model

    if preset not in PRESET_NAMES:
        raise ValueError(f"unknown preset {preset!r} (known: {', '.join(PRESET_NAMES)})")
    default_prompt, default_frames, default_repeats = DEFAULTS[preset]
    prompt_len = default_prompt if prompt_len is None else prompt_len
    frames = default_frames if frames is None else frames
    repeats = default_repeats if repeats is None else repeats
    if prompt_len < 3 or frames < 1 or repeats < 1:
        raise ValueError("need prompt_len >= 3, frames >= 1 and repeats >= 1")
    dev, model_dtype = _device(device), _dtype(dtype)
    config = preset_config(preset)
    if prompt_len + frames + 1 > config.slow.max_seq_len:
        raise ValueError(f"prompt_len + frames must stay below the preset's context {config.slow.max_seq_len}")
    say = log or (lambda line: None)
    if preset == "s2pro" and dev.type == "cpu":
        say("warning: the s2pro preset is the real 4.6 B-parameter shape (18 GiB in float32): meant for a GPU")
    clock = _Clock(dev)
    load_before = _load_average()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    say(f"building the {preset} model ({model_dtype}) and codec on {dev}: random weights")
    model = random_model(preset, device=str(dev), dtype=model_dtype, seed=seed)
    model.setup_caches(1, prompt_len + frames + 1)
    torch.manual_seed(seed)  # the codec keeps torch's default initialisation
    with torch.device(dev):
        codec = Codec(ModifiedDAC(codec_config(preset)).eval().requires_grad_(False))
    generator = torch.Generator().manual_seed(seed)
    prompt = random_prompt(config, prompt_len, generator)[None].to(dev)  # (1, 1 + C, T)
    positions = torch.arange(prompt_len, device=dev)  # (T,)
    codes = _random_codes(codec.config, frames, generator).to(dev)  # (10, frames)
    chunks = _chunk_sizes(frames)
    sampling = Sampling(**SERVER_SAMPLING, seed=seed)  # type: ignore[arg-type]

    prefill_s, first_frame_s, first_audio_s, step_s, codec_s = [], [], [], [], []  # type: ignore[var-annotated]
    cpu_start = wall_start = 0.0
    with torch.inference_mode():
        for run in range(repeats + 1):  # run 0 warms up and is not recorded
            if run == 1:
                cpu_start, wall_start = time.process_time(), time.perf_counter()
            say(f"{'warm-up' if run == 0 else f'run {run}/{repeats}'}: prefill, first audio, {frames} frames, codec")
            prefill_time, _ = clock.time(lambda: model.slow(prompt, positions))  # the slow AR alone

            sampler, decoder = make_sampler(model, sampling), codec.stream()
            start = clock.now()
            frame = prefill(model, prompt, positions, sampler)  # slow AR + main token + fast AR
            first_frame = clock.now()
            decoder.decode_tensor(frame.column[0, 1:, None])  # (10, 1): the first chunk is one frame
            first_audio = clock.now()

            steps = []
            for n in range(frames):  # each frame timed alone: robust to a busy machine (median), synced as
                step = clock.now()  # the stream is anyway (it reads every main token to look for <|im_end|>)
                frame = decode_step(model, frame.column, positions[-1:] + 1 + n, sampler)
                steps.append(clock.now() - step)

            stream, done = codec.stream(), 0
            codec_start = clock.now()
            for size in chunks:
                stream.decode_tensor(codes[:, done : done + size])
                done += size
            codec_time = clock.now() - codec_start

            if run:
                prefill_s.append(prefill_time)
                first_frame_s.append(first_frame - start)
                first_audio_s.append(first_audio - start)
                step_s.extend(steps)
                codec_s.append(codec_time)

    cpu_share = (time.process_time() - cpu_start) / (time.perf_counter() - wall_start)  # ~threads when unshared
    step_median = statistics.median(step_s)
    codec_median = statistics.median(codec_s)
    audio_seconds = frames * codec.frame_samples / codec.sample_rate
    peak_cuda_mib = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    tokens = prompt[0, 0]  # (T,)
    audio_positions = int(((tokens >= config.semantic_begin_id) & (tokens <= config.semantic_end_id)).sum())
    return {
        "preset": preset,
        "random_weights": True,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        "dtype": str(model_dtype).removeprefix("torch."),
        "codec_dtype": "float32",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": [load_before, _load_average()],  # before and after: others' work skews CPU numbers
        "process_cpu_per_wall": cpu_share,  # CPU seconds per second over the measured runs (<= threads)
        "slow_params": _params(model.slow),
        "fast_params": _params(model.fast),
        "codec_params": _params(codec.model),
        "weights_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
        "kv_cache_mib": sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "kv_cache" in n) / 2**20,
        "prompt_len": prompt_len,
        "prompt_audio_positions": audio_positions,
        "frames": frames,
        "repeats": repeats,
        "prefill_ms": statistics.median(prefill_s) * 1e3,
        "prefill_tokens_per_s": prompt_len / statistics.median(prefill_s),
        "first_frame_ms": statistics.median(first_frame_s) * 1e3,
        "first_audio_ms": statistics.median(first_audio_s) * 1e3,
        "decode_ms_per_frame": step_median * 1e3,
        "decode_ms_per_frame_p90": (statistics.quantiles(step_s, n=10)[-1] if len(step_s) > 1 else step_s[0]) * 1e3,
        "decode_frames_per_s": 1 / step_median,
        "decode_mean_frames_per_s": len(step_s) / sum(step_s),
        "codec_chunks": chunks,
        "codec_decode_ms": codec_median * 1e3,
        "codec_frames_per_s": frames / codec_median,
        "codec_rtf": codec_median / audio_seconds,
        "peak_rss_mib": peak_rss_mib,
        "peak_cuda_mib": peak_cuda_mib,
        "peak_memory_mib": peak_cuda_mib if peak_cuda_mib is not None else peak_rss_mib,
    }


def format_table(result: dict[str, Any]) -> str:
    """The result as a few aligned lines for a terminal."""
    r = result
    chunks = ",".join(str(c) for c in r["codec_chunks"][:5]) + (",…" if len(r["codec_chunks"]) > 5 else "")
    memory = f"{r['peak_rss_mib']:.0f} MiB RSS (process high-water mark)"
    if r["peak_cuda_mib"] is not None:
        memory = f"{r['peak_cuda_mib']:.0f} MiB CUDA max allocated; " + memory
    rows = [
        ("model", f"slow {r['slow_params'] / 1e6:.1f} M + fast {r['fast_params'] / 1e6:.1f} M params "
                  f"({r['weights_mib']:.0f} MiB), KV cache {r['kv_cache_mib']:.1f} MiB"),
        ("codec", f"{r['codec_params'] / 1e6:.1f} M params, {r['codec_dtype']}"),
        ("prompt", f"{r['prompt_len']} positions ({r['prompt_audio_positions']} audio)"),
        ("prefill", f"{r['prefill_tokens_per_s']:,.0f} tokens/s ({r['prefill_ms']:.1f} ms)"),
        ("first frame", f"{r['first_frame_ms']:.1f} ms (prefill + sampling + fast AR)"),
        ("first audio", f"{r['first_audio_ms']:.1f} ms (+ codec decode of that frame)"),
        ("decode, batch 1", f"{r['decode_frames_per_s']:.1f} frames/s (median {r['decode_ms_per_frame']:.1f} ms/frame, "
                            f"p90 {r['decode_ms_per_frame_p90']:.1f}; mean {r['decode_mean_frames_per_s']:.1f} "
                            "frames/s; real time needs 21.5)"),
        ("codec decode", f"RTF {r['codec_rtf']:.3f} ({r['codec_frames_per_s']:.1f} frames/s, chunks {chunks})"),
        ("peak memory", memory),
    ]
    load = [f"{x:.2f}" for x in r["load_average_1m"] if x is not None]
    busy = f"this process used {r['process_cpu_per_wall']:.2f} CPUs with {r['threads']} threads"
    rows.append(("machine", f"{r['cpu_count']} CPUs, load average {' -> '.join(load) or '?'} (1 min); {busy}"))
    width = max(len(name) for name, _ in rows)
    head = (
        f"shoal bench engine: preset {r['preset']} on {r['device']} ({r['device_name']}), {r['dtype']}, "
        f"{r['threads']} threads, torch {r['torch']}; {r['repeats']} run{'s' * (r['repeats'] != 1)} of "
        f"{r['frames']} frames after a warm-up (medians)"
    )
    warning = "RANDOM WEIGHTS: these numbers measure speed only; the audio is noise"
    if r["preset"] == "s2pro":
        warning += " (s2pro = the real S2 Pro shapes, not its weights)"
    return "\n".join([head, warning, *(f"  {name:<{width}}  {value}" for name, value in rows)])


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=PRESET_NAMES, default="tiny",
                   help="model size: tiny (fixture), small (CPU-sized), s2pro (the real shapes: a GPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt positions (default 320)")
    p.add_argument("--frames", type=int, default=None, help="frames decoded per run (default: 64; small 32)")
    p.add_argument("--repeats", type=int, default=None, help="measured runs after the warm-up (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="also write the numbers as JSON to OUT (- for stdout)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``engine`` on the subparsers of ``shoal bench``; the parsed args carry ``bench_main = run``."""
    p = subparsers.add_parser(
        "engine",
        help="S2 Pro engine speed on random weights: prefill, decode frames/s, codec RTF, peak memory",
        description=(__doc__ or "").split("\n\n")[0],
    )
    _add_arguments(p)
    p.set_defaults(bench_main=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the benchmark the parsed arguments describe, print the table (and JSON). Exit status: 0, or 2 with one
    line on stderr for a bad argument (unknown dtype, no CUDA, ...)."""
    try:
        return _run(args)
    except (ValueError, OSError) as exc:
        print(f"shoal bench engine: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    dtype = args.dtype or ("bfloat16" if str(args.device).startswith("cuda") else "float32")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError("--threads must be at least 1")
        import torch

        torch.set_num_threads(args.threads)
    log = None if args.quiet else (lambda line: print(f"bench: {line}", file=sys.stderr, flush=True))
    result = bench_engine(args.preset, device=args.device, dtype=dtype, prompt_len=args.prompt_len,
                          frames=args.frames, repeats=args.repeats, seed=args.seed, log=log)
    text = json.dumps(result, indent=2)
    if args.json == "-":
        print(text)
        print(format_table(result), file=sys.stderr)
    else:
        print(format_table(result))
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(text + "\n")
            print(f"wrote {args.json}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m engine.dualar.bench [--preset …]``: the same as ``shoal bench engine``."""
    parser = argparse.ArgumentParser(prog="python -m engine.dualar.bench", description=(__doc__ or "").split("\n\n")[0])
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
