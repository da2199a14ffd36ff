"""Fused kernels of freezeasguard. Each module holds a Triton kernel, its launcher and its
pure-torch reference; Triton is imported only where it is available (see
``freezeasguard.engine.backends``)."""
