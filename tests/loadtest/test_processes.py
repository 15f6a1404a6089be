"""Several processes on each side: the load split over load-generator processes (``--client-processes``) gives one
run whose statistics cover every session, and the server's CPU is summed over its gateway processes (those of its
process tree listening on the port, as ``shoal serve --processes N`` runs them) apart from the rest of its tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from loadtest.config import SwarmConfig
from loadtest.cpu import CpuSampler, gateway_pids, listening_pid
from loadtest.generator import shares
from loadtest.record import Recorder, merge, read_events
from loadtest.script import turn_plan
from tests.loadtest.test_smoke import small_run


def test_sessions_are_dealt_round_robin_and_each_once() -> None:
    assert shares(5, 2) == [[0, 2, 4], [1, 3]]
    assert shares(2, 8) == [[0], [1]]  # never a process without a session
    assert shares(3, 1) == [[0, 1, 2]]
    assert sorted(sid for share in shares(100, 7) for sid in share) == list(range(100))


def test_merged_parts_are_in_time_order_and_keep_each_parts_order(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    ra, rb = Recorder(a, t0=0.0), Recorder(b, t0=0.0)
    for t in (1.0, 3.0, 2.5, 5.0):  # a part may be slightly out of order (a floor probe records its send time)
        ra.event("x", t, "a")
    for t in (2.0, 4.0):
        rb.event("x", t, "b")
    ra.close()
    rb.close()
    out = tmp_path / "events.msgpack"
    assert merge([a, b], out) == 6
    events = list(read_events(out))
    assert [ev[1] for ev in events if ev[2] == "a"] == [1.0, 3.0, 2.5, 5.0]
    assert [ev[1] for ev in events] == [1.0, 2.0, 3.0, 2.5, 4.0, 5.0]


def test_two_load_generator_processes_run_every_session_once_as_one_process_would(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc, summary = small_run(out, "--serve", "stub", "--stub-ttft-ms", "5", "--sessions", "6", "--floor-probes", "2",
                              "--client-processes", "2", "--duration", "8")
    meta = json.loads((out / "raw" / "meta.json").read_text())
    clients = meta["client_processes"]
    assert len(clients) == 2 and [c["sessions"] for c in clients] == [3, 3]
    assert len({c["pid"] for c in clients} | {meta["client_parent_pid"]}) == 3, "two processes besides the parent"
    assert all(c["returncode"] == 0 and c["events"] > 0 for c in clients)
    assert not list((out / "raw").glob("events-*.msgpack")), "the parts are merged into events.msgpack"

    events = list(read_events(out / "raw" / "events.msgpack"))
    assert meta["events"] == len(events)
    config = SwarmConfig.from_json(meta["config"])
    turns = [ev for ev in events if ev[0] == "turn"]
    assert {ev[2] for ev in turns} == set(range(6)), "every session of both processes held turns"
    assert len(turns) == summary["turns_total"] and summary["turns"] >= 6
    for _, _, sid, k, _speaker, text, *_ in turns:  # session i's conversation, whichever process ran it
        assert text == turn_plan(config, sid, k).text
    step = config.ramp_s / config.sessions
    for _, t, sid in (ev for ev in events if ev[0] == "conn"):  # on the one clock, each at its place in the ramp
        assert sid * step - 0.01 <= t <= sid * step + 1.0
    assert summary["sessions_ready"] == 6 and summary["turns_unfinished"] == 0
    assert any(ev[0] == "floor" for ev in events) and any(ev[0] == "lag" for ev in events)

    head = summary["headline"]
    assert head["client_processes"] == 2 and head["gateway_processes"] == 1
    assert head["server_cpu_per_stream"] is not None and head["server_cpu_per_stream"] > 0
    assert head["streams"] == summary["streams_mean"] > 0
    # the codec's floor, measured before the load: libopus alone for one 48 kHz stream here (0.6 % of a core quiet)
    assert 0 < head["codec_floor_pct"] == meta["codec_floor_pct"] < 10
    assert proc.stdout.splitlines()[0].startswith("server CPU per stream") and "codec" in proc.stdout.splitlines()[0]
    assert "Server CPU per stream" in (out / "report.html").read_text()
    assert summary["cpu"]["client"]["mean"] >= summary["cpu"]["client_max"]["mean"] > 0


_TREE = textwrap.dedent("""
    import socket, subprocess, sys, time

    def gateway(port):  # listens on the shared port and keeps a core half busy
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
        print("listening", flush=True)
        end = time.monotonic() + 60
        while time.monotonic() < end:
            t = time.monotonic() + 0.02
            while time.monotonic() < t:
                pass
            time.sleep(0.02)

    role = sys.argv[1] if len(sys.argv) > 1 else "supervisor"
    if role == "gateway":
        gateway(int(sys.argv[2]))
    elif role == "worker":
        time.sleep(60)
    else:  # the supervisor: reserves the port (bound, not listening), starts two gateways and a worker
        keep = socket.socket()
        keep.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        keep.bind(("127.0.0.1", 0))
        port = keep.getsockname()[1]
        kids = [subprocess.Popen([sys.executable, __file__, "gateway", str(port)], stdout=subprocess.PIPE, text=True)
                for _ in range(2)]
        kids.append(subprocess.Popen([sys.executable, __file__, "worker"]))
        for k in kids[:2]:
            k.stdout.readline()
        print(port, flush=True)
        try:
            time.sleep(60)
        finally:
            for k in kids:
                k.kill()
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT and /proc")
def test_server_cpu_sums_the_gateway_processes_of_the_tree_apart_from_its_other_processes(tmp_path: Path) -> None:
    script = tmp_path / "tree.py"
    script.write_text(_TREE)
    sup = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert sup.stdout is not None
        port = int(sup.stdout.readline())
        gateways = gateway_pids(sup.pid, port)
        assert len(gateways) == 2 and sup.pid not in gateways
        assert listening_pid(f"ws://127.0.0.1:{port}/v1/realtime") == sup.pid, "the root is the gateways' parent"

        rec = Recorder(tmp_path / "events.msgpack")
        sampler = CpuSampler(sup.pid, port, client_pids=[os.getpid()])
        for _ in range(4):
            time.sleep(0.3)
            sampler.sample(rec)
        rec.close()
        rows = [ev for ev in read_events(tmp_path / "events.msgpack") if ev[0] == "cpu"]
        _, _, server, children, client, _system, server_wait, _client_wait, n, client_max = rows[-1]
        assert n == 2 and sampler.gateways_seen == set(gateways)
        assert server > 20.0, "two gateways each half busy"  # (a shared machine may slow them, not stop them)
        assert children < server and children < 10.0, "the supervisor and the worker idle"
        assert server_wait is not None and client == client_max
    finally:
        for child in psutil.Process(sup.pid).children(recursive=True):  # the ones this test started, by pid
            child.kill()
        sup.kill()
        sup.wait()


def test_process_counts_are_checked_before_anything_starts(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "shoal", "loadtest", "--sessions", "2", "--duration", "1", "--quiet", "--out",
            str(tmp_path)]
    for args, says in ((["--url", "ws://127.0.0.1:9/v1/realtime", "--processes", "2"], "--processes goes with --serve"),
                       (["--serve", "stub", "--client-processes", "0"], "positive number or auto"),
                       (["--serve", "stub", "--processes", "two"], "positive number or auto")):
        proc = subprocess.run(base + args, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and says in proc.stderr, proc.stderr
