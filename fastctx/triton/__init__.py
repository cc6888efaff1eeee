"""Triton kernels of fastctx (host functions ``<op>_fwd`` / ``<op>_bwd`` per operator)."""
