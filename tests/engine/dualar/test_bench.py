"""`shoal bench engine`: the measurement runs on the tiny preset and reports sane numbers; its command line."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from engine.dualar.bench import add_parser, bench_engine, format_table, main, random_prompt
from engine.dualar.presets import preset_config

RATES = ("prefill_tokens_per_s", "decode_frames_per_s", "decode_mean_frames_per_s", "codec_frames_per_s")
TIMES = ("prefill_ms", "first_frame_ms", "first_audio_ms", "decode_ms_per_frame", "codec_decode_ms", "codec_rtf")


def test_tiny_preset_gives_positive_numbers_with_the_expected_keys() -> None:
    lines: list[str] = []
    result = bench_engine("tiny", prompt_len=40, frames=5, repeats=2, log=lines.append)
    sizes = ("peak_memory_mib", "peak_rss_mib", "weights_mib", "kv_cache_mib", "process_cpu_per_wall")
    for key in (*RATES, *TIMES, *sizes):
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, key
    assert result["slow_params"] == 161_152 and result["fast_params"] == 57_536 and result["codec_params"] > 0
    assert (result["preset"], result["device"], result["dtype"]) == ("tiny", "cpu", "float32")
    assert result["random_weights"] is True
    assert (result["prompt_len"], result["frames"], result["repeats"]) == (40, 5, 2)
    assert result["codec_chunks"] == [1, 2, 2]  # the synthesizer's growing chunks, cut to 5 frames
    assert result["peak_cuda_mib"] is None and result["peak_memory_mib"] == result["peak_rss_mib"]
    assert result["first_audio_ms"] >= result["first_frame_ms"]
    # the codec's real-time factor is its decode time over the audio's duration
    assert result["codec_rtf"] == pytest.approx(result["codec_decode_ms"] / 1e3 / (5 * 2048 / 44100))
    assert len(lines) == 1 + 1 + 2  # building, warm-up, two runs
    json.dumps(result)  # JSON-ready as is
    table = format_table(result)
    assert "RANDOM WEIGHTS" in table and "tokens/s" in table and "frames/s" in table and "RTF" in table


def test_bfloat16_runs() -> None:
    result = bench_engine("tiny", dtype=torch.bfloat16, prompt_len=20, frames=2, repeats=1)
    assert result["dtype"] == "bfloat16" and result["decode_frames_per_s"] > 0


def test_prompt_has_audio_positions_with_their_codes() -> None:
    config = preset_config("small")
    prompt = random_prompt(config, 320, torch.Generator().manual_seed(0))
    assert prompt.shape == (11, 320)
    audio = (prompt[0] >= config.semantic_begin_id) & (prompt[0] <= config.semantic_end_id)
    assert int(audio.sum()) == 213 and torch.equal(prompt[0, audio] - config.semantic_begin_id, prompt[1, audio])
    assert int(prompt[1:, ~audio].abs().sum()) == 0  # codes only at audio positions
    assert int(prompt[1:].max()) < config.codebook_size


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"preset": "huge"}, "unknown preset"),
        ({"preset": "tiny", "frames": 0}, "frames >= 1"),
        ({"preset": "tiny", "dtype": "float16"}, "dtype must be"),
        ({"preset": "tiny", "device": "mps"}, "device must be"),
        ({"preset": "tiny", "prompt_len": 4096}, "context"),
    ],
)
def test_bad_arguments_are_value_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bench_engine(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is missing")
def test_cuda_without_a_gpu_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--preset", "tiny", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_main_prints_the_table_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    args = ["--preset", "tiny", "--prompt-len", "30", "--frames", "3", "--repeats", "1", "--json", str(out)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "preset tiny" in captured.out and "RANDOM WEIGHTS" in captured.out
    assert "bench: warm-up" in captured.err  # progress on stderr
    saved = json.loads(out.read_text())
    assert saved["frames"] == 3 and saved["decode_frames_per_s"] > 0


def test_add_parser_wires_shoal_bench_engine(capsys: pytest.CaptureFixture[str]) -> None:
    """The parser as `shoal bench engine` would hold it; JSON to stdout with --json -."""
    parser = argparse.ArgumentParser(prog="shoal")
    bench = parser.add_subparsers(dest="command").add_parser("bench").add_subparsers(dest="bench", required=True)
    add_parser(bench)
    args = parser.parse_args(
        ["bench", "engine", "--preset", "tiny", "--prompt-len", "30", "--frames", "2", "--repeats", "1",
         "--json", "-", "-q"]
    )
    assert args.bench == "engine" and args.dtype is None
    assert args.bench_main(args) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["preset"] == "tiny"
    assert "RANDOM WEIGHTS" in captured.err and "bench:" not in captured.err  # the table, no progress lines
