"""The benchmark the GPU check runs, exercised end to end on the CPU stub engine (its numbers mean nothing here)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from engine.sglang.bench import BenchPlan, StreamTrace, format_report, main, percentile, run_benchmark
from engine.sglang.guard import missing_requirements
from engine.stub import StubConfig, StubSynthesizer

PLAN = BenchPlan(concurrency=(1, 3), frames=12, sessions=3, turns=2, turn_frames=5, pause_s=0.0, warmup=False)


def test_trace_arithmetic() -> None:
    trace = StreamTrace(start=10.0, chunks=[(10.05, 2), (10.15, 4), (10.25, 4)])
    assert trace.frames == 10 and math.isclose(trace.ttfa, 0.05)
    assert math.isclose(trace.decode_fps, 8 / 0.2)  # the frames after the first chunk over first..last chunk
    assert math.isnan(StreamTrace(1.0, [(1.1, 3)]).decode_fps)
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and math.isnan(percentile([], 50))


async def test_every_measurement_on_the_stub() -> None:
    synth = StubSynthesizer(StubConfig(ttft_ms=5, frame_ms=2, chars_per_frame=0.1))
    await synth.start()
    try:
        report = await run_benchmark(synth, PLAN, log=lambda _: None)
    finally:
        await synth.aclose()
    assert set(report.decode_fps_p50) == {1, 3} and set(report.aggregate_fps) == {1, 3}
    assert all(v > 0 for v in report.decode_fps_p50.values()) and all(v > 0 for v in report.aggregate_fps.values())
    assert set(report.ttfa_ms) == {1, 2} and 0 < report.ttfa_ms[1]["p50"] < 1000
    assert 0 < report.rtf_c1 < 1  # the stub makes a 46 ms frame every 2 ms
    assert report.frames_total == 12 * (1 + 3) + 5 * 3 * 2
    text = format_report(report, PLAN)
    for needle in ("frames/s per stream", "aggregate frames/s", "turn 1:", "turn 2:", "real-time factor",
                   "target", "< 100", "> 3000", "< 0.2"):
        assert needle in text
    json.dumps(report.to_json())


def test_the_command_line_on_the_stub(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.json"
    code = main(["--engine", "stub", "--concurrency", "1,2", "--frames", "8", "--sessions", "2", "--turns", "2",
                 "--turn-frames", "3", "--pause", "0", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "real-time factor at concurrency 1" in printed
    assert json.loads(out.read_text())["engine"] == "stub"


@pytest.mark.skipif(not missing_requirements(), reason="this machine can run the sglang backend")
def test_the_sglang_benchmark_without_a_gpu_fails_with_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--preset", "tiny", "--concurrency", "1", "--frames", "4"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bench: error: the sglang backend cannot start")
