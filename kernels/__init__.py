"""Fused kernels of freezeasguard. Each module holds one op's Triton kernel, its launcher (input
checks, one dispatch point, ``backend='auto'|'triton'|'torch'``) and its pure-torch reference.
This package imports only torch and Triton (``_triton`` probes whether Triton can run here), so
it stands alone: nothing in it knows about the engine built on top of it."""
