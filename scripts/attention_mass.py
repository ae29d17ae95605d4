"""How much attention do a few key blocks hold? Per layer of the embedded model, sampled densely.

Usage:
    python scripts/attention_mass.py [--weights sagesla/embedded/tiny-video.safetensors] [--topk 0.05 0.1 0.2]

SLA keeps the top ``topk`` key blocks of each query block for softmax attention and hands the rest to its linear
branch, so it serves a model well where those blocks hold most of each query's attention probability. This samples
the demo's prompts with dense attention (``sagesla.calibration.sampling.denoise``), reads every self-attention call's
Q and K (diffusers' native attention calls ``F.scaled_dot_product_attention``), and prints per layer the mean share
of a query row's probability mass inside its query block's S kept key blocks: chosen by SLA's pooled scores
(``select_blocks_ref``) and, as a bound no selector can pass, the S blocks holding the most mass. Dense attention
over L tokens is formed per call (L x L per head, float64): meant for the embedded model's 2048 tokens (CPU or GPU).
"""

import argparse
import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from sagesla.calibration.sampling import denoise
from sagesla.embedded.demo import DEMO_PROMPTS
from sagesla.embedded.model import LATENT_SHAPE, WEIGHTS, load
from sagesla.kernels.block_select_ref import num_selected_blocks, select_blocks_ref
from sagesla.kernels.blocks_ref import to_blocks


def block_mass(q: torch.Tensor, k: torch.Tensor, block: int, topk: float) -> tuple[float, float]:
    """(selected, best): mean share of a query row's softmax mass in its block's kept key blocks.

    Args:
        q, k: [B, H, L, D] with L a multiple of ``block``; softmax scale D^-0.5, no mask.
        block: rows per query and key block.
        topk: fraction of key blocks kept (SLA's rule: ``num_selected_blocks``).
    Returns:
        the share for SLA's pooled-score selection and for the S blocks of most mass, each in [0, 1].
    """
    q, k = q.double(), k.double()
    p = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)  # [B, H, L, L]
    n = q.shape[-2] // block
    # [B, H, NQ, NK]: per query block, each key block's mass summed over its keys, averaged over the block's rows
    mass = p.unflatten(-1, (n, block)).sum(-1).unflatten(-2, (n, block)).mean(-2)
    selected = num_selected_blocks(topk, n)
    lut = select_blocks_ref(to_blocks(q, block).mean(-2), to_blocks(k, block).mean(-2), topk)
    chosen = mass.gather(-1, lut.long()).sum(-1)
    best = mass.topk(selected, dim=-1).values.sum(-1)
    return float(chosen.mean()), float(best.mean())


@contextlib.contextmanager
def self_attention_calls() -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Inside the block, every ``F.scaled_dot_product_attention`` call with as many keys as queries appends its
    (q, k) [B, H, L, D] to the yielded list (cross-attention, over the 4 text tokens, is left out)."""
    calls, sdpa = [], F.scaled_dot_product_attention

    def spy(query, key, *args, **kwargs):
        if query.shape[-2] == key.shape[-2]:
            calls.append((query.detach(), key.detach()))
        return sdpa(query, key, *args, **kwargs)

    F.scaled_dot_product_attention = spy
    try:
        yield calls
    finally:
        F.scaled_dot_product_attention = sdpa


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=str(WEIGHTS))
    parser.add_argument("--topk", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    model, embed = load(args.weights, args.device)
    noise = torch.randn(len(DEMO_PROMPTS), *LATENT_SHAPE, generator=torch.Generator().manual_seed(0))
    noise = noise.to(args.device)
    layers = len(model.blocks)
    with torch.no_grad(), self_attention_calls() as calls:
        denoise(model, noise, embed(list(DEMO_PROMPTS)), args.steps)
    tokens = calls[0][0].shape[-2]
    print(
        f"{len(calls)} self-attention calls ({layers} layers x {args.steps} steps), {tokens} tokens, block {args.block}"
    )
    for topk in args.topk:
        shares = torch.tensor([block_mass(q, k, args.block, topk) for q, k in calls]).view(args.steps, layers, 2)
        kept = num_selected_blocks(topk, tokens // args.block)
        per_layer = " ".join(f"{s:.2f}" for s in shares[..., 0].mean(0).tolist())
        print(
            f"topk {topk} ({kept} of {tokens // args.block} key blocks): mass kept by SLA's selection "
            f"{float(shares[..., 0].mean()):.3f} (per layer {per_layer}), at most {float(shares[..., 1].mean()):.3f}"
        )


if __name__ == "__main__":
    main()
