"""Pallas kernels for DecMem (Sparse Global Memory attention and friends). Empty until the SGM kernel issue lands;
see pallas_kernels/README.md."""
