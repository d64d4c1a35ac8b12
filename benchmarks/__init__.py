"""Benchmarks: step times, kernels, hypergradient precision, the methods comparison, the GPU session."""
