"""Test support: the documented error bounds and tolerances, dense attention oracles, one comparison helper and a
pipeline runner for either backend and layout (the benchmarks' accuracy checks use the oracles too)."""

import dataclasses
import importlib.util
import math
import pathlib
import threading
import types
from collections.abc import Callable, Sequence

import torch

from sagesla import metrics, ops

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
    lut = ops.forward_for(backend, quantized)(
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


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """A tiny random diffusers model of one class SLA patches, its inputs and what ``patch`` reports of its layers.

    Attributes:
        model: the diffusers class name.
        config: its constructor's keywords.
        inputs: builds the forward's keywords (fresh random tensors).
        self_attention: the layers SLA serves (``PatchReport.replaced``).
        skipped: {layer: reason} ``PatchReport.skipped`` lists.
        tolerance: rel-L1 of the output at topk=1.0 (SLA, bf16, zero ``proj_l``) against the unpatched model.
    """

    model: str
    config: dict
    inputs: Callable[[], dict]
    self_attention: tuple[str, ...]
    skipped: dict[str, str]
    tolerance: float = 1e-4

    def build(self) -> torch.nn.Module:
        import diffusers

        return getattr(diffusers, self.model)(**self.config).eval()


def run_model(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The first output of a diffusers transformer's forward without gradients (a list of tensors stacked)."""
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    return torch.stack(out) if isinstance(out, list) else out


def load_module(path: pathlib.Path) -> types.ModuleType:
    """Import a Python file by path (test folders are not packages)."""
    spec = importlib.util.spec_from_file_location(f"_sagesla_tests_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_families(folder: pathlib.Path) -> dict[str, ModelFamily]:
    """{id: family} of every ``FAMILIES`` of the Python files in ``folder``."""
    families: dict[str, ModelFamily] = {}
    for path in sorted(folder.glob("*.py")):
        families.update(load_module(path).FAMILIES)
    return families


def sla_processors(model: torch.nn.Module) -> dict[str, object]:
    """{processor name: processor} of a patched diffusers model's SLA layers."""
    from sagesla.patching.processor import SLAProcessor

    return {name: p for name, p in attention_processors(model).items() if isinstance(p, SLAProcessor)}


def attention_processors(model: torch.nn.Module) -> dict[str, object]:
    """{"<layer>.processor": processor} of every attention layer (diffusers' ``attn_processors``, which Mochi lacks)."""
    return {f"{name}.processor": m.processor for name, m in model.named_modules() if hasattr(m, "processor")}


def first_attn1_output(model: torch.nn.Module, inputs: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(model output, output of blocks.0.attn1) of a Wan-family model: the first self-attention layer, whose input
    depends on no attention."""
    from sagesla.wan_shapes import run_wan

    outputs = []
    handle = model.blocks[0].attn1.register_forward_hook(lambda module, args, out: outputs.append(out))
    try:
        return run_wan(model, inputs), outputs[0]
    finally:
        handle.remove()


def run_in_threads(call: Callable[[object], object], keys: Sequence, repeats: int = 4) -> dict[object, list]:
    """{key: [call(key) ...]}: one thread per key, each calling ``repeats`` times in step with the others (a barrier
    before each call), so the calls of different keys interleave."""
    barrier, results = threading.Barrier(len(keys)), {key: [] for key in keys}

    def run(key):
        for _ in range(repeats):
            barrier.wait()
            results[key].append(call(key))

    threads = [threading.Thread(target=run, args=(key,)) for key in keys]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def seeded_wan_inputs(seeds: Sequence[int], shape: tuple[int, int, int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Calibration inputs for ``sagesla.wan_shapes.tiny_wan_transformer``, one per seed: (noise [1, 16, F, H, W],
    text [1, 8, 32]) drawn from that seed; ``shape`` (F, H, W) gives F * H * W / 4 tokens."""
    inputs = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        inputs.append((torch.randn(1, 16, *shape, generator=generator), torch.randn(1, 8, 32, generator=generator)))
    return inputs


def synthetic_measurements(
    head_errors: torch.Tensor,
    candidates: Sequence[float],
    attention: object,
    edges: Sequence[float] = (),
    *,
    sparsity: torch.Tensor | None = None,
    layers: Sequence | None = None,
    info: dict | None = None,
):
    """Calibration ``Measurements`` of a synthetic model: per-head worst rel-L1 ``head_errors`` [NL, NB, NC, H]
    (means: half of it; cosines: 1 minus it; layer values: the mean over heads), 3 calls per layer and bucket,
    sparsity ``1 - topk`` unless given, layers ``blocks.{i}.attn1`` of head_dim 64 unless given."""
    from sagesla.profile import LayerSpec, Measurements

    nl, nb, nc, heads = head_errors.shape
    layers = tuple(layers or (LayerSpec(f"blocks.{i}.attn1", heads, 64) for i in range(nl)))
    if sparsity is None:
        sparsity = (1 - torch.tensor(candidates)).expand(nl, nb, nc)
    errors = head_errors.mean(-1)
    return Measurements(
        "WanTransformer3DModel",
        layers,
        attention,
        tuple(candidates),
        tuple(edges),
        calls=torch.full((nl, nb), 3),
        sparsity=sparsity.float().contiguous(),
        rel_l1_max=errors,
        rel_l1_mean=errors / 2,
        cosine_min=1 - errors,
        cosine_mean=1 - errors / 2,
        head_rel_l1_max=head_errors,
        head_rel_l1_mean=head_errors / 2,
        head_cosine_min=1 - head_errors,
        head_cosine_mean=1 - head_errors / 2,
        **({} if info is None else {"info": info}),
    )


def turbodiffusion_state_dict(
    config: dict, *, quantized: bool = False, seed: int = 0, training_layout: bool = False
) -> dict[str, object]:
    """A TurboDiffusion checkpoint of a (tiny) Wan ``config`` (``WanTransformer3DModel`` keywords), random values.

    Built from TurboDiffusion's key layout, not from our converter: original Wan names, a 2-D ``patch_embedding``
    [D, C * 4] (Linear over (c, kt, kh, kw)-flattened patches), ``norm3`` affine, ``modulation`` [1, 6, D],
    ``head.modulation`` [1, 2, D], each self-attention's ``attn_op.local_attn.proj_l`` [hd, hd] / [hd] (float32),
    ``img_emb`` and ``k_img`` / ``v_img`` / ``norm_k_img`` when ``config["image_dim"]`` is set. Floating tensors are
    bf16, as released. ``quantized``: the ``-quant`` layout, every Linear inside ``blocks`` but ``proj_l`` as
    ``int8_weight`` [N, K] + ``scale`` [ceil(N / 128), ceil(K / 128)] float32 + ``bias`` (bf16), quantized as
    TurboDiffusion does (per 128 x 128 block, amax = max(|block|, 1e-8), scale = amax / 128,
    int8 = saturate(round_half_even(w * 128 / amax))), and the block norms float32. ``training_layout``: the
    training checkpoint's ``{"state_dict": {"net." + key: tensor}}``.
    """
    gen = torch.Generator().manual_seed(seed)
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    dim, ffn, patch = heads * head_dim, config["ffn_dim"], math.prod(config.get("patch_size", (1, 2, 2)))
    image_dim = config.get("image_dim")

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(torch.bfloat16)

    def linear(name: str, out: int, inp: int, in_block: bool = False) -> dict[str, torch.Tensor]:
        weight, bias = torch.randn(out, inp, generator=gen) * inp**-0.5, randn(out, std=0.1)
        if quantized and in_block:
            int8_weight, scale = _quantize_blocks(weight.to(torch.bfloat16).float())
            return {f"{name}.int8_weight": int8_weight, f"{name}.scale": scale, f"{name}.bias": bias}
        return {f"{name}.weight": weight.to(torch.bfloat16), f"{name}.bias": bias}

    def norm(name: str, size: int, bias: bool = False, in_block: bool = False) -> dict[str, torch.Tensor]:
        dtype = torch.float32 if quantized and in_block else torch.bfloat16
        tensors = {f"{name}.weight": (1 + randn(size, std=0.1).float()).to(dtype)}
        return tensors | ({f"{name}.bias": randn(size, std=0.1).to(dtype)} if bias else {})

    state = {
        **linear("patch_embedding", dim, config["in_channels"] * patch),
        **linear("text_embedding.0", dim, config["text_dim"]),
        **linear("text_embedding.2", dim, dim),
        **linear("time_embedding.0", dim, config["freq_dim"]),
        **linear("time_embedding.2", dim, dim),
        **linear("time_projection.1", 6 * dim, dim),
    }
    for i in range(config["num_layers"]):
        block = f"blocks.{i}"
        for attention in ("self_attn", "cross_attn"):
            for name in ("q", "k", "v", "o") + (("k_img", "v_img") if attention == "cross_attn" and image_dim else ()):
                state |= linear(f"{block}.{attention}.{name}", dim, dim, in_block=True)
            for name in ("norm_q", "norm_k") + (("norm_k_img",) if attention == "cross_attn" and image_dim else ()):
                state |= norm(f"{block}.{attention}.{name}", dim, in_block=True)
        proj_l = f"{block}.self_attn.attn_op.local_attn.proj_l"
        state[f"{proj_l}.weight"] = torch.randn(head_dim, head_dim, generator=gen) * 0.05
        state[f"{proj_l}.bias"] = torch.randn(head_dim, generator=gen) * 0.05
        if config.get("cross_attn_norm", True):
            state |= norm(f"{block}.norm3", dim, bias=True, in_block=True)
        state |= linear(f"{block}.ffn.0", ffn, dim, in_block=True) | linear(f"{block}.ffn.2", dim, ffn, in_block=True)
        state[f"{block}.modulation"] = randn(1, 6, dim, std=dim**-0.5)
    state |= linear("head.head", config["out_channels"] * patch, dim)
    state["head.modulation"] = randn(1, 2, dim, std=dim**-0.5)
    if image_dim:
        state |= norm("img_emb.proj.0", image_dim, bias=True) | linear("img_emb.proj.1", image_dim, image_dim)
        state |= linear("img_emb.proj.3", dim, image_dim) | norm("img_emb.proj.4", dim, bias=True)
    return {"state_dict": {f"net.{key}": value for key, value in state.items()}} if training_layout else state


def _quantize_blocks(weight: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """TurboDiffusion's blockwise int8 quantization of a float32 [N, K] weight, one block at a time."""
    rows, cols = weight.shape
    int8_weight = torch.empty(rows, cols, dtype=torch.int8)
    scale = torch.empty(-(-rows // block), -(-cols // block))
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = weight[i * block : (i + 1) * block, j * block : (j + 1) * block]
            amax = max(float(tile.abs().max()), 1e-8)
            scale[i, j] = amax / 128
            quantized = torch.round(tile * (128 / amax)).clamp(-128, 127)
            int8_weight[i * block : (i + 1) * block, j * block : (j + 1) * block] = quantized.to(torch.int8)
    return int8_weight, scale
