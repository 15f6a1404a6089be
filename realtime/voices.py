"""Registered voices meeting the engine that serves them.

A voice registered while an engine that cannot clone was serving (the built-in voice) is stored without codes, but
with its reference audio. When a cloning engine (S2 Pro) is the first to meet it, :func:`with_codes` has the engine
encode that audio once and stores the codes back, so every later session (on any gateway) gets them from the store.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from engine.base import EngineError, Synthesizer
from realtime.audio import pcm16_to_float, read_audio_bytes
from sessions.model import Voice
from sessions.store import SessionStore, StoreError

__all__ = ["with_codes"]

log = logging.getLogger("shoal.voices")


async def with_codes(voice: Voice, engine: Synthesizer, store: SessionStore) -> Voice:
    """``voice`` ready for ``engine``: with codes encoded from its stored audio (and stored back) when the engine
    clones and the voice has none. A failure to encode leaves the voice as it was (the prompt then goes without it)
    and is logged; a failure to store keeps the codes for this connection (the next one encodes again)."""
    if voice.codes is not None or not engine.info.cloning or not voice.audio:
        return voice
    try:
        if voice.audio_format == "pcm16":  # records written before voices were compressed
            pcm, rate = pcm16_to_float(voice.audio), voice.sample_rate
        else:
            pcm, rate = await asyncio.get_running_loop().run_in_executor(None, read_audio_bytes, voice.audio, None)
        codes = await engine.encode_voice(pcm, rate, voice.text)
    except (EngineError, ValueError) as exc:
        log.warning("voice %s has no codes and the engine could not encode it: %s", voice.voice, exc)
        return voice
    if codes is None:
        return voice
    voice = dataclasses.replace(voice, codes=codes)
    try:
        await store.put_voice(voice)
    except StoreError as exc:
        log.warning("voice %s: its new codes could not be stored: %s", voice.voice, exc)
    return voice
