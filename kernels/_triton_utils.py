"""Small helpers shared by the Triton kernel families, and the shared constants as compile-time values."""

import os

import triton
import triton.language as tl

from sagesla.kernels import constants

# Under the interpreter bf16 dots and some casts are wrong (docs/testing.md): kernels upcast when this is set.
IS_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# constants.py's numbers as compile-time values of the kernels.
LOG2E = tl.constexpr(constants.LOG2E)
LN2 = tl.constexpr(constants.LN2)
DENOM_EPS = tl.constexpr(constants.DENOM_EPS)
INT8_MAX = tl.constexpr(constants.INT8_MAX)
FP8_MAX = tl.constexpr(constants.FP8_MAX)
SCALE_FLOOR = tl.constexpr(constants.SCALE_FLOOR)

FEATURE_MAP_IDS = {"softmax": 0, "elu": 1, "relu": 2}


def padded_head_dim(head_dim: int) -> int:
    """Head dims run as the next power of two, at least 32 (the INT8 dot's minimum K)."""
    return max(32, triton.next_power_of_2(head_dim))


def even_tiles(length: int, block_q: int, block_k: int, head_dim: int) -> bool:
    """Whether every query and key tile is whole and D needs no padding, so loads can go unmasked."""
    return length % block_q == 0 and length % block_k == 0 and head_dim == padded_head_dim(head_dim)


@triton.jit
def feature_map_unnormalized(x, m_d, FEATURE: tl.constexpr):
    """(f [N, DP], n [N]) with phi(x) = f / n over the last dim of x [N, DP]: n is the softmax map's row sum (1 for
    the others), so a caller can fold 1 / n into a later per-row scale. Padded columns (m_d False) of f are 0."""
    # exp as exp2 (tl.exp adds subnormal handling around each exponential on the GPU)
    if FEATURE == 0:
        x = tl.where(m_d[None, :], x, float("-inf"))
        f = tl.exp2((x - tl.max(x, axis=1)[:, None]) * LOG2E)
    elif FEATURE == 1:
        f = tl.where(x > 0, x + 1.0, tl.exp2(x * LOG2E))
    else:
        # NaN stays NaN (the default max would drop it on the GPU: a NaN key would vanish from the linear state).
        f = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)
    f = tl.where(m_d[None, :], f, 0.0)
    if FEATURE == 0:
        n = tl.sum(f, axis=1)
    else:
        n = tl.full([x.shape[0]], 1.0, dtype=tl.float32)
    return f, n


@triton.jit
def feature_map(x, m_d, FEATURE: tl.constexpr):
    """phi of SLA's linear branch over the last dim of x [N, DP]; padded columns (m_d False) come out 0."""
    f, n = feature_map_unnormalized(x, m_d, FEATURE)
    if FEATURE == 0:
        f = f / n[:, None]
    return f


@triton.jit
def fp8e4m3_round_interpret(x):
    """Round fp32 to the nearest e4m3 value (ties to even, as the hardware), in fp32 arithmetic, clamped to +-448.

    Only for the interpreter, whose fp32 -> e4m3 cast mis-rounds about a tenth of values (often halving them);
    after this the cast receives exact e4m3 values. On the GPU the hardware cast rounds correctly.
    """
    exponent = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    quantum = tl.exp2((tl.maximum(exponent, -6) - 3).to(tl.float32))
    steps = tl.abs(x) / quantum
    nearest = tl.floor(steps + 0.5)
    is_odd_tie = (nearest - steps == 0.5) & (nearest - 2.0 * tl.floor(nearest * 0.5) == 1.0)
    y = tl.where(is_odd_tie, nearest - 1.0, nearest) * quantum
    return tl.where(x < 0, -1.0, 1.0) * tl.minimum(y, FP8_MAX)


@triton.jit
def head_base(x, i_bh, H, s_b, s_h):
    """Pointer to row 0 of head ``i_bh`` (= b * H + h) of a strided [B, H, L, D] view; 64-bit offsets."""
    return x + (i_bh // H).to(tl.int64) * s_b + (i_bh % H).to(tl.int64) * s_h


@triton.jit
def tile_ptrs(base, o_t, s_l, o_d):
    """Pointers [len(o_t), len(o_d)] to rows ``o_t`` (stride ``s_l``) and unit-stride columns ``o_d`` of ``base``."""
    return base + o_t.to(tl.int64)[:, None] * s_l + o_d[None, :]


@triton.jit
def feature_map_vjp(x, phi, g, FEATURE: tl.constexpr):
    """Gradient with respect to x [N, DP] of ``sum(g * feature_map(x))``, given phi = feature_map(x) (fp32)."""
    if FEATURE == 0:
        dx = phi * (g - tl.sum(g * phi, axis=1)[:, None])
    elif FEATURE == 1:
        # d/dx (elu(x) + 1) is 1 above zero and exp(x) = phi below.
        dx = tl.where(x > 0, g, g * phi)
    else:
        dx = tl.where(x > 0, g, 0.0)
    return dx


@triton.jit
def dot(a, b, IS_INTERPRET: tl.constexpr):
    """``a @ b`` with fp32 accumulation; the interpreter gets fp32 operands (its bf16 dot is wrong)."""
    if IS_INTERPRET:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def load_rows(base, o_t, s_l, o_d, L, D: tl.constexpr, EVEN: tl.constexpr):
    """Tile [len(o_t), DP] of rows ``o_t`` of ``base``; rows >= L and columns >= D read 0 unless ``EVEN``
    (every row real and D a power of two), where the load is unmasked."""
    p = tile_ptrs(base, o_t, s_l, o_d)
    if EVEN:
        x = tl.load(p)
    else:
        x = tl.load(p, mask=(o_t < L)[:, None] & (o_d < D)[None, :], other=0.0)
    return x
