"""``bench prefix`` / ``bench batch`` run end to end on the tiny preset and report what they measured."""

from __future__ import annotations

import argparse

import pytest

from engine.dualar.bench_batch import add_parser, bench_batch, bench_prefix, byte_tokenizer, main, run
from tests.engine.dualar import MODEL_DIR


def test_the_byte_tokenizer_tokenizes_like_the_fixture_tokenizer() -> None:
    from engine.dualar.prompt import load_tokenizer

    ours, fixture = byte_tokenizer(), load_tokenizer(MODEL_DIR)
    texts = ("<|im_start|>user\n<|speaker:1|>Héllo [whisper] wörld!<|im_end|>\n", "<|im_start|>assistant\n<|voice|>")
    for text in texts:
        assert ours.encode(text, add_special_tokens=False).ids == fixture.encode(text, add_special_tokens=False).ids


def test_bench_prefix_reuses_each_turn_with_the_cache_and_nothing_without() -> None:
    res = bench_prefix(preset="tiny", turns=4, voice_frames=20, turn_frames=6, repeats=2, max_seq_len=1024)
    on, off = res["on"], res["off"]
    assert [t.turn for t in on] == [t.turn for t in off] == [1, 2, 3, 4]
    assert [t.prompt for t in on] == [t.prompt for t in off]  # the very same prompts
    assert on[0].reused == 0 and all(t.reused == 0 for t in off)
    for before, turn in zip(on, on[1:]):
        assert before.prompt <= turn.reused < turn.prompt  # through the whole last turn; the new text is prefilled
    assert all(0 < t.ttfa_ms_min <= t.ttfa_ms for t in on + off)


def test_bench_prefix_with_a_small_budget_drops_history() -> None:
    res = bench_prefix(preset="tiny", turns=6, voice_frames=10, turn_frames=6, repeats=1, max_seq_len=1024,
                       context_budget=100)
    prompts = [t.prompt for t in res["on"]]
    assert any(b < a for a, b in zip(prompts, prompts[1:]))  # a drop shortened the prompt
    assert max(prompts) <= prompts[0] + 100  # turn 1 (system, voices, new text) + at most the budget


def test_bench_batch_counts_frames_of_every_client() -> None:
    points = bench_batch(preset="tiny", batches=(1, 3), frames=5, steps=6, rounds=2, warmup=1, max_seq_len=256)
    assert [p.batch for p in points] == [1, 3]
    assert points[0].frames <= 12 and 12 < points[1].frames <= 36  # clients replaced as they finish
    assert all(p.frames_per_s > 0 and p.step_ms_p50 > 0 for p in points)


PREFIX_ARGV = ["prefix", "--turns", "2", "--voice-frames", "8", "--turn-frames", "3", "--repeats", "1"]
BATCH_ARGV = ["batch", "--batch", "1", "2", "--frames", "3", "--steps", "3", "--rounds", "1"]


@pytest.mark.parametrize("argv", [PREFIX_ARGV, BATCH_ARGV])
def test_command_line(argv: list[str], capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    parser = argparse.ArgumentParser(prog="shoal bench")
    add_parser(parser.add_subparsers(dest="command", required=True))
    out_json = tmp_path / "out.json"
    args = parser.parse_args([*argv, "--preset", "tiny", "--json", str(out_json)])
    assert args.bench_main is run
    assert run(args) == 0
    out = capsys.readouterr().out
    assert ("on/off" in out and "goal <= 0.25" in out) if argv[0] == "prefix" else "x batch 1" in out
    assert out_json.read_text().startswith(("{", "["))


def test_python_dash_m_entry_point(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*BATCH_ARGV, "--preset", "tiny", "--json", "-"]) == 0
    assert '"frames_per_s"' in capsys.readouterr().out
