"""Tests of the SGLang backend: everything CUDA-free on the CPU; the GPU-marked ones need a GPU and the sglang extra."""
