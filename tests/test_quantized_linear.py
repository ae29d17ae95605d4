"""sagesla.quantize_linear on a tiny diffusers WanTransformer3DModel patched with SLA: which layers torchao
quantizes, how far the output moves, patch order, torch.compile, and the argument checks."""

import copy

import pytest
import torch
from torch import nn

import sagesla
from sagesla import metrics
from sagesla.quantized_linear import OUTSIDE_BLOCKS, PROJ_L, quantize_linear
from sagesla.settings import SLASettings
from sagesla.testing import assert_close
from sagesla.wan_shapes import run_wan, wan_inputs

pytest.importorskip("diffusers")
pytest.importorskip("torchao")

# The tiny Wan's layers are 128 wide and its proj_l 64 x 64: min_features=16 lets proj_l pass the size rule, so
# only its being SLA's keeps it exact.
MIN_FEATURES = 16
# rel-L1 of the int8 W8A8 model against the unquantized one (both patched, topk 0.5, torch backend), measured over
# seeds 0-3 on CPU: 1.4e-3 to 1.7e-3.
TOL_INT8 = 5e-3
# torch.compile (aot_eager) against eager on the same quantized model: the same ops, measured 0.
TOL_COMPILED = 1e-6
BLOCK_LINEARS = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ffn.net.0.proj",
    "ffn.net.2",
)
OUTSIDE = (
    "condition_embedder.time_embedder.linear_1",
    "condition_embedder.time_embedder.linear_2",
    "condition_embedder.time_proj",
    "condition_embedder.text_embedder.linear_1",
    "condition_embedder.text_embedder.linear_2",
    "proj_out",
)


def _block_linears(blocks: int = 2) -> tuple[str, ...]:
    return tuple(f"blocks.{i}.{name}" for i in range(blocks) for name in BLOCK_LINEARS)


def _patch(model: nn.Module) -> None:
    sagesla.patch(model, topk=0.5, settings=SLASettings(backend="torch"))


def _random_proj_l(model: nn.Module) -> None:
    """Non-zero proj_l, so the linear branch counts in the output and "left exact" means something."""
    for name, parameter in model.named_parameters():
        if ".proj_l." in name:
            parameter.data.normal_(0, 0.1)


@pytest.fixture
def patched(tiny_wan):
    _patch(tiny_wan)
    _random_proj_l(tiny_wan)
    return tiny_wan


def test_int8_quantizes_exactly_the_block_linears(patched):
    before = {name: p.detach().clone() for name, p in patched.named_parameters()}
    proj_l = [f"blocks.{i}.attn1.sla.proj_l" for i in range(2)]
    report = quantize_linear(patched, "int8", min_features=MIN_FEATURES)
    assert report.mode == "int8" and report.config == "Int8DynamicActivationInt8WeightConfig"
    assert report.quantized == _block_linears()
    assert report.skipped == dict.fromkeys(OUTSIDE, OUTSIDE_BLOCKS) | dict.fromkeys(proj_l, PROJ_L)
    modules = dict(patched.named_modules())
    for name in report.quantized:
        assert type(modules[name].weight) not in (torch.Tensor, nn.Parameter), name
    # Everything but the block linears' weights (proj_l, embeddings, proj_out, norms, biases) is as it was.
    quantized_weights = {f"{name}.weight" for name in report.quantized}
    for name, parameter in patched.named_parameters():
        if name not in quantized_weights:
            assert type(parameter) is nn.Parameter and torch.equal(parameter, before[name]), name
    assert type(patched.patch_embedding.weight) is nn.Parameter


def test_report_counts_the_bytes(patched):
    shapes = {name: module.weight.shape for name, module in patched.named_modules() if isinstance(module, nn.Linear)}
    fp32_bytes = sum(p.numel() * 4 for p in patched.parameters())
    report = quantize_linear(patched, "int8", min_features=MIN_FEATURES)
    assert report.bytes_before == fp32_bytes
    # Each quantized weight [out, in] went from 4 bytes an element to 1, plus per-row scales (and zero points):
    # between 0 and 16 bytes a row.
    kept = fp32_bytes - sum(4 * shapes[name].numel() for name in report.quantized)
    int8_bytes = sum(shapes[name].numel() for name in report.quantized)
    rows = sum(shapes[name][0] for name in report.quantized)
    assert kept + int8_bytes < report.bytes_after <= kept + int8_bytes + 16 * rows
    text = str(report).splitlines()
    assert text[0].startswith("sagesla.quantize_linear: 20 linear layer(s) -> int8 (Int8DynamicActivationInt8Weight")
    assert text[1].startswith("  quantized 20: blocks.0.attn1.to_q, ") and text[1].endswith("(20 in all)")
    assert text[2].startswith(f"  skipped 6, {OUTSIDE_BLOCKS}: condition_embedder.time_embedder.linear_1, ")
    assert text[3] == f"  skipped 2, {PROJ_L}: blocks.0.attn1.sla.proj_l, blocks.1.attn1.sla.proj_l"


def test_int8_output_close_to_unquantized(patched):
    inputs = wan_inputs()
    expected = run_wan(patched, inputs)
    assert quantize_linear(patched, min_features=MIN_FEATURES).mode == "int8"  # "auto" on CPU
    out = run_wan(patched, inputs)
    assert_close("int8 linear", expected, out, TOL_INT8)
    assert metrics.rel_l1(out, expected) > 0  # the linears did change


def test_patch_after_quantize_matches_patch_before(tiny_wan):
    inputs = wan_inputs()
    other = copy.deepcopy(tiny_wan)
    _patch(tiny_wan)
    first = quantize_linear(tiny_wan, "int8", min_features=MIN_FEATURES)
    second = quantize_linear(other, "int8", min_features=MIN_FEATURES)
    _patch(other)
    assert first.quantized == second.quantized == _block_linears()
    assert second.skipped == dict.fromkeys(OUTSIDE, OUTSIDE_BLOCKS)  # no proj_l yet
    assert all(type(p) is nn.Parameter for name, p in other.named_parameters() if ".proj_l." in name)
    assert torch.equal(run_wan(tiny_wan, inputs), run_wan(other, inputs))


def test_compiled_fullgraph_matches_eager(patched):
    inputs = wan_inputs()
    quantize_linear(patched, "int8", min_features=MIN_FEATURES)
    eager = run_wan(patched, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(patched, fullgraph=True, backend="aot_eager")
    assert_close("compiled int8", eager, run_wan(compiled, inputs), TOL_COMPILED)


def test_default_min_features_keeps_small_layers():
    """Outside Wan: ``transformer_blocks`` of a made-up model, a layer too narrow and one not a multiple of 16."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.wide = nn.Linear(128, 256)
            self.narrow = nn.Linear(256, 64)
            self.odd = nn.Linear(256, 136)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(128, 128)
            self.transformer_blocks = nn.ModuleList([Block(), Block()])

    model = Model()
    report = quantize_linear(model, "int8")
    tiny = "tiny: in or out features < 128 or not a multiple of 16"
    assert report.quantized == ("transformer_blocks.0.wide", "transformer_blocks.1.wide")
    assert report.skipped == {
        "embed": OUTSIDE_BLOCKS,
        "transformer_blocks.0.narrow": tiny,
        "transformer_blocks.0.odd": tiny,
        "transformer_blocks.1.narrow": tiny,
        "transformer_blocks.1.odd": tiny,
    }


def test_fp8_on_cpu_raises_naming_the_device(tiny_wan):
    with pytest.raises(NotImplementedError, match=r"mode='fp8'.*blocks\.0\.attn1\.to_q is on cpu.*>= 8\.9"):
        quantize_linear(tiny_wan, "fp8")
    assert all(type(p) is nn.Parameter for p in tiny_wan.parameters())


@pytest.mark.parametrize(
    ("model", "kwargs", "error", "match"),
    [
        (None, {}, TypeError, "`model` must be a torch.nn.Module"),
        ("wan", {"mode": "int4"}, ValueError, r"`mode` must be one of \('auto', 'int8', 'fp8'\), got 'int4'"),
        ("wan", {"min_features": 0}, ValueError, "`min_features` must be an int >= 1, got 0"),
        ("wan", {"min_features": 16.0}, TypeError, "`min_features` must be an int >= 1, got float 16.0"),
        ("wan", {"min_features": True}, TypeError, "`min_features` must be an int >= 1, got bool True"),
    ],
    ids=["model", "mode", "min_features-0", "min_features-float", "min_features-bool"],
)
def test_bad_arguments_raise(tiny_wan, model, kwargs, error, match):
    with pytest.raises(error, match=match):
        quantize_linear(tiny_wan if model == "wan" else model, **kwargs)


def test_quantizing_twice_raises(tiny_wan):
    quantize_linear(tiny_wan, "int8")
    # The weight's class is torchao's: Int8Tensor from 0.18, LinearActivationQuantizedTensor before.
    with pytest.raises(ValueError, match=r"already quantized \(blocks\.0\.attn1\.to_q, .* hold \w+Tensor weights"):
        quantize_linear(tiny_wan, "int8")


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (nn.Sequential(nn.Linear(256, 256), nn.GELU()), r"no linear layer to quantize .*'outside the transformer"),
        (
            nn.ModuleList([nn.Sequential(nn.Linear(64, 64)), nn.Sequential(nn.Linear(64, 64))]),
            r"\['tiny: in or out features < 128",
        ),
        (nn.Sequential(nn.Conv1d(4, 4, 1)), r"\['the model has no nn.Linear'\]"),
    ],
    ids=["outside-blocks", "tiny", "no-linear"],
)
def test_no_eligible_layer_raises(model, match):
    with pytest.raises(ValueError, match=match):
        quantize_linear(model, "int8")


# FP8 (per-row e4m3) on the GPU against the unquantized bf16 model; the compiled model against eager (inductor
# fuses the activation quantization, so not bit for bit).
TOL_FP8 = 3e-2
TOL_FP8_COMPILED = 1e-2


@pytest.mark.gpu
def test_fp8_on_the_gpu_compiles_fullgraph():
    from sagesla.wan_shapes import tiny_wan_transformer

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs a GPU with FP8 matrix multiplies (sm89+)")
    torch.manual_seed(0)
    model = tiny_wan_transformer().to("cuda", torch.bfloat16)
    sagesla.patch(model, topk=0.5)
    inputs = tuple(x.to("cuda", torch.bfloat16) if x.is_floating_point() else x.cuda() for x in wan_inputs())
    exact = run_wan(model, inputs)
    report = quantize_linear(model, mode="auto", min_features=MIN_FEATURES)
    assert report.mode == "fp8" and set(report.quantized) == set(_block_linears())
    eager = run_wan(model, inputs)
    assert_close("fp8 vs bf16", exact.float(), eager.float(), TOL_FP8)
    compiled = run_wan(torch.compile(model, fullgraph=True), inputs)
    assert_close("compiled vs eager", eager.float(), compiled.float(), TOL_FP8_COMPILED)
