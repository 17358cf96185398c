"""Sparse Global Memory (SGM) block-sparse attention: `sgm_attention` (backend switch + custom VJP), the XLA oracles
`sgm_reference` / `dense_masked_reference`, and the backend registry that the Mosaic GPU and TPU kernels plug into."""

from pallas_kernels.sgm.api import Backend, available_backends, register_backend, resolve_sgm_backend, sgm_attention
from pallas_kernels.sgm.reference import dense_masked_reference, dense_token_mask, sgm_reference, sgm_reference_bwd

__all__ = ["Backend", "available_backends", "dense_masked_reference", "dense_token_mask", "register_backend",
           "resolve_sgm_backend", "sgm_attention", "sgm_reference", "sgm_reference_bwd"]
