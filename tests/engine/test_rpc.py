"""The engine worker RPC: the message codec, and a real ``WorkerServer`` on a real TCP socket driven by a raw client
(so the wire itself is checked: credit, cancel, errors) and by ``WorkerClient``."""

from __future__ import annotations

import asyncio
import struct
from collections import Counter
from collections.abc import AsyncIterator

import msgpack
import numpy as np
import pytest

from engine.base import AudioChunk, EngineError, EngineInfo, PastTurn, Sampling, SynthesisRequest, VoiceRef
from engine.rpc_client import ClientConfig, WorkerClient, WorkerLost, WorkerUnavailable
from engine.rpc import (
    Cancel,
    Credit,
    Done,
    EncodeVoice,
    Failed,
    Frames,
    Hello,
    Message,
    Ping,
    Pong,
    Report,
    RpcError,
    Stats,
    Submit,
    VoiceReply,
    decode,
    encode,
    read_message,
    write_message,
)
from engine.stub import StubConfig, StubSynthesizer
from engine.rpc_server import WorkerConfig, WorkerServer

LONG = " ".join(f"This is sentence number {i} of a long and winding reply." for i in range(40))
CODES = np.arange(10 * 7, dtype=np.int16).reshape(10, 7)


class CountingEngine:
    """A real stub engine that also keeps what each request yielded (private copies: what went on the wire must
    equal them), counts the chunks pulled and the streams still open; a request whose text contains "explode"
    fails after two chunks."""

    def __init__(self, started: bool = True) -> None:
        self.inner = StubSynthesizer(StubConfig(ttft_ms=1, frame_ms=1, cloning=True))
        self.info = self.inner.info
        self.pulled: Counter[str] = Counter()
        self.made: dict[str, list[AudioChunk]] = {}
        self.open = 0
        self._start = started

    async def start(self) -> None:
        if self._start:
            await self.inner.start()

    async def aclose(self) -> None:
        await self.inner.aclose()

    def health(self) -> str | None:
        return self.inner.health()

    async def encode_voice(self, pcm: np.ndarray, sample_rate: int, text: str) -> np.ndarray | None:
        return await self.inner.encode_voice(pcm, sample_rate, text)

    async def synthesize(self, request: SynthesisRequest) -> AsyncIterator[AudioChunk]:
        self.open += 1
        try:
            async for chunk in self.inner.synthesize(request):
                self.pulled[request.text] += 1
                if "explode" in request.text and self.pulled[request.text] > 2:
                    raise EngineError("the engine blew up")
                made = AudioChunk(chunk.pcm.copy(), None if chunk.codes is None else chunk.codes.copy())
                self.made.setdefault(request.text, []).append(made)
                yield made
        finally:
            self.open -= 1


@pytest.fixture
async def worker() -> AsyncIterator[tuple[CountingEngine, WorkerServer, int]]:
    engine = CountingEngine()
    await engine.start()
    server = WorkerServer(engine, WorkerConfig(worker_id="t0", max_frame=1 << 20))
    _, port = await server.start("127.0.0.1", 0)
    yield engine, server, port
    await server.stop(0)
    await engine.aclose()


class Raw:
    """A client that speaks the RPC by hand, frame by frame."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> tuple[Raw, Hello]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        raw = cls(reader, writer)
        hello = await raw.recv()
        assert isinstance(hello, Hello)
        return raw, hello

    async def send(self, msg: Message) -> None:
        write_message(self.writer, msg)
        await self.writer.drain()

    async def recv(self, timeout: float = 5.0) -> Message | None:
        return await asyncio.wait_for(read_message(self.reader, 1 << 30), timeout)

    async def until_end(self, rid: int, timeout: float = 10.0) -> tuple[list[Frames], Message]:
        """Frames of request ``rid`` up to its done / error (messages of other requests are skipped)."""
        frames: list[Frames] = []
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.recv(timeout)
                if isinstance(msg, Frames) and msg.id == rid:
                    frames.append(msg)
                elif isinstance(msg, (Done, Failed)) and msg.id == rid:
                    return frames, msg

    async def silent(self, seconds: float) -> bool:
        try:
            msg = await self.recv(seconds)
        except TimeoutError:
            return True
        raise AssertionError(f"expected silence, got {msg}")

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


# ------------------------------------------------------------------------------------------------------ codec


def test_every_message_survives_encode_decode() -> None:
    request = SynthesisRequest(
        text="<|speaker:1|>Hello [laughs] there.",
        speaker=1,
        voices={1: VoiceRef("alice", "a transcript", CODES), 3: VoiceRef("bob", "")},
        history=(PastTurn(0, "earlier", CODES[:, :3]), PastTurn(1, "no codes")),
        sampling=Sampling(temperature=0.5, top_p=0.9, top_k=12, seed=42, max_frames=77),
        session="sess-1",
    )
    back = decode(encode(Submit(7, request, window=3, pcm="i16")))
    assert isinstance(back, Submit) and (back.id, back.window, back.pcm) == (7, 3, "i16")
    r = back.request
    assert (r.text, r.speaker, r.sampling, r.session) == (request.text, 1, request.sampling, "sess-1")
    assert sorted(r.voices) == [1, 3] and r.voices[3].codes is None and r.voices[1].text == "a transcript"
    np.testing.assert_array_equal(r.voices[1].codes, CODES)
    assert [(t.speaker, t.text) for t in r.history] == [(0, "earlier"), (1, "no codes")]
    np.testing.assert_array_equal(r.history[0].codes, CODES[:, :3])
    assert r.history[0].codes.flags.writeable  # engines may hand it to torch.from_numpy

    pcm = np.sin(np.linspace(0, 20, 1000)).astype(np.float32) * 0.9
    exact = decode(encode(Frames(2, AudioChunk(pcm, CODES[:, :1]))))
    assert isinstance(exact, Frames) and exact.chunk.pcm.dtype == np.float32
    np.testing.assert_array_equal(exact.chunk.pcm, pcm)
    np.testing.assert_array_equal(exact.chunk.codes, CODES[:, :1])
    half = decode(encode(Frames(2, AudioChunk(pcm), pcm="i16")))
    assert isinstance(half, Frames) and half.chunk.codes is None and half.chunk.pcm.dtype == np.float32
    np.testing.assert_allclose(half.chunk.pcm, pcm, atol=1 / 32767)

    info = EngineInfo("s2pro", 44100, True, 1000 * 2048 / 44100)
    simple: list[Message] = [
        Credit(3, 5), Cancel(4), Stats(5), Ping(), Pong(), Done(6, "cancelled"), Failed(None, "protocol", "bye"),
        Failed(8, "unavailable", "draining"), Hello("w0", info, 1 << 20), Report(9, {"a_total": 3.0}, "closed", 2),
    ]
    for msg in simple:
        assert decode(encode(msg)) == msg
    voice = decode(encode(EncodeVoice(10, pcm, 16000, "hi")))
    assert isinstance(voice, EncodeVoice) and (voice.sample_rate, voice.text) == (16000, "hi")
    np.testing.assert_array_equal(voice.pcm, pcm)
    reply = decode(encode(VoiceReply(11, CODES)))
    assert isinstance(reply, VoiceReply)
    np.testing.assert_array_equal(reply.codes, CODES)
    assert decode(encode(VoiceReply(12, None))) == VoiceReply(12, None)


@pytest.mark.parametrize(
    ("body", "code", "rid"),
    [
        ({"type": "submit", "id": 3, "text": 1}, "bad_request", 3),
        ({"type": "submit", "id": 3, "text": "hi", "sampling": {"temperature": 9}}, "bad_request", 3),
        ({"type": "submit", "id": 3, "text": "hi", "window": 0}, "bad_request", 3),
        ({"type": "submit", "id": -1, "text": "hi"}, "bad_request", None),
        ({"type": "submit", "id": 3, "text": "hi",
          "history": [{"speaker": 0, "text": "x", "codes": {"shape": [10, 2], "dtype": "<i2", "data": b"\0" * 39}}]},
         "bad_request", 3),
        ({"type": "submit", "id": 3, "text": "hi",
          "history": [{"speaker": 0, "text": "x", "codes": {"shape": [9, 2], "dtype": "<i2", "data": b"\0" * 36}}]},
         "bad_request", 3),
        ({"type": "credit", "id": 1, "n": 100_000}, "bad_request", 1),
        ({"type": "launch", "id": 2}, "protocol", 2),
        ({"id": 2}, "protocol", None),
        ([1, 2, 3], "protocol", None),
    ],
)
def test_malformed_messages_raise_the_one_error(body: object, code: str, rid: int | None) -> None:
    with pytest.raises(RpcError) as info:
        decode(msgpack.packb(body, use_bin_type=True))
    assert (info.value.code, info.value.request_id) == (code, rid)


def test_garbage_is_a_protocol_error() -> None:
    with pytest.raises(RpcError, match="not msgpack") as info:
        decode(b"\xc1\xc1")
    assert info.value.code == "protocol"


# --------------------------------------------------------------------------------------------- on the wire


async def test_hello_then_frames_equal_to_the_engine_in_process(worker) -> None:
    engine, server, port = worker
    raw, hello = await Raw.open(port)
    assert hello.worker == "t0" and hello.engine == engine.info and hello.max_frame == 1 << 20
    request = SynthesisRequest("Hello there. Nice day.", speaker=2, history=(PastTurn(0, "before", CODES),),
                               session="s")
    await raw.send(Submit(1, request, window=64))
    frames, end = await raw.until_end(1)
    assert end == Done(1, "complete")
    expected = engine.made[request.text]  # what the engine yielded, bit for bit
    assert len(frames) == len(expected) > 5
    for got, want in zip(frames, expected):
        np.testing.assert_array_equal(got.chunk.pcm, want.pcm)
        np.testing.assert_array_equal(got.chunk.codes, want.codes)
    await raw.send(Stats(2))
    report = await raw.recv()
    assert isinstance(report, Report) and report.id == 2 and report.health is None and report.load == 0
    assert report.stats["worker_requests_total"] == 1 and report.stats["worker_chunks_total"] == len(expected)
    await raw.send(Ping())
    assert await raw.recv() == Pong()
    await raw.close()


async def test_credit_bounds_the_frames_in_flight_and_pauses_the_engine(worker) -> None:
    engine, server, port = worker
    raw, _ = await Raw.open(port)
    await raw.send(Submit(1, SynthesisRequest(LONG), window=2))
    got = [await raw.recv(), await raw.recv()]
    assert all(isinstance(m, Frames) and m.id == 1 for m in got)
    assert await raw.silent(0.3)  # no credit: nothing more comes ...
    assert engine.pulled[LONG] == 2  # ... and the engine made nothing more (pull-driven)
    await raw.send(Credit(1, 3))
    more = [await raw.recv() for _ in range(3)]
    assert all(isinstance(m, Frames) for m in more)
    assert await raw.silent(0.3)
    assert engine.pulled[LONG] == 5
    await raw.close()


async def test_a_paused_request_does_not_hold_up_another_on_the_same_connection(worker) -> None:
    engine, server, port = worker
    raw, _ = await Raw.open(port)
    await raw.send(Submit(1, SynthesisRequest(LONG), window=1))
    await raw.send(Submit(2, SynthesisRequest("A short one, please."), window=4))
    frames, end = [], None
    async with asyncio.timeout(10):
        while end is None:
            msg = await raw.recv()
            if isinstance(msg, Frames) and msg.id == 2:
                frames.append(msg)
                await raw.send(Credit(2, 1))
            elif isinstance(msg, Done):
                end = msg
    assert end == Done(2, "complete") and len(frames) == len(engine.made["A short one, please."])
    assert engine.pulled[LONG] == 1 and server.load == 1  # the paused one holds its place, nothing more
    await raw.send(Cancel(1))
    _, cancelled = await raw.until_end(1)
    assert cancelled == Done(1, "cancelled")
    await raw.close()


async def test_cancel_stops_the_engine_at_once_and_frees_the_id(worker) -> None:
    engine, server, port = worker
    raw, _ = await Raw.open(port)
    await raw.send(Submit(5, SynthesisRequest(LONG), window=64))
    for _ in range(3):
        assert isinstance(await raw.recv(), Frames)
    await raw.send(Cancel(5))
    frames, end = await raw.until_end(5, timeout=2)
    assert end == Done(5, "cancelled") and len(frames) < 64
    assert engine.open == 0 and server.load == 0 and server.counters.cancelled == 1
    await raw.send(Cancel(5))  # a late cancel of a finished request is harmless
    await raw.send(Submit(5, SynthesisRequest("Again."), window=8))  # the id is free again
    _, end = await raw.until_end(5)
    assert end == Done(5, "complete")
    await raw.close()


async def test_closing_the_connection_cancels_its_requests(worker) -> None:
    engine, server, port = worker
    raw, _ = await Raw.open(port)
    await raw.send(Submit(1, SynthesisRequest(LONG), window=64))
    await raw.send(Submit(2, SynthesisRequest(LONG + " Two."), window=64))
    assert isinstance(await raw.recv(), Frames)
    await raw.close()
    async with asyncio.timeout(3):
        while engine.open or server.load:
            await asyncio.sleep(0.01)


async def test_request_errors_are_per_request_and_keep_the_connection(worker) -> None:
    engine, server, port = worker
    raw, _ = await Raw.open(port)
    await raw.send(Submit(1, SynthesisRequest("Please explode now, thank you very much."), window=64))
    await raw.send(Submit(2, SynthesisRequest("I am fine."), window=64))
    frames, end = await raw.until_end(1)
    assert isinstance(end, Failed) and end.code == "engine" and "blew up" in end.message and len(frames) == 2
    _, end2 = await raw.until_end(2)
    assert end2 == Done(2, "complete")
    # a malformed submit is answered for its id; the connection goes on
    bad = msgpack.packb({"type": "submit", "id": 9, "text": "x", "sampling": {"top_k": -1}}, use_bin_type=True)
    raw.writer.write(struct.pack(">I", len(bad)) + bad)
    answer = await raw.recv()
    assert isinstance(answer, Failed) and (answer.id, answer.code) == (9, "bad_request") and "top_k" in answer.message
    await raw.send(Submit(9, SynthesisRequest("Still here."), window=64))
    _, end = await raw.until_end(9)
    assert end == Done(9, "complete")
    await raw.send(Submit(10, SynthesisRequest(LONG), window=1))
    await raw.send(Submit(10, SynthesisRequest("twice"), window=1))  # an id in flight cannot be reused
    msgs = [await raw.recv(), await raw.recv()]
    assert Failed(10, "bad_request", "request id 10 is already in flight") in msgs
    await raw.close()


async def test_an_oversized_frame_is_a_protocol_error_that_closes_the_connection(worker) -> None:
    _, _, port = worker
    raw, _ = await Raw.open(port)
    raw.writer.write(struct.pack(">I", (1 << 20) + 1) + b"\0" * 64)
    answer = await raw.recv()
    assert isinstance(answer, Failed) and answer.id is None and answer.code == "protocol" and "exceeds" in answer.message
    assert await raw.recv() is None  # closed
    await raw.close()


async def test_an_engine_that_is_not_ready_makes_the_worker_unavailable() -> None:
    engine = CountingEngine(started=False)
    server = WorkerServer(engine, WorkerConfig(worker_id="cold"))
    _, port = await server.start("127.0.0.1", 0)
    raw, _ = await Raw.open(port)
    await raw.send(Submit(1, SynthesisRequest("Hello."), window=4))
    answer = await raw.recv()
    assert isinstance(answer, Failed) and answer.code == "unavailable" and "not started" in answer.message
    await raw.close()
    await server.stop(0)


async def test_stop_lets_requests_in_flight_finish_and_refuses_new_ones(worker) -> None:
    engine, server, port = worker
    raw, _ = await Raw.open(port)
    await raw.send(Submit(1, SynthesisRequest("Finish this sentence please."), window=64))
    assert isinstance(await raw.recv(), Frames)
    stopping = asyncio.create_task(server.stop(5.0))
    await asyncio.sleep(0.01)
    await raw.send(Submit(2, SynthesisRequest("Too late."), window=4))
    ends = {}
    async with asyncio.timeout(5):
        while len(ends) < 2:
            msg = await raw.recv()
            if isinstance(msg, (Done, Failed)):
                ends[msg.id] = msg
    assert ends[1] == Done(1, "complete")
    assert isinstance(ends[2], Failed) and ends[2].code == "unavailable"
    await stopping
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    await raw.close()


async def test_stop_ends_what_does_not_finish_in_time_as_unavailable(worker) -> None:
    engine, server, port = worker
    raw, _ = await Raw.open(port)
    await raw.send(Submit(1, SynthesisRequest(LONG), window=1))  # paused after one frame: cannot finish
    assert isinstance(await raw.recv(), Frames)
    await server.stop(0.2)
    _, end = await raw.until_end(1)
    assert isinstance(end, Failed) and end.code == "unavailable"
    assert engine.open == 0
    await raw.close()


# ---------------------------------------------------------------------------------------------- the client


async def test_worker_client_multiplexes_streams_and_calls(worker) -> None:
    engine, server, port = worker
    client = await WorkerClient.connect("127.0.0.1", port, ClientConfig(window=2))
    assert client.worker == "t0" and client.info == engine.info
    texts = [f"Speaker {i} says hello to everyone." for i in range(6)]

    async def run(text: str) -> list[AudioChunk]:
        return [c async for c in client.synthesize(SynthesisRequest(text))]

    results = await asyncio.gather(*(run(t) for t in texts))
    for text, chunks in zip(texts, results):
        want = engine.made[text]
        assert len(chunks) == len(want) > 10
        np.testing.assert_array_equal(np.concatenate([c.pcm for c in chunks]), np.concatenate([c.pcm for c in want]))
        np.testing.assert_array_equal(np.concatenate([c.codes for c in chunks], 1), np.concatenate([c.codes for c in want], 1))
    pcm = np.sin(np.arange(16000) / 10).astype(np.float32) * 0.5
    codes = await client.encode_voice(pcm, 16000, "ref")
    np.testing.assert_array_equal(codes, await engine.inner.encode_voice(pcm, 16000, "ref"))
    report = await client.stats()
    assert report.load == 0 and report.stats["worker_requests_total"] == 6 and report.stats["worker_voices_total"] == 1
    with pytest.raises(EngineError, match="the engine blew up"):
        await run("explode, please")
    assert client.in_flight == 0 and not client.closed
    await client.aclose()


async def test_worker_client_slow_consumer_holds_at_most_the_window(worker) -> None:
    engine, server, port = worker
    client = await WorkerClient.connect("127.0.0.1", port, ClientConfig(window=4))
    stream = client.synthesize(SynthesisRequest(LONG))
    await anext(stream)
    await asyncio.sleep(0.3)  # the consumer dawdles
    assert engine.pulled[LONG] <= 1 + 4  # one taken, at most a window waiting
    got = 1
    async for _ in stream:
        got += 1
        if got == 50:
            break
    await stream.aclose()  # type: ignore[attr-defined]
    async with asyncio.timeout(2):
        while engine.open:
            await asyncio.sleep(0.01)
    assert engine.pulled[LONG] <= 50 + 4
    await client.aclose()


async def test_worker_client_reports_a_lost_worker(worker) -> None:
    engine, server, port = worker
    client = await WorkerClient.connect("127.0.0.1", port)
    stream = client.synthesize(SynthesisRequest(LONG))
    await anext(stream)
    await server.stop(0)  # the worker goes away mid-stream
    with pytest.raises((WorkerLost, WorkerUnavailable)):
        async for _ in stream:
            pass
    with pytest.raises(WorkerLost):
        await client.stats()
    with pytest.raises(WorkerLost, match="cannot reach"):
        await WorkerClient.connect("127.0.0.1", port, ClientConfig(connect_timeout_s=1))
