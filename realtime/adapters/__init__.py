"""Other vendors' TTS APIs as thin front doors onto Shoal's sessions and turns (DESIGN.md, "Other front doors").

Each adapter translates a vendor's wire format into protocol v1 and back, over a ``bridge.VirtualSocket`` that
the gateway's ordinary ``Connection`` serves: the same sessions, prefix cache, persistence, pacing and barge-in as
``/v1/realtime``, no second pipeline. One module per vendor, plus ``containers`` (MP3, Ogg/Opus, AAC, FLAC, WAV).

| route | vendor | module |
|---|---|---|
| ``POST /v1/audio/speech`` | OpenAI | ``openai`` |
| ``WS /v1/tts/live``, ``POST /v1/tts`` | Fish Audio | ``fish`` |
| ``WS /v1/text-to-speech/{voice_id}/stream-input``, ``.../multi-stream-input`` | ElevenLabs | ``elevenlabs`` |
"""

from __future__ import annotations

from starlette.routing import Route, WebSocketRoute

__all__ = ["routes"]


def routes() -> list[Route | WebSocketRoute]:
    """The adapters' routes; their handlers find the gateway at ``app.state.gateway``."""
    from realtime.adapters import elevenlabs, fish, openai

    return [
        Route("/v1/audio/speech", openai.speech, methods=["POST"]),
        Route("/v1/tts", fish.tts, methods=["POST"]),
        WebSocketRoute("/v1/tts/live", fish.live),
        WebSocketRoute("/v1/text-to-speech/{voice_id}/stream-input", elevenlabs.stream_input),
        WebSocketRoute("/v1/text-to-speech/{voice_id}/multi-stream-input", elevenlabs.multi_stream_input),
    ]
