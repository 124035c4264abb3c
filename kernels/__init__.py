"""Triton kernels of ddpm-fast, installed as `ddpm_fast.kernels`: one module per op, each holding
its kernels and their launcher, and `sm90_specs()` listing every configuration it can launch
(consumed by `python -m benchmarks.sm90`)."""
