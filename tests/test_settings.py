"""``SLASettings``: validated once when built, resolved per device in one place, handed whole to every entry point."""

import copy
import dataclasses
import inspect

import pytest
import torch

import sagesla
from sagesla import ops
from sagesla.modules import sla_module
from sagesla.settings import SLASettings


@pytest.mark.parametrize(
    "changes,error,message",
    [
        ({"quantized": 1}, TypeError, r"`quantized` must be a bool, got int 1"),
        ({"feature_map": "gelu"}, ValueError, r"`feature_map` must be one of \('softmax', 'elu', 'relu'\)"),
        ({"linear_scope": "some"}, ValueError, r"`linear_scope` must be one of"),
        ({"block_q": 0}, ValueError, r"`block_q` must be a positive int"),
        ({"block_k": 64.0}, ValueError, r"`block_k` must be a positive int"),
        ({"sm_scale": -1.0}, ValueError, r"`sm_scale` must be positive"),
        ({"tensor_layout": "BHLD"}, ValueError, r"`tensor_layout` must be one of \('HND', 'NHD'\)"),
        ({"compute_dtype": torch.float32}, ValueError, r"`compute_dtype` must be one of"),
        ({"pv_precision": "int8"}, ValueError, r"`pv_precision` must be one of \('auto', 'fp8', 'half'\)"),
        ({"backend": "cuda"}, ValueError, r"`backend` must be one of \('auto', 'torch', 'triton'\)"),
    ],
    ids=lambda value: next(iter(value)) if isinstance(value, dict) else None,
)
def test_bad_fields_raise_naming_them_when_built_or_replaced(changes, error, message):
    with pytest.raises(error, match=message):
        SLASettings(**changes)
    with pytest.raises(error, match=message):
        SLASettings().replace(**changes)


def test_frozen_hashable_and_resolved_in_one_place():
    settings = SLASettings(sm_scale=1)
    assert isinstance(settings.sm_scale, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.backend = "torch"
    cpu = torch.device("cpu")
    resolved = settings.resolve(cpu)
    assert (resolved.block_q, resolved.block_k, resolved.pv_precision) == (128, 64, "fp8")
    assert settings.resolve(cpu) == resolved and len({resolved, settings.resolve(cpu)}) == 1
    assert SLASettings(quantized=False).resolve(cpu).default_block_sizes(cpu) == (64, 64)
    given = SLASettings(block_q=32, block_k=256, pv_precision="half").resolve(cpu)
    assert (given.block_q, given.block_k, given.pv_precision) == (32, 256, "half")


def test_functional_module_and_settings_compute_the_same():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 200, 64) for _ in range(3))
    settings = SLASettings(feature_map="elu", block_q=64, block_k=64, backend="torch", compute_dtype=torch.bfloat16)
    module = sla_module(64, 0.5, settings)
    assert isinstance(module, sagesla.SageSparseLinearAttention) and module.settings == settings
    assert (module.BLKQ, module.BLKK, module.feature_map, module.dtype) == (64, 64, "elu", torch.bfloat16)
    with torch.no_grad():
        module.proj_l.weight.normal_(0, 0.05)
        by_module = module(q, k, v)
        by_function = sagesla.sparse_linear_attn(
            q, k, v, topk=0.5, proj_weight=module.proj_l.weight, proj_bias=module.proj_l.bias, feature_map="elu",
            block_q=64, block_k=64, backend="torch", compute_dtype=torch.bfloat16,
        )  # fmt: skip
        by_ops = ops.attend(q, k, v, 0.5, settings, module.proj_l.weight, module.proj_l.bias)
    assert torch.equal(by_module, by_function) and torch.equal(by_module, by_ops)
    thu_ml = sagesla.SageSparseLinearAttention(64, 0.5, "elu", 64, 64, backend="torch")
    assert thu_ml.settings == settings
    trainable = sla_module(64, 0.5, SLASettings(quantized=False))
    assert type(trainable) is sagesla.SparseLinearAttention and trainable.proj_l.weight.requires_grad


def test_patch_takes_every_module_setting():
    """Each constructor setting of the modules is a keyword of ``patch`` or a field of the ``settings`` it takes."""
    module_settings = set()
    for module in (sagesla.SparseLinearAttention, sagesla.SageSparseLinearAttention):
        module_settings |= set(inspect.signature(module).parameters)
    patch_keywords = set(inspect.signature(sagesla.patch).parameters)
    thu_ml_names = {"BLKQ": "block_q", "BLKK": "block_k", "use_bf16": "compute_dtype"}
    # head_dim comes from each layer, tensor_layout is the processor's, tie_feature_map_qk changes nothing.
    fixed = {"head_dim", "tensor_layout", "tie_feature_map_qk"}
    missing = {thu_ml_names.get(name, name) for name in module_settings - fixed} - patch_keywords
    assert not missing, missing


def test_patch_with_settings_equals_patch_with_keywords():
    pytest.importorskip("diffusers")
    from sagesla.wan_shapes import run_wan, tiny_wan_transformer, wan_inputs

    inputs, base = wan_inputs(), tiny_wan_transformer()
    outputs = []
    for how in ("keywords", "settings"):
        model = copy.deepcopy(base)
        if how == "keywords":
            sagesla.patch(model, topk=0.5, backend="torch", feature_map="elu", pv_precision="half")
        else:
            settings = SLASettings(backend="torch", feature_map="elu", pv_precision="half")
            sagesla.patch(model, topk=0.5, settings=settings)
        sla = model.blocks[0].attn1.sla
        assert sla.settings.tensor_layout == "NHD" and sla.pv_precision == "half"
        outputs.append(run_wan(model, inputs))
    assert torch.equal(*outputs)
    with pytest.raises(ValueError, match=r"give `settings` or the keywords it holds, not both: .*\['backend'\]"):
        sagesla.patch(tiny_wan_transformer(), topk=0.5, settings=SLASettings(), backend="torch")
    with pytest.raises(TypeError, match=r"`settings` must be a sagesla.SLASettings or None, got dict"):
        sagesla.patch(tiny_wan_transformer(), topk=0.5, settings={"backend": "torch"})
