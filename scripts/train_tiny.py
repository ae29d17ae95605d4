"""Train the embedded video model with flow matching on procedural moving-shape videos.

Usage (the shipped weights: ``make train-tiny``, this then ``finetune_tiny.py``; 7.8 + 4.8 min on an H100):
    python scripts/train_tiny.py --out sagesla/embedded/tiny-video.safetensors   # 6000 steps of batch 32
    python scripts/train_tiny.py --init stage1.safetensors --steps 3000 --out more.safetensors   # a second stage
    python scripts/train_tiny.py --smoke --out /tmp/tiny.safetensors    # a few CPU steps of a 2-block model

Each step draws a batch of prompts and renders fresh videos (``sagesla.embedded.training.Batches``), folds them
into the trivial latent space, and regresses the flow velocity ``noise - x0`` at sigma drawn from a logit-normal
shifted as the sampler's scheduler shifts its timesteps (``--sigma-shift 3``, ``DEFAULT_SHIFT``; timestep = 1000
sigma, diffusers' flow-matching convention, as ``sagesla.calibration.sampling.denoise`` samples), with 10 % of the
prompts dropped to the null prompt so classifier-free guidance can be used.
Writes one safetensors file (transformer under ``transformer.``, prompt embedding under ``prompts.``) atomically,
with the config, the steps (summed over ``--init`` stages) and the final loss in its metadata. ``--init`` continues
from a file this script wrote (its config), with a fresh optimizer and schedule.

Split one run over several (each ending cleanly within a time limit), ending where one uninterrupted run would:
    python scripts/train_tiny.py --out stage1.safetensors --checkpoint state.safetensors --stop-after 2000
    python scripts/train_tiny.py --out stage1.safetensors --resume state.safetensors --stop-after 2000
    python scripts/train_tiny.py --out stage1.safetensors --resume state.safetensors     # the last 1500 steps
``--checkpoint`` writes the training state (weights, optimizer, schedule, batch RNG, losses;
``sagesla.embedded.checkpoint``) every ``--checkpoint-every`` steps and when the run stops; ``--resume`` continues
it (same ``--steps`` and settings, and ``--init`` if the run had one) and keeps writing to it. ``--out`` is written
only once all ``--steps`` are done.
"""

import argparse
import json

import torch

from sagesla.calibration.sampling import DEFAULT_SHIFT
from sagesla.embedded.checkpoint import TrainingCheckpoint, add_resume_arguments, check_resume_arguments, load_state
from sagesla.embedded.model import TINY_VIDEO_CONFIG, build, config_of, load, weights_tensors
from sagesla.embedded.training import Batches, fit, flow_matching_loss
from sagesla.files import save_file_atomic


def _steps_of(path: str) -> int:
    """Training steps a weights file records."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        return int((handle.metadata() or {}).get("steps", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--text-dropout", type=float, default=0.1, help="zero a sample's prompt with this probability (for guidance)"
    )
    parser.add_argument(
        "--sigma-shift",
        type=float,
        default=DEFAULT_SHIFT,
        help="shift the logit-normal noise levels as the sampler's scheduler does (1: no shift)",
    )
    parser.add_argument("--init", help="continue from weights this script wrote (default: fresh random weights)")
    parser.add_argument("--smoke", action="store_true", help="2 blocks, 4 steps of batch 2, on CPU")
    add_resume_arguments(parser)
    args = parser.parse_args()
    check_resume_arguments(parser, args, args.out)
    resume = load_state(args.resume) if args.resume else None
    config = dict(TINY_VIDEO_CONFIG)
    if args.smoke:
        config["num_layers"], args.steps, args.batch = 2, 4, 2
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    torch.manual_seed(args.seed)
    earlier = 0
    if args.init:
        model, prompts = load(args.init, device)
        config, earlier = config_of(model), _steps_of(args.init)
    else:
        model, prompts = build(config)
    model.to(device).train()
    prompts.to(device).train()
    batches = Batches(args.batch, args.seed, device, args.text_dropout, args.sigma_shift)
    groups = [{"params": [*model.parameters(), *prompts.parameters()], "lr": args.lr}]
    checkpoint = None
    if args.checkpoint is not None:
        modules = {"transformer": model, "prompts": prompts}
        checkpoint = TrainingCheckpoint(args.checkpoint, modules, batches, args.checkpoint_every, args.stop_after)
    run = fit(lambda: flow_matching_loss(model, batches.draw(prompts)), groups, args.steps, device, checkpoint, resume)
    if not run.finished:
        print(f"{run}; stopped: the state is in {args.checkpoint} (--resume it; --out comes after the last step)")
        return
    steps = str(earlier + args.steps)
    metadata = {"config": json.dumps(config), "steps": steps, "final_loss": f"{run.final_loss:.5f}"}
    metadata["text_dropout"], metadata["sigma_shift"] = str(args.text_dropout), str(args.sigma_shift)
    save_file_atomic(weights_tensors(model, prompts), args.out, metadata)
    print(f"{run}; wrote {args.out}")


if __name__ == "__main__":
    main()
