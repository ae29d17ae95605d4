"""SLA checkpoints: our keys and TurboDiffusion's, safetensors / .pt / dicts, strictness, all-or-nothing loads."""

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import sagesla
from sagesla import files
from sagesla.patching import checkpoints
from sagesla.testing import assert_close
from sagesla.wan_shapes import run_wan, wan_inputs

KEYS = [f"blocks.{i}.attn1.sla.proj_l.{p}" for i in range(2) for p in ("weight", "bias")]
# Two instances of one patched model agree to 2e-7 to 2.4e-6 rel-L1 on CPU (seeds 0-2; the first difference is in
# the time embedding's matmul, before any attention); zero vs std-0.1 proj_l moves the output by 2e-2.
ROUND_TRIP_TOL = 1e-4
TURBO_KEYS = [f"blocks.{i}.self_attn.attn_op.local_attn.proj_l.{p}" for i in range(2) for p in ("weight", "bias")]


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.sla = sagesla.SageSparseLinearAttention(head_dim=64, topk=0.5, tensor_layout="NHD")


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn1 = _Layer()
        self.ffn = nn.Linear(64, 64)


class _PatchedLike(nn.Module):
    """Two blocks with SLA at ``blocks.{i}.attn1.sla``, as ``sagesla.patch`` leaves a Wan model (no diffusers)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])


def random_weights(keys=KEYS) -> dict[str, torch.Tensor]:
    return {key: torch.randn(64, 64) if key.endswith("weight") else torch.randn(64) for key in keys}


def sla_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items() if ".sla." in key}


def test_save_then_load_round_trip(tmp_path):
    source, target = _PatchedLike(), _PatchedLike()
    with torch.no_grad():
        for parameter in checkpoints.sla_parameters(source).values():
            parameter.normal_()
    path = tmp_path / "sla.safetensors"
    assert sagesla.save_sla_weights(source, path) == KEYS
    assert os.listdir(tmp_path) == ["sla.safetensors"]
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata.items() > checkpoints.METADATA.items() and len(metadata[checkpoints.CHECKSUM_KEY]) == 64
    report = sagesla.load_sla_weights(target, path)
    assert report.loaded == KEYS and report.missing == [] and report.unexpected == [] and report.ignored == 0
    assert str(report).startswith(f"load_sla_weights: 4 tensor(s) from {str(path)!r}; missing [], unexpected []")
    for key, value in sla_state(source).items():
        assert torch.equal(sla_state(target)[key], value)


def test_save_overwrites_atomically_and_cleans_up_on_failure(tmp_path, monkeypatch):
    model = _PatchedLike()
    path = tmp_path / "sla.safetensors"
    sagesla.save_sla_weights(model, path)
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(files, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        sagesla.save_sla_weights(model, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["sla.safetensors"]


@pytest.mark.parametrize("prefix", ["", "net."], ids=["plain", "net-prefix"])
@pytest.mark.parametrize("form", ["dict", "pth", "pth-nested", "safetensors"])
def test_turbodiffusion_keys_load(tmp_path, prefix, form):
    weights = random_weights(TURBO_KEYS)
    # A full TurboDiffusion checkpoint also holds every other weight of the network: ignored.
    state = {prefix + key: value for key, value in weights.items()} | {
        f"{prefix}blocks.0.self_attn.q.weight": torch.randn(8, 8),
        f"{prefix}head.head.bias": torch.randn(8),
    }
    source = state
    if form.startswith("pth"):
        source = tmp_path / "turbo.pth"
        torch.save({"state_dict": state} if form == "pth-nested" else state, source)
    elif form == "safetensors":
        source = tmp_path / "turbo.safetensors"
        save_file(state, source)
    model = _PatchedLike()
    report = sagesla.load_sla_weights(model, source)
    assert report.loaded == KEYS and report.ignored == 2
    loaded = sla_state(model)
    for ours, turbo in zip(KEYS, TURBO_KEYS, strict=True):
        assert torch.equal(loaded[ours], weights[turbo])


def test_missing_keys_raise_with_the_list_and_change_nothing():
    model = _PatchedLike()
    before = sla_state(model)
    with pytest.raises(ValueError, match=r"missing keys \['blocks.1.attn1.sla.proj_l.weight', 'blocks.1.attn1.sla.pr"):
        sagesla.load_sla_weights(model, random_weights(KEYS[:2]))
    assert all(torch.equal(sla_state(model)[key], value) for key, value in before.items())


def test_unexpected_keys_raise_with_the_list():
    weights = random_weights() | {"blocks.7.attn1.sla.proj_l.weight": torch.randn(64, 64)}
    with pytest.raises(ValueError, match=r"missing keys \[\], unexpected keys \['blocks.7.attn1.sla.proj_l.weight'\]"):
        sagesla.load_sla_weights(_PatchedLike(), weights)


def test_not_strict_loads_what_matches_and_reports_the_rest():
    model = _PatchedLike()
    weights = random_weights(KEYS[:2]) | {"other.proj_l.bias": torch.randn(64)}
    report = sagesla.load_sla_weights(model, weights, strict=False)
    assert report.loaded == KEYS[:2] and report.missing == KEYS[2:] and report.unexpected == ["other.proj_l.bias"]
    assert torch.equal(sla_state(model)[KEYS[0]], weights[KEYS[0]])
    assert not sla_state(model)[KEYS[2]].any()


@pytest.mark.parametrize(
    "change,error,message",
    [
        ({KEYS[3]: torch.randn(32)}, ValueError, r"'blocks.1.attn1.sla.proj_l.bias' has shape \(32,\), .* \(64,\)"),
        (
            {KEYS[0]: torch.full((64, 64), float("nan"))},
            ValueError,
            r"'blocks.0.attn1.sla.proj_l.weight' holds NaN/Inf",
        ),
        ({KEYS[1]: torch.ones(64, dtype=torch.int64)}, TypeError, r"entry 'blocks.0.attn1.sla.proj_l.bias' must be a"),
        ({KEYS[1]: [0.0] * 64}, TypeError, r"must be a floating torch.Tensor"),
        ({TURBO_KEYS[0]: torch.randn(64, 64)}, ValueError, r"names one weight twice: .*local_attn.proj_l.weight"),
        ({}, None, None),
    ],
    ids=["shape", "nan", "int", "list", "duplicate", "nothing-matches"],
)
def test_bad_checkpoint_raises_and_changes_nothing(change, error, message):
    model = _PatchedLike()
    before = sla_state(model)
    weights = random_weights() | change
    if error is None:
        weights, error, message = {"x.weight": torch.randn(2)}, ValueError, r"missing keys \[.*\], unexpected keys \[\]"
    with pytest.raises(error, match=message):
        sagesla.load_sla_weights(model, weights, strict=False)
    assert all(torch.equal(sla_state(model)[key], value) for key, value in before.items())


class _Evil:
    """Unpickling this calls ``open(marker, "w")``: the file appears if the payload ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_torch_files_are_loaded_without_unpickling_code(tmp_path):
    path, marker = tmp_path / "evil.pt", tmp_path / "payload-ran"
    torch.save(random_weights() | {"payload": _Evil(marker)}, path)
    torch.load(path, weights_only=False)
    assert marker.exists(), "the payload is live: unrestricted unpickling runs it"
    marker.unlink()
    model = _PatchedLike()
    before = sla_state(model)
    with pytest.raises(ValueError, match=r"evil.pt' cannot be loaded with torch.load\(weights_only=True\)"):
        sagesla.load_sla_weights(model, path)
    assert not marker.exists()
    assert all(torch.equal(sla_state(model)[key], value) for key, value in before.items())


def test_a_pickle_posing_as_a_profile_is_refused_without_running(tmp_path):
    """Profiles load through safetensors only: a torch.save payload named like a profile is an unreadable file."""
    pytest.importorskip("diffusers")
    from sagesla.profile import ProfileError, load_profile
    from sagesla.wan_shapes import tiny_wan_transformer

    path, marker = tmp_path / "evil.profile.safetensors", tmp_path / "payload-ran"
    torch.save({"payload": _Evil(marker)}, path)
    with pytest.raises(ProfileError, match=r"evil.profile.safetensors': not a readable safetensors file"):
        load_profile(path)
    model = tiny_wan_transformer()
    with pytest.raises(ProfileError, match=r"not a readable safetensors file"):
        sagesla.patch(model, profile=path)
    assert not marker.exists() and sagesla.unpatch(model) == []


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


class _Wider(nn.Module):
    """Two blocks of SLA with head_dim 128: the same keys as ``_PatchedLike``, other shapes."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])
        for block in self.blocks:
            block.attn1.sla = sagesla.SageSparseLinearAttention(head_dim=128, topk=0.5)


@pytest.mark.parametrize(
    "name,spoil,message",
    [
        ("sla.safetensors", _truncate, r"sla.safetensors' is not a readable safetensors file \(truncated or corr"),
        ("sla.safetensors", lambda p: p.write_bytes(b"\x10" + bytes(7) + b"{not json}"), r"not a readable safetensors"),
        ("sla.safetensors", _flip_last_byte, r"sla.safetensors' is corrupted: its tensors do not match"),
        ("sla.safetensors", None, r"'blocks.0.attn1.sla.proj_l.weight' has shape \(128, 128\), .* \(64, 64\)"),
        ("folder/b.safetensors", _truncate, r"b.safetensors' is not a readable safetensors file"),
        ("sla.pt", _truncate, r"sla.pt' cannot be loaded with torch.load\(weights_only=True\): it is truncated"),
        ("sla.pt", lambda p: p.write_bytes(b""), r"sla.pt' cannot be loaded"),
    ],
    ids=["truncated", "bad-header", "flipped-data-byte", "other-head-dim", "folder-with-a-bad-file", "pt-truncated",
         "pt-empty"],
)  # fmt: skip
def test_unreadable_or_mismatched_file_raises_and_changes_nothing(tmp_path, name, spoil, message):
    """A truncated, corrupted or mismatched file raises a ValueError naming it; the model keeps its weights."""
    source = _Wider() if spoil is None else _PatchedLike()
    with torch.no_grad():
        for parameter in checkpoints.sla_parameters(source).values():
            parameter.normal_()
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    if name.endswith(".pt"):
        torch.save(sla_state(source), path)
    else:
        sagesla.save_sla_weights(source, path)
    if name.startswith("folder/"):
        # A good file beside the bad one: nothing of it may load either.
        sagesla.save_sla_weights(source, path.with_name("a.safetensors"))
    if spoil is not None:
        spoil(path)
    model = _PatchedLike()
    before = sla_state(model)
    with pytest.raises(ValueError, match=message):
        sagesla.load_sla_weights(model, path.parent if name.startswith("folder/") else path)
    assert all(torch.equal(sla_state(model)[key], value) for key, value in before.items())


@pytest.mark.parametrize(
    "second,error,message",
    [
        (
            {KEYS[0]: torch.randn(64, 64)},
            ValueError,
            r"folder '.*ckpt' holds the key 'blocks.0.attn1.sla.proj_l.weight' twice: in '.*ckpt/a.safetensors' and in "
            r"'.*ckpt/b.safetensors'",
        ),
        (
            {TURBO_KEYS[0]: torch.randn(64, 64)},
            ValueError,
            r"names one weight twice: 'blocks.0.attn1.sla.proj_l.weight' \(in '.*a.safetensors'\) and "
            r"'blocks.0.self_attn.attn_op.local_attn.proj_l.weight' \(in '.*b.safetensors'\)",
        ),
        (
            {"blocks.2.attn1.sla.proj_l.bias": torch.full((64,), float("nan"))},
            ValueError,
            r"'blocks.2.attn1.sla.proj_l.bias' \(in '.*ckpt/b.safetensors'\) holds NaN/Inf",
        ),
        (
            {"blocks.2.attn1.sla.proj_l.weight": torch.randn(8, 8)},
            ValueError,
            r"'blocks.2.attn1.sla.proj_l.weight' \(in '.*ckpt/b.safetensors'\) has shape \(8, 8\)",
        ),
        (
            {"blocks.2.attn1.sla.proj_l.weight": torch.ones(64, 64, dtype=torch.int64)},
            TypeError,
            r"SLA checkpoint '.*ckpt': entry 'blocks.2.attn1.sla.proj_l.weight' \(in '.*ckpt/b.safetensors'\) must be",
        ),
    ],
    ids=["same-key-in-two-files", "one-weight-two-names", "nan", "shape", "int"],
)
def test_a_folder_names_the_file_of_each_bad_key_and_changes_nothing(tmp_path, second, error, message):
    """A folder of several files (as save_pretrained shards a model): a key in two files is ambiguous and raises,
    naming the key and both files; every other fault names the file the key came from. Nothing is loaded."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file(random_weights(), folder / "a.safetensors")
    save_file(second | {"other.weight": torch.randn(2)}, folder / "b.safetensors")
    model = _PatchedLike()
    before = sla_state(model)
    if "blocks.2" in next(iter(second)):
        model.blocks.append(_Block())
        before = sla_state(model)
    with pytest.raises(error, match=message):
        sagesla.load_sla_weights(model, folder, strict=False)
    assert all(torch.equal(sla_state(model)[key], value) for key, value in before.items())


def test_a_folder_of_disjoint_shards_loads(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    weights = random_weights()
    save_file({key: weights[key] for key in KEYS[:2]}, folder / "a.safetensors")
    save_file({key: weights[key] for key in KEYS[2:]}, folder / "b.safetensors")
    model = _PatchedLike()
    assert sagesla.load_sla_weights(model, folder).loaded == KEYS
    assert all(torch.equal(sla_state(model)[key], value) for key, value in weights.items())


def test_saved_file_is_flushed_before_the_rename_and_gets_the_usual_mode(tmp_path, monkeypatch):
    """os.fsync runs before os.replace (a crash leaves the old file or the new one), and the mode is open()'s."""
    events = []
    for name in ("fsync", "replace"):
        original = getattr(os, name)
        monkeypatch.setattr(checkpoints.os, name, lambda *a, _f=original, _n=name: events.append(_n) or _f(*a))
    path = tmp_path / "sla.safetensors"
    sagesla.save_sla_weights(_PatchedLike(), path)
    assert events == ["fsync", "replace"]
    (tmp_path / "plain").write_bytes(b"")
    assert path.stat().st_mode == (tmp_path / "plain").stat().st_mode


@pytest.mark.parametrize(
    "model,source,error,message",
    [
        (nn.Linear(2, 2), {}, ValueError, r"`model` holds no SLA layer: call sagesla.patch"),
        (
            "pipe",
            {},
            TypeError,
            r"`model` must be a torch.nn.Module \(for a pipeline, pass each transformer\), got str",
        ),
        (None, 3, TypeError, r"`path_or_state_dict` must be a path or a state dict, got int"),
        (None, "missing.safetensors", FileNotFoundError, r"missing.safetensors' does not exist"),
        (None, "empty", FileNotFoundError, r"folder '.*empty' holds no .safetensors file"),
        (None, "sla.ckpt", ValueError, r"must be a .safetensors, .pt, .pth or .bin file, .*sla.ckpt'"),
        (None, "list.pt", TypeError, r"list.pt' must hold a state dict, got list"),
    ],
    ids=["unpatched", "not-a-module", "int-source", "no-file", "empty-folder", "suffix", "not-a-dict"],
)
def test_bad_arguments(tmp_path, model, source, error, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "sla.ckpt").write_bytes(b"x")
    torch.save([1, 2], tmp_path / "list.pt")
    model = _PatchedLike() if model is None else model
    source = tmp_path / source if isinstance(source, str) else source
    with pytest.raises(error, match=message):
        sagesla.load_sla_weights(model, source)


def test_strict_must_be_bool():
    with pytest.raises(TypeError, match=r"`strict` must be a bool, got str 'no'"):
        sagesla.load_sla_weights(_PatchedLike(), random_weights(), strict="no")


def test_save_needs_sla_layers(tmp_path):
    with pytest.raises(ValueError, match=r"`model` holds no SLA layer"):
        sagesla.save_sla_weights(nn.Linear(2, 2), tmp_path / "x.safetensors")


def test_save_adds_metadata_and_keeps_its_own_keys(tmp_path):
    path = tmp_path / "sla.safetensors"
    sagesla.save_sla_weights(_PatchedLike(), path, metadata={"topk": "0.1"})
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["topk"] == "0.1" and metadata.items() > checkpoints.METADATA.items()
    assert sagesla.load_sla_weights(_PatchedLike(), path).loaded == KEYS
    with pytest.raises(ValueError, match=r"`metadata` must not set \['format', 'sha256'\]"):
        sagesla.save_sla_weights(_PatchedLike(), path, metadata={"sha256": "0", "format": "x", "topk": "1"})
    with pytest.raises(TypeError, match=r"`metadata` must be a mapping of str to str, got \{'topk': 0.1\}"):
        sagesla.save_sla_weights(_PatchedLike(), path, metadata={"topk": 0.1})
    with safe_open(path, framework="pt") as handle:
        assert handle.metadata() == metadata  # the refused calls left the file as it was


def test_save_pretrained_round_trip_keeps_proj_l(tiny_wan, tmp_path):
    from diffusers import WanTransformer3DModel

    sagesla.patch(tiny_wan, topk=0.5)
    with torch.no_grad():
        for parameter in checkpoints.sla_parameters(tiny_wan).values():
            parameter.normal_(std=0.1)
    inputs = wan_inputs()
    ref = run_wan(tiny_wan, inputs)
    tiny_wan.save_pretrained(tmp_path)
    with safe_open(tmp_path / "diffusion_pytorch_model.safetensors", framework="pt") as handle:
        assert set(KEYS) <= set(handle.keys())

    # from_pretrained builds an unpatched model (the SLA keys are left unused): patch it, then load them.
    for source in (tmp_path, tmp_path / "diffusion_pytorch_model.safetensors"):
        model = WanTransformer3DModel.from_pretrained(tmp_path).eval()
        sagesla.patch(model, topk=0.5)
        with pytest.raises(AssertionError, match="rel-L1"):
            assert_close("before loading", ref, run_wan(model, inputs), ROUND_TRIP_TOL)
        report = sagesla.load_sla_weights(model, source)
        assert report.loaded == KEYS and report.ignored > 0
        assert all(torch.equal(value, sla_state(model)[key]) for key, value in sla_state(tiny_wan).items())
        # Not bit for bit: CPU matmuls of two model instances may differ in the last bit (memory alignment).
        assert_close("after loading", ref, run_wan(model, inputs), ROUND_TRIP_TOL)


COMMUNITY_FORMS = ["attn1.attn_op.local_attn", "attn1.attn_impl"]


@pytest.mark.parametrize("prefix", ["", "net.", "model.diffusion_model."], ids=["plain", "net", "diffusion-model"])
@pytest.mark.parametrize("form", COMMUNITY_FORMS + ["self_attn.attn_op.local_attn"])
def test_community_key_names_load(tmp_path, form, prefix):
    """Public diffusers conversions of TurboDiffusion's checkpoints keep its SLA module names under attn1."""
    names = [f"{prefix}blocks.{i}.{form}.proj_l.{p}" for i in range(2) for p in ("weight", "bias")]
    weights = random_weights(names)
    path = tmp_path / "community.safetensors"
    save_file(weights | {f"{prefix}blocks.0.attn1.to_q.weight": torch.randn(4, 4)}, path)
    model = _PatchedLike()
    report = sagesla.load_sla_weights(model, path)
    assert report.loaded == KEYS and report.unexpected == [] and report.ignored == 1
    for ours, name in zip(KEYS, names, strict=True):
        assert torch.equal(sla_state(model)[ours], weights[name])


def test_two_community_names_for_one_weight_raise():
    weights = random_weights([f"blocks.{i}.attn1.attn_impl.proj_l.{p}" for i in range(2) for p in ("weight", "bias")])
    weights["net.blocks.0.attn1.attn_op.local_attn.proj_l.weight"] = torch.randn(64, 64)
    with pytest.raises(
        ValueError, match=r"names one weight twice: .*attn_impl.proj_l.weight.*local_attn.proj_l.weight"
    ):
        sagesla.load_sla_weights(_PatchedLike(), weights)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip-mapped", "legacy-read-whole"])
def test_torch_files_are_memory_mapped_unless_legacy(tmp_path, monkeypatch, zip_format):
    weights = random_weights(TURBO_KEYS)
    path = tmp_path / "turbo.pth"
    torch.save(weights, path, _use_new_zipfile_serialization=zip_format)
    calls = []
    load = torch.load
    monkeypatch.setattr(
        checkpoints.torch, "load", lambda *args, **kwargs: calls.append(kwargs) or load(*args, **kwargs)
    )
    model = _PatchedLike()
    assert sagesla.load_sla_weights(model, path).loaded == KEYS
    assert calls == [{"map_location": "cpu", "weights_only": True, "mmap": zip_format}]
    assert all(
        torch.equal(sla_state(model)[ours], weights[turbo]) for ours, turbo in zip(KEYS, TURBO_KEYS, strict=True)
    )


def test_save_sla_state_dict_writes_the_save_sla_weights_format(tmp_path):
    weights = random_weights()
    path = tmp_path / "sla.safetensors"
    assert checkpoints.save_sla_state_dict(weights, path, {"converted_from": "x.pth"}) == KEYS
    source = _PatchedLike()
    with torch.no_grad():
        for key, parameter in checkpoints.sla_parameters(source).items():
            parameter.copy_(weights[key])
    sagesla.save_sla_weights(source, tmp_path / "model.safetensors", {"converted_from": "x.pth"})
    # The same tensors give the same file: tensors and metadata (checksum included).
    for name in ("sla.safetensors", "model.safetensors"):
        with safe_open(tmp_path / name, framework="pt") as handle:
            assert handle.metadata() == checkpoints.METADATA | {
                "converted_from": "x.pth",
                checkpoints.CHECKSUM_KEY: checkpoints._checksum(weights),
            }
            assert all(torch.equal(handle.get_tensor(key), weights[key]) for key in KEYS)
    model = _PatchedLike()
    assert sagesla.load_sla_weights(model, path).loaded == KEYS
    assert all(torch.equal(sla_state(model)[key], value) for key, value in weights.items())


@pytest.mark.parametrize(
    "tensors,metadata,error,message",
    [
        ({}, None, ValueError, r"`tensors` must hold at least one proj_l tensor"),
        ({"blocks.0.attn1.to_q.weight": torch.zeros(2)}, None, ValueError, r"must end in proj_l.weight or proj_l.bias"),
        ({KEYS[0]: [0.0]}, None, TypeError, r"`tensors` must be a mapping of str to torch.Tensor"),
        ([(KEYS[0], torch.zeros(2))], None, TypeError, r"`tensors` must be a mapping of str to torch.Tensor"),
        ({KEYS[0]: torch.zeros(2)}, {"sha256": "0"}, ValueError, r"`metadata` must not set \['sha256'\]"),
    ],
    ids=["empty", "not-proj-l", "not-a-tensor", "not-a-mapping", "reserved-metadata"],
)
def test_save_sla_state_dict_rejects_bad_arguments(tmp_path, tensors, metadata, error, message):
    with pytest.raises(error, match=message):
        checkpoints.save_sla_state_dict(tensors, tmp_path / "sla.safetensors", metadata)
    assert os.listdir(tmp_path) == []
