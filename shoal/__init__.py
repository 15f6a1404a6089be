"""The ``shoal`` command: the one place that knows every package's commands (no package imports another's CLI).

``realtime`` brings serve, worker, say, codec and bench (``realtime.cli``); ``loadtest`` brings loadtest
(``loadtest.cli``). Each package can also be run alone: ``python -m realtime``, ``python -m loadtest``.
"""
