"""Test and benchmark helpers: the documented error bounds, a dense masked attention oracle, one comparison helper,
a pipeline runner for either backend and layout, and a tiny Wan model."""

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from sagesla import backends, metrics

# Documented error bounds (README "Guarantees and limits"): rel-L1 of the whole forward, output in the input dtype,
# against the same SLA computed densely in float64 from the same (16-bit) inputs with the same block selection.
# Unit-scale random or video-like inputs; the extreme inputs of tests/test_extreme_values.py have their own.
BOUND_SLA = 1e-2
BOUND_SAGESLA = 5e-2
# Triton pipeline against the torch reference on identical inputs and block selection: P is rounded (to e4m3,
# relative step 2^-4, or to the compute dtype) after scaling by the running row maximum instead of the final one,
# and the linear state is multiplied in bf16.
TOL_KERNEL_FP8 = 3e-2
TOL_KERNEL_HALF = 4e-3
# The whole Triton pipeline with 16-bit P.V (the linear branch adds its bf16 state), and the unquantized
# (trainable) one, whose P and linear state are rounded to bf16 in other places than the reference's.
TOL_PIPELINE_HALF = 1e-2
TOL_PIPELINE_SLA = 1e-2
# Every forward path as (id, backend, quantized, pv_precision); Triton's unquantized one is the trainable SLA.
FORWARD_PATHS = (
    ("torch-sla", "torch", False, "half"),
    ("torch-fp8", "torch", True, "fp8"),
    ("torch-half", "torch", True, "half"),
    ("triton-sla", "triton", False, "half"),
    ("triton-fp8", "triton", True, "fp8"),
    ("triton-half", "triton", True, "half"),
)
# phi(K)^T V and sum phi(K) of kv_stats, phi rounded to the compute dtype on the GPU (bf16: relative step 2^-8).
TOL_KV_STATE = 5e-3


def assert_close(name: str, ref: torch.Tensor, tri: torch.Tensor, tol: float) -> None:
    """Fail unless ``rel_l1(tri, ref) <= tol``; NaN anywhere in ``tri`` or ``ref`` fails too."""
    if ref.shape != tri.shape:
        raise AssertionError(f"{name}: shape {tuple(tri.shape)} != reference {tuple(ref.shape)}")
    for label, x in (("result", tri), ("reference", ref)):
        if x.is_floating_point() and torch.isnan(x).any():
            raise AssertionError(f"{name}: {label} holds {int(torch.isnan(x).sum())} NaN")
    err = metrics.rel_l1(tri, ref)
    if not err <= tol:
        raise AssertionError(f"{name}: rel-L1 {err:.3e} > {tol:.1e} (cosine {metrics.cosine(tri, ref):.6f})")


def expand_block_mask(block_mask: torch.Tensor, length: int, block_q: int, block_k: int) -> torch.Tensor:
    """[B, H, NQ, NK] bool -> [B, H, L, L] bool token mask."""
    return block_mask.repeat_interleave(block_q, dim=-2)[..., :length, :].repeat_interleave(block_k, dim=-1)[
        ..., :length
    ]


def dense_masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    sm_scale: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Dense softmax attention, optionally restricted to ``token_mask`` [B, H, L, L] (True = attend).

    q, k, v: [B, H, L, D]; the math runs in ``dtype`` (float64 for ground truth). Returns [B, H, L, D] in ``dtype``.
    Masked keys take no part even when their values are NaN / Inf (no ``0 * NaN``); an output element that sums a
    non-finite value of an attended key is NaN.
    """
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    scores = (q @ k.transpose(-1, -2)) * scale
    if token_mask is None:
        return torch.softmax(scores, dim=-1) @ v
    p = torch.softmax(scores.masked_fill(~token_mask, float("-inf")), dim=-1)
    finite = torch.isfinite(v)
    if bool(finite.all()):
        return p @ v
    hit = token_mask.to(dtype) @ (~finite).to(dtype) > 0
    return (p @ v.where(finite, 0.0)).masked_fill(hit, float("nan"))


def sla_dense_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: torch.Tensor,
    block_q: int,
    block_k: int,
    proj_weight: torch.Tensor | None,
    proj_bias: torch.Tensor | None,
    feature_map: str = "softmax",
    dtype: torch.dtype = torch.float32,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """SLA computed densely: softmax attention masked to ``lut``'s blocks plus ``proj_l`` of the linear branch.

    q, k, v: [B, H, L, D]; lut: [B, H, NQ, S]; no linear branch when ``proj_weight`` is None. One head at a time,
    so only one [L, L] score matrix is alive. Returns [B, H, L, D] in ``dtype``.
    """
    from sagesla.kernels.block_select_ref import lut_to_mask
    from sagesla.kernels.linear_attn_ref import linear_attn_ref

    length = q.shape[-2]
    mask = lut_to_mask(lut, -(-length // block_k))
    heads = [
        dense_masked_attention(
            q[:, h : h + 1],
            k[:, h : h + 1],
            v[:, h : h + 1],
            expand_block_mask(mask[:, h : h + 1], length, block_q, block_k),
            sm_scale=sm_scale,
            dtype=dtype,
        )
        for h in range(q.shape[1])
    ]
    o = torch.cat(heads, dim=1)
    if proj_weight is None:
        return o
    return o + linear_attn_ref(q, k, v, feature_map, proj_weight, proj_bias).to(dtype)


def run_forward(
    backend: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    topk: float,
    tensor_layout: str = "HND",
    quantized: bool = True,
    pv_precision: str = "fp8",
    block_q: int = 64,
    block_k: int = 64,
    feature_map: str = "softmax",
    proj_weight: torch.Tensor | None = None,
    proj_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One backend's pipeline ("torch" or "triton") on already-valid inputs, returning its block selection too.

    Takes q, k, v in ``tensor_layout`` ([B, H, L, D] or [B, L, H, D], in the compute dtype) and hands the pipeline
    strided HND views, as ``sparse_linear_attn`` does; the output is NaN-poisoned first, so unwritten rows show.
    Returns (o in the inputs' layout and dtype, lut [B, H, NQ, S] int32).
    """
    to_hnd = (lambda x: x) if tensor_layout == "HND" else (lambda x: x.transpose(1, 2))
    out = torch.full_like(q, float("nan"))
    lut = backends.forward_for(backend, quantized)(
        *(to_hnd(x) for x in (q, k, v)),
        topk=topk,
        block_q=block_q,
        block_k=block_k,
        sm_scale=q.shape[-1] ** -0.5,
        quantized=quantized,
        pv_precision=pv_precision,
        feature_map=feature_map,
        linear_scope="all",
        proj_weight=proj_weight,
        proj_bias=proj_bias,
        out=to_hnd(out),
    )
    return out, lut


# A 2-block diffusers WanTransformer3DModel, 2 heads of 64: a forward on ``wan_inputs()`` (256 tokens) takes 0.02 s
# on 2 CPU cores.
TINY_WAN_CONFIG = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 64,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 32,
    "freq_dim": 32,
    "ffn_dim": 128,
    "num_layers": 2,
    "qk_norm": "rms_norm_across_heads",
    "cross_attn_norm": True,
    "rope_max_seq_len": 32,
}


@dataclasses.dataclass(frozen=True)
class WanShape:
    """A Wan transformer config with the latent it serves: (frames, height, width) and text tokens."""

    config: dict
    latent: tuple[int, int, int]
    text_tokens: int

    @property
    def tokens(self) -> int:
        """Self-attention sequence length: the latent over the (1, 2, 2) patch."""
        frames, height, width = self.latent
        return frames * (height // 2) * (width // 2)


# diffusers' Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers transformer configs (other arguments keep their defaults);
# latents of 81 frames at 480 x 832 (32760 tokens) and 720 x 1280 (75600 tokens) after the VAE's 4 x 8 x 8.
_WAN21 = {"freq_dim": 256, "text_dim": 4096, "eps": 1e-6, "attention_head_dim": 128}
WAN_SHAPES = {
    "tiny": WanShape(TINY_WAN_CONFIG, (4, 16, 16), 8),
    "wan2.1-1.3b": WanShape(
        {**_WAN21, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30}, (21, 60, 104), 512
    ),
    "wan2.1-14b": WanShape(
        {**_WAN21, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}, (21, 90, 160), 512
    ),
}


def build_wan(shape: WanShape, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A ``WanTransformer3DModel`` of ``shape.config`` with random weights, built on ``device`` in ``dtype``."""
    from diffusers import WanTransformer3DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # a 14B model never exists in fp32
    try:
        with torch.device(device):
            return WanTransformer3DModel(**shape.config).eval()
    finally:
        torch.set_default_dtype(previous)


def wan_step_inputs(
    shape: WanShape, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (latent [1, 16, F, H, W], timestep [1], text [1, T, text_dim]) for one forward of ``shape``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    latent = torch.randn(1, 16, *shape.latent, generator=gen, device=device).to(dtype)
    text = torch.randn(1, shape.text_tokens, shape.config["text_dim"], generator=gen, device=device).to(dtype)
    return latent, torch.tensor([500], device=device), text


def tiny_wan_transformer() -> torch.nn.Module:
    """A ``WanTransformer3DModel`` built from ``TINY_WAN_CONFIG`` (random weights, eval mode; needs diffusers)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(**TINY_WAN_CONFIG).eval()


def wan_inputs(frames: int = 4, size: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (latent [1, 16, frames, size, size], timestep [1], text [1, 8, 32]); frames * size^2 / 4 tokens."""
    return torch.randn(1, 16, frames, size, size), torch.tensor([500]), torch.randn(1, 8, 32)


def run_wan(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The model's output [1, 16, frames, size, size] for ``wan_inputs``, without autograd."""
    with torch.no_grad():
        return model(*inputs, return_dict=False)[0]


def spawn_ranks(fn: Callable[..., Any], world: int, *args: Any, backend: str = "gloo") -> Any:
    """Run ``fn(*args)`` on ``world`` local processes of one ``torch.distributed`` group; rank 0's result.

    ``fn`` must be importable (module level). With ``backend="nccl"`` rank r runs on GPU r. Rank 0's result travels
    back through a queue, so it must be picklable (plain numbers, strings, lists, dicts).
    """
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_rank_main, args=(world, port, backend, fn, args, results), nprocs=world)
    return results.get()


def _rank_main(rank: int, world: int, port: int, backend: str, fn, args, results) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "nccl":
        torch.cuda.set_device(rank)
    elif torch.accelerator.device_count() == 0:
        # diffusers 0.42.1 picks each rank's device as rank % accelerator count: zero on a CPU-only machine.
        torch.accelerator.device_count = lambda: 1
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        result = fn(*args)
        if rank == 0:
            results.put(result)
    finally:
        dist.destroy_process_group()


def ulysses_vs_one_device(
    shape_name: str,
    num_layers: int,
    topk: float,
    quantized: bool,
    backend: str,
    dtype_name: str,
    degree: int,
    profile: str | None = None,
) -> dict:
    """On every rank: one patched Wan step on this rank's device alone, then under ``enable_ulysses(degree)``.

    The SLA layers get random ``proj_l`` weights and per-layer topk ``topk, topk * 2, ...`` (capped at 1), or the
    per-layer, per-timestep-bucket topk of the calibration profile file ``profile``, so the linear branch and
    per-layer settings are exercised. Returns rel-L1 and max |diff| of the N-rank output against
    the one-device output, both runs' per-layer sparsity and fallback reasons (rank 0's, for ``spawn_ranks``).
    """
    import sagesla
    from sagesla.parallel import enable_ulysses

    rank = torch.distributed.get_rank()
    device = f"cuda:{rank}" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, dtype_name)
    shape = WAN_SHAPES[shape_name]
    shape = dataclasses.replace(shape, config={**shape.config, "num_layers": num_layers})
    torch.manual_seed(0)
    model = build_wan(shape, device, dtype)
    names = [f"blocks.{i}.attn1" for i in range(num_layers)]
    layer_topk = profile or {n: min(1.0, topk * 2**i) for i, n in enumerate(names)}
    sagesla.patch(model, profile=layer_topk, quantized=quantized, backend=backend)
    for name in names:
        torch.nn.init.normal_(model.get_submodule(name).sla.proj_l.weight, std=0.05)
    inputs = wan_step_inputs(shape, device, dtype)
    processors = [model.get_submodule(n).processor for n in names]

    def step() -> tuple[torch.Tensor, list, list]:
        out = run_wan(model, inputs)
        return out, [p.last_sparsity for p in processors], [p.last_fallback for p in processors]

    one, one_sparsity, one_fallbacks = step()
    enable_ulysses(model, degree)
    many, many_sparsity, many_fallbacks = step()
    return {
        "rel_l1": metrics.rel_l1(many, one),
        "max_abs": float((many.double() - one.double()).abs().max()),
        "sparsity": [one_sparsity, many_sparsity],
        "fallbacks": [one_fallbacks, many_fallbacks],
    }
