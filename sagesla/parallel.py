"""Sequence-parallel sampling of a patched Wan model on N GPUs: diffusers' Ulysses context parallelism.

Every rank holds the whole model and S / N tokens of each sequence. At each self-attention, diffusers' Ulysses
all-to-all hands every rank all S tokens of H / N heads, SLA runs on them as on one GPU, and a second all-to-all
hands the tokens back. SLA's block selection, quantisation and linear branch are per head over the whole sequence,
so each head's output equals the one-GPU output; the layer's topk (profile and timestep bucket included) and its
``proj_l``, one [D, D] map shared by all heads, apply unchanged on every rank. Ring attention would split the keys
themselves across ranks, so SLA does not serve it (those calls run diffusers' dense ring attention, logged once).

Usage, one process per GPU (``torchrun --nproc-per-node N script.py``)::

    torch.distributed.init_process_group("nccl")
    torch.cuda.set_device(torch.distributed.get_rank())
    model = WanTransformer3DModel.from_pretrained(...).to("cuda")
    sagesla.patch(model, profile="profile.safetensors")  # before or after enable_ulysses
    sagesla.parallel.enable_ulysses(model)                # import sagesla.parallel; all ranks of the world
    latent = model(latent, t, text, return_dict=False)[0]  # same inputs on every rank; output gathered on each
"""

import torch

from sagesla import validation
from sagesla.patching.wan import is_self_attention


def enable_ulysses(model: torch.nn.Module, degree: int | None = None, *, uneven: bool = False):
    """Turn on diffusers' Ulysses context parallelism for a (patched or not) ``WanTransformer3DModel``.

    Args:
        model: the transformer, already on this rank's device; ``torch.distributed`` must be initialised.
        degree: ranks one sequence is spread over (default: the world size).
        uneven: allow head counts and sequence lengths that ``degree`` does not divide (diffusers'
            ``ulysses_anything``: padded all-to-all, slower).
    Returns:
        the model's diffusers ``ParallelConfig``.

    Wan's context-parallel plan also splits the timestep when it is per token (Wan2.2 TI2V, [B, S]); diffusers
    0.42.1 crashes on Wan2.1's [B] timesteps there unless ``transformers`` was imported, so that entry is left out:
    call diffusers' ``model.enable_parallelism`` yourself for per-token timesteps.
    """
    from diffusers import WanTransformer3DModel
    from diffusers.models._modeling_parallel import ContextParallelConfig

    if not isinstance(model, WanTransformer3DModel):
        raise TypeError(f"`model` must be a diffusers WanTransformer3DModel, got {type(model).__name__}")
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError("enable_ulysses needs torch.distributed initialised (init_process_group) on every rank")
    world = torch.distributed.get_world_size()
    degree = world if degree is None else degree
    if not validation.is_number(degree, int) or not 2 <= degree <= world:
        raise ValueError(f"`degree` must be an int in [2, world size {world}], got {degree!r}")
    if not uneven:
        for name, module in model.named_modules():
            if is_self_attention(module) and module.heads % degree:
                raise ValueError(
                    f"`degree` {degree} must divide the {module.heads} heads of {name} (or pass uneven=True)"
                )
    plan = {name: entry for name, entry in model._cp_plan.items() if name != ""}
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree, ulysses_anything=uneven), cp_plan=plan)
    return model._parallel_config
