"""An engine in a child process of this one, spoken to over the worker RPC on the child's stdin and stdout.

The built-in voice runs espeak-ng this way (it keeps global state, so one process per utterance in flight): the
same framing, messages and credit window as a ``shoal worker`` over TCP (``engine.rpc``), only the transport differs.

    child = await RpcProcess.spawn([sys.executable, "-m", "engine.espeak_process", ...], ClientConfig(window=256))
    async for chunk in child.client.synthesize(request): ...
    await child.close()                      # closes its stdin: the child ends its requests and exits

Child side: ``serve_stdio(engine, worker_id)`` serves one engine on this process's stdin/stdout until stdin closes
(the parent closed it, or died). The child's real stdout carries only the RPC: anything else written to file
descriptor 1 (a C library's chatter) goes to stderr.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from engine.base import EngineError, Synthesizer
from engine.rpc import MAX_FRAME, Failed, frame, encode
from engine.rpc_client import ClientConfig, WorkerClient, WorkerLost
from engine.rpc_server import WorkerConfig, WorkerServer

__all__ = ["RpcProcess", "refuse_stdio", "serve_stdio"]

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the directory that holds the `engine` package


class RpcProcess:
    """A child process serving one engine over the RPC on its stdin/stdout, and the client talking to it."""

    def __init__(self, proc: asyncio.subprocess.Process, client: WorkerClient) -> None:
        self.proc, self.client = proc, client
        self.pid = proc.pid

    @classmethod
    async def spawn(cls, argv: Sequence[str], config: ClientConfig, *, start_timeout_s: float = 10.0) -> RpcProcess:
        """Start ``argv`` and wait for its ``hello``. Raises EngineError saying why it did not come up."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=PACKAGE_ROOT,
                limit=MAX_FRAME,
            )
        except OSError as exc:
            raise EngineError(f"cannot start {Path(argv[0]).name}: {exc}") from exc
        assert proc.stdout is not None and proc.stdin is not None
        try:
            client = await WorkerClient.open(proc.stdout, proc.stdin, config, where=f"pid {proc.pid}",
                                             timeout_s=start_timeout_s)
        except WorkerLost as exc:
            await _reap(proc, kill=True)
            reason = str(exc) if "cannot serve" in str(exc) else f"{exc} (exit code {proc.returncode})"
            raise EngineError(reason) from None
        except BaseException:
            await _reap(proc, kill=True)
            raise
        return cls(proc, client)

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None and not self.client.closed

    async def close(self, *, kill: bool = False, grace_s: float = 1.0) -> None:
        """Close the connection (a closed stdin makes the child exit) and reap it; ``kill``: do not wait politely."""
        await self.client.aclose()
        await _reap(self.proc, kill=kill, grace_s=grace_s)


async def _reap(proc: asyncio.subprocess.Process, *, kill: bool, grace_s: float = 1.0) -> None:
    if proc.stdin is not None and not proc.stdin.is_closing():
        proc.stdin.close()
    if kill and proc.returncode is None:
        proc.kill()
    try:
        async with asyncio.timeout(grace_s):
            await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()


def _take_stdout() -> int:
    """A private copy of the real stdout for the RPC; file descriptor 1 goes to stderr from now on."""
    fd = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return fd


def refuse_stdio(message: str) -> None:
    """Instead of serving: tell the parent (in place of ``hello``) why this process cannot, and return."""
    with os.fdopen(_take_stdout(), "wb") as out:
        out.write(frame(encode(Failed(None, "unavailable", message))))


def serve_stdio(engine: Synthesizer, worker_id: str) -> None:
    """Serve ``engine`` on this process's stdin/stdout until stdin closes."""
    out = _take_stdout()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_FRAME)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
        transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin,
                                                            os.fdopen(out, "wb", buffering=0))
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        await engine.start()
        try:
            await WorkerServer(engine, WorkerConfig(worker_id=worker_id, drain_timeout_s=0)).serve(reader, writer)
        finally:
            await engine.aclose()

    asyncio.run(main())
