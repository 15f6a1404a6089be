"""The ``shoal`` command: ``serve`` (the gateway) and ``say`` (the same engine, offline, to a WAV file)."""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engine.base import EngineError, SynthesisRequest, Synthesizer, VoiceRef
from engine.registry import ENGINE_NAMES, make_engine
from realtime.audio import write_wav
from realtime.config import ServerConfig


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


def _port(value: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be within 0..65535, got {port}")
    return port


def _nonneg_float(value: str) -> float:
    x = float(value)
    if not 0 <= x <= 10_000:
        raise argparse.ArgumentTypeError(f"must be within 0..10000, got {value}")
    return x


def _speaker(value: str) -> int:
    n = int(value)
    if not 0 <= n <= 63:
        raise argparse.ArgumentTypeError(f"speaker must be within 0..63, got {n}")
    return n


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=ENGINE_NAMES, default="espeak", help="synthesizer (default: espeak, built in)")
    p.add_argument("--stub-ttft-ms", type=_nonneg_float, default=20.0, help="stub engine: delay before the first frame")
    p.add_argument("--stub-frame-ms", type=_nonneg_float, default=12.0, help="stub engine: time per 46.4 ms codec frame")


def _engine_from_args(args: argparse.Namespace) -> Synthesizer:
    if args.engine == "stub":
        return make_engine("stub", ttft_ms=args.stub_ttft_ms, frame_ms=args.stub_frame_ms)
    return make_engine(args.engine)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal", description="Shoal: real-time conversational voice server")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the WebSocket gateway (protocol v1 at /v1/realtime)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0 picks a free one)")
    serve.add_argument("--redis", metavar="URL", help="use this Redis (redis://, rediss://, unix://) instead of the embedded one")
    serve.add_argument("--data-dir", type=Path, help="where the embedded Redis persists (default: per-user data dir)")
    serve.add_argument("--api-key", metavar="KEY", help="require this key (Authorization: Bearer KEY or ?token=KEY)")
    _add_engine_options(serve)

    say = sub.add_parser("say", help="synthesize TEXT to a WAV file with the same engine, offline")
    say.add_argument("text", metavar="TEXT")
    say.add_argument("-o", "--output", default="shoal.wav", help="WAV file to write, or - for stdout (default shoal.wav)")
    say.add_argument("--speaker", type=_speaker, default=0, help="speaker index (default 0)")
    say.add_argument("--voice", metavar="ID", help="voice id (the built-in voice maps each id to a stable voice)")
    _add_engine_options(say)
    return parser


async def _say(engine: Synthesizer, text: str, speaker: int, voice: str | None) -> np.ndarray:
    await engine.start()
    try:
        voices = {speaker: VoiceRef(voice=voice, text="")} if voice else {}
        chunks = [c.pcm async for c in engine.synthesize(SynthesisRequest(text=text, speaker=speaker, voices=voices))]
    finally:
        await engine.aclose()
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)


def run_say(args: argparse.Namespace) -> int:
    if not args.text.strip():
        raise CliError("TEXT is empty")
    if args.output == "-" and sys.stdout.isatty():
        raise CliError("refusing to write WAV audio to a terminal; use -o FILE or redirect stdout")
    engine = _engine_from_args(args)
    pcm = asyncio.run(_say(engine, args.text, args.speaker, args.voice))
    if args.output == "-":
        buf = io.BytesIO()
        write_wav(buf, pcm, engine.info.sample_rate)
        sys.stdout.buffer.write(buf.getvalue())
        sys.stdout.buffer.flush()
    else:
        out = Path(args.output)
        if not out.parent.is_dir():
            raise CliError(f"output directory {out.parent} does not exist")
        write_wav(out, pcm, engine.info.sample_rate)
        print(f"wrote {out} ({len(pcm) / engine.info.sample_rate:.2f} s at {engine.info.sample_rate} Hz)", file=sys.stderr)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from realtime.server import serve  # uvicorn only where it is needed

    try:
        config = ServerConfig(
            host=args.host,
            port=args.port,
            redis_url=args.redis,
            data_dir=args.data_dir,
            api_key=args.api_key,
            engine=args.engine,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.redis is not None and not args.redis.startswith(("redis://", "rediss://", "unix://")):
        raise CliError(f"--redis must be a redis://, rediss:// or unix:// URL, got {args.redis!r}")
    if args.data_dir is not None and args.data_dir.exists() and not args.data_dir.is_dir():
        raise CliError(f"--data-dir {args.data_dir} exists and is not a directory")
    return serve(config, _engine_from_args(args))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "serve":
            return run_serve(args)
        return run_say(args)
    except CliError as exc:
        print(f"shoal {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (EngineError, ValueError, OSError) as exc:
        print(f"shoal {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
