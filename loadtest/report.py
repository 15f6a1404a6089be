"""The report: matplotlib PNGs and one self-contained HTML page next to ``summary.json``.

Plots of a run: the TTFA distribution (with the bare WebSocket floor), TTFA and underruns against concurrency
(every turn, ramp included, since the ramp is where concurrency varies), and CPU over time. A sweep adds TTFA,
underruns and CPU against the number of sessions. Uses matplotlib's object API with the Agg canvas (no pyplot
state, no display needed).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.stats import Analysis, timing_shown


def _figure(width: float = 7.5, height: float = 4.0) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig: Any, path: Path) -> str:
    fig.savefig(path, format="png")
    return path.name


def plot_ttfa_distribution(a: Analysis, path: Path) -> str:
    """Cumulative distributions (log time axis): TTFA next to the bare WebSocket round trip of the same run."""
    s = a.summary
    lo, hi = s["window_s"]
    ttfa = np.sort([v for t in a.turns if lo <= t.t_start <= hi and (v := t.ttfa_ms) is not None])
    floor = np.sort([rtt for t, rtt in a.floor if lo <= t <= hi])
    server = np.sort([float(t.done[7]) for t in a.turns if lo <= t.t_start <= hi and t.done and t.done[7] is not None])
    fig = _figure()
    ax = fig.add_subplot()
    for values, label in ((floor, "bare WebSocket round trip"), (ttfa, "TTFA (client)"), (server, "TTFA (server-reported)")):
        if values.size:
            ax.step(np.maximum(values, 0.01), np.arange(1, values.size + 1) / values.size, where="post",
                    label=f"{label}, n={values.size}, p50 {np.percentile(values, 50):.1f} ms, p99 {np.percentile(values, 99):.1f} ms")
    ax.set_xscale("log")
    for q in (0.5, 0.99):
        ax.axhline(q, color="gray", linewidth=0.6, linestyle=":")
    ax.set_xlabel("milliseconds (log scale)")
    ax.set_ylabel("fraction of turns / round trips")
    ax.set_ylim(0, 1.01)
    ax.set_title(f"Time to first audio, {s['sessions']} sessions (warm-up excluded)")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def plot_vs_concurrency(a: Analysis, path: Path) -> str:
    fig = _figure(7.5, 5.5)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    rows = [(t.concurrency, t.ttfa_ms, t.player.underruns if t.player else 0) for t in a.turns]
    conc = np.array([r[0] for r in rows], dtype=float)
    ttfa = np.array([np.nan if r[1] is None else r[1] for r in rows], dtype=float)
    under = np.array([r[2] for r in rows], dtype=float)
    if conc.size:
        ax1.scatter(conc, ttfa, s=4, alpha=0.35, label="turn")
        edges = np.unique(np.linspace(0, conc.max() + 1, 12).round())
        mids, p50, p99, urate = [], [], [], []
        for lo, hi in zip(edges[:-1], edges[1:]):
            sel = (conc >= lo) & (conc < hi)
            vals = ttfa[sel & ~np.isnan(ttfa)]
            if vals.size:
                mids.append((lo + hi) / 2)
                p50.append(np.percentile(vals, 50))
                p99.append(np.percentile(vals, 99))
                urate.append(under[sel].sum() / sel.sum())
        ax1.plot(mids, p50, "-o", color="C1", markersize=3, label="p50")
        ax1.plot(mids, p99, "-o", color="C3", markersize=3, label="p99")
        ax2.bar(mids, urate, width=max(1.0, (edges[1] - edges[0]) * 0.8) if len(edges) > 1 else 1.0, color="C3")
    ax1.set_ylabel("TTFA (ms)")
    ax1.set_title("TTFA and underruns against concurrent sessions (all turns, ramp included)")
    ax1.legend(fontsize=8)
    ax2.set_ylabel("underruns per turn")
    ax2.set_xlabel("sessions connected when the turn began")
    return _save(fig, path)


def plot_cpu(a: Analysis, path: Path) -> str:
    fig = _figure()
    ax = fig.add_subplot()
    if a.cpu:
        t = np.array([row[0] for row in a.cpu])
        labels = ("server (gateway processes)", "server children (engine, Redis)", "load-test client (all processes)",
                  "whole machine")
        for i, label in enumerate(labels, start=1):
            y = np.array([np.nan if row[i] is None else row[i] for row in a.cpu], dtype=float)
            if not np.all(np.isnan(y)):
                ax.plot(t, y, label=label, linewidth=1)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("CPU % (100 = one core)")
    ncores = (a.summary.get("machine") or {}).get("cores")
    ax.set_title(f"CPU over time ({ncores} cores)")
    if a.concurrency:
        ax2 = ax.twinx()
        ax2.step([c[0] for c in a.concurrency], [c[1] for c in a.concurrency], where="post", color="gray",
                 linestyle="--", linewidth=1, label="sessions")
        ax2.set_ylabel("sessions connected")
        ax2.legend(loc="upper right", fontsize=8)
    lo, hi = a.summary["window_s"]
    ax.axvspan(lo, hi, color="green", alpha=0.06, label="measured window")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def _fmt(d: dict[str, Any] | None) -> str:
    if not d or d.get("p50") is None:
        return "–"
    return " / ".join(f"{d[q]:.1f}" for q in ("p50", "p90", "p99", "max"))


def _context_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """Rows for runs with several contexts per session (none for one)."""
    ctx = s.get("contexts") or {}
    if ctx.get("per_session", 1) <= 1:
        return []
    rows = [
        ("contexts per session", f"{ctx['per_session']}"),
        ("TTFA ms, no other context of the session in flight", _fmt(ctx["ttfa_ms_alone"])),
        ("TTFA ms, other contexts in flight (ratio of p50s)",
         f"{_fmt(ctx['ttfa_ms_with_others'])} ({ctx['with_others_over_alone_p50']})"),
    ]
    rows += [(f"TTFA ms, {n} other contexts in flight", _fmt(d)) for n, d in ctx["ttfa_ms_by_others"].items()]
    rows += [(f"first round: TTFA ms of the context that began {int(r) + 1}.", _fmt(d))
             for r, d in ctx["first_round"]["ttfa_ms_by_rank"].items()]
    rows.append(("first round: later context's TTFA / the first's", _fmt2(ctx["first_round"]["later_over_first"])))
    rows += [
        (f"context {c}: turns, TTFA ms, audio s, underruns",
         f"{v['turns']} {v['turns_by_reason']}; {_fmt(v['ttfa_ms'])}; {v['audio_seconds']}; {v['underruns']}")
        for c, v in ctx["by_context"].items()
    ]
    rows.append(("turns whose audio interleaved with another context's", f"{ctx['interleaved_turns']}"))
    rows.append(("most contexts of one session playing at once", f"{ctx['streams_peak_in_session']}"))
    return rows


def _fmt2(d: dict[str, Any] | None) -> str:
    if not d or d.get("p50") is None:
        return "–"
    return " / ".join(f"{d[q]:.2f}" for q in ("p50", "p90", "p99", "max"))


def _rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    cpu = s["cpu"]
    return [
        ("sessions (ready / requested)", f"{s['sessions_ready']} / {s['sessions']}"),
        ("turns measured (total)", f"{s['turns']} ({s['turns_total']}), by reason {s['turns_by_reason']}"),
        ("average concurrent streams (peak)", f"{s['streams_mean']} ({s.get('streams_peak', '–')})"),
        ("TTFA ms p50 / p90 / p99 / max", _fmt(s["ttfa_ms"])),
        ("bare WebSocket round trip ms", _fmt(s["floor_ms"])),
        ("gateway overhead ms (TTFA − floor) p50 / p90 / p99", " / ".join(
            "–" if s["overhead_ms"][q] is None else f"{s['overhead_ms'][q]:.1f}" for q in ("p50", "p90", "p99"))),
        ("server-reported TTFA ms", _fmt(s["server_ttfa_ms"])),
        ("protocol ping ms", _fmt(s["ping_ms"])),
        *_context_rows(s),
        ("gap between packets ms", _fmt(s["gap_ms"])),
        ("underruns (turns with any, ms)", f"{s['underruns']} ({s['turns_with_underruns']}, {s['underrun_ms']:.1f} ms)"),
        ("real-time factor", _fmt(s["rtf"])),
        ("cancel → turn.done ms", _fmt(s["cancel_ms"])),
        ("audio after cancel: packets; cancel → last packet ms", f"{s['audio_after_cancel']['packets']}; "
                                                                 f"{_fmt(s['audio_after_cancel']['last_ms'])}"),
        ("errors", f"{s['errors']} {s['errors_by_code'] or ''}"),
        *_timing_rows(s),
        *_telephony_rows(s),
        ("audio seconds (measured)", f"{s['audio_seconds']} ({s['audio_seconds_measured']})"),
        ("server CPU % mean / max", _mean_max(cpu["server"])),
        ("server children CPU % mean / max", _mean_max(cpu["server_children"])),
        ("server CPU % per stream: gateway processes; with children",
         f"{(s.get('headline') or {}).get('server_cpu_per_stream', '–')}; {cpu['server_per_stream']}"),
        ("client CPU % mean / max (busiest generator process)",
         _mean_max(cpu["client"]) + (f" ({_mean_max(cpu['client_max'])})" if cpu.get("client_max") else "")),
        *_process_rows(s),
        ("other processes CPU % mean / max", _mean_max(cpu["other"]) + (" (machine busy: numbers not valid!)" if s["machine_busy"] else "")),
        ("waiting for a CPU % of time, server / client loop", f"{_mean(cpu.get('server_wait'))} / {_mean(cpu.get('client_wait'))}"),
        ("client loop lag ms", _fmt(s["client_lag_ms"]) + (" (client saturated!)" if s["client_saturated"] else "")),
        ("sanity", "ok" if s["sanity"]["ok"] else f"FAILED {s['sanity']['violations']}"),
    ]


def _process_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """Which processes were measured: the gateways, and the load generators with their share of the sessions."""
    rows = []
    gateways = (s.get("server") or {}).get("gateway_pids")
    if gateways:
        rows.append(("gateway processes (pids)", f"{len(gateways)} ({', '.join(map(str, gateways))})"))
    clients = s.get("client_processes") or []
    if len(clients) > 1:
        rows.append(("load-generator processes: pid (sessions)",
                     ", ".join(f"{c['pid']} ({c['sessions']})" for c in clients)))
    return rows


def _headline_html(s: dict[str, Any]) -> str:
    """Server CPU per stream, beside the floor: the first thing on the page."""
    h = s.get("headline")
    if not h:
        return ""

    def pct(x: float | None) -> str:
        return "–" if x is None else f"{x:.2f} %"

    floor = []
    if h["floor_ms_p50"] is not None:
        floor.append(f"bare WebSocket round trip p50 {h['floor_ms_p50']:.2f} ms")
    if h.get("codec_floor_pct") is not None:
        floor.append(f"the codec alone {pct(h['codec_floor_pct'])} of a core per stream")
    return (
        f"<p class='headline'><b>Server CPU per stream: {pct(h['server_cpu_per_stream'])} of a core</b> "
        f"({html.escape(str(h['gateway_processes']))} gateway process(es), {html.escape(str(h['server_cpu']))} % "
        f"for {h['streams']} concurrent streams; {pct(h['server_cpu_per_stream_with_children'])} with the engine and "
        f"the store). Load generator: {pct(h['client_cpu_per_stream'])} per stream in {h['client_processes']} "
        f"process(es)." + (f" Floor: {html.escape('; '.join(floor))}." if floor else "") + "</p>"
    )


def _timing_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    if not timing_shown(s):
        return []
    t = s["timing"]
    return [(f"word timing ({t['requested']}): words messages (words, estimated); visemes messages (visemes)",
             f"{t['words_messages']} ({t['words']}, {t['estimated_messages']}); {t['visemes_messages']} ({t['visemes']})")]


def _telephony_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    phone = s.get("telephony")
    if phone is None:
        return []
    b, vad = phone["barge_ins"], phone["vad"]
    rows = [
        ("phone calls joined / opened (hang-ups)", f"{phone['joined']} / {phone['calls']} ({phone['hangups']})"),
        ("caller barge-ins: cleared / spoken; missed; spurious clears",
         f"{b['cleared']} / {b['utterances']}; {b['missed']}; {b['spurious_clears']}"),
        ("onset → clear ms p50 / p90 / p99 / max", _fmt(phone["onset_to_clear_ms"])),
        ("VAD onset error ms (speech_started.ms − onset)", _fmt(phone["vad_onset_error_ms"])),
        ("caller frames sent; relayed to the application; marks echoed",
         f"{phone['caller_frames']}; {phone['relayed_frames']}; {phone['marks_echoed']}"),
        ("server CPU % per call", f"{phone['server_cpu_per_call']}"),
    ]
    if vad is not None:
        rows.append(("input path CPU % per call (VAD alone; ms per audio second)",
                     f"{vad['per_call_pct']} ({vad['vad_per_call_pct']}; {vad['vad_ms_per_s']}), "
                     f"benchmark of {vad['audio_s']:g} s"))
    return rows


def _mean(d: dict[str, Any] | None) -> str:
    return "–" if not d or d.get("mean") is None else f"{d['mean']:.1f}"


def _mean_max(d: dict[str, Any]) -> str:
    return "–" if d.get("mean") is None else f"{d['mean']:.1f} / {d['max']:.1f}"


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:14px}"
    "img{max-width:100%;margin:1em 0}pre{background:#f6f6f6;padding:8px;font-size:12px;overflow:auto}"
)


def _page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )


def _table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows) + "</table>"


def write_report(a: Analysis, out_dir: Path, extra_html: str = "") -> Path:
    """Plots and report.html in ``out_dir``. Returns the HTML path."""
    s = a.summary
    images: list[str] = []
    note = ""
    try:
        images = [
            plot_ttfa_distribution(a, out_dir / "ttfa.png"),
            plot_vs_concurrency(a, out_dir / "concurrency.png"),
            plot_cpu(a, out_dir / "cpu.png"),
        ]
    except ImportError:
        note = "<p><b>No plots:</b> matplotlib is not installed (<code>pip install -e '.[loadtest]'</code>).</p>"
    cfg = s["config"]
    contexts = int(cfg.get("contexts", 1))
    what = "phone calls" if cfg.get("telephony") else "sessions"
    title = (f"Shoal load test: {s['sessions']} {what}{f' x {contexts} contexts' if contexts > 1 else ''}, "
             f"{cfg['duration_s']:g} s, {cfg['codec']}")
    body = (
        _headline_html(s)
        + _table(_rows(s))
        + note
        + "".join(f"<img src='{html.escape(name)}' alt='{html.escape(name)}'>" for name in images)
        + extra_html
        + "<h2>Machine and server</h2><pre>" + html.escape(json.dumps({"machine": s["machine"], "server": s["server"]}, indent=2)) + "</pre>"
        + "<h2>Settings</h2><pre>" + html.escape(json.dumps(cfg, indent=2)) + "</pre>"
        + ("" if s["sanity"]["ok"] else "<h2>Sanity violations</h2><pre>" + html.escape("\n".join(s["sanity"]["examples"])) + "</pre>")
    )
    path = out_dir / "report.html"
    path.write_text(_page(title, body))
    return path


def write_sweep_report(sweep: dict[str, Any], out_dir: Path) -> Path:
    steps = sweep["steps"]
    n = [st["sessions"] for st in steps]
    images: list[str] = []
    note = ""
    try:
        fig = _figure(7.5, 7.0)
        ax1, ax2, ax3 = fig.subplots(3, 1, sharex=True)
        for q, style in (("p50", "-o"), ("p99", "-s")):
            ax1.plot(n, [st["ttfa_ms"][q] if st["ttfa_ms"][q] is not None else np.nan for st in steps], style, label=f"TTFA {q}")
        if sweep.get("ttfa_p99_ms") is not None:
            ax1.axhline(sweep["ttfa_p99_ms"], color="red", linestyle=":", label="p99 threshold")
        ax1.set_ylabel("ms")
        ax1.legend(fontsize=8)
        ax1.set_title(f"Sweep: capacity {sweep['capacity']} sessions")
        ax2.bar(n, [st["underruns"] for st in steps], width=max(1.0, min(np.diff(sorted(n))) * 0.6) if len(n) > 1 else 1.0, color="C3")
        ax2.set_ylabel("underruns")
        ax3.plot(n, [st["server_cpu"] for st in steps], "-o", label="server")
        ax3.plot(n, [st["server_children_cpu"] for st in steps], "-o", label="server children")
        ax3.plot(n, [st["client_cpu"] for st in steps], "-o", label="client")
        ax3.set_ylabel("CPU % mean")
        ax3.set_xlabel("sessions")
        ax3.legend(fontsize=8)
        images.append(_save(fig, out_dir / "sweep.png"))
    except ImportError:
        note = "<p><b>No plots:</b> matplotlib is not installed.</p>"
    rows = "".join(
        f"<tr><td><a href='{html.escape(st['dir'])}/report.html'>{st['sessions']}</a></td><td>{st['streams_mean']}</td>"
        f"<td>{_fmt(st['ttfa_ms'])}</td><td>{st['underruns']}</td><td>{st['errors']}</td>"
        f"<td>{st['server_cpu']}</td><td>{st['server_children_cpu']}</td><td>{st['client_cpu']}</td>"
        f"<td>{'yes' if st['pass'] else 'no'}{' (machine busy)' if st.get('machine_busy') else ''}</td></tr>"
        for st in steps
    )
    table = (
        "<table><tr><th>sessions</th><th>streams</th><th>TTFA ms p50/p90/p99/max</th><th>underruns</th><th>errors</th>"
        "<th>server CPU %</th><th>children CPU %</th><th>client CPU %</th><th>pass</th></tr>" + rows + "</table>"
    )
    body = (
        f"<p>Capacity: <b>{sweep['capacity']}</b> concurrent sessions with TTFA p99 ≤ {sweep['ttfa_p99_ms']} ms and "
        f"≤ {sweep['max_underruns']} underruns{' (limited by the client)' if sweep.get('limited_by_client') else ''}.</p>"
        + table + note + "".join(f"<img src='{i}' alt='{i}'>" for i in images)
        + "<h2>Sweep</h2><pre>" + html.escape(json.dumps({k: v for k, v in sweep.items() if k != "steps"}, indent=2)) + "</pre>"
    )
    path = out_dir / "report.html"
    path.write_text(_page("Shoal load test: capacity sweep", body))
    return path
