"""``shoal loadtest [run|sweep|report]``: the load test's command line.

    shoal loadtest --url ws://127.0.0.1:8000/v1/realtime --sessions 100 --duration 30 --out DIR
    shoal loadtest --serve stub --stub-ttft-ms 0 --sessions 100 --duration 30 --out DIR
    shoal loadtest --serve stub --sessions 50 --contexts 2 --out DIR     # two characters talking at once per session
    shoal loadtest --serve espeak --timestamps words --out DIR           # word timing: counted, and checked for order
    shoal loadtest --serve stub --telephony --sessions 25 --out DIR      # phone calls: Twilio Media Streams, barge-in
    shoal loadtest sweep --serve stub --start 100 --step 100 --max-sessions 800 --out DIR
    shoal loadtest report --out DIR          # recompute summary.json and the report from DIR/raw
    shoal loadtest soak --serve stub --sessions 66 --duration 1800 --out DIR   # 80 % of capacity, watched for leaks
    shoal loadtest --serve stub --processes auto --client-processes auto --sessions 300 --out DIR
                                             # gateways in N processes, the load from one process per core

Exit status: 0 when the run completed and its events are sane (with ``--check``: and within the thresholds);
1 when the events show impossible orderings, nothing could run, or (``--check``) a threshold broke; 2 for usage
errors.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from loadtest.config import TELEPHONY_OUTPUT, TIMESTAMPS, SwarmConfig


def _range(kind: type) -> Any:
    def parse(value: str) -> tuple[Any, Any]:
        lo, _, hi = value.partition("-")
        try:
            a, b = kind(lo), kind(hi or lo)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected N or N-M, got {value!r}") from None
        if b < a:
            raise argparse.ArgumentTypeError(f"empty range {value!r}")
        return a, b

    return parse


def _processes(value: str) -> str:
    """N (a positive count) or ``auto`` (one per core), kept as given."""
    if value != "auto" and not (value.isdigit() and int(value) >= 1):
        raise argparse.ArgumentTypeError(f"expected a positive number or auto, got {value!r}")
    return value


def _count(value: str) -> int:
    """``--client-processes``: N or ``auto`` (os.cpu_count())."""
    return (os.cpu_count() or 1) if _processes(value) == "auto" else int(value)


def add_loadtest_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``loadtest`` on the ``shoal`` command's subparsers."""
    p = sub.add_parser(
        "loadtest",
        help="simulate many conversations against a server on this machine; latency and capacity report",
        description=(__doc__ or "").split("\n\n")[0],
    )
    p.add_argument("action", nargs="?", choices=("run", "sweep", "report", "soak"), default="run",
                   help="run (default): one load; sweep: find the capacity; report: re-analyse --out DIR; soak: "
                        "one long load, the server's memory, fds and tasks sampled and checked flat")
    target = p.add_argument_group("server under test (loopback only)")
    target.add_argument("--url", help="protocol v1 endpoint, e.g. ws://127.0.0.1:8000/v1/realtime")
    target.add_argument("--serve", metavar="ENGINE", choices=("stub", "espeak"),
                        help="start `shoal serve --engine ENGINE` on a free port for the run, and stop it after")
    target.add_argument("--stub-ttft-ms", type=float, default=20.0, help="with --serve stub (default 20)")
    target.add_argument("--stub-frame-ms", type=float, default=12.0, help="with --serve stub (default 12)")
    target.add_argument("--processes", type=_processes, metavar="N|auto",
                        help="with --serve: `shoal serve --processes N` (N gateway processes sharing the port; auto: "
                             "one per core); their CPU is summed as the server's")
    target.add_argument("--server-pid", type=int,
                        help="root of the server's process tree whose CPU to sample (default: the one listening on "
                             "--url, or the parent of the several that do)")
    target.add_argument("--profile", action="store_true", help="record the server with py-spy during the window")
    load = p.add_argument_group("load")
    load.add_argument("--sessions", type=int, default=10, help="concurrent sessions (default 10)")
    load.add_argument("--duration", type=float, default=30.0, help="seconds in which turns start (default 30)")
    load.add_argument("--turns", type=int, default=0, help="turns per session (default 0: as many as fit)")
    load.add_argument("--ramp", type=float, default=None, help="seconds to connect all sessions (default: duration/6, at most 10)")
    load.add_argument("--warmup", type=float, default=2.0, help="seconds after the ramp excluded from statistics (default 2)")
    load.add_argument("--seed", type=int, default=1)
    load.add_argument("--tokens-per-s", type=float, default=30.0, help="text token rate per session (default 30)")
    load.add_argument("--sentences", type=_range(int), default=(1, 3), help="sentences per turn, N or N-M (default 1-3)")
    load.add_argument("--think", type=_range(float), default=(0.3, 1.0), help="pause between turns in s (default 0.3-1.0)")
    load.add_argument("--barge-in", type=float, default=None,
                      help="share of turns interrupted (default 0; with --telephony 0.5, by the caller's voice)")
    load.add_argument("--speaker-change", type=float, default=0.2,
                      help="share of turns that change speaker (default 0.2; one context only)")
    load.add_argument("--contexts", type=int, default=1, metavar="N",
                      help="concurrent contexts per session (ids c0..cN-1), each with its own speaker, turns, player "
                           "and barge-ins, first turns sent together (default 1: no `context` on the wire; the "
                           "server allows 8 by default)")
    load.add_argument("--telephony", action="store_true",
                      help="each session is a phone call: the application drives it over /v1/realtime and a simulated "
                           "Twilio Media Stream joins it on /v1/twilio, plays its mu-law 8 kHz audio, echoes marks, "
                           "and speaks over a share (--barge-in) of the turns with a short utterance of the built-in "
                           "voice; adds onset-to-clear latency, server CPU per call and the VAD's cost per call")
    load.add_argument("--vad-bench-s", type=float, default=30.0, metavar="S",
                      help="with --telephony: seconds of line audio through the server's input path and its voice "
                           "activity, timed in this process before the load (default 30; 0: skip)")
    load.add_argument("--codec", choices=("opus", "pcm16", "mulaw"), default=None,
                      help="output.codec (default opus; with --telephony the call's mu-law)")
    load.add_argument("--sample-rate", type=int, default=None, help="default 48000 (with --telephony 8000)")
    load.add_argument("--frame-ms", type=int, default=20)
    load.add_argument("--lead-ms", type=int, default=None, help="output.lead_ms (default: the server's)")
    load.add_argument("--timestamps", choices=TIMESTAMPS, default="none",
                      help="output.timestamps: ask for word timing (`words`, and `visemes` with visemes); each words "
                           "message must arrive before the audio it covers (default none)")
    load.add_argument("--prebuffer-ms", type=float, default=40.0, help="player jitter buffer: playback starts once this much audio is in (default 40)")
    load.add_argument("--compression", action="store_true", help="offer permessage-deflate, as browsers do")
    load.add_argument("--floor-probes", type=int, default=8, help="bare WebSocket round-trip probes (default 8)")
    load.add_argument("--client-processes", type=_count, default=1, metavar="N|auto",
                      help="load-generator processes the sessions are split over, so that the client is never the "
                           "bottleneck (default 1: all in this one; auto: one per core); floor probes and CPU "
                           "sampling stay in this process")
    thr = p.add_argument_group("thresholds (sweep; run with --check)")
    thr.add_argument("--ttfa-p99-ms", type=float, default=50.0, help="default 50")
    thr.add_argument("--max-underruns", type=int, default=0, help="default 0")
    thr.add_argument("--check", action="store_true", help="run: exit 1 if a threshold breaks")
    sw = p.add_argument_group("sweep")
    sw.add_argument("--start", type=int, default=50)
    sw.add_argument("--step", type=int, default=50)
    sw.add_argument("--max-sessions", type=int, default=1000)
    sw.add_argument("--refine", type=int, default=2, help="bisection steps after the first failure (default 2)")
    p.add_argument("--sample-s", type=float, default=10.0, help="soak: seconds between samples (default 10)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="on a shared machine: first wait up to S s for other processes to go quiet (sweep: before "
                        "each level, and redo a level measured while they were busy, up to 2 times)")
    p.add_argument("--out", type=Path, help="output directory (default loadtest-out/TIMESTAMP)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    return p


def _config(args: argparse.Namespace, url: str) -> SwarmConfig:
    ramp = args.ramp if args.ramp is not None else min(10.0, args.duration / 6)
    phone = TELEPHONY_OUTPUT if args.telephony else {"codec": "opus", "sample_rate": 48000}
    barge_in = args.barge_in if args.barge_in is not None else (0.5 if args.telephony else 0.0)
    return SwarmConfig(
        url=url,
        sessions=args.sessions,
        duration_s=args.duration,
        turns=args.turns,
        ramp_s=ramp,
        warmup_s=args.warmup,
        seed=args.seed,
        tokens_per_s=args.tokens_per_s,
        sentences=args.sentences,
        think_s=args.think,
        barge_in=barge_in,
        speaker_change=args.speaker_change,
        contexts=args.contexts,
        codec=args.codec or phone["codec"],
        sample_rate=args.sample_rate or phone["sample_rate"],
        frame_ms=args.frame_ms,
        lead_ms=args.lead_ms,
        timestamps=args.timestamps,
        prebuffer_ms=args.prebuffer_ms,
        compression=args.compression,
        floor_probes=args.floor_probes,
        telephony=args.telephony,
        vad_bench_s=args.vad_bench_s,
        client_processes=args.client_processes,
    )


def headline(s: dict[str, Any]) -> str:
    """Server CPU per stream beside the floor, in one line (summaries from before the headline have none)."""
    h = s.get("headline")
    if not h:
        return f"server CPU per stream {s['cpu']['server_per_stream']} % of a core (with children)"

    def pct(x: float | None) -> str:
        return "–" if x is None else f"{x:.2f} %"

    floor = [] if h["floor_ms_p50"] is None else [f"WebSocket round trip p50 {h['floor_ms_p50']:.2f} ms"]
    if h.get("codec_floor_pct") is not None:
        floor.append(f"codec {pct(h['codec_floor_pct'])} of a core per stream")
    procs = h["gateway_processes"]
    return (f"server CPU per stream {pct(h['server_cpu_per_stream'])} of a core "
            f"({procs if procs is not None else '–'} gateway process{'es' if procs != 1 else ''}, "
            f"{h['server_cpu'] if h['server_cpu'] is not None else '–'} % for {h['streams']} streams; "
            f"{pct(h['server_cpu_per_stream_with_children'])} with engine and store); "
            f"client {pct(h['client_cpu_per_stream'])} in {h['client_processes']} process"
            f"{'es' if h['client_processes'] != 1 else ''}"
            + (f"; floor: {', '.join(floor)}" if floor else ""))


def _print_summary(s: dict[str, Any], out_dir: Path) -> None:
    from loadtest.stats import timing_shown

    def d(x: dict[str, Any]) -> str:
        return "–" if x.get("p50") is None else f"p50 {x['p50']:.1f} p90 {x['p90']:.1f} p99 {x['p99']:.1f} max {x['max']:.1f}"

    cpu = s["cpu"]
    print(headline(s))
    print(f"sessions {s['sessions_ready']}/{s['sessions']}, turns {s['turns']} measured, streams {s['streams_mean']}")
    print(f"TTFA ms        {d(s['ttfa_ms'])}")
    print(f"floor ms       {d(s['floor_ms'])}")
    print(f"overhead ms    p50 {s['overhead_ms']['p50']} p90 {s['overhead_ms']['p90']} p99 {s['overhead_ms']['p99']}")
    print(f"gap ms         {d(s['gap_ms'])}")
    ctx = s.get("contexts") or {}
    if ctx.get("per_session", 1) > 1:
        first = ctx["first_round"]["later_over_first"]
        ratio = "–" if first["p50"] is None else f"p50 {first['p50']:.2f} max {first['max']:.2f}"
        print(f"contexts       {ctx['per_session']} per session: TTFA alone {d(ctx['ttfa_ms_alone'])}; "
              f"with others in flight {d(ctx['ttfa_ms_with_others'])}")
        print(f"               first round, later context's TTFA / first's: {ratio}; interleaved turns "
              f"{ctx['interleaved_turns']}; streams peak {s['streams_peak']} ({ctx['streams_peak_in_session']} in one session)")
    if timing_shown(s):
        timing = s["timing"]
        print(f"word timing    {timing['requested']}: {timing['words_messages']} words messages ({timing['words']} words, "
              f"{timing['estimated_messages']} estimated), {timing['visemes_messages']} visemes messages")
    print(f"underruns      {s['underruns']} ({s['underrun_ms']:.1f} ms), errors {s['errors']} {s['errors_by_code'] or ''}")
    phone = s.get("telephony")
    if phone is not None:
        b, vad = phone["barge_ins"], phone["vad"]
        print(f"calls          {phone['joined']}/{phone['calls']} joined; barge-ins {b['cleared']}/{b['utterances']} "
              f"cleared, {b['missed']} missed, {b['spurious_clears']} spurious clears")
        print(f"onset->clear   {d(phone['onset_to_clear_ms'])}")
        print(f"VAD onset err  {d(phone['vad_onset_error_ms'])} (speech_started.ms - the utterance's onset)")
        print(f"CPU per call   server {phone['server_cpu_per_call']} % of a core; input path "
              + ("–" if vad is None else f"{vad['per_call_pct']} % (VAD alone {vad['vad_per_call_pct']} %: "
                 f"{vad['vad_ms_per_s']} ms per audio second, measured on {vad['audio_s']:g} s)"))
    print(f"server CPU %   mean {cpu['server']['mean']} (+children {cpu['server_children']['mean']}), "
          f"per stream {cpu['server_per_stream']}; client {cpu['client']['mean']}"
          + (" (client saturated)" if s["client_saturated"] else ""))
    if s["machine_busy"]:
        print(f"WARNING: other processes used {cpu['other']['mean']} % CPU and this run's processes waited for a "
              f"CPU (server {cpu['server_wait']['mean']} %, client {cpu['client_wait']['mean']} % of the time): "
              "the numbers are not valid")
    if not s["sanity"]["ok"]:
        print(f"SANITY FAILED: {s['sanity']['violations']}")
    print(f"report: {out_dir / 'report.html'}")


def run_loadtest(args: argparse.Namespace) -> int:
    from loadtest.runner import analyse_dir, run_once
    from loadtest.server import ServerProcess
    from loadtest.sweep import sweep

    out_dir: Path = args.out or Path("loadtest-out") / time.strftime("%Y%m%d-%H%M%S")
    progress = None if args.quiet else sys.stderr
    if args.action == "report":
        if args.out is None or not (args.out / "raw").is_dir():
            print("shoal loadtest report: error: --out DIR with a raw/ folder is required", file=sys.stderr)
            return 2
        summary = analyse_dir(args.out, args.ttfa_p99_ms, args.max_underruns)
        _print_summary(summary, args.out)
        return 0 if summary["sanity"]["ok"] else 1
    if (args.url is None) == (args.serve is None):
        print("shoal loadtest: error: give exactly one of --url or --serve", file=sys.stderr)
        return 2
    if args.processes is not None and args.serve is None:
        print("shoal loadtest: error: --processes goes with --serve (with --url, start the server yourself)",
              file=sys.stderr)
        return 2
    server = None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if args.serve is not None:
            extra = ["--stub-ttft-ms", str(args.stub_ttft_ms), "--stub-frame-ms", str(args.stub_frame_ms)] if args.serve == "stub" else []
            server = ServerProcess(args.serve, out_dir / "server.log", extra, processes=args.processes)
            url, pid = server.url, server.pid
            info: dict[str, Any] = {"command": " ".join(server.command[1:]), "engine": args.serve,
                                    "processes": args.processes or "1", "gateway_pids_at_start": server.gateways}
            if args.serve == "stub":
                info.update(stub_ttft_ms=args.stub_ttft_ms, stub_frame_ms=args.stub_frame_ms)
        else:
            from loadtest.cpu import listening_pid

            url = args.url
            pid = args.server_pid if args.server_pid is not None else listening_pid(url)
            info = {"url": url}
        config = _config(args, url)
        if args.action == "sweep":
            result = sweep(
                config, out_dir, pid, info, args.start, args.step, args.max_sessions, args.ttfa_p99_ms,
                args.max_underruns, args.refine, progress=progress, quiet_wait_s=args.wait_quiet,
                busy_retries=2 if args.wait_quiet > 0 else 0,
            )
            per = f" x {config.contexts} contexts" if config.contexts > 1 else ""
            unit, missed = ("phone calls", ", no barge-in missed") if config.telephony else ("sessions", "")
            print(f"capacity: {result['capacity']} {unit}{per} (TTFA p99 <= {args.ttfa_p99_ms} ms, underruns <= "
                  f"{args.max_underruns}{missed}){' - limited by the client' if result['limited_by_client'] else ''}")
            print(f"report: {out_dir / 'report.html'}")
            return 0 if all(st["sane"] for st in result["steps"]) else 1
        if args.action == "soak":
            from loadtest.soak import soak

            if pid is None:
                raise RuntimeError("soak needs the server's pid (use --serve, or --server-pid)")
            verdict = soak(config, out_dir, pid, info, args.sample_s, progress=progress)
            for name in ("rss_mb", "fds", "tasks"):
                v = verdict.get(name)
                if v:
                    print(f"{name:8} {v['start']:g} -> {v['end']:g} over the second half ({v['per_min']:+g}/min; "
                          f"min {v['min']:g}, max {v['max']:g}; allowed +{v['allowed']:g}; first half "
                          f"{v['fill']:+g}): {'flat' if v['flat'] else 'GROWING'}")
            settled = verdict["settled"]
            print(f"after    connections {settled['connections_after']:g}, client sockets "
                  f"{settled['client_sockets_after']}, files {settled['files']['before']} -> "
                  f"{settled['files']['after']}, tasks {settled['tasks']['before']:g} -> {settled['tasks']['after']:g}"
                  f" (store and worker sockets {settled['sockets']['before']} -> {settled['sockets']['after']}): "
                  f"{'settled' if settled['ok'] else 'NOT settled'}")
            flat = {True: "flat", False: "NOT flat", None: "no verdict (too short)"}[verdict["flat"]]
            print(f"soak: {verdict['run']['sessions_ready']}/{config.sessions} sessions, {verdict['run']['turns']} "
                  f"turns, {verdict['run']['errors']} errors; {flat}; {out_dir / 'soak.json'}")
            return 0 if verdict["flat"] and settled["ok"] and verdict["sane"] else 1
        thresholds = (args.ttfa_p99_ms, args.max_underruns)
        if args.wait_quiet > 0:
            from loadtest.cpu import wait_quiet

            if not wait_quiet(args.wait_quiet) and progress is not None:
                progress.write("shoal loadtest: the machine did not get quiet; running anyway\n")
        summary = run_once(config, out_dir, pid, info, *thresholds, profile=args.profile, progress=progress)
        _print_summary(summary, out_dir)
        if not summary["sanity"]["ok"] or summary["sessions_ready"] == 0:
            return 1
        if args.check and not summary.get("within_thresholds", False):
            return 1
        return 0
    except ValueError as exc:
        print(f"shoal loadtest: error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as exc:
        print(f"shoal loadtest: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest")
    sub = parser.add_subparsers(dest="command", required=True)
    add_loadtest_parser(sub)
    return run_loadtest(parser.parse_args(["loadtest", *(argv if argv is not None else sys.argv[1:])]))
