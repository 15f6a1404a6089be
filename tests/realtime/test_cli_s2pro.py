"""`shoal say --model`, `shoal codec encode|decode` with the tiny S2 Pro fixture, and their errors."""

from __future__ import annotations

import os
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np

from tests.engine.dualar import FIXTURES, MODEL_DIR

CODEC = str(FIXTURES / "codec" / "codec.pth")


def shoal(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "realtime", *args], capture_output=True, text=True, timeout=120)


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768, w.getframerate()


def test_say_then_codec_round_trip(tmp_path: Path) -> None:
    wav, codes = tmp_path / "say.wav", tmp_path / "say.npy"
    model = ["--model", str(MODEL_DIR), "--codec", CODEC]
    run = shoal("say", "Hello there.", *model, "--seed", "3", "--max-frames", "12", "-o", str(wav), "--codes-out", str(codes))
    assert run.returncode == 0, run.stderr
    generated = np.load(codes)
    assert generated.shape == (10, 12) and generated.dtype == np.int64  # codes files are int64 (10, T)
    pcm, rate = read_wav(wav)
    assert rate == 44100 and len(pcm) == 12 * 2048
    # decoding the saved codes offline gives the audio `say` streamed (16-bit WAV rounding apart)
    out = tmp_path / "decoded.wav"
    assert shoal("codec", "decode", str(codes), "-o", str(out), "--codec", CODEC).returncode == 0
    decoded, _ = read_wav(out)
    assert np.abs(decoded - pcm).max() <= 2 / 32768
    as_npy = tmp_path / "decoded.npy"
    assert shoal("codec", "decode", str(codes), "-o", str(as_npy), "--codec", CODEC).returncode == 0
    assert np.load(as_npy).shape == (12 * 2048,)
    # encode turns audio back into codes of the right shape
    enc = tmp_path / "enc.npy"
    run = shoal("codec", "encode", str(out), "-o", str(enc), "--codec", CODEC)
    assert run.returncode == 0, run.stderr
    assert np.load(enc).shape == (10, 12)
    # the same seed reproduces the same codes; a reference changes them
    again = tmp_path / "again.npy"
    shoal("say", "Hello there.", *model, "--seed", "3", "--max-frames", "12", "-o", str(wav), "--codes-out", str(again))
    np.testing.assert_array_equal(np.load(again), generated)
    cloned = tmp_path / "cloned.npy"
    run = shoal("say", "Hello there.", *model, "--seed", "3", "--max-frames", "12", "-o", str(wav),
                "--reference-codes", str(enc), "--reference-text", "Hello there.", "--codes-out", str(cloned))
    assert run.returncode == 0, run.stderr
    assert not np.array_equal(np.load(cloned), generated)
    run = shoal("say", "Hi.", *model, "--max-frames", "4", "-o", str(wav), "--reference-audio", str(out),
                "--reference-text", "Hello there.")
    assert run.returncode == 0, run.stderr


def test_clear_errors(tmp_path: Path) -> None:
    bad_codes = tmp_path / "bad.npy"
    np.save(bad_codes, np.zeros((3, 4), np.int16))
    run = shoal("codec", "decode", str(bad_codes), "-o", str(tmp_path / "x.wav"), "--codec", CODEC)
    assert run.returncode == 2 and "shape (10, frames)" in run.stderr
    run = shoal("codec", "decode", str(bad_codes), "-o", str(tmp_path / "x.wav"))
    assert run.returncode == 2 and "--codec" in run.stderr
    run = shoal("codec", "encode", str(tmp_path / "missing.wav"), "-o", str(tmp_path / "c.npy"), "--codec", CODEC)
    assert run.returncode == 2 and "cannot read" in run.stderr
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"not audio at all")
    run = shoal("codec", "encode", str(garbage), "-o", str(tmp_path / "c.npy"), "--codec", CODEC)
    assert run.returncode == 2 and "garbage.wav" in run.stderr
    run = shoal("say", "Hi.", "--reference-audio", str(garbage), "--reference-text", "x", "-o", str(tmp_path / "o.wav"))
    assert run.returncode == 2 and "cannot clone" in run.stderr
    run = shoal("say", "Hi.", "--model", str(MODEL_DIR), "--codec", CODEC, "--reference-codes", str(bad_codes),
                "-o", str(tmp_path / "o.wav"))
    assert run.returncode == 2 and "--reference-text" in run.stderr
    run = shoal("say", "Hi.", "--model", str(MODEL_DIR), "--codec", CODEC, "--temperature", "5")
    assert run.returncode == 2 and "temperature" in run.stderr


def test_done_when_say_writes_the_reference_codes_and_codec_decode_matches(tmp_path: Path) -> None:
    """Issue 3's "done when", as written: the exact `shoal say` command (no -o: shoal.wav lands in the working
    directory) writes the reference's greedy codes, and `shoal codec decode` reproduces the reference audio."""
    golden_a = np.load(FIXTURES / "a_slow_ar_prompt.npz")
    golden_c = np.load(FIXTURES / "c_greedy_generate.npz")
    golden_d = np.load(FIXTURES / "d_codec_decode.npz")
    ref, out = tmp_path / "REF.npy", tmp_path / "OUT.npy"
    np.save(ref, golden_a["ref_codes"])  # (10, 12) int64
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run(
        [sys.executable, "-m", "realtime", "say", "<|speaker:0|>[whisper] Hi there.", "--model", str(MODEL_DIR),
         "--codec", CODEC, "--reference-codes", str(ref), "--reference-text", "Hello.", "--temperature", "0",
         "--max-frames", "8", "--codes-out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )
    assert run.returncode == 0, run.stderr
    codes = np.load(out)
    expected = golden_c["codes_generate_long"]  # (10, 8)
    assert codes.shape == expected.shape == (10, 8)
    np.testing.assert_array_equal(codes.astype(np.int64), expected)
    pcm, rate = read_wav(tmp_path / "shoal.wav")
    assert rate == 44100 and len(pcm) == 8 * 2048

    codes_in, audio_out = tmp_path / "d_codes.npy", tmp_path / "d_audio.npy"
    np.save(codes_in, golden_d["codes"])  # (10, 16) int64
    run = shoal("codec", "decode", str(codes_in), "-o", str(audio_out), "--codec", CODEC)
    assert run.returncode == 0, run.stderr
    audio = np.load(audio_out)
    assert audio.dtype == np.float32 and audio.shape == golden_d["audio"].shape == (16 * 2048,)
    np.testing.assert_allclose(audio, golden_d["audio"], rtol=0, atol=1e-4)


def test_bench_and_backend_commands_answer_clearly() -> None:
    helped = shoal("bench", "--help")
    assert helped.returncode == 0 and "engine" in helped.stdout and "prefix" in helped.stdout
    bad = shoal("bench", "batch", "--preset", "huge")
    assert bad.returncode == 2 and "preset" in bad.stderr
    no_gpu = shoal("serve", "--port", "0", "--backend", "sglang", "--model", str(MODEL_DIR))
    assert no_gpu.returncode == 2 and "sglang" in no_gpu.stderr and "Traceback" not in no_gpu.stderr


def test_random_weight_presets_say_so_loudly(tmp_path: Path) -> None:
    out, codes = tmp_path / "p.wav", tmp_path / "p.npy"
    # seeded: random weights may sample <|im_end|> at any frame (seed 2 runs to the frame limit)
    run = shoal("say", "Hi there.", "--model", "preset:tiny", "--max-frames", "6", "--seed", "2", "-o", str(out),
                "--codes-out", str(codes))
    assert run.returncode == 0, run.stderr
    assert "RANDOM WEIGHTS" in run.stderr
    assert np.load(codes).shape == (10, 6)
    bad = shoal("say", "Hi.", "--model", "preset:huge", "-o", str(out))
    assert bad.returncode != 0 and "huge" in bad.stderr and "Traceback" not in bad.stderr
