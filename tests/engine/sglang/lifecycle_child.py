"""A Shoal process that serves with the SGLang synthesizer over the stand-in engine, which behaves like SGLang
0.5.23 towards its parent process (a watchdog that SIGQUITs, signal handlers on the loop). Run by
``test_lifecycle.py`` in a subprocess, since what it checks is whether the process survives:

    python -m tests.engine.sglang.lifecycle_child close|sigterm

Prints one line per milestone; exits 0 when everything went as Shoal wants it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import torch

from engine.base import Sampling, SynthesisRequest
from engine.dualar.codec import load_codec
from engine.sglang import SGLangConfig, SGLangSynthesizer
from tests.engine.dualar import FIXTURES, MODEL_DIR
from tests.engine.sglang.fakes import shadow_launcher


def say(line: str) -> None:
    print(line, flush=True)


async def main(mode: str) -> int:
    loop = asyncio.get_running_loop()
    sigterm = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, sigterm.set)  # Shoal's own handler, as the gateway installs one
    codec = load_codec(FIXTURES / "codec" / "codec.pth", device="cpu", dtype=torch.float32)
    config = SGLangConfig(model=str(MODEL_DIR), codec=str(FIXTURES / "codec" / "codec.pth"), ignore_end=True,
                          max_running_requests=4, cuda_graph_max_bs=4, max_seq_len=1024, warm_cache=False)
    synth = SGLangSynthesizer(config, codec=codec, launcher=shadow_launcher(children=1))
    await synth.start()
    engine = synth._engine
    child = engine.children[0]
    chunks = [c async for c in synth.synthesize(SynthesisRequest("Hello there.", sampling=Sampling(max_frames=6)))]
    say(f"frames {sum(c.codes.shape[1] for c in chunks)}")
    if mode == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(sigterm.wait(), 5)
        say(f"shoal handled SIGTERM; sglang child alive {child.is_alive()}")
    await synth.aclose()
    say(f"closed; sglang child alive {child.is_alive()}")
    await asyncio.sleep(0.5)  # several watchdog periods: SGLang's watchdog would SIGQUIT this process by now
    say("alive after close")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1])))
