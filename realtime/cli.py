"""The server's commands: ``serve`` (the gateway), ``worker`` (an engine served to gateways over the worker RPC),
``say`` (an engine, offline, to a WAV file), ``codec`` (encode / decode with the S2 Pro codec), ``token`` (a
short-lived token for a browser or device) and ``bench`` (the S2 Pro engine's benchmarks). ``python -m realtime``
runs these; the ``shoal`` command (``shoal.cli``) adds the other packages' commands (``loadtest``) to them. Engines
are built by ``engine.registry`` from the options here.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from engine.base import EngineError, Sampling, Synthesizer
from engine.registry import ENGINE_NAMES, make_engine
from realtime.auth import DEFAULT_TENANT, SCOPES, TOKEN_TTL_S, KeyRing, OriginPolicy
from realtime.config import GatewayLimits, ServerConfig
from realtime.say_codec import CliError, SayJob, codec_decode, codec_encode, say
from realtime.turns import Limits as TurnLimits

Command = Callable[[argparse.Namespace], int]
Commands = Callable[[Any], Mapping[str, Command]]  # registers commands on a subparsers object, returns their runners


def _bounded(kind: type, lo: float, hi: float, what: str):  # type: ignore[no-untyped-def]
    def parse(value: str):  # type: ignore[no-untyped-def]
        try:
            x = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {value!r}") from None
        if not lo <= x <= hi:
            raise argparse.ArgumentTypeError(f"{what} must be within {lo:g}..{hi:g}, got {value}")
        return x

    return parse


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--engine", choices=ENGINE_NAMES, help="synthesizer (default: s2pro with --model, else espeak)")
    g.add_argument("--model", metavar="DIR|REPO", help="S2 Pro checkpoint directory (or Hugging Face repo id)")
    g.add_argument("--codec", metavar="PATH", type=Path, help="S2 Pro codec.pth (default: DIR/codec.pth)")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    g.add_argument("--max-seq-len", type=_bounded(int, 64, 1 << 20, "--max-seq-len"), default=4096,
                   help="S2 Pro context (KV cache) length in positions (default 4096)")
    g.add_argument("--prefix-cache", choices=("on", "off"), default="on",
                   help="S2 Pro: keep each conversation's prompt prefix cached between turns (default on)")
    g.add_argument("--cuda-graphs", choices=("on", "off"), default="on",
                   help="S2 Pro torch backend on CUDA: replay the decode step as captured CUDA graphs (default on; "
                        "off decodes eagerly; no effect on the CPU)")
    g.add_argument("--backend", choices=("torch", "sglang"), default="torch",
                   help="S2 Pro backend: torch (CPU or GPU) or sglang (GPU only; pip install '.[sglang]')")
    g.add_argument("--stub-ttft-ms", type=_bounded(float, 0, 60_000, "--stub-ttft-ms"), default=20.0,
                   help="stub engine: delay before the first frame")
    g.add_argument("--stub-frame-ms", type=_bounded(float, 0, 10_000, "--stub-frame-ms"), default=12.0,
                   help="stub engine: time per 46.4 ms codec frame")


def _engine_name(args: argparse.Namespace) -> str:
    """The engine the options ask for, checked without loading anything."""
    name: str = args.engine or ("s2pro" if args.model else "espeak")
    if name == "s2pro" and not args.model:
        raise CliError("the s2pro engine needs --model DIR")
    if name != "s2pro" and args.model:
        raise CliError(f"--model is for the s2pro engine, not {name}")
    return name


def _engine_argv(args: argparse.Namespace) -> tuple[str, ...]:
    """The engine options again, as a command line for ``shoal worker`` (workers get config only this way)."""
    argv = ["--engine", _engine_name(args), "--device", args.device, "--max-seq-len", str(args.max_seq_len),
            "--prefix-cache", args.prefix_cache, "--cuda-graphs", args.cuda_graphs,
            "--stub-ttft-ms", repr(args.stub_ttft_ms),
            "--stub-frame-ms", repr(args.stub_frame_ms), "--backend", args.backend]
    if args.model:
        argv += ["--model", args.model]
    if args.codec:
        argv += ["--codec", str(args.codec)]
    if args.dtype:
        argv += ["--dtype", args.dtype]
    return tuple(argv)


def _engine_from_args(args: argparse.Namespace) -> Synthesizer:
    """The engine the options ask for, from ``engine.registry``; S2 Pro loads its weights now, before serving, so a
    bad checkpoint (or a missing GPU or sglang) is a clear error rather than a failed startup."""
    name = _engine_name(args)
    if name == "stub":
        return make_engine("stub", ttft_ms=args.stub_ttft_ms, frame_ms=args.stub_frame_ms)
    if name != "s2pro":
        return make_engine(name)
    from engine.dualar.loader import ModelLoadError

    try:
        engine = make_engine("s2pro", **_s2pro_options(args))
        engine.load()  # type: ignore[attr-defined]
    except (ModelLoadError, EngineError, ValueError) as exc:
        raise CliError(str(exc)) from None
    return engine


def _s2pro_options(args: argparse.Namespace) -> dict[str, object]:
    """The S2 Pro options of the command line as the chosen backend's config fields."""
    codec = str(args.codec) if args.codec else None
    if args.backend == "sglang":
        device = "cuda:0" if args.device == "cpu" else args.device
        if not device.startswith("cuda"):
            raise CliError(f"--backend sglang runs on a CUDA GPU (--device cuda[:N]), not {args.device}")
        return dict(backend="sglang", model=args.model, codec=codec, gpu=int(device.partition(":")[2] or 0),
                    dtype=args.dtype or "bfloat16", max_seq_len=args.max_seq_len, warm_cache=args.prefix_cache == "on")
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    return dict(model=args.model, codec=codec, device=args.device, dtype=dtype, max_seq_len=args.max_seq_len,
                prefix_cache=args.prefix_cache == "on", cuda_graphs=args.cuda_graphs == "on")


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _check_redis_url(url: str | None) -> None:
    if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
        raise CliError(f"--redis must be a redis://, rediss:// or unix:// URL, got {url!r}")


KEYS_ENV = "SHOAL_API_KEYS"  # TENANT:KEY[,TENANT:KEY...]: keys without putting them on a command line


def _add_key_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("API keys (each key is a tenant; also read from $" + KEYS_ENV + ")")
    g.add_argument("--api-key", metavar="KEY", help=f"the key of tenant {DEFAULT_TENANT!r}")
    g.add_argument("--api-keys", metavar="FILE", type=Path, help="TENANT:KEY per line (# comments)")


def _key_ring(args: argparse.Namespace) -> KeyRing:
    """The API keys from --api-key, --api-keys FILE and $SHOAL_API_KEYS, together (a tenant named twice is an
    error)."""
    keys: dict[str, str] = {}
    sources: list[tuple[str, str]] = []
    if args.api_key is not None:
        sources.append(("--api-key", f"{DEFAULT_TENANT}:{args.api_key}"))
    if args.api_keys is not None:
        try:
            sources.append((str(args.api_keys), args.api_keys.read_text()))
        except OSError as exc:
            raise CliError(f"--api-keys: {exc}") from None
    if os.environ.get(KEYS_ENV):
        sources.append((f"${KEYS_ENV}", os.environ[KEYS_ENV]))
    try:
        for where, text in sources:
            for tenant, key in KeyRing.parse(text, where).keys.items():
                if tenant in keys:
                    raise ValueError(f"{where}: tenant {tenant!r} already has a key")
                keys[tenant] = key
        return KeyRing(keys)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _limit(value: str) -> tuple[str, float]:
    name, sep, number = value.partition("=")
    fields = {f.name: f for f in dataclasses.fields(GatewayLimits) if f.type in ("int", "float")}
    if not sep or name not in fields:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with NAME one of {', '.join(sorted(fields))}")
    try:
        return name, (int if fields[name].type == "int" else float)(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} must be a {fields[name].type}, got {number!r}") from None


def add_commands(sub: Any) -> dict[str, Command]:
    """Register the server's commands on ``sub`` (an argparse subparsers object); returns their runners."""

    serve = sub.add_parser("serve", help="run the WebSocket gateway (protocol v1 at /v1/realtime)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=_bounded(int, 0, 65535, "port"), default=8000,
                       help="port (default 8000; 0 picks a free one)")
    serve.add_argument("--redis", metavar="URL", help="use this Redis (redis://, rediss://, unix://) instead of the embedded one")
    serve.add_argument("--data-dir", type=Path, help="where the embedded Redis persists (default: per-user data dir)")
    _add_key_options(serve)
    serve.add_argument("--allowed-origins", metavar="LIST",
                       help="comma-separated web origins that may open a socket: * (any), self (this server's own "
                            "pages), or scheme://host[:port] (default: self with API keys, else *)")
    serve.add_argument("--limit", metavar="NAME=VALUE", type=_limit, action="append", default=[],
                       help="set a limit or quota (README: Security); repeatable, e.g. --limit voices_per_tenant=25")
    serve.add_argument("--max-contexts", type=_bounded(int, 1, 64, "--max-contexts"), default=8,
                       help="concurrent contexts a session may have in flight (default 8)")
    serve.add_argument("--processes", type=_processes, default=1, metavar="N|auto",
                       help="gateway processes sharing the port, the store and the engine workers (default 1; auto: "
                            "one per core); with --engine s2pro, give --workers too")
    pool = serve.add_argument_group("worker pool")
    pool.add_argument("--workers", type=_bounded(int, 0, 64, "--workers"), default=0,
                      help="run the engine in N local worker processes (default 0: in this process)")
    pool.add_argument("--worker-pool", metavar="NAME",
                      help="route to the workers registered in Redis under pool NAME (`shoal worker --pool NAME`); "
                           "start none")
    _add_engine_options(serve)

    worker = sub.add_parser("worker", help="serve an engine to gateways over the worker RPC, registered in Redis")
    worker.add_argument("--listen", type=_host_port, default=("127.0.0.1", 0), metavar="HOST:PORT",
                        help="RPC address (default 127.0.0.1:0, a free port)")
    worker.add_argument("--advertise", metavar="HOST", help="host gateways should connect to (default: the listen host)")
    worker.add_argument("--redis", metavar="URL", help="register in this Redis (redis://, rediss://, unix://)")
    worker.add_argument("--data-dir", type=Path,
                        help="register in the embedded Redis of `shoal serve --data-dir DIR` (default: the per-user one)")
    worker.add_argument("--no-register", action="store_true", help="serve the RPC without registering anywhere")
    worker.add_argument("--pool", default="default", help="pool name in the registry (default: default)")
    worker.add_argument("--id", dest="worker_id", metavar="ID", help="worker id in the pool (default: HOST-PID)")
    worker.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)  # set by `serve --workers`
    _add_engine_options(worker)

    say_p = sub.add_parser("say", help="synthesize TEXT to a WAV file with the same engine, offline")
    say_p.add_argument("text", metavar="TEXT")
    say_p.add_argument("-o", "--output", default="shoal.wav", help="WAV file to write, or - for stdout (default shoal.wav)")
    say_p.add_argument("--speaker", type=_bounded(int, 0, 63, "speaker"), default=0, help="speaker index (default 0)")
    say_p.add_argument("--voice", metavar="ID", help="voice id (the built-in voice maps each id to a stable voice)")
    say_p.add_argument("--reference-audio", type=Path, metavar="WAV", help="reference voice audio to clone (s2pro)")
    say_p.add_argument("--reference-codes", type=Path, metavar="NPY", help="reference voice as codec codes (10, T)")
    say_p.add_argument("--reference-text", metavar="T", help="transcript of the reference")
    say_p.add_argument("--temperature", type=_bounded(float, 0, 2, "--temperature"), default=0.8)
    say_p.add_argument("--top-p", type=_bounded(float, 1e-6, 1, "--top-p"), default=0.8)
    say_p.add_argument("--top-k", type=_bounded(int, 0, 4096, "--top-k"), default=30)
    say_p.add_argument("--seed", type=int, default=None)
    say_p.add_argument("--max-frames", type=_bounded(int, 1, 20_000, "--max-frames"), default=2048)
    say_p.add_argument("--codes-out", type=Path, metavar="NPY", help="also save the generated codes (10, frames)")
    _add_engine_options(say_p)

    codec = sub.add_parser("codec", help="S2 Pro codec: audio <-> codes")
    codec_sub = codec.add_subparsers(dest="codec_command", required=True)
    enc = codec_sub.add_parser("encode", help="AUDIO (wav/ogg) -> CODES.npy (10, frames)")
    enc.add_argument("audio", type=Path, metavar="AUDIO")
    enc.add_argument("-o", "--output", type=Path, required=True, metavar="CODES.npy")
    dec = codec_sub.add_parser("decode", help="CODES.npy -> OUT.wav (44.1 kHz) or OUT.npy (float32 samples)")
    dec.add_argument("codes", type=Path, metavar="CODES.npy")
    dec.add_argument("-o", "--output", required=True, metavar="OUT")
    for p in (enc, dec):
        p.add_argument("--codec", type=Path, metavar="PATH", help="codec.pth")
        p.add_argument("--model", type=Path, metavar="DIR", help="checkpoint directory holding codec.pth")
        p.add_argument("--device", default="cpu")

    token = sub.add_parser("token", help="print a short-lived token (for a browser or device) signed with a tenant's key")
    _add_key_options(token)
    token.add_argument("--tenant", default=None, help="whose token (default: the only tenant)")
    token.add_argument("--session", metavar="ID", help="the one session the token may open (default: any)")
    token.add_argument("--scope", dest="scopes", action="append", choices=SCOPES,
                       help="what it may do, repeatable (default: all)")
    token.add_argument("--ttl", type=_bounded(int, 1, 24 * 3600, "--ttl"), default=TOKEN_TTL_S,
                       help=f"lifetime in seconds (default {TOKEN_TTL_S})")

    bench = sub.add_parser("bench", help="measure the S2 Pro engine on random weights: engine | prefix | batch",
                           add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    return {"serve": run_serve, "worker": run_worker, "say": run_say, "codec": run_codec, "bench": run_bench,
            "token": run_token}


def build_parser(extra: Sequence[Commands] = ()) -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    """The ``shoal`` parser: the server's commands and those ``extra`` registers; and every command's runner."""
    parser = argparse.ArgumentParser(prog="shoal", description="Shoal: real-time conversational voice server")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = add_commands(sub)
    for register in extra:
        commands.update(register(sub))
    return parser, commands


def run_worker(args: argparse.Namespace) -> int:
    from realtime.worker_process import WorkerOptions
    from realtime.worker_process import run_worker as serve_worker
    from sessions.embedded import EmbeddedRedis, default_data_dir

    _check_redis_url(args.redis)
    if args.no_register and (args.redis or args.data_dir):
        raise CliError("--no-register does not go with --redis or --data-dir")
    if args.redis and args.data_dir:
        raise CliError("give --redis or --data-dir, not both")
    redis_url = None
    if not args.no_register:
        # a gateway's embedded Redis is found by its data dir; it must be running (the worker keeps retrying)
        redis_url = args.redis or EmbeddedRedis(args.data_dir or default_data_dir()).url
    try:
        options = WorkerOptions(host=args.listen[0], port=args.listen[1], advertise=args.advertise,
                                redis_url=redis_url, pool=args.pool, worker_id=args.worker_id,
                                parent_pid=args.parent_pid)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return serve_worker(_engine_from_args(args), options)


def _processes(value: str) -> int:
    if value == "auto":
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    return _bounded(int, 1, 256, "--processes")(value)


def run_serve(args: argparse.Namespace) -> int:
    from realtime.processes import GatewayStartError
    from realtime.server import serve  # uvicorn only where it is needed
    from realtime.worker_process import LocalWorkers, WorkerStartError

    _check_redis_url(args.redis)
    if args.data_dir is not None and args.data_dir.exists() and not args.data_dir.is_dir():
        raise CliError(f"--data-dir {args.data_dir} exists and is not a directory")
    if args.workers and args.worker_pool:
        raise CliError("give --workers N (local workers) or --worker-pool NAME (workers started elsewhere), not both")
    keys = _key_ring(args)
    try:
        limits = GatewayLimits(turn=TurnLimits(max_contexts=args.max_contexts), **dict(args.limit))
        origins = None
        if args.allowed_origins is not None:
            origins = OriginPolicy(tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip()))
        config = ServerConfig(host=args.host, port=args.port, redis_url=args.redis, data_dir=args.data_dir,
                              keys=keys, origins=origins, engine=_engine_name(args), limits=limits,
                              processes=args.processes)
        if args.worker_pool:
            return serve(config, None, worker_pool=args.worker_pool, verbose=args.verbose)
        if args.workers:
            workers = LocalWorkers(count=args.workers, engine_argv=_engine_argv(args), verbose=args.verbose)
            return serve(config, None, workers=workers, verbose=args.verbose)
        if args.processes > 1:
            if config.engine == "s2pro":
                raise CliError("--processes with the s2pro engine would load the model once per process: add "
                               "--workers N (the gateway processes then share the N engine workers)")
            # each gateway process builds its own light engine (stub, built-in voice)
            return serve(config, None, engine_factory=functools.partial(_engine_from_args, args),
                         verbose=args.verbose)
    except (WorkerStartError, GatewayStartError) as exc:
        raise CliError(str(exc)) from None
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return serve(config, _engine_from_args(args))


def run_token(args: argparse.Namespace) -> int:
    keys = _key_ring(args)
    if not keys.enabled:
        raise CliError(f"no API keys: give --api-key, --api-keys FILE or ${KEYS_ENV}, as to shoal serve")
    tenant = args.tenant
    if tenant is None:
        if len(keys.keys) != 1:
            raise CliError(f"several tenants ({', '.join(sorted(keys.keys))}): name one with --tenant")
        tenant = next(iter(keys.keys))
    try:
        token, _ = keys.issue(tenant, ttl_s=args.ttl, session=args.session, scopes=args.scopes or SCOPES)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    print(token)
    return 0


def run_say(args: argparse.Namespace) -> int:
    try:
        sampling = Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            max_frames=args.max_frames)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.reference_audio and args.reference_codes:
        raise CliError("give --reference-audio or --reference-codes, not both")
    job = SayJob(text=args.text, speaker=args.speaker, voice=args.voice, reference_audio=args.reference_audio,
                 reference_codes=args.reference_codes, reference_text=args.reference_text, sampling=sampling)
    if not job.text.strip():
        raise CliError("TEXT is empty")
    return say(_engine_from_args(args), job, args.output, args.codes_out)


def run_codec(args: argparse.Namespace) -> int:
    codec_path = args.codec or (args.model / "codec.pth" if args.model else None)
    if codec_path is None:
        raise CliError("give --codec PATH or --model DIR")
    if not codec_path.is_file():
        raise CliError(f"codec checkpoint {codec_path} not found")
    if args.codec_command == "encode":
        return codec_encode(codec_path, args.audio, args.output, args.device)
    return codec_decode(codec_path, args.codes, args.output, args.device)


def run_bench(args: argparse.Namespace) -> int:
    return bench_main(args.bench_args)


def bench_main(argv: Sequence[str]) -> int:
    """``shoal bench engine|prefix|batch``: parsed here, lazily, so torch loads only for benchmarks."""
    from engine.dualar import bench as bench_engine
    from engine.dualar import bench_batch

    parser = argparse.ArgumentParser(prog="shoal bench", description="S2 Pro engine benchmarks (random weights)")
    sub = parser.add_subparsers(dest="bench", required=True)
    bench_engine.add_parser(sub)
    bench_batch.add_parser(sub)
    parsed = parser.parse_args(list(argv))
    return int(parsed.bench_main(parsed) or 0)


def main(argv: Sequence[str] | None = None, *, extra: Sequence[Commands] = ()) -> int:
    """Run one command (``extra``: more commands to offer, as ``shoal.cli`` adds ``loadtest``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # its own parser (and its --help), built only when asked for
        return bench_main(argv[1:])
    parser, commands = build_parser(extra)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return commands[args.command](args)
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
