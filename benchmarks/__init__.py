"""Benchmarks and GPU evidence of ddpm-fast: the sm_90 static check, the GPU suite, the
micro-benchmarks and the report that turns their JSON into RESULTS.md and the backend table."""
