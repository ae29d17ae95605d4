"""SageSLA kernels (Triton) and their plain-PyTorch references, installed as ``sagesla.kernels``.

Inference: each Triton ``<op>.py`` sits beside its reference ``<op>_ref.py`` (torch only), the twin functions taking
the same arguments and giving the same results where the math allows (where not, the Triton function's docstring
says how it differs): ``kv_stats`` (token reductions of K and V), ``quant`` (INT8 Q/K, FP8 V), ``block_select``,
``sparse_attn`` (block-sparse attention with the linear branch fused; ``linear_attn_ref`` is that branch's reference)
and ``sla`` (the whole forward). Training: ``<op>_train.py`` (``sla_train``, ``sparse_attn_train``,
``linear_attn_train``) is the trainable Triton twin of ``<op>_ref.py``, whose torch autograd is the reference.
Shared: ``constants.py`` (numbers), ``_triton_utils.py`` (Triton helpers), ``blocks_ref.py`` (the references' row
blocks), ``exact_keys_ref.py`` (attention over extra keys every query attends, and the merge of two softmax partials:
both ``sla`` pipelines use it, the Triton one merging in the sparse kernel's epilogue).

Shape letters used throughout: B batch, H heads, L tokens, D head dim, BQ / BK rows of a query / key block,
NQ = ceil(L / BQ) query blocks, NK = ceil(L / BK) key blocks, S selected key blocks per query block, T extra (exact)
keys.
Tensors are HND views ``[B, H, L, D]`` with free strides, so NHD inputs need no copy.

Nothing here imports triton at package import time.
"""
