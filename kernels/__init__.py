"""SageSLA kernels (Triton) and their plain-PyTorch references, installed as ``sagesla.kernels``.

Each family ``<op>.py`` (Triton) has a twin ``<op>_ref.py`` (torch only) with the same signature and results.
Shape letters used throughout: B batch, H heads, L tokens, D head dim, BQ / BK rows of a query / key block,
NQ = ceil(L / BQ) query blocks, NK = ceil(L / BK) key blocks, S selected key blocks per query block.
Tensors are HND views ``[B, H, L, D]`` with free strides, so NHD inputs need no copy.

Nothing here imports triton at package import time.
"""
