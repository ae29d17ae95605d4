"""TurboDiffusion checkpoints as diffusers folders: the converted model against the same weights loaded the diffusers
way, the ``-quant`` form against the dequantization formula, shards, config inference, and every bad file."""

import json
import math
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import sagesla
from sagesla import turbodiffusion
from sagesla.patching import checkpoints
from sagesla.testing import assert_close, run_model, turbodiffusion_state_dict
from sagesla.wan_shapes import wan_inputs

diffusers = pytest.importorskip("diffusers")

from diffusers import WanTransformer3DModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers  # noqa: E402

# 2 heads of 128 (the released head dim), 2 blocks; ffn 320 = 2.5 quantization blocks, so the ffn weights have tail
# blocks along both of their dimensions. text_dim 32 takes wan_inputs()' text.
CONFIG = {
    "num_attention_heads": 2,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 32,
    "freq_dim": 32,
    "ffn_dim": 320,
    "num_layers": 2,
}
DIM = 256
# Two instances of one model with identical weights agree to ~1e-6 rel-L1 on CPU (matmul memory alignment).
SAME_WEIGHTS_TOL = 1e-5
# Released kinds: (name, config overrides for the builder, the diffusers config entries they must infer).
WAN_14B = {"num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}
RELEASED = [
    ("Wan2.1 T2V 1.3B", {"num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30}),
    ("Wan2.1 T2V 14B", WAN_14B),
    ("Wan2.2 I2V A14B", {**WAN_14B, "in_channels": 36}),
    ("Wan2.1 I2V 14B", {**WAN_14B, "in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120}),
]


def released_config(overrides: dict) -> dict:
    return {
        "attention_head_dim": 128,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": 4096,
        "freq_dim": 256,
        **overrides,
    }


def save(tmp_path, state, name="turbo.pth"):
    path = tmp_path / name
    torch.save(state, path)
    return path


def convert(path, out, **kwargs):
    return turbodiffusion.convert_turbodiffusion(path, out, progress=False, **kwargs)


def dequantized(int8_weight: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """w[i, j] = q[i, j] * scale[i // block, j // block], the scale matrix spelled out element by element."""
    rows, cols = int8_weight.shape
    full = scale.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return int8_weight.float() * full


def diffusers_reference(state: dict, config: dict = CONFIG) -> torch.nn.Module:
    """The checkpoint loaded the diffusers way: int8 triplets dequantized by the formula, the patch embedding as
    the Conv3d weight [D, C, 1, 2, 2], diffusers' renaming, a strict load_state_dict (fp32)."""
    weights = {}
    for key, value in state.items():
        if key.endswith(".int8_weight"):
            base = key.removesuffix(".int8_weight")
            weights[f"{base}.weight"] = dequantized(value, state[f"{base}.scale"])
        elif "proj_l" not in key and not key.endswith(".scale"):
            weights[key] = value.float()
    weights["patch_embedding.weight"] = weights["patch_embedding.weight"].reshape(-1, config["in_channels"], 1, 2, 2)
    model = WanTransformer3DModel(**config).eval()
    model.load_state_dict(convert_wan_transformer_to_diffusers(weights), strict=True)
    return model


def load_converted(out, dtype=torch.float32) -> torch.nn.Module:
    model, info = WanTransformer3DModel.from_pretrained(out, torch_dtype=dtype, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    return model.eval()


def assert_same_weights(model, reference):
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert torch.equal(ours[key].float(), value), key


def proj_l(state: dict) -> dict[str, torch.Tensor]:
    """The checkpoint's proj_l under our keys."""
    found = {}
    for key, value in state.items():
        if ".proj_l." in key:
            block, name = key.split(".")[1], key.rsplit(".", 1)[1]
            found[f"blocks.{block}.attn1.sla.proj_l.{name}"] = value
    return found


def test_converted_model_equals_the_diffusers_load_and_carries_proj_l(tmp_path):
    state = turbodiffusion_state_dict(CONFIG)
    report = convert(save(tmp_path, state), tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        turbodiffusion.SLA_WEIGHTS_FILE,
    ]
    assert (report.kind, report.sla_layers, report.dequantized, report.shards) == ("custom", 2, 0, 1)
    assert report.dtype == torch.bfloat16 and report.tensors == len(diffusers_reference(state).state_dict())
    assert "num_attention_heads" in report.from_shapes and report.from_config == ()
    text = str(report)
    assert "custom WanTransformer3DModel" in text and "2 layers' proj_l in sla_weights.safetensors" in text
    assert "num_attention_heads=2 (shapes)" in text and "eps=1e-06 (default)" in text

    # bf16 values stored in bf16: the converted weights are the checkpoint's, bit for bit.
    reference, model = diffusers_reference(state), load_converted(tmp_path / "out")
    assert_same_weights(model, reference)
    inputs = dict(zip(("hidden_states", "timestep", "encoder_hidden_states"), wan_inputs(), strict=True))
    assert_close("converted model", run_model(reference, inputs), run_model(model, inputs), SAME_WEIGHTS_TOL)

    sagesla.patch(model, topk=0.5)
    loaded = sagesla.load_sla_weights(model, tmp_path / "out")
    assert loaded.missing == [] and loaded.unexpected == [] and len(loaded.loaded) == 4
    parameters = checkpoints.sla_parameters(model)
    for key, value in proj_l(state).items():
        assert torch.equal(parameters[key], value), key
    assert torch.isfinite(run_model(model, inputs)).all()


def test_quantized_checkpoint_converts_to_the_dequantized_weights(tmp_path):
    state = turbodiffusion_state_dict(CONFIG, quantized=True)
    assert state["blocks.0.ffn.0.int8_weight"].dtype == torch.int8
    assert state["blocks.0.ffn.0.scale"].shape == (3, 2) and state["blocks.0.ffn.2.scale"].shape == (2, 3)
    assert state["blocks.0.norm3.weight"].dtype == torch.float32 and "blocks.0.ffn.0.weight" not in state
    report = convert(save(tmp_path, state), tmp_path / "out", dtype=torch.float32)
    # Per block: q, k, v, o of both attentions and the two ffn layers.
    assert report.dequantized == 2 * 10 and report.dtype == torch.float32
    reference, model = diffusers_reference(state), load_converted(tmp_path / "out")
    assert_same_weights(model, reference)
    inputs = dict(zip(("hidden_states", "timestep", "encoder_hidden_states"), wan_inputs(), strict=True))
    assert_close("converted -quant model", run_model(reference, inputs), run_model(model, inputs), SAME_WEIGHTS_TOL)
    sagesla.patch(model, topk=0.5)
    assert sagesla.load_sla_weights(model, tmp_path / "out").unexpected == []


def test_dequantize_blockwise_is_the_formula_with_tail_blocks():
    torch.manual_seed(0)
    weight = torch.randn(300, 130) * 0.02
    int8_weight = torch.randint(-128, 128, (300, 130), dtype=torch.int8)
    scale = torch.rand(3, 2) + 0.5
    assert torch.equal(turbodiffusion.dequantize_blockwise(int8_weight, scale), dequantized(int8_weight, scale))
    # Element by element on a small grid (block 4, tails of 2 and 1).
    small, small_scale = torch.randint(-128, 128, (6, 9), dtype=torch.int8), torch.rand(2, 3)
    result = turbodiffusion.dequantize_blockwise(small, small_scale, block=4)
    for i in range(6):
        for j in range(9):
            assert result[i, j] == float(small[i, j]) * small_scale[i // 4, j // 4], (i, j)
    # TurboDiffusion's rounding to nearest of w * 128 / amax: within half a step (amax / 128) of the weight, but
    # for a block's +amax, saturated from 128 to 127: a whole step.
    from sagesla.testing import _quantize_blocks

    int8_weight, scale = _quantize_blocks(weight)
    error = (turbodiffusion.dequantize_blockwise(int8_weight, scale) - weight).abs()
    step = dequantized(torch.ones_like(int8_weight), scale) * (1 + 1e-4)
    saturated = int8_weight == 127
    assert bool((error[~saturated] <= step[~saturated] / 2).all()) and bool((error <= step).all())
    assert 0 < int(saturated.sum()) <= 6


@pytest.mark.parametrize(
    "args,error,message",
    [
        ((torch.zeros(4, 4), torch.ones(1, 1)), TypeError, r"`int8_weight` must be an int8 torch.Tensor"),
        ((torch.zeros(4, 4, dtype=torch.int8), torch.ones(1, 1, dtype=torch.int32)), TypeError, r"`scale` must be"),
        ((torch.zeros(4, dtype=torch.int8), torch.ones(1)), ValueError, r"`int8_weight` must have shape \[N, K\]"),
        ((torch.zeros(130, 4, dtype=torch.int8), torch.ones(1, 1)), ValueError, r"= \[2, 1\] .* got \[1, 1\]"),
        ((torch.zeros(4, 4, dtype=torch.int8), torch.ones(1, 1), 0), ValueError, r"`block` must be a positive int"),
    ],
    ids=["float-weight", "int-scale", "1-d", "scale-shape", "block"],
)
def test_dequantize_blockwise_rejects_bad_arguments(args, error, message):
    with pytest.raises(error, match=message):
        turbodiffusion.dequantize_blockwise(*args)


def test_shards_and_index_load_like_one_file(tmp_path):
    state = turbodiffusion_state_dict(CONFIG)
    path = save(tmp_path, state)
    convert(path, tmp_path / "one")
    report = convert(path, tmp_path / "sharded", max_shard_size=1_000_000)
    names = sorted(os.listdir(tmp_path / "sharded"))
    shards = [name for name in names if name.startswith("diffusion_pytorch_model-")]
    assert (
        report.shards == len(shards) > 2
        and shards[0] == f"diffusion_pytorch_model-00001-of-{len(shards):05d}.safetensors"
    )
    index = json.loads((tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    one = load_file(tmp_path / "one" / "diffusion_pytorch_model.safetensors")
    assert index["weight_map"].keys() == one.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in one.values())
    for shard in shards:
        # Each shard within the limit unless it holds a single bigger tensor.
        tensors = load_file(tmp_path / "sharded" / shard)
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= 1_000_000
        assert all(torch.equal(value, one[key]) for key, value in tensors.items())
    assert_same_weights(load_converted(tmp_path / "sharded"), load_converted(tmp_path / "one"))
    model = load_converted(tmp_path / "sharded")
    sagesla.patch(model, topk=0.5)
    loaded = sagesla.load_sla_weights(model, tmp_path / "sharded")
    assert len(loaded.loaded) == 4 and loaded.unexpected == [] and loaded.ignored == len(one)


def test_training_layout_converts_the_same(tmp_path):
    convert(save(tmp_path, turbodiffusion_state_dict(CONFIG, seed=3)), tmp_path / "plain")
    nested = turbodiffusion_state_dict(CONFIG, seed=3, training_layout=True)
    assert list(nested) == ["state_dict"] and all(key.startswith("net.") for key in nested["state_dict"])
    convert(save(tmp_path, nested, "train.pt"), tmp_path / "train")
    for name in ("diffusion_pytorch_model.safetensors", turbodiffusion.SLA_WEIGHTS_FILE):
        plain, train = load_file(tmp_path / "plain" / name), load_file(tmp_path / "train" / name)
        assert plain.keys() == train.keys() and all(torch.equal(train[key], value) for key, value in plain.items())


def test_sla_file_is_in_the_save_sla_weights_format(tmp_path):
    state = turbodiffusion_state_dict(CONFIG)
    convert(save(tmp_path, state), tmp_path / "out")
    sla = tmp_path / "out" / turbodiffusion.SLA_WEIGHTS_FILE
    with safe_open(sla, framework="pt") as handle:
        metadata = handle.metadata()
        assert sorted(handle.keys()) == sorted(proj_l(state))
        assert all(handle.get_tensor(key).dtype == torch.float32 for key in handle.keys())  # noqa: SIM118
    assert metadata.items() > (checkpoints.METADATA | {"converted_from": "turbo.pth"}).items()
    data = bytearray(sla.read_bytes())
    data[-1] ^= 0x40
    sla.write_bytes(bytes(data))
    model = load_converted(tmp_path / "out")
    sagesla.patch(model, topk=0.5)
    with pytest.raises(ValueError, match=r"sla_weights.safetensors' is corrupted"):
        sagesla.load_sla_weights(model, tmp_path / "out")


@pytest.mark.parametrize("name,overrides", RELEASED, ids=[name for name, _ in RELEASED])
def test_released_kinds_are_inferred_from_shapes_alone(name, overrides):
    config = released_config(overrides)
    # Shapes only: meta tensors, no memory for 14B parameters.
    with torch.device("meta"):
        state = turbodiffusion_state_dict(config)
    without_proj_l = {key: value for key, value in state.items() if "proj_l" not in key}
    for source in (state, without_proj_l):
        wan = turbodiffusion.infer_wan_config(source)
        assert wan.kind == name
        assert wan.config.items() >= {**config, "patch_size": (1, 2, 2), "eps": 1e-6}.items()
        assert wan.config["image_dim"] == config.get("image_dim") and wan.from_config == ()
    # The released key layout is exactly the diffusers model's, every shape fitting.
    model = turbodiffusion._meta_model(wan.config)
    plan = turbodiffusion._plan(state, wan, model, "x")
    assert plan.recipes.keys() == model.state_dict().keys() and len(plan.sla) == 2 * config["num_layers"]


def test_undecided_heads_need_a_config_and_a_contradicting_config_raises(tmp_path):
    state = {key: value for key, value in turbodiffusion_state_dict(CONFIG).items() if "proj_l" not in key}
    with pytest.raises(ValueError, match=r"'num_attention_heads' is not decided by the shapes .* pass config="):
        turbodiffusion.infer_wan_config(state)
    wan = turbodiffusion.infer_wan_config(state, {"num_attention_heads": 2, "_class_name": "WanTransformer3DModel"})
    assert wan.config["attention_head_dim"] == 128 and wan.from_config == ("num_attention_heads",)
    path = save(tmp_path, state)
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"num_attention_heads": 4, "attention_head_dim": 64, "eps": 1e-5}))
    report = convert(path, tmp_path / "out", config=config_file)
    assert report.config["num_attention_heads"] == 4 and report.config["eps"] == 1e-5 and report.sla_layers == 0
    assert set(report.from_config) == {"num_attention_heads", "attention_head_dim", "eps"}
    assert not (tmp_path / "out" / turbodiffusion.SLA_WEIGHTS_FILE).exists()
    for config, message in [
        ({"ffn_dim": 512}, r"config entry 'ffn_dim' is 512 but the shapes of .*turbo.pth' say 320"),
        ({"num_attention_heads": 3, "attention_head_dim": 64}, r"2?3 \* 64 but the shapes .* model dim is 256"),
        ({"vace_layers": [0]}, r"config entries \['vace_layers'\] are no WanTransformer3DModel arguments"),
        ({"_class_name": "FluxTransformer2DModel"}, r"is a FluxTransformer2DModel config"),
    ]:
        with pytest.raises(ValueError, match=message):
            convert(path, tmp_path / "again", config=config)
    with pytest.raises(ValueError, match=r"'attention_head_dim' is 64 but the shapes of .*sla.pth' say 128"):
        convert(save(tmp_path, turbodiffusion_state_dict(CONFIG), "sla.pth"), tmp_path / "again", config=config_file)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "out", "sla.pth", "turbo.pth"]


class _Evil:
    """Unpickling this calls ``open(marker, "w")``: the file appears if the payload ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _spoiled(tmp_path, case):
    """(checkpoint path, expected message) of one bad-file case."""
    path = tmp_path / "turbo.pth"
    state = turbodiffusion_state_dict(CONFIG, quantized=case in ("no-scale", "nan-scale"))
    message = None
    if case == "truncated":
        torch.save(state, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        message = r"turbo.pth' cannot be loaded with torch.load\(weights_only=True\)"
    elif case == "random-bytes":
        path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
        message = r"turbo.pth' cannot be loaded"
    elif case == "code":
        torch.save(state | {"payload": _Evil(tmp_path / "payload-ran")}, path)
        message = r"turbo.pth' cannot be loaded with torch.load\(weights_only=True\)"
    elif case == "foreign":
        torch.save(torch.nn.Conv2d(3, 8, 3).state_dict(), path)
        message = r"turbo.pth' is no Wan checkpoint: it holds no 'patch_embedding.weight'"
    elif case == "not-a-dict":
        torch.save([torch.zeros(1)], path)
        message = r"turbo.pth' holds a list, not a state dict"
    else:
        message = {
            "missing": r"turbo.pth' does not fit .*missing the key diffusers names 'blocks.1.ffn.net.2.bias'",
            "unexpected": r"unexpected key 'blocks.0.self_attn.extra.weight' \(diffusers: 'blocks.0.attn1.extra.w",
            "shape": r"turbo.pth' does not fit .*'blocks.1.self_attn.q.weight' has shape \[256, 255\], want \[256, 2",
            "int8-as-weight": r"'blocks.0.cross_attn.o.weight' is a torch.int8 tensor .* want a floating tensor",
            "no-scale": r"turbo.pth': 'blocks.1.ffn.0.int8_weight' is an int8 weight without its scale",
            "nan": r"turbo.pth': 'blocks.1.ffn.2.weight' holds NaN/Inf",
            "nan-scale": r"turbo.pth': 'blocks.0.ffn.2.int8_weight' holds NaN/Inf",
            "nan-proj-l": r"turbo.pth': 'blocks.1.self_attn.attn_op.local_attn.proj_l.bias' holds NaN/Inf",
            "proj-l-shape": r"'blocks.0.self_attn.attn_op.local_attn.proj_l.weight' is a torch.float32 tensor of shap",
        }[case]
        if case == "missing":
            del state["blocks.1.ffn.2.bias"]
        elif case == "unexpected":
            state["blocks.0.self_attn.extra.weight"] = torch.zeros(2)
        elif case == "shape":
            state["blocks.1.self_attn.q.weight"] = torch.zeros(256, 255)
        elif case == "int8-as-weight":
            state["blocks.0.cross_attn.o.weight"] = torch.zeros(256, 256, dtype=torch.int8)
        elif case == "no-scale":
            del state["blocks.1.ffn.0.scale"]
        elif case == "nan":
            state["blocks.1.ffn.2.weight"][3, 5] = float("nan")
        elif case == "nan-scale":
            state["blocks.0.ffn.2.scale"][1, 2] = float("inf")
        elif case == "nan-proj-l":
            state["blocks.1.self_attn.attn_op.local_attn.proj_l.bias"][0] = float("nan")
        elif case == "proj-l-shape":
            state["blocks.0.self_attn.attn_op.local_attn.proj_l.weight"] = torch.zeros(128, 64)
        torch.save(state, path)
    return path, message


BAD_FILES = [
    "truncated",
    "random-bytes",
    "code",
    "foreign",
    "not-a-dict",
    "missing",
    "unexpected",
    "shape",
    "int8-as-weight",
    "no-scale",
    "nan",
    "nan-scale",
    "nan-proj-l",
    "proj-l-shape",
]


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_checkpoint_raises_naming_it_and_leaves_nothing(tmp_path, case):
    path, message = _spoiled(tmp_path, case)
    with pytest.raises(ValueError, match=message):
        convert(path, tmp_path / "out")
    # Nothing at out_dir, no temporary folder beside it, no payload run.
    assert os.listdir(tmp_path) == ["turbo.pth"]


def test_out_dir_must_be_new_or_empty(tmp_path):
    path = save(tmp_path, turbodiffusion_state_dict(CONFIG))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"`out_dir` '.*full' is a folder that is not empty"):
        convert(path, tmp_path / "full")
    assert os.listdir(tmp_path / "full") == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    convert(path, tmp_path / "empty")
    assert "config.json" in os.listdir(tmp_path / "empty")
    convert(path, tmp_path / "new" / "deeper")
    assert sorted(os.listdir(tmp_path)) == ["empty", "full", "new", "turbo.pth"]


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"checkpoint": 3}, TypeError, r"`checkpoint` must be a path, got int"),
        ({"checkpoint": "missing.pth"}, FileNotFoundError, r"`checkpoint` '.*missing.pth': no such file"),
        ({"checkpoint": "x.ckpt"}, ValueError, r"`checkpoint` must be a torch.save file \(.pt, .pth, .bin\)"),
        ({"out_dir": "x.ckpt/out"}, NotADirectoryError, r"is a file, not a folder"),
        ({"dtype": "bfloat16"}, TypeError, r"`dtype` must be a torch.dtype"),
        ({"dtype": torch.float64}, ValueError, r"`dtype` must be one of"),
        ({"progress": 1}, TypeError, r"`progress` must be a bool"),
        ({"max_shard_size": 0}, ValueError, r"`max_shard_size` must be a positive int"),
        ({"config": 5}, TypeError, r"`config` must be a config.json path"),
        ({"config": "missing.json"}, FileNotFoundError, r"`config` '.*missing.json': no such file"),
        ({"config": "x.ckpt"}, ValueError, r"`config` '.*x.ckpt' is not readable JSON"),
    ],
    ids=lambda value: None if not isinstance(value, dict) else "-".join(map(str, value)),
)
def test_bad_arguments_raise_before_reading_the_checkpoint(tmp_path, monkeypatch, kwargs, error, message):
    (tmp_path / "x.ckpt").write_bytes(b"\x80")
    save(tmp_path, {"x": torch.zeros(1)})
    monkeypatch.setattr(checkpoints, "read_torch_file", lambda *args: pytest.fail("the checkpoint was read"))
    arguments = {"checkpoint": tmp_path / "turbo.pth", "out_dir": tmp_path / "out", "progress": False} | {
        key: tmp_path / value if isinstance(value, str) and key != "dtype" else value for key, value in kwargs.items()
    }
    with pytest.raises(error, match=message):
        turbodiffusion.convert_turbodiffusion(**arguments)
    assert not (tmp_path / "out").exists()


def test_progress_bar_shows_unless_silenced(tmp_path, capsys):
    path = save(tmp_path, turbodiffusion_state_dict(CONFIG))
    convert(path, tmp_path / "quiet")
    assert capsys.readouterr().err == ""
    turbodiffusion.convert_turbodiffusion(path, tmp_path / "loud")
    assert "converting: 100%" in capsys.readouterr().err


def test_a_failing_write_leaves_nothing(tmp_path, monkeypatch):
    path = save(tmp_path, turbodiffusion_state_dict(CONFIG))
    calls = []

    def fail_second(tensors, target, metadata):
        calls.append(target)
        if len(calls) == 2:
            raise OSError("disk full")
        original(tensors, target, metadata)

    original = turbodiffusion.files.save_file_atomic
    monkeypatch.setattr(turbodiffusion.files, "save_file_atomic", fail_second)
    with pytest.raises(OSError, match="disk full"):
        convert(path, tmp_path / "out", max_shard_size=1_000_000)
    assert len(calls) == 2 and os.listdir(tmp_path) == ["turbo.pth"]


def test_image_conditioned_layout_converts(tmp_path):
    """Original Wan2.1 I2V's CLIP branch (img_emb, k_img / v_img / norm_k_img), as the keys say."""
    config = CONFIG | {"in_channels": 36, "image_dim": 64, "added_kv_proj_dim": DIM}
    state = turbodiffusion_state_dict(config)
    report = convert(save(tmp_path, state), tmp_path / "out")
    assert report.config["image_dim"] == 64 and report.config["added_kv_proj_dim"] == DIM
    assert report.config["in_channels"] == 36 and math.prod(report.config["patch_size"]) == 4
    assert_same_weights(load_converted(tmp_path / "out"), diffusers_reference(state, config))
