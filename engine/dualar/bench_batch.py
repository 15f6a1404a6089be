"""``shoal bench prefix`` and ``shoal bench batch``: what the prefix cache and continuous batching buy.

Both drive the scheduler (``scheduler.py``) directly on the calling thread — no gateway, no codec — with a model
of a size preset and random weights (``presets.random_model``; ``small`` by default, float32 on the CPU). Prompts
are built by the real :class:`PromptBuilder` over a byte-level tokenizer made in code (the token layout of the
fixture checkpoint: 256 bytes, 12 special tokens, then the semantic tokens), so no checkpoint is needed.

prefix — a 10-turn conversation between two speakers, each with a reference voice (``--voice-frames`` of codes),
turn i spoken by speaker i % 2. Each turn is generated (up to ``--turn-frames`` frames, seeded) and its codes become
history for the next, as the gateway does. TTFA-equivalent of a turn = submit to the first frame leaving the
scheduler: prefill (of what the cache did not have) plus the first slow and fast AR step. The codec's decode of the
first chunk is not included (about a constant per turn, and a random model's codes are not speech). Runs with the
prefix cache on, then off over the very same prompts; each turn's TTFA is the median of ``--repeats`` passes.

batch — N closed-loop clients, each with its own short prompt: submit, take every frame as it comes, submit again
when the request ends (``<|im_end|>`` or ``--frames`` frames). After warm-up steps, aggregate frames/s over
``--steps`` scheduler steps (prefills of new requests included), for each N in ``--batch``, in ``--rounds`` rounds
over the batch sizes (the median round counts).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from engine.dualar.model import DualAR
    from engine.dualar.prompt import PromptBuilder
    from engine.dualar.scheduler import Scheduler
    from engine.dualar.scheduler import Sequence as Seq

__all__ = ["BatchPoint", "PrefixTurn", "add_parser", "bench_batch", "bench_prefix", "byte_tokenizer", "main", "run"]

PRESET_NAMES = ("tiny", "small", "s2pro")

SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>", "<|phoneme_start|>", "<|phoneme_end|>", "<|text|>",
    "<|voice|>", "<|interleave|>", "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>",
)  # ids 256..267, as in the fixture tokenizer and the presets
LINES = (
    "Did you bring the maps we talked about last night?",
    "I did, but the coastal one got soaked in the rain.",
    "Then we follow the river until the old stone bridge.",
    "That bridge washed out two winters ago, remember?",
    "Right. The ferry, then, if the keeper is still awake.",
    "He never sleeps before midnight; he counts the boats.",
    "Good. Pack the lantern and the spare rope as well.",
    "Already done. I also took bread, cheese and apples.",
    "You think of everything. Shall we leave at dawn?",
    "At dawn, before the fog lifts off the water. Agreed.",
)


def byte_tokenizer() -> Tokenizer:
    """The byte-level tokenizer of the presets (bytes, then the 12 specials, then the semantic tokens)."""
    from engine.dualar.presets import byte_level_tokenizer

    return byte_level_tokenizer(4096)


def _setup(preset: str, device: str, dtype: str, max_seq_len: int, batch: int) -> tuple[DualAR, PromptBuilder]:
    import torch

    from engine.dualar.presets import random_model
    from engine.dualar.prompt import PromptBuilder

    model = random_model(preset, device=device, dtype=getattr(torch, dtype))
    model.setup_caches(batch, max_seq_len)
    c = model.config
    prompts = PromptBuilder(
        byte_tokenizer(), semantic_begin_id=c.semantic_begin_id, num_codebooks=c.num_codebooks,
        codebook_size=c.codebook_size,
    )
    return model, prompts


def _run_until(scheduler: Scheduler, seq: Seq, *, first_frame: bool) -> None:
    while seq.finish is None and not (first_frame and seq.first_frame_at is not None):
        scheduler.step()
        scheduler.take(seq, 1 << 20)


# ---- prefix


class PrefixTurn(NamedTuple):
    turn: int  # 1-based
    prompt: int  # positions
    reused: int  # positions matched in the prefix cache
    ttfa_ms: float  # submit -> first frame, median over the repeats
    ttfa_ms_min: float


def bench_prefix(
    *,
    preset: str = "small",
    device: str = "cpu",
    dtype: str = "float32",
    turns: int = 10,
    voice_frames: int = 150,
    turn_frames: int = 40,
    repeats: int = 3,
    max_seq_len: int = 4096,
    context_budget: int | None = None,
    prefill_chunk: int = 256,
    seed: int = 0,
) -> dict[str, list[PrefixTurn]]:
    """TTFA per turn with the prefix cache on, then off over the same prompts.

    The first pass (cache on) makes the conversation: each turn is generated whole and becomes history. Then the
    same prompts are replayed: ``repeats - 1`` more passes with a fresh cache (each turn generated whole again, so
    the cache holds what it held the first time: seeded generation repeats itself) and ``repeats`` passes without
    the cache (stopped at the first frame). A turn's TTFA is its median over the passes.
    """
    import numpy as np
    import torch

    from engine.base import PastTurn, Sampling, VoiceRef
    from engine.dualar.context import trim_history
    from engine.dualar.scheduler import Scheduler, SchedulerConfig

    if repeats < 1 or turns < 1:
        raise ValueError("turns and repeats must be at least 1")
    model, prompts = _setup(preset, device, dtype, max_seq_len, 1)
    rng = np.random.default_rng(seed)
    size = min(1024, model.config.codebook_size)  # residual codebooks of the real codec have 1024 entries
    voices = {s: VoiceRef(f"v{s}", f"Reference voice number {s}.", rng.integers(0, size, (10, voice_frames)))
              for s in (0, 1)}
    budget = context_budget if context_budget is not None else max_seq_len // 2
    config = SchedulerConfig(max_batch_size=1, prefill_chunk=prefill_chunk)

    def turn(scheduler: Scheduler, i: int, prompt: Any, *, whole: bool) -> tuple[float, int, list[Any]]:
        sampling = Sampling(temperature=0.8, top_p=0.8, top_k=30, seed=seed + i, max_frames=turn_frames)
        seq = scheduler.submit(prompt, sampling, generator=torch.Generator(device=device).manual_seed(seed + i))
        frames: list[Any] = []
        while seq.finish is None and (whole or seq.first_frame_at is None):
            scheduler.step()
            frames += scheduler.take(seq, 1 << 20).frames
        if seq.finish is None:
            scheduler.cancel(seq)
            _run_until(scheduler, seq, first_frame=False)
        assert seq.first_frame_at is not None
        return 1000 * (seq.first_frame_at - seq.submitted_at), seq.reused, frames

    _warm_up(model, prompts)
    history: list[PastTurn] = []
    conversation: list[Any] = []  # the prompt of each turn
    on_ms: list[list[float]] = [[] for _ in range(turns)]
    reused: list[int] = []
    on = Scheduler(model, config)
    for i in range(turns):
        kept = trim_history(prompts, history, budget)
        prompt = prompts.build(LINES[i % len(LINES)], speaker=i % 2, voices=voices, history=kept)
        conversation.append(prompt)
        ms, matched, frames = turn(on, i, prompt, whole=True)
        on_ms[i].append(ms)
        reused.append(matched)
        codes = torch.stack(frames, dim=1).numpy() if frames else np.zeros((10, 0), np.int64)
        history.append(PastTurn(i % 2, LINES[i % len(LINES)], codes.astype(np.int16)))
    for _ in range(repeats - 1):
        on = Scheduler(model, config)
        for i, prompt in enumerate(conversation):
            ms, matched, _ = turn(on, i, prompt, whole=True)
            assert matched == reused[i], "a replay must find what the first pass found"
            on_ms[i].append(ms)
    off_ms: list[list[float]] = [[] for _ in range(turns)]
    for _ in range(repeats):
        off = Scheduler(model, _no_cache(config))
        for i, prompt in enumerate(conversation):
            off_ms[i].append(turn(off, i, prompt, whole=False)[0])
    return {
        "on": [PrefixTurn(i + 1, p.shape[1], reused[i], statistics.median(on_ms[i]), min(on_ms[i]))
               for i, p in enumerate(conversation)],
        "off": [PrefixTurn(i + 1, p.shape[1], 0, statistics.median(off_ms[i]), min(off_ms[i]))
                for i, p in enumerate(conversation)],
    }


def _no_cache(config: Any) -> Any:
    import dataclasses

    return dataclasses.replace(config, prefix_cache=False)


def _warm_up(model: DualAR, prompts: PromptBuilder) -> None:
    """One short request without the cache, so the first measured turn does not pay for lazy initialisation."""
    from engine.base import Sampling
    from engine.dualar.scheduler import Scheduler, SchedulerConfig

    scheduler = Scheduler(model, SchedulerConfig(max_batch_size=1, prefix_cache=False))
    seq = scheduler.submit(prompts.build("Warm up."), Sampling(temperature=0.8, seed=1, max_frames=3))
    _run_until(scheduler, seq, first_frame=False)


# ---- batch


class BatchPoint(NamedTuple):
    batch: int
    frames: int  # measured, all rounds
    seconds: float  # measured, all rounds
    frames_per_s: float  # median over the rounds
    step_ms_p50: float


def bench_batch(
    *,
    preset: str = "small",
    device: str = "cpu",
    dtype: str = "float32",
    batches: Sequence[int] = (1, 4, 8),
    frames: int = 64,
    steps: int = 30,
    rounds: int = 3,
    warmup: int = 4,
    max_seq_len: int = 1024,
    prefill_chunk: int = 256,
    seed: int = 0,
) -> list[BatchPoint]:
    """Aggregate frames/s of N closed-loop clients sharing one model, for each N in ``batches``.

    Measured in ``rounds`` rounds that each run every N in turn (``warmup`` + ``steps`` steps from fresh clients),
    so a slow spell of a shared machine does not land on one batch size only; frames/s is the median of the rounds.
    """
    if rounds < 1 or steps < 1 or not batches:
        raise ValueError("need rounds >= 1, steps >= 1 and a batch size")
    model, prompts = _setup(preset, device, dtype, max_seq_len, max(batches))
    made: dict[int, list[int]] = {n: [] for n in batches}
    times: dict[int, list[float]] = {n: [] for n in batches}
    for r in range(rounds):
        for n in batches:
            frames_made, step_times = _closed_loop(model, prompts, n, frames, warmup, steps, prefill_chunk,
                                                   device, seed + 1000 * r)
            made[n].append(frames_made)
            times[n] += step_times
    points = []
    for n in batches:
        per_round = [f / sum(times[n][i * steps : (i + 1) * steps]) for i, f in enumerate(made[n])]
        points.append(BatchPoint(n, sum(made[n]), sum(times[n]), statistics.median(per_round),
                                 1000 * statistics.median(times[n])))
    return points


def _closed_loop(
    model: DualAR, prompts: PromptBuilder, n: int, frames: int, warmup: int, steps: int, prefill_chunk: int,
    device: str, seed: int,
) -> tuple[int, list[float]]:
    """``n`` clients, each resubmitting when its request ends: frames made and step times of the measured steps."""
    import torch

    from engine.base import Sampling
    from engine.dualar.scheduler import Scheduler, SchedulerConfig

    scheduler = Scheduler(model, SchedulerConfig(max_batch_size=n, prefill_chunk=prefill_chunk, prefix_cache=False))
    counter = iter(range(1 << 30))

    def submit(client: int) -> Seq:
        k = next(counter)
        text = f"<|speaker:{client % 2}|>{LINES[k % len(LINES)]}"
        return scheduler.submit(prompts.build(text), Sampling(temperature=0.8, seed=seed + k, max_frames=frames),
                                generator=torch.Generator(device=device).manual_seed(seed + k))

    clients = [submit(c) for c in range(n)]
    made, times = 0, []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        result = scheduler.step()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
            made += result.frames
        for c, seq in enumerate(clients):
            scheduler.take(seq, 1 << 20)
            if seq.finish is not None:
                clients[c] = submit(c)
    for seq in clients:
        scheduler.cancel(seq)
    scheduler.step()  # the cancels take effect: every slot is free for the next scheduler on this model
    return made, times


# ---- command line


def add_parser(subparsers: Any) -> None:
    """Register ``prefix`` and ``batch`` on the subparsers of ``shoal bench``; parsed args carry ``bench_main``."""
    prefix = subparsers.add_parser("prefix", help="TTFA per turn of a 10-turn conversation, prefix cache on vs off")
    batch = subparsers.add_parser("batch", help="aggregate frames/s at batch 1, 4, 8 (continuous batching)")
    _add_arguments(prefix, "prefix")
    _add_arguments(batch, "batch")


def _add_arguments(p: argparse.ArgumentParser, which: str) -> None:
    p.add_argument("--preset", choices=PRESET_NAMES, default="small", help="model size, random weights (default small)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt positions prefilled per step (default 256)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--json", metavar="OUT", help="also write the numbers as JSON to OUT (- for stdout)")
    if which == "prefix":
        p.add_argument("--turns", type=int, default=10)
        p.add_argument("--voice-frames", type=int, default=150, help="codes per reference voice (default 150, 7 s)")
        p.add_argument("--turn-frames", type=int, default=40, help="frames generated per turn at most (default 40)")
        p.add_argument("--context-budget", type=int, default=None, help="history positions kept (default 2048)")
        p.add_argument("--repeats", type=int, default=3, help="passes over the conversation; medians (default 3)")
    else:
        p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8], help="concurrent clients (default 1 4 8)")
        p.add_argument("--frames", type=int, default=64, help="frames per request (default 64)")
        p.add_argument("--steps", type=int, default=30, help="measured steps per batch size and round (default 30)")
        p.add_argument("--rounds", type=int, default=3, help="rounds over the batch sizes; medians (default 3)")
    p.set_defaults(bench=which, bench_main=run)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark the parsed arguments describe and print its table (and JSON); 0 on success."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bfloat16" if str(args.device).startswith("cuda") else "float32")
    common = {"preset": args.preset, "device": args.device, "dtype": dtype, "prefill_chunk": args.prefill_chunk}
    where = f"preset {args.preset} (random weights), {args.device} {dtype}, {torch.get_num_threads()} threads"
    if args.bench == "prefix":
        res = bench_prefix(turns=args.turns, voice_frames=args.voice_frames, turn_frames=args.turn_frames,
                           repeats=args.repeats, context_budget=args.context_budget, **common)
        data: Any = {k: [t._asdict() for t in v] for k, v in res.items()}
        table = format_prefix(res, where)
    else:
        points = bench_batch(batches=args.batch, frames=args.frames, steps=args.steps, rounds=args.rounds, **common)
        data = [p._asdict() for p in points]
        table = format_batch(points, where)
    if args.json == "-":
        print(json.dumps(data, indent=1))
        print(table, file=sys.stderr)
        return 0
    print(table)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=1) + "\n")
    return 0


def format_prefix(res: dict[str, list[PrefixTurn]], where: str) -> str:
    lines = [f"bench prefix: {where}; TTFA = submit -> first frame (codec not included), median ms",
             f"{'turn':>4} {'prompt':>6} {'reused':>6} {'on ms':>8} {'off ms':>8} {'on/off':>6}"]
    for a, b in zip(res["on"], res["off"], strict=True):
        lines.append(f"{a.turn:>4} {a.prompt:>6} {a.reused:>6} {a.ttfa_ms:>8.1f} {b.ttfa_ms:>8.1f} "
                     f"{a.ttfa_ms / b.ttfa_ms:>6.2f}")
    first, last, last_off = res["on"][0].ttfa_ms, res["on"][-1].ttfa_ms, res["off"][-1].ttfa_ms
    lines.append(f"last turn cached / turn 1: {last / first:.2f} (goal <= 1.3); "
                 f"cached / uncached last turn: {last / last_off:.2f} (goal <= 0.25)")
    return "\n".join(lines)


def format_batch(points: list[BatchPoint], where: str) -> str:
    lines = [f"bench batch: {where}; frames/s of the slow + fast AR (codec not included)",
             f"{'batch':>5} {'frames':>6} {'seconds':>8} {'frames/s':>9} {'step ms':>8} {'x batch 1':>9}"]
    for p in points:
        lines.append(f"{p.batch:>5} {p.frames:>6} {p.seconds:>8.2f} {p.frames_per_s:>9.1f} {p.step_ms_p50:>8.1f} "
                     f"{p.frames_per_s / points[0].frames_per_s:>9.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m engine.dualar.bench_batch prefix|batch [...]``: the same as ``shoal bench prefix|batch``."""
    parser = argparse.ArgumentParser(
        prog="python -m engine.dualar.bench_batch", description=(__doc__ or "").split("\n\n")[0]
    )
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
