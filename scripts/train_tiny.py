"""Train the embedded video model with flow matching on procedural moving-shape videos.

Usage:
    python scripts/train_tiny.py --out sagesla/embedded/tiny-video.safetensors [--steps 4000 --batch 32]
    python scripts/train_tiny.py --smoke --out /tmp/tiny.safetensors    # a few CPU steps of a 2-block model

Each step draws a batch of prompts and renders fresh videos (``sagesla.embedded.videos``), folds them into the
trivial latent space, and regresses the flow velocity ``noise - x0`` at sigma drawn from a logit-normal (timestep =
1000 sigma, diffusers' flow-matching convention, as ``sagesla.calibration.sampling.denoise`` samples). Writes one
safetensors file (transformer under ``transformer.``, prompt embedding under ``prompts.``) atomically, with the
config and the final loss in its metadata.
"""

import argparse
import json
import random
import time

import torch
from tqdm import tqdm

from sagesla.embedded.model import TINY_VIDEO_CONFIG, build
from sagesla.embedded.videos import PROMPTS, render, to_latent
from sagesla.patching.checkpoints import save_file_atomic


def flow_matching_loss(model, prompts_module, prompts: list[str], generator: torch.Generator, device) -> torch.Tensor:
    """Mean squared error of the predicted velocity on one batch of fresh videos."""
    x0 = to_latent(render(prompts, generator=generator)).to(device)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    sigma = torch.sigmoid(torch.randn(len(prompts), generator=generator)).to(device)
    x = sigma[:, None, None, None, None] * noise + (1 - sigma[:, None, None, None, None]) * x0
    velocity = model(x, sigma * 1000, prompts_module(prompts), return_dict=False)[0]
    return torch.nn.functional.mse_loss(velocity.float(), (noise - x0).float())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="2 blocks, 4 steps of batch 2, on CPU")
    args = parser.parse_args()
    config = dict(TINY_VIDEO_CONFIG)
    if args.smoke:
        config["num_layers"], args.steps, args.batch = 2, 4, 2
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    torch.manual_seed(args.seed)
    model, prompts_module = build(config)
    model.to(device).train()
    prompts_module.to(device)
    parameters = [*model.parameters(), *prompts_module.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    generator, picker = torch.Generator().manual_seed(args.seed), random.Random(args.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
    start, losses = time.perf_counter(), []
    bar = tqdm(range(args.steps), desc="training", unit="step")
    for _ in bar:
        with autocast:
            loss = flow_matching_loss(model, prompts_module, picker.choices(PROMPTS, k=args.batch), generator, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    minutes = (time.perf_counter() - start) / 60
    final = sum(losses[-50:]) / len(losses[-50:])
    tensors = {f"transformer.{k}": v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    tensors |= {f"prompts.{k}": v.detach().contiguous() for k, v in prompts_module.state_dict().items()}
    metadata = {"config": json.dumps(config), "steps": str(args.steps), "final_loss": f"{final:.5f}"}
    save_file_atomic(tensors, args.out, metadata)
    print(f"{args.steps} steps in {minutes:.1f} min on {device}; loss {losses[0]:.4f} -> {final:.4f}; wrote {args.out}")


if __name__ == "__main__":
    main()
