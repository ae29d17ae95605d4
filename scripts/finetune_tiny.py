"""Fine-tune SLA into the embedded video model: proj_l learns to make up for the key blocks sparse attention skips.

Usage:
    python scripts/finetune_tiny.py    # sagesla/embedded/tiny-video.safetensors -> tiny-video-sla.safetensors
    python scripts/finetune_tiny.py --topk 0.05 --out /tmp/tiny-sla-0.05.safetensors
    python scripts/finetune_tiny.py --train proj_l --out /tmp/tiny-sla-proj_l.safetensors
    python scripts/finetune_tiny.py --smoke --out /tmp/sla.safetensors    # seconds on CPU: 2 blocks, random weights

The dense model (``--weights``) is patched with trainable SLA at ``--topk`` (``sagesla.patch(..., quantized=False)``,
64 x 64 blocks). Its ``proj_l`` starts at zero, so the student starts as plain block-sparse attention, and learns to
make up for the skipped blocks. Objective "distill" (default): the student's velocity regresses the frozen dense
model's on the same noisy inputs, which is what keeps the sampled videos close to the dense ones; "flow": the
flow-matching loss ``train_tiny.py`` trains with. ``--train all`` (default; the SLA paper's and TurboDiffusion's
way) fine-tunes every parameter of the transformer with SLA in place (at ``--transformer-lr``; proj_l at ``--lr``),
and the file then holds the whole model (11.5 MB); ``--train attention`` only the self-attention layers'
projections and QK-norms besides proj_l, ``--train proj_l`` only proj_l (6 x 4160 parameters).

Writes ``--out`` atomically: ``sagesla.load_sla_weights`` loads it after ``sagesla.patch``, ``sagesla demo`` compares
it; the metadata records topk, blocks, objective, what was trained, steps and the final loss.

``--checkpoint``, ``--checkpoint-every``, ``--resume`` and ``--stop-after`` split one run over several, as in
``train_tiny.py``: the state file holds the patched transformer, the optimizer, the schedule, the batch RNG and the
losses; a resumed run gives the same ``--weights``, ``--steps`` and settings, and ``--out`` is written only once all
``--steps`` are done.
"""

import argparse
import copy
import pathlib

import torch

import sagesla
from sagesla.calibration.sampling import DEFAULT_SHIFT
from sagesla.embedded import finetuned
from sagesla.embedded.checkpoint import TrainingCheckpoint, add_resume_arguments, check_resume_arguments, load_state
from sagesla.embedded.model import TINY_VIDEO_CONFIG, WEIGHTS, build, load
from sagesla.embedded.training import Batches, distillation_loss, fit, flow_matching_loss
from sagesla.patching.checkpoints import sla_parameters
from sagesla.settings import SLA_BLOCK_SIZES


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None, help=f"from train_tiny.py (default sagesla/embedded/{WEIGHTS.name})")
    parser.add_argument("--out", default=None, help=f"default sagesla/embedded/{finetuned.SLA_WEIGHTS.name} (shipped)")
    parser.add_argument("--topk", type=float, default=finetuned.DEFAULT_TOPK, help="fraction of key blocks kept")
    parser.add_argument("--objective", choices=finetuned.OBJECTIVES, default="distill")
    parser.add_argument("--train", choices=finetuned.TRAINED, default="all")
    parser.add_argument("--steps", type=int, default=2800)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of proj_l")
    parser.add_argument(
        "--transformer-lr", type=float, default=1e-4, help="with --train attention / all: the transformer's"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sigma-shift", type=float, default=DEFAULT_SHIFT, help="noise-level shift of the batches (train_tiny.py's)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="4 steps of batch 2 on CPU; 2 random blocks unless --weights"
    )
    add_resume_arguments(parser)
    args = parser.parse_args()
    if args.out is None and args.smoke:
        parser.error(f"--out is required with --smoke (the default is the shipped file, {finetuned.SLA_WEIGHTS})")
    check_resume_arguments(parser, args, args.out if args.out is not None else finetuned.SLA_WEIGHTS)
    return args


def trainable_groups(model: torch.nn.Module, train: str, lr: float, transformer_lr: float) -> list[dict]:
    """Optimizer groups of a patched model: its proj_l at ``lr``; with ``train="attention"`` the self-attention
    weights, with ``train="all"`` every other parameter, at ``transformer_lr``.

    Everything outside the groups is frozen (``requires_grad`` False).
    """
    projections = list(sla_parameters(model).values())
    chosen = {id(parameter) for parameter in projections}
    others = {
        "proj_l": [],
        "attention": list(finetuned.attention_parameters(model).values()),
        "all": [p for p in model.parameters() if id(p) not in chosen],
    }[train]
    model.requires_grad_(False)
    groups = [{"params": projections, "lr": lr}] + ([{"params": others, "lr": transformer_lr}] if others else [])
    for parameter in projections + others:
        parameter.requires_grad_(True)
    return groups


def main() -> None:
    args = parse_args()
    resume = load_state(args.resume) if args.resume else None
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.smoke:
        args.steps, args.batch = 4, 2
    torch.manual_seed(args.seed)
    if args.smoke and args.weights is None:
        model, prompts = build({**TINY_VIDEO_CONFIG, "num_layers": 2})
        model, prompts = model.to(device), prompts.to(device)
    else:
        model, prompts = load(args.weights or WEIGHTS, device)
    prompts.requires_grad_(False)
    teacher = copy.deepcopy(model).requires_grad_(False).eval() if args.objective == "distill" else None

    block_q, block_k = SLA_BLOCK_SIZES
    print(sagesla.patch(model, topk=args.topk, quantized=False, block_q=block_q, block_k=block_k))
    model.train()
    groups = trainable_groups(model, args.train, args.lr, args.transformer_lr)
    batches = Batches(args.batch, args.seed, device, sigma_shift=args.sigma_shift)

    def loss() -> torch.Tensor:
        batch = batches.draw(prompts)
        return flow_matching_loss(model, batch) if teacher is None else distillation_loss(model, teacher, batch)

    checkpoint = None
    if args.checkpoint is not None:
        # The frozen teacher is rebuilt from --weights (or the seed); these settings shape the loss beyond the file.
        settings = {"objective": args.objective, "topk": str(args.topk), "blocks": f"{block_q}x{block_k}"}
        modules = {"transformer": model, "prompts": prompts}
        checkpoint = TrainingCheckpoint(
            args.checkpoint, modules, batches, args.checkpoint_every, args.stop_after, settings
        )
    run = fit(loss, groups, args.steps, device, checkpoint, resume)
    if not run.finished:
        print(f"{run}; stopped: the state is in {args.checkpoint} (--resume it; --out comes after the last step)")
        return

    record = finetuned.Finetune(
        args.topk, block_q, block_k, args.objective, args.train, args.steps, round(run.final_loss, 6)
    )
    out = pathlib.Path(args.out) if args.out is not None else finetuned.SLA_WEIGHTS
    finetuned.save(out, model, prompts, record)
    print(f"{run}; wrote {out} ({out.stat().st_size / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
