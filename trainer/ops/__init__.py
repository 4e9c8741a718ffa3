"""GPU kernels (Triton) and the plain PyTorch definitions they must match, side by side."""
