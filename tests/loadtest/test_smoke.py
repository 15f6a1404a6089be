"""The load test end to end at a small size: `shoal loadtest` starts `shoal serve --engine stub` on a free
loopback port, runs a few sessions for a few seconds (barge-ins included), and writes a complete summary and
report. The same raw events re-analysed give the same summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

SUMMARY_KEYS = {"sessions", "turns", "ttfa_ms", "gap_ms", "underruns", "errors", "audio_seconds"}


def small_run(out: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """`shoal loadtest` for a few seconds with barge-ins (`args`: the server and the load, and any setting to change,
    given last so that they win); it must exit 0 with a sane summary and no error. Returns the process and the
    summary."""
    cmd = [
        sys.executable, "-m", "shoal", "loadtest", "--duration", "6", "--ramp", "1", "--warmup", "0.5",
        "--barge-in", "0.3", "--tokens-per-s", "60", "--quiet", "--out", str(out), *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sanity"]["ok"], summary["sanity"]
    assert summary["errors"] == 0, summary["errors_by_code"]
    return proc, summary


def test_small_load_against_the_stub_engine_gives_a_complete_summary_and_report(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc, summary = small_run(out, "--serve", "stub", "--stub-ttft-ms", "5", "--sessions", "4", "--floor-probes", "2")
    assert SUMMARY_KEYS <= summary.keys()
    for key in ("ttfa_ms", "gap_ms"):
        assert {"p50", "p90", "p99", "max"} <= summary[key].keys()
    assert summary["sessions"] == 4 and summary["sessions_ready"] == 4
    assert summary["turns"] >= 4 and summary["turns_unfinished"] == 0
    assert 5.0 <= summary["ttfa_ms"]["p50"] < 2000.0  # the stub waits 5 ms before its first frame
    assert summary["audio_seconds"] > 5.0
    assert summary["floor_ms"]["n"] > 10 and summary["ping_ms"]["n"] >= 4
    assert summary["cpu"]["server"]["n"] > 0, "the spawned server's CPU was not sampled"
    assert summary["server"]["engine"] == "stub"
    assert "TTFA" in proc.stdout and "report.html" in proc.stdout

    html = (out / "report.html").read_text()
    for png in ("ttfa.png", "concurrency.png", "cpu.png"):
        assert (out / png).stat().st_size > 5000
        assert f"src='{png}'" in html
    rows = (out / "turns.csv").read_text().splitlines()
    assert rows[0].startswith("session,turn") and len(rows) - 1 == summary["turns_total"]

    again = subprocess.run([sys.executable, "-m", "shoal", "loadtest", "report", "--out", str(out)],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "summary.json").read_text()) == summary


def test_refuses_anything_but_loopback(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "shoal", "loadtest", "--url", "ws://192.0.2.1:8000/v1/realtime", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "loopback" in proc.stderr


def test_an_unreachable_server_is_reported_not_hung(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "shoal", "loadtest", "--url", f"ws://127.0.0.1:{port}/v1/realtime",
        "--sessions", "2", "--duration", "1", "--ramp", "0", "--floor-probes", "0", "--quiet", "--out", str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["sessions_ready"] == 0 and summary["errors_by_code"] == {"connect": 2}


def test_two_contexts_per_session_play_at_once_and_both_complete(tmp_path: Path) -> None:
    """`--contexts 2`: each session runs contexts c0 and c1 at once (their first turns sent together, barge-ins per
    context). Both contexts' audio arrives, interleaved; turns of both complete; the strict per-turn orderings hold
    (turn indices, seq per turn, a cancel stopping only its own context's turn)."""
    from loadtest.record import read_events

    out = tmp_path / "out"
    proc, summary = small_run(
        out, "--serve", "stub", "--stub-ttft-ms", "5", "--sessions", "3", "--contexts", "2", "--floor-probes", "0"
    )
    assert summary["sessions_ready"] == 3
    assert summary["turns_unfinished"] == 0
    ctx = summary["contexts"]
    assert ctx["per_session"] == 2 and set(ctx["by_context"]) == {"c0", "c1"}
    for c in ("c0", "c1"):
        assert ctx["by_context"][c]["audio_seconds"] > 0.5, ctx["by_context"][c]
        assert ctx["by_context"][c]["ttfa_ms"]["n"] >= 1
    ranks = ctx["first_round"]["ttfa_ms_by_rank"]
    assert ranks["0"]["n"] == 3 and ranks["1"]["n"] == 3  # every session's two first lines got their audio
    assert ctx["interleaved_turns"] >= 2 and ctx["streams_peak_in_session"] == 2
    assert summary["streams_peak"] >= 2
    assert "contexts       2 per session" in proc.stdout

    audio: dict[str | None, int] = {}
    completed: dict[str | None, int] = {}
    for ev in read_events(out / "raw" / "events.msgpack"):
        if ev[0] == "a":
            audio[ev[-1]] = audio.get(ev[-1], 0) + 1
        elif ev[0] == "done" and ev[4] == "complete":
            completed[ev[-1]] = completed.get(ev[-1], 0) + 1
    assert set(audio) == {"c0", "c1"}, audio  # the server labelled every packet with its context
    assert set(completed) == {"c0", "c1"} and min(completed.values()) >= 2, completed
    rows = (out / "turns.csv").read_text().splitlines()
    assert rows[0].endswith(",context,others") and {r.split(",")[-2] for r in rows[1:]} == {"c0", "c1"}


def test_word_timing_against_the_built_in_voice_arrives_before_its_audio(tmp_path: Path) -> None:
    """`--timestamps words` against `shoal serve --engine espeak` (exact timing): a `words` message per segment, each
    before the first audio packet it covers (the sanity rule words_after_audio), one word per word of the segment."""
    from loadtest.record import read_events

    out = tmp_path / "out"
    proc, summary = small_run(out, "--serve", "espeak", "--timestamps", "words", "--sessions", "3", "--floor-probes", "0")
    timing = summary["timing"]
    assert timing["requested"] == "words" and timing["words_messages"] >= 3, timing
    assert timing["estimated_messages"] == 0 and timing["visemes_messages"] == 0  # espeak's own timing, no visemes
    assert "word timing    words:" in proc.stdout

    segments: dict[tuple[int, int], list[str]] = {}
    words: dict[tuple[int, int], list[int]] = {}
    complete = set()
    for ev in read_events(out / "raw" / "events.msgpack"):
        if ev[0] == "seg":
            segments.setdefault((ev[2], ev[3]), []).append(ev[5])
        elif ev[0] == "w":
            words.setdefault((ev[2], ev[3]), []).append(ev[4])
        elif ev[0] == "done" and ev[4] == "complete":
            complete.add((ev[2], ev[3]))
    assert complete
    for turn in complete:  # every segment of a complete turn got its words, one per word it says
        said = [len([w for w in text.split() if any(c.isalnum() for c in w)]) for text in segments[turn]]
        assert words.get(turn) == said, (turn, segments[turn], words.get(turn))
