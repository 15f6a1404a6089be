"""Offline commands around an engine: ``shoal say`` and ``shoal codec encode|decode``."""

from __future__ import annotations

import asyncio
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.base import Sampling, SynthesisRequest, Synthesizer, VoiceRef
from realtime.audio import read_audio_bytes, write_wav


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


@dataclass(frozen=True)
class SayJob:
    text: str
    speaker: int = 0
    voice: str | None = None
    reference_audio: Path | None = None
    reference_codes: Path | None = None
    reference_text: str | None = None
    sampling: Sampling = Sampling()


def read_audio_file(path: Path) -> tuple[np.ndarray, int]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return read_audio_bytes(data)
    except ValueError as exc:
        raise CliError(f"{path}: {exc}") from None


def read_codes_file(path: Path, codebooks: int = 10) -> np.ndarray:
    try:
        codes = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read codes from {path}: {exc}") from None
    if codes.ndim != 2 or codes.shape[0] != codebooks or not np.issubdtype(codes.dtype, np.integer):
        raise CliError(f"{path}: codes must be an integer array of shape ({codebooks}, frames), got {codes.dtype} {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() > np.iinfo(np.int16).max):
        raise CliError(f"{path}: codes out of range")
    return codes.astype(np.int16)


def check_output(path: str) -> None:
    if path != "-" and not Path(path).parent.is_dir():
        raise CliError(f"output directory {Path(path).parent} does not exist")
    if path == "-" and sys.stdout.isatty():
        raise CliError("refusing to write binary audio to a terminal; use -o FILE or redirect stdout")


def write_audio(path: str, pcm: np.ndarray, rate: int) -> None:
    if path == "-":
        buf = io.BytesIO()
        write_wav(buf, pcm, rate)
        sys.stdout.buffer.write(buf.getvalue())
        sys.stdout.buffer.flush()
    else:
        write_wav(Path(path), pcm, rate)
        print(f"wrote {path} ({len(pcm) / rate:.2f} s at {rate} Hz)", file=sys.stderr)


async def _say(engine: Synthesizer, job: SayJob) -> tuple[np.ndarray, np.ndarray | None]:
    await engine.start()
    try:
        voices: dict[int, VoiceRef] = {}
        if job.reference_audio is not None or job.reference_codes is not None:
            if not engine.info.cloning:
                raise CliError(f"the {engine.info.name} engine cannot clone a reference voice (use --model)")
            if not job.reference_text:
                raise CliError("--reference-text (the transcript of the reference) is required with a reference")
            if job.reference_codes is not None:
                codes = read_codes_file(job.reference_codes)
            else:
                assert job.reference_audio is not None
                pcm, rate = read_audio_file(job.reference_audio)
                codes = await engine.encode_voice(pcm, rate, job.reference_text)
            voices[job.speaker] = VoiceRef(voice="reference", text=job.reference_text, codes=codes)
        elif job.voice:
            voices[job.speaker] = VoiceRef(voice=job.voice, text="")
        request = SynthesisRequest(text=job.text, speaker=job.speaker, voices=voices, sampling=job.sampling)
        pcm_chunks: list[np.ndarray] = []
        code_chunks: list[np.ndarray] = []
        async for chunk in engine.synthesize(request):
            pcm_chunks.append(chunk.pcm)
            if chunk.codes is not None:
                code_chunks.append(chunk.codes)
    finally:
        await engine.aclose()
    pcm = np.concatenate(pcm_chunks) if pcm_chunks else np.zeros(0, dtype=np.float32)
    codes_out = np.concatenate(code_chunks, axis=1) if code_chunks else None
    return pcm, codes_out


def say(engine: Synthesizer, job: SayJob, output: str, codes_out: Path | None) -> int:
    if not job.text.strip():
        raise CliError("TEXT is empty")
    check_output(output)
    if codes_out is not None and not codes_out.parent.is_dir():
        raise CliError(f"output directory {codes_out.parent} does not exist")
    pcm, codes = asyncio.run(_say(engine, job))
    write_audio(output, pcm, engine.info.sample_rate)
    if codes_out is not None:
        if codes is None:
            raise CliError(f"the {engine.info.name} engine produces no codec codes")
        np.save(codes_out, codes.astype(np.int64))  # codes files: int64, (10, frames)
        print(f"wrote {codes_out} ({codes.shape[1]} frames)", file=sys.stderr)
    return 0


def codec_encode(codec_path: Path, audio: Path, out: Path, device: str) -> int:
    from engine.dualar.codec import load_codec

    pcm, rate = read_audio_file(audio)
    if not out.parent.is_dir():
        raise CliError(f"output directory {out.parent} does not exist")
    codec = load_codec(codec_path, device=device)
    codes = np.asarray(codec.encode(pcm, rate), dtype=np.int64)  # codes files: int64, (10, frames)
    np.save(out, codes)
    print(f"wrote {out}: codes {codes.shape} ({len(pcm) / rate:.2f} s of audio)", file=sys.stderr)
    return 0


def codec_decode(codec_path: Path, codes_path: Path, out: str, device: str) -> int:
    from engine.dualar.codec import load_codec

    codes = read_codes_file(codes_path)
    check_output(out)
    codec = load_codec(codec_path, device=device)
    pcm = np.asarray(codec.decode(codes), dtype=np.float32)
    if out.endswith(".npy"):
        np.save(out, pcm)
        print(f"wrote {out} ({len(pcm)} samples at {codec.sample_rate} Hz)", file=sys.stderr)
    else:
        write_audio(out, pcm, codec.sample_rate)
    return 0


__all__ = ["CliError", "SayJob", "codec_decode", "codec_encode", "say"]
