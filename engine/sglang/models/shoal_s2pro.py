"""Shoal's S2 Pro as an SGLang model class, loaded by SGLang in its scheduler process (sglang==0.5.23).

The model is :class:`engine.sglang.core.S2ProCore` with SGLang's ``RadixAttention`` as the attention of each slow-AR
layer (paged KV cache, radix prefix reuse, the attention backend SGLang is started with). What it relies on from
SGLang, all verified in the 0.5.23 sources:

- the model protocol: ``__init__(config, quant_config)``, ``forward(input_ids, positions, forward_batch)`` returning
  ``LogitsProcessorOutput``, ``load_weights(iterable of (name, tensor))``, ``post_load_weights()`` (after dummy
  loading) and ``prepare_for_forward(forward_batch)``, which ``ModelRunner._forward_raw`` calls on the host before
  every forward, a decode CUDA-graph replay included;
- ``ForwardBatch``: ``forward_mode``, ``batch_size``, ``req_pool_indices`` (+ ``_cpu``), ``extend_prefix_lens_cpu``,
  ``extend_seq_lens`` (+ ``_cpu``), ``rids`` and ``sampling_info.custom_params`` (present when the request has a
  custom logit processor and the server has ``enable_custom_logit_processor``: hence :class:`ShoalPassthrough`);
- ``LogitsProcessorOutput.customized_info``: per-request values SGLang appends per token and streams back in
  ``meta_info``. A decode step is a CUDA graph whose outputs the next replay overwrites, so the frames are copied
  out right behind the forward, on its stream, by an AFTER hook on ``ModelRunner.sample`` registered with SGLang's
  ``HookRegistry`` (the copy then precedes SGLang's own result read-back, which waits for that stream).

SGLang samples from the returned logits, which are -inf except at the main token the model drew, so its (greedy)
sampler returns exactly that token: stop on ``<|im_end|>``, ``max_new_tokens`` and abort stay SGLang's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from sglang.srt.layers.logits_processor import LogitsProcessorOutput
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor
from torch import Tensor

from engine.dualar.config import ModelConfig
from engine.sglang.convert import FRAME_KEY
from engine.sglang.core import BatchInfo, S2ProCore, without_custom_processor

__all__ = ["EntryClass", "ShoalPassthrough", "ShoalS2ProForCausalLM", "install_sample_hook"]

log = logging.getLogger(__name__)

_SAMPLE = "sglang.srt.model_executor.model_runner.ModelRunner.sample"
_HOST_BUFFERS = 8  # pinned frame buffers in rotation; SGLang keeps at most two steps in flight


class ShoalPassthrough(CustomLogitProcessor):
    """Leaves the logits alone; attached to every request so its ``custom_params`` (the plan) reach the model."""

    def __call__(self, logits: Tensor, custom_param_list: list[dict[str, Any]] | None = None) -> Tensor:
        return logits


def _after_sample(result: Any, runner: Any, logits_output: Any = None, forward_batch: Any = None, *a: Any,
                  **kw: Any) -> None:
    attach = getattr(getattr(runner, "model", None), "shoal_attach_frames", None)
    if attach is not None and logits_output is not None and forward_batch is not None:
        try:
            attach(logits_output, forward_batch)
        except Exception:  # an exception here would kill SGLang's scheduler (and SIGQUIT Shoal): log, go on
            log.exception("attaching this step's frames failed; its requests end with an error")
    return None  # keep SGLang's sampled ids


def install_sample_hook() -> None:
    """Register (once per process) the hook that hands each step's frames to SGLang's output path."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if any(hook is _after_sample for _, hook, _ in HookRegistry._hooks.get(_SAMPLE, [])):
        return
    if _SAMPLE in HookRegistry._patched:
        raise RuntimeError(f"{_SAMPLE} was already patched by another SGLang plugin; Shoal cannot attach its hook")
    HookRegistry.register(_SAMPLE, _after_sample, HookType.AFTER)
    HookRegistry.apply_hooks()
    if _SAMPLE not in HookRegistry._patched:
        raise RuntimeError(f"SGLang did not apply Shoal's hook on {_SAMPLE}; see the log above")


class ShoalS2ProForCausalLM(S2ProCore):
    passthrough = ShoalPassthrough  # the processor every request names (it carries the plan)

    def __init__(self, config: Any, quant_config: Any = None, prefix: str = "", **_: Any) -> None:
        if quant_config is not None:
            raise ValueError("the Shoal S2 Pro model does not support quantization")
        raw = getattr(config, "shoal_s2pro", None)
        if not isinstance(raw, dict):
            raise ValueError("config.json has no shoal_s2pro section: start SGLang through engine.sglang")
        runtime = getattr(config, "shoal_runtime", None) or {}
        s2 = ModelConfig.from_dict(raw)
        slow = s2.slow

        def attention(layer_id: int) -> RadixAttention:
            return RadixAttention(
                slow.n_head,
                slow.head_dim,
                slow.head_dim**-0.5,
                num_kv_heads=slow.n_local_heads,
                layer_id=layer_id,
                prefix=f"slow.layers.{layer_id}.attention.attend",
            )

        super().__init__(
            s2, attention, max_rows=int(runtime.get("max_rows", 256)), max_slots=int(runtime.get("max_slots", 1024))
        )
        width = self.out_frames.shape[1]
        pinned = torch.cuda.is_available()  # page-locked, so the copy out is asynchronous
        self._host_frames = [
            torch.empty((self.max_rows, width), dtype=torch.int32, device="cpu", pin_memory=pinned)
            for _ in range(_HOST_BUFFERS)
        ]
        self._host_next = 0
        install_sample_hook()

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.slow.embeddings

    def prepare_for_forward(self, forward_batch: Any) -> None:
        mode = forward_batch.forward_mode
        rows = 0 if mode.is_idle() else int(forward_batch.batch_size)
        slots_cpu = getattr(forward_batch, "req_pool_indices_cpu", None)
        sampling = getattr(forward_batch, "sampling_info", None)
        if mode.is_decode():  # the plan reached the model at the extend; skip the processor's per-step copies
            forward_batch.sampling_info = without_custom_processor(sampling)
        self.prepare(
            BatchInfo(
                decode=mode.is_decode(),
                rows=rows,
                slots=forward_batch.req_pool_indices,
                slots_cpu=slots_cpu.tolist() if slots_cpu is not None else None,
                prefix_lens=forward_batch.extend_prefix_lens_cpu or (),
                extend_lens=forward_batch.extend_seq_lens_cpu or (),
                custom=getattr(sampling, "custom_params", None),
                rids=getattr(forward_batch, "rids", None),
                token=forward_batch,
            )
        )

    def forward(self, input_ids: Tensor, positions: Tensor, forward_batch: Any, **_: Any) -> LogitsProcessorOutput:
        mode = forward_batch.forward_mode
        if mode.is_idle() or input_ids.shape[0] == 0:
            empty = torch.zeros((0, self.config.slow.vocab_size), dtype=torch.float32, device=input_ids.device)
            return LogitsProcessorOutput(next_token_logits=empty)
        decode = mode.is_decode()
        out = self.guarded_step(
            input_ids,
            positions,
            forward_batch,
            decode=decode,
            extend_lens=None if decode else forward_batch.extend_seq_lens,
            token=forward_batch,
        )
        return LogitsProcessorOutput(next_token_logits=out.logits)

    def shoal_attach_frames(self, logits_output: Any, forward_batch: Any) -> None:
        """After sampling, on the forward stream: copy this step's frames to pinned memory, attach them."""
        if forward_batch.forward_mode.is_idle():
            return
        rows = int(forward_batch.batch_size)
        host = self._host_frames[self._host_next]
        self._host_next = (self._host_next + 1) % len(self._host_frames)
        if self.failed_pass is not None:  # a replayed graph ran on the failed slot; say so in every row
            host[:rows].copy_(self.failed_output(rows, torch.device("cpu")).frames)
        else:
            host[:rows].copy_(self.out_frames[:rows], non_blocking=True)
        info = dict(logits_output.customized_info or {})
        info[FRAME_KEY] = host[:rows].numpy()  # read (row by row, copied) after SGLang's copy_done event
        logits_output.customized_info = info

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        self.load_published(weights)

    def post_load_weights(self) -> None:
        self.init_buffers()


EntryClass = ShoalS2ProForCausalLM
