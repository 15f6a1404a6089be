"""Load test for protocol v1: a swarm of simulated conversations, then statistics and a report.

Three steps, each usable alone:

1. ``swarm`` runs N simulated sessions against a server (loopback only). Each session holds a multi-turn,
   multi-speaker conversation, streams text as LLM-like tokens in real time, plays the audio it gets through a
   clock-driven player, and may barge in. Every event is timestamped and written raw (``raw/events.msgpack``)
   as it happens; nothing is summarised while the load runs.
2. ``stats`` reads the raw events, rejects impossible orderings, excludes the warm-up, and computes TTFA,
   packet gaps, underruns, real-time factor, errors, the bare WebSocket round-trip floor, server CPU and (with
   ``--timestamps``) the word timing messages, each of which must come before the audio it covers
   (``summary.json``).
3. ``report`` draws the plots (matplotlib) and writes ``report.html``.

``sweep`` repeats 1-3 at rising concurrency until a threshold breaks and reports the capacity.

``--telephony`` makes every session a phone call (:mod:`loadtest.call`): the application drives the session over
``/v1/realtime`` and a simulated Twilio Media Stream joins it on ``/v1/twilio``, plays its mu-law audio in real time
and speaks over some of its turns with a short utterance of the built-in voice. The statistics add the call's
numbers (:mod:`loadtest.callstats`): onset-to-``clear`` latency, missed and spurious barge-ins, server CPU per
call, and the voice activity's own cost per call, timed in-process before the load (:mod:`loadtest.caller`).

The load test talks to the server only over the wire; the one piece it shares with the server is the protocol
codec (:mod:`realtime.protocol`), and in telephony mode the caller's voice (``engine.espeak``) and the benchmark of
the server's input path (``realtime.caller``, ``realtime.vad``).
"""
