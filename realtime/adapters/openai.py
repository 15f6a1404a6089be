"""OpenAI's speech endpoint, ``POST /v1/audio/speech``, onto a Shoal session.

Each request is one turn of a session (a fresh one, or the one named by the ``session`` extension: a body field,
``?session=`` or the ``x-shoal-session`` header), streamed in the response body as it is synthesized, at 24 kHz in
``response_format``; with ``stream_format: "sse"``, as ``speech.audio.delta`` / ``speech.audio.done`` events.
``voice`` is a Shoal voice id, or one of OpenAI's own names (the engine's default voice); ``speed`` and
``instructions`` become inline instructions (``[slow]`` / ``[fast]``, and ``[<instructions>]``). Errors are
OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the matching status.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from realtime.adapters.bridge import ADAPTER_LEAD_MS, Bridge, BridgeError, frame_ms_for, session_param
from realtime.adapters.common import TurnAudio, instruction_tag, speed_tag, stream_body
from realtime.adapters.containers import MEDIA_TYPES, ContainerEncoder
from realtime.gateway import Gateway

__all__ = ["speech"]

SAMPLE_RATE = 24_000  # OpenAI's speech is 24 kHz in every format
FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
BUILTIN_VOICES = frozenset(
    {"alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse", "marin", "cedar"}
)
MAX_INPUT_CHARS = 4096
MAX_BODY_BYTES = 1 << 20
# protocol v1 error code -> (HTTP status, OpenAI error type)
_STATUS = {
    "bad_message": (400, "invalid_request_error"),
    "unknown_type": (400, "invalid_request_error"),
    "too_large": (400, "invalid_request_error"),
    "not_started": (400, "invalid_request_error"),
    "unauthorized": (401, "invalid_request_error"),
    "busy": (409, "invalid_request_error"),
    "limit": (429, "rate_limit_error"),
    "engine_unavailable": (503, "server_error"),
    "internal": (500, "server_error"),
}


class _Invalid(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def _from_bridge(exc: BridgeError) -> JSONResponse:
    status, kind = _STATUS.get(exc.code, (500, "server_error"))
    return error_response(status, exc.message, kind, code=exc.code)


def _parse(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _Invalid("the request body must be a JSON object")
    for name in ("model", "input", "voice"):
        if body.get(name) is None:
            raise _Invalid(f"you must provide '{name}'", name)
    if not isinstance(body["model"], str):
        raise _Invalid("'model' must be a string", "model")
    text = body["input"]
    if not isinstance(text, str) or not text.strip():
        raise _Invalid("'input' must be a non-empty string", "input")
    if len(text) > MAX_INPUT_CHARS:
        raise _Invalid(f"'input' is longer than {MAX_INPUT_CHARS} characters", "input")
    voice = body["voice"]
    if isinstance(voice, dict):
        voice = voice.get("id")
    if not isinstance(voice, str) or not voice:
        raise _Invalid("'voice' must be a voice name or {\"id\": ...}", "voice")
    fmt = body.get("response_format") or "mp3"
    if fmt not in FORMATS:
        raise _Invalid(f"'response_format' must be one of {', '.join(FORMATS)}", "response_format")
    speed = body.get("speed", 1.0)
    if speed is None:
        speed = 1.0
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not math.isfinite(speed) \
            or not 0.25 <= speed <= 4.0:
        raise _Invalid("'speed' must be a number within [0.25, 4.0]", "speed")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _Invalid("'instructions' must be a string", "instructions")
    stream_format = body.get("stream_format") or "audio"
    if stream_format not in ("audio", "sse"):
        raise _Invalid("'stream_format' must be 'audio' or 'sse'", "stream_format")
    session = body.get("session")
    if session is not None and not isinstance(session, str):
        raise _Invalid("'session' must be a string", "session")
    return {"text": text, "voice": voice, "format": fmt, "speed": float(speed), "instructions": instructions,
            "sse": stream_format == "sse"}


async def speech(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    bridge = Bridge(gateway, request.headers, request.query_params, request.client)
    if not bridge.authorized():
        return error_response(401, "Incorrect API key provided.", code="invalid_api_key")
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        return error_response(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
    try:
        body = json.loads(raw)
        req = _parse(body)
    except ValueError:
        return error_response(400, "the request body is not valid JSON")
    except _Invalid as exc:
        return error_response(400, exc.message, param=exc.param)
    voice = None if req["voice"] in BUILTIN_VOICES else req["voice"]
    output = {"codec": "pcm16", "sample_rate": SAMPLE_RATE, "frame_ms": frame_ms_for(SAMPLE_RATE),
              "lead_ms": ADAPTER_LEAD_MS}
    turn = TurnAudio(bridge)
    try:
        await bridge.start(session=session_param(request.headers, request.query_params, body),
                           speakers=[{"speaker": 0, "voice": voice}], output=output)
        text = speed_tag(req["speed"]) + instruction_tag(req["instructions"]) + req["text"]
        await bridge.send(type="text", text=text)
        await bridge.send(type="turn.end")
        first = await turn.next()  # the status is known only now: an error before any audio is the response
    except BridgeError as exc:
        await bridge.close()
        return _from_bridge(exc)
    if first is None and turn.done is not None and turn.done["reason"] == "error":
        await bridge.close()
        return error_response(503, turn.last_error or "synthesis failed", "server_error", code="engine_unavailable")
    encoder = ContainerEncoder(req["format"], SAMPLE_RATE)
    chars = len(req["text"])

    def done() -> bytes:  # the SSE stream's last event
        audio_tokens = round((turn.done or {}).get("audio_ms", 0.0) / 20.0)  # a nominal 50 audio tokens a second
        usage = {"input_tokens": chars, "output_tokens": audio_tokens, "total_tokens": chars + audio_tokens}
        return _event({"type": "speech.audio.done", "usage": usage})

    body_iter = stream_body(bridge, turn, encoder, first, _delta, done) if req["sse"] else \
        stream_body(bridge, turn, encoder, first)
    media_type = "text/event-stream" if req["sse"] else MEDIA_TYPES[req["format"]]
    return StreamingResponse(body_iter, media_type=media_type, headers={"x-shoal-session": bridge.session or ""})


def _delta(data: bytes) -> bytes:
    return _event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")})


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
