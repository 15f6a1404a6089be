"""Load-generator processes (``--client-processes N``): the swarm's sessions split over N processes, so that the
client is never the bottleneck.

``python -m loadtest.generator`` is one such process. The parent (:func:`loadtest.swarm.run_swarm`) starts them all,
and speaks to each over its stdin and stdout, one line at a time:

    parent -> child   {"config": ..., "sids": [...], "events": PATH}   the settings, its sessions, its part file
    child -> parent   ready                                            imported, voice made: ready to start
    parent -> child   go T0                                            the run's start (time.monotonic(), system-wide)
    child -> parent   live {"open": ..., "ttfa_ms": [...], ...}        progress counters, every half second
    child -> parent   done {"events": N}                               the part file is complete

Session ``sid`` is the same conversation whichever process runs it: its script is seeded by the sid and it
connects at ``sid * ramp_s / sessions`` on the shared clock. Each child records its sessions' events and its own
event-loop lag into its part file; the parent runs the floor probes and the CPU sampler once, and merges the parts
(:func:`loadtest.record.merge`). Nothing here is configured through the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.client import Live
from loadtest.config import SwarmConfig
from loadtest.record import Recorder

READY_TIMEOUT_S = 120.0  # importing, and (telephony) making the caller's voice, on a busy machine
LIVE_PERIOD_S = 0.5
_COUNTERS = ("open", "connected", "turns", "audio_ms", "underruns", "errors")


def shares(sessions: int, processes: int) -> list[list[int]]:
    """The session ids each process runs: dealt round robin, so every process's sessions spread over the ramp."""
    n = max(1, min(processes, sessions))
    return [list(range(k, sessions, n)) for k in range(n)]


# ---------------------------------------------------------------------------------------------------- the child


async def _report(rec: Recorder, live: Live, stop: asyncio.Event) -> None:
    sent = 0
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), LIVE_PERIOD_S)
        rec.flush()
        snapshot: dict[str, Any] = {k: getattr(live, k) for k in _COUNTERS}
        new = live.ttfa_ms[sent:]
        snapshot["ttfa_ms"] = new[-500:]
        sent = len(live.ttfa_ms)
        if sent > 10_000:
            del live.ttfa_ms[:]
            sent = 0
        sys.stdout.write("live " + json.dumps(snapshot) + "\n")
        sys.stdout.flush()


async def _child(config: SwarmConfig, rec: Recorder, sids: list[int], voice: Any) -> None:
    from loadtest.swarm import run_sessions

    live = Live()
    stop = asyncio.Event()
    reporter = asyncio.create_task(_report(rec, live, stop))
    try:
        await run_sessions(config, rec, live, sids, voice)
    finally:
        stop.set()
        await reporter


def main() -> None:
    job = json.loads(sys.stdin.readline())
    config = SwarmConfig.from_json(job["config"])
    sids = [int(sid) for sid in job["sids"]]
    voice = None
    if config.telephony:
        from loadtest.caller import CallerVoice

        voice = CallerVoice.make(config.seed)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    word, _, t0 = sys.stdin.readline().partition(" ")
    if word != "go":
        sys.exit(1)  # the parent gave up before the start
    rec = Recorder(Path(job["events"]), float(t0))
    try:
        asyncio.run(_child(config, rec, sids, voice))
    finally:
        rec.close()
    sys.stdout.write("done " + json.dumps({"events": rec.count}) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------------------------------- the parent


@dataclass
class _Child:
    index: int
    sids: list[int]
    events: Path
    log: Path
    proc: asyncio.subprocess.Process
    counters: dict[str, float] = field(default_factory=dict)
    count: int | None = None  # events, from its `done`

    def info(self) -> dict[str, Any]:
        """What meta.json says about this process."""
        return {"pid": self.proc.pid, "sessions": len(self.sids), "sids": _span(self.sids), "events": self.count,
                "returncode": self.proc.returncode}


def _span(sids: list[int]) -> str:
    """``first:stop:step`` of a round-robin share (the sids themselves would be long)."""
    if len(sids) < 2:
        return f"{sids[0]}:{sids[0] + 1}:1" if sids else ""
    return f"{sids[0]}:{sids[-1] + 1}:{sids[1] - sids[0]}"


class Generators:
    """The parent's side: start the children, start them together, follow their progress, wait for their end."""

    def __init__(self) -> None:
        self.children: list[_Child] = []
        self.live = Live()  # the sum of the children's counters, for the progress display

    @property
    def pids(self) -> list[int]:
        return [c.proc.pid for c in self.children]

    @property
    def parts(self) -> list[Path]:
        return [c.events for c in self.children]

    async def start(self, config: SwarmConfig, raw_dir: Path) -> None:
        """Start one process per share and wait until every one is ready (raises RuntimeError if one is not)."""
        for index, sids in enumerate(shares(config.sessions, config.client_processes)):
            events, log = raw_dir / f"events-client{index}.msgpack", raw_dir / f"client{index}.log"
            with open(log, "wb") as err:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "loadtest.generator", stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE, stderr=err,
                )
            self.children.append(_Child(index, sids, events, log, proc))
            job = {"config": config.to_json(), "sids": sids, "events": str(events)}
            assert proc.stdin is not None
            proc.stdin.write((json.dumps(job) + "\n").encode())
            await proc.stdin.drain()
        for child in self.children:
            assert child.proc.stdout is not None
            try:
                line = await asyncio.wait_for(child.proc.stdout.readline(), READY_TIMEOUT_S)
            except TimeoutError:
                line = b""
            if line.strip() != b"ready":
                raise RuntimeError(f"load-generator process {child.index} did not start; see {child.log}:\n"
                                   + child.log.read_text(errors="replace")[-2000:])

    async def go(self, t0: float) -> None:
        for child in self.children:
            assert child.proc.stdin is not None
            child.proc.stdin.write(f"go {t0!r}\n".encode())
            await child.proc.stdin.drain()
            child.proc.stdin.close()

    async def _follow(self, child: _Child) -> None:
        assert child.proc.stdout is not None
        for _ in range(10_000_000):  # bounded: one line per half second, and EOF ends it
            line = await child.proc.stdout.readline()
            if not line:
                break
            word, _, payload = line.decode(errors="replace").partition(" ")
            if word == "live":
                snapshot = json.loads(payload)
                self.live.ttfa_ms.extend(snapshot.pop("ttfa_ms", []))
                child.counters = snapshot
                for k in _COUNTERS:
                    setattr(self.live, k, sum(c.counters.get(k, 0) for c in self.children))
            elif word == "done":
                child.count = int(json.loads(payload)["events"])
        await child.proc.wait()

    async def wait(self, timeout_s: float) -> None:
        """Until every child has exited; those still running after ``timeout_s`` are killed."""
        follow = [asyncio.create_task(self._follow(c)) for c in self.children]
        try:
            await asyncio.wait(follow, timeout=timeout_s)
        finally:
            self.kill()
            for task in follow:
                task.cancel()
            await asyncio.gather(*follow, return_exceptions=True)
            for child in self.children:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(child.proc.wait(), 5.0)

    def kill(self) -> None:
        for child in self.children:
            if child.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()

    def failed(self) -> list[_Child]:
        return [c for c in self.children if c.proc.returncode != 0 or c.count is None]

    def info(self) -> list[dict[str, Any]]:
        return [c.info() for c in self.children]


if __name__ == "__main__":
    main()
