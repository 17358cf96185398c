"""Pallas kernels for DecMem; see pallas_kernels/README.md. `pallas_kernels.sgm.sgm_attention` is the Sparse Global
Memory attention (reference + kernels behind one function)."""
