"""The embedded model's fine-tuned SLA weights (``scripts/finetune_tiny.py`` writes them): where, what, how.

The file holds every SLA layer's ``proj_l`` under the model's own keys (``blocks.{i}.attn1.sla.proj_l.weight``
[D, D] and ``.bias`` [D], fp32), which ``sagesla.load_sla_weights`` reads after ``sagesla.patch``, and its
``Finetune`` settings plus the model config in the metadata. After ``--train all`` (the shipped file: the SLA way,
every parameter fine-tuned with SLA in place) it also holds the whole fine-tuned model as
``sagesla.embedded.model.load`` reads it (bf16, 11.5 MB); after ``--train attention`` the self-attention layers'
own weights (``transformer.blocks.{i}.attn1.{to_q,to_k,to_v,to_out.0,norm_q,norm_k}.*``, bf16: ``load_attention``
reads them).
"""

import dataclasses
import json
import os
import pathlib
from dataclasses import dataclass

import torch
from safetensors import safe_open
from torch import nn

from sagesla import validation
from sagesla.embedded.model import config_of, weights_tensors
from sagesla.files import save_file_atomic
from sagesla.patching.checkpoints import save_sla_weights, sla_parameters
from sagesla.patching.wan import is_self_attention

SLA_WEIGHTS = pathlib.Path(__file__).with_name("tiny-video-sla.safetensors")
DEFAULT_TOPK = 0.1
OBJECTIVES = ("distill", "flow")
TRAINED = ("proj_l", "attention", "all")
# Prefix of the transformer's own tensors in weights files (``sagesla.embedded.model.weights_tensors``).
TRANSFORMER = "transformer."


@dataclass(frozen=True)
class Finetune:
    """How a fine-tune ran.

    Attributes:
        topk: fraction of key blocks the trainable SLA kept, in (0, 1].
        block_q, block_k: its query / key block rows.
        objective: "distill" (towards the dense model's velocity) or "flow" (flow matching).
        train: "proj_l" (only the linear branches' projections), "attention" (the self-attention layers too) or
            "all" (the whole transformer too).
        steps: optimizer steps.
        final_loss: mean loss of the last steps.
    """

    topk: float
    block_q: int
    block_k: int
    objective: str
    train: str
    steps: int
    final_loss: float

    def __post_init__(self):
        validation.check_topk(self.topk)
        validation.check_block_sizes(block_q=self.block_q, block_k=self.block_k)
        validation.check_choice("objective", self.objective, OBJECTIVES)
        validation.check_choice("train", self.train, TRAINED)

    def metadata(self) -> dict[str, str]:
        """The fields as safetensors metadata entries, one each."""
        return {field.name: str(getattr(self, field.name)) for field in dataclasses.fields(self)}


def attention_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """State-dict key -> parameter of every self-attention layer's own weights (projections, QK-norms; not SLA's)."""
    return {
        f"{name}.{key}": parameter
        for name, module in model.named_modules()
        if is_self_attention(module)
        for key, parameter in module.named_parameters()
        if not key.startswith("sla.")
    }


def save(path: str | os.PathLike, model: nn.Module, prompts: nn.Module, finetune: Finetune) -> None:
    """Write the fine-tune of ``model`` (patched with trainable SLA) to ``path``, atomically.

    ``finetune.train == "attention"`` adds the self-attention weights (bf16, under ``TRANSFORMER``), ``"all"`` the
    transformer and the prompt embedding (``model.weights_tensors``).
    """
    metadata = finetune.metadata() | {"config": json.dumps(config_of(model))}
    if finetune.train == "proj_l":
        save_sla_weights(model, path, metadata)
        return
    tensors = {key: parameter.detach().to("cpu").contiguous() for key, parameter in sla_parameters(model).items()}
    if finetune.train == "attention":
        tensors |= {
            TRANSFORMER + key: parameter.detach().to("cpu", torch.bfloat16).contiguous()
            for key, parameter in attention_parameters(model).items()
        }
    else:
        tensors |= weights_tensors(model, prompts)
    save_file_atomic(tensors, path, metadata)


def load_attention(model: nn.Module, path: str | os.PathLike) -> None:
    """Load the self-attention weights of an ``--train attention`` file into ``model`` (patched or not).

    Raises:
        ValueError: the file's self-attention weights do not match the model's, key for key and shape for shape.
    """
    from safetensors.torch import load_file

    state = {k.removeprefix(TRANSFORMER): v for k, v in load_file(path).items() if k.startswith(TRANSFORMER)}
    ours = attention_parameters(model)
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    if shapes != {key: tuple(parameter.shape) for key, parameter in ours.items()}:
        raise ValueError(f"`sla_weights` {str(path)!r}: its self-attention weights do not fit the model")
    with torch.no_grad():
        for key, parameter in ours.items():
            parameter.copy_(state[key])


def read(path: str | os.PathLike) -> Finetune:
    """The ``Finetune`` a file records.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file records no fine-tune (it was not written by ``scripts/finetune_tiny.py``).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`sla_weights` must be a file written by scripts/finetune_tiny.py, got {str(path)!r}")
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
    fields = dataclasses.fields(Finetune)
    missing = [field.name for field in fields if field.name not in metadata]
    if missing:
        raise ValueError(
            f"`sla_weights` {str(path)!r} records no fine-tune (metadata lacks {missing}): "
            "it was not written by scripts/finetune_tiny.py"
        )
    return Finetune(**{field.name: field.type(metadata[field.name]) for field in fields})
