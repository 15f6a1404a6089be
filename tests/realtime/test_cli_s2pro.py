"""`shoal say --model`, `shoal codec encode|decode` with the tiny S2 Pro fixture, and their errors."""

from __future__ import annotations

import subprocess
import sys
import wave
from pathlib import Path

import numpy as np

from tests.engine.dualar import FIXTURES, MODEL_DIR, requires_fixtures

pytestmark = requires_fixtures
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
    assert generated.shape == (10, 12) and generated.dtype == np.int16
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
