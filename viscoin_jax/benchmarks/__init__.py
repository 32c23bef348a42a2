"""Benchmarks against the references users would otherwise pick (NVlabs' PyTorch StyleGAN2-ADA),
with the op-by-op profiler that locates a gap."""
