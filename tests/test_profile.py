"""Profile files: one SHA-256 over the whole header and every tensor, a strict schema for each header field, errors
that name the file and the field. Synthetic profiles of a few kilobytes, no model."""

import copy
import dataclasses
import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import sagesla
from sagesla import profile as profile_module
from sagesla.profile import (
    LayerSpec,
    Measurements,
    Profile,
    ProfileError,
    Selection,
    _digest,
    load_profile,
)
from sagesla.settings import SLASettings
from sagesla.testing import synthetic_measurements

SETTINGS = SLASettings(quantized=True, block_q=128, block_k=64, backend="auto", pv_precision="fp8")
CANDIDATES = (0.1, 0.5, 1.0)
EDGES = (500.0,)
INFO = {
    "tokens": [1024],
    "steps": 3,
    "timesteps": [999.0, 700.5, 300.25],
    "environment": {"sagesla": "0.1.0", "torch": "2.5", "triton": None, "device": "cpu"},
}


def make_profile(heads: int = 2, attention: SLASettings = SETTINGS) -> Profile:
    """Two layers, two timestep buckets, three candidates, ``heads`` heads; seeded values."""
    layers, buckets, candidates = 2, len(EDGES) + 1, len(CANDIDATES)
    generator = torch.Generator().manual_seed(0)
    head_errors = torch.rand(layers, buckets, candidates, heads, generator=generator)
    measurements = synthetic_measurements(head_errors, CANDIDATES, attention, EDGES, info=copy.deepcopy(INFO))
    values = torch.tensor(CANDIDATES, dtype=torch.float64)
    return Profile(
        measurements,
        Selection("rel_l1", 0.4, False, None),
        topk=values[torch.tensor([[0, 1], [2, 1]])],
        head_topk=values[torch.randint(0, candidates, (layers, buckets, heads), generator=generator)],
        met=torch.tensor([[True, True], [False, True]]),
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "good.profile.safetensors"
    make_profile().save(path)
    return path


def stored(path):
    with safe_open(path, "pt") as handle:
        return handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118


def rewrite(source, target, change=None, raw=None, metadata=None, redigest=False):
    """Copy a profile file with its parsed header changed by ``change`` (in place, or returning a new one), or its
    JSON text by ``raw``, or its
    metadata by ``metadata``; the checksum is recomputed only with ``redigest`` (then only validation can refuse)."""
    meta, tensors = stored(source)
    text = meta["profile"]
    if change is not None:
        header = json.loads(text)
        header = change(header) or header
        text = json.dumps(header)
        if redigest:
            meta["sha256"] = _digest(header, tensors)
    if raw is not None:
        text = raw(text)
    meta["profile"] = text
    if metadata is not None:
        meta = metadata(meta)
    save_file(tensors, target, metadata=meta)


def assert_refused(path, message):
    """load_profile and sagesla.patch(model, profile=path) both refuse ``path``; the model is left untouched."""
    pattern = rf"profile '.*{path.name}': {message}"
    with pytest.raises(ProfileError, match=pattern):
        load_profile(path)
    model = nn.Sequential(nn.Linear(4, 4))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ProfileError, match=pattern):
        sagesla.patch(model, profile=path)
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())


def test_round_trip_and_digest_ignores_only_layout(saved, tmp_path):
    original = make_profile()
    loaded = load_profile(saved)
    assert loaded._header() == original._header()
    for name in profile_module.TENSORS:
        owner = loaded if name in profile_module.CHOSEN else loaded.measurements
        reference = original if name in profile_module.CHOSEN else original.measurements
        assert torch.equal(getattr(owner, name), getattr(reference, name)), name
    meta, _ = stored(saved)
    assert sorted(meta) == sorted(profile_module.METADATA_KEYS) and meta["schema_version"] == "2"
    # Whitespace and key order are layout, not content: the same digest.
    relaid = tmp_path / "relaid.safetensors"
    rewrite(saved, relaid, raw=lambda text: json.dumps(dict(reversed(json.loads(text).items())), indent=3))
    assert load_profile(relaid)._header() == original._header()


def test_an_output_psnr_selection_round_trips_and_a_file_without_it_reads_as_none(saved, tmp_path):
    quality = Selection("rel_l1", 0.4, target_psnr=35.0, output_psnr=36.25, judged_on="videos")
    path = tmp_path / "quality.safetensors"
    dataclasses.replace(make_profile(), selection=quality).save(path)
    header = json.loads(stored(path)[0]["profile"])
    assert header["selection"] == {
        "metric": "rel_l1",
        "budget": 0.4,
        "per_head": False,
        "target_sparsity": None,
        "target_psnr": 35.0,
        "output_psnr": 36.25,
        "judged_on": "videos",
    }
    assert load_profile(path).selection == quality
    # Written before judged_on: the output PSNR was the final latents'.
    unjudged = tmp_path / "unjudged.safetensors"

    def unjudge(header):
        del header["selection"]["judged_on"]

    rewrite(path, unjudged, unjudge, redigest=True)
    assert load_profile(unjudged).selection == dataclasses.replace(quality, judged_on="latents")
    # A budget-mode file, as every file written before these fields: none of them, read as None.
    assert sorted(json.loads(stored(saved)[0]["profile"])["selection"]) == [
        "budget",
        "metric",
        "per_head",
        "target_sparsity",
    ]
    assert load_profile(saved).selection == Selection("rel_l1", 0.4)
    older = tmp_path / "older.safetensors"

    def drop(header):
        for name in ("target_psnr", "output_psnr", "judged_on"):
            del header["selection"][name]

    rewrite(path, older, drop, redigest=True)
    assert load_profile(older).selection == Selection("rel_l1", 0.4)


def test_dense_layers_are_the_layers_at_topk_one_in_every_bucket(saved, tmp_path):
    # make_profile's blocks.1 is at 1.0 below t = 500 only: not dense.
    assert load_profile(saved).dense_layers() == [] and make_profile().layer_topk()["blocks.1.attn1"] == (1.0, 0.5)
    generator = torch.Generator().manual_seed(1)
    measurements = synthetic_measurements(torch.rand(4, 2, 3, 2, generator=generator), CANDIDATES, SETTINGS, EDGES)
    topk = torch.tensor([[1.0, 1.0], [0.5, 1.0], [1.0, 0.1], [1.0, 1.0]], dtype=torch.float64)
    mixed = Profile(
        measurements, Selection("rel_l1", 0.4), topk, topk.unsqueeze(-1).repeat(1, 1, 2), torch.ones(4, 2, dtype=bool)
    )
    assert mixed.dense_layers() == ["blocks.0.attn1", "blocks.3.attn1"]
    # Derived from topk: the file holds nothing more, and reads back the same.
    mixed.save(tmp_path / "mixed.safetensors")
    assert sorted(stored(tmp_path / "mixed.safetensors")[1]) == sorted(profile_module.TENSORS)
    assert load_profile(tmp_path / "mixed.safetensors").dense_layers() == ["blocks.0.attn1", "blocks.3.attn1"]


def _edit(path: str, value):
    """A change setting the header field at ``path`` ("selection.budget", "layers.0.1") to ``value``."""
    *parents, last = path.split(".")

    def change(header):
        node = header
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value

    return change


EDITS = {
    "bucket-edge": ("bucket_edges.0", 501.0),
    "bucket-edge-as-int": ("bucket_edges.0", 500),
    "budget": ("selection.budget", 0.5),
    "per-head": ("selection.per_head", True),
    "metric": ("selection.metric", "cosine"),
    "target-sparsity": ("selection.target_sparsity", 0.5),
    "target-psnr-added": ("selection.target_psnr", 35.0),
    "layer-heads": ("layers.0.1", 4),
    "layer-head-dim": ("layers.1.2", 128),
    "layer-name": ("layers.0.0", "blocks.9.attn1"),
    "block-q": ("attention.block_q", 64),
    "block-k": ("attention.block_k", 128),
    "quantized": ("attention.quantized", False),
    "linear-scope": ("attention.linear_scope", "complement"),
    "feature-map": ("attention.feature_map", "elu"),
    "backend": ("attention.backend", "torch"),
    "pv-precision": ("attention.pv_precision", "half"),
    "model-class": ("model_class", "WanPipeline"),
    "candidate": ("candidates.1", 0.25),
    "info": ("info.tokens.0", 2048),
    "environment": ("info.environment.device", "cuda"),
}


@pytest.mark.parametrize("path,value", list(EDITS.values()), ids=list(EDITS))
def test_a_hand_edited_header_is_refused(saved, tmp_path, path, value):
    """Any header field changed with the checksum left as written: the file is refused, nothing is applied."""
    bad = tmp_path / "bad.safetensors"
    rewrite(saved, bad, _edit(path, value))
    assert_refused(bad, r"corrupted or edited: its header and tensors do not match the SHA-256")


@pytest.mark.parametrize(
    "change",
    [
        lambda m: {**m, "format": "sagesla.profile ", "schema_version": "2"},
        lambda m: {**m, "note": "reviewed"},
        lambda m: {k: v for k, v in m.items() if k != "sha256"},
        lambda m: {**m, "sha256": m["sha256"].upper()},
    ],
    ids=["format", "extra-key", "no-checksum", "checksum-case"],
)
def test_edited_metadata_is_refused(saved, tmp_path, change):
    bad = tmp_path / "bad.safetensors"
    rewrite(saved, bad, metadata=change)
    with pytest.raises(ProfileError, match=r"profile '.*bad.safetensors': (not a sagesla|metadata must|corrupted)"):
        load_profile(bad)


def test_schema_version_1_is_refused_with_the_reason(saved, tmp_path):
    """A version-1 file's checksum covers the tensors only: nothing vouches for its header, so it is not read."""
    old = tmp_path / "old.safetensors"
    meta, tensors = stored(saved)
    meta = {**meta, "schema_version": "1", "sha256": hashlib.sha256(b"").hexdigest()}
    save_file(tensors, old, metadata=meta)
    assert_refused(old, r"schema version '1', whose checksum covers the tensors only .* recalibrate")


def _pop(path: str):
    *parents, last = path.split(".")

    def change(header):
        node = header
        for key in parents:
            node = node[key]
        del node[last]

    return change


def _nest(levels: int):
    value = 1
    for _ in range(levels):
        value = {"x": value}
    return value


MALFORMED = {
    # wrong types
    "block-q-str": (
        _edit("attention.block_q", "64"),
        r"`attention.block_q` must be an int in \[1, 1024\], got str '64'",
    ),
    "block-q-float": (_edit("attention.block_q", 64.0), r"`attention.block_q` must be an int .*, got float 64.0"),
    "block-k-bool": (_edit("attention.block_k", True), r"`attention.block_k` must be an int .*, got bool True"),
    "quantized-int": (_edit("attention.quantized", 1), r"`attention.quantized` must be a bool, got int 1"),
    "scope-list": (_edit("attention.linear_scope", ["all"]), r"`attention.linear_scope` must be one of \('all'"),
    "budget-str": (_edit("selection.budget", "0.4"), r"`selection.budget` must be a finite float >= 0, got str '0.4'"),
    "budget-bool": (_edit("selection.budget", False), r"`selection.budget` must be a finite float >= 0, got bool"),
    "budget-int": (_edit("selection.budget", 1), r"`selection.budget` must be a finite float >= 0, got int 1"),
    "per-head-int": (_edit("selection.per_head", 0), r"`selection.per_head` must be a bool, got int 0"),
    "heads-str": (_edit("layers.0.1", "2"), r"`layers\[0\].heads` must be an int in \[1, 1024\], got str '2'"),
    "heads-bool": (_edit("layers.1.1", True), r"`layers\[1\].heads` must be an int .*, got bool True"),
    "name-int": (_edit("layers.0.0", 0), r"`layers\[0\].name` must be a non-empty str, got int 0"),
    "edge-int": (_edit("bucket_edges.0", 500), r"`bucket_edges\[0\]` must be a finite float >= 0 .*, got int 500"),
    "edge-str": (_edit("bucket_edges.0", "500.0"), r"`bucket_edges\[0\]` must be a finite float .*, got str"),
    "candidates-str": (_edit("candidates", "0.1 0.5 1.0"), r"`candidates` must be a JSON array, got str"),
    "model-class-int": (_edit("model_class", 3), r"`model_class` must be a class name .*, got int 3"),
    "metric": (_edit("selection.metric", "l2"), r"`selection.metric` must be one of \('rel_l1', 'cosine'\), got str"),
    "feature-map": (_edit("attention.feature_map", "gelu"), r"`attention.feature_map` must be one of"),
    # absurd numbers
    "block-q-zero": (_edit("attention.block_q", 0), r"`attention.block_q` must be an int in \[1, 1024\], got int 0"),
    "block-k-negative": (_edit("attention.block_k", -64), r"`attention.block_k` must be an int .*, got int -64"),
    "block-k-huge": (_edit("attention.block_k", 1 << 40), r"`attention.block_k` must be an int in \[1, 1024\]"),
    "head-dim-huge": (_edit("layers.0.2", 10**12), r"`layers\[0\].head_dim` must be an int in \[1, 1024\]"),
    "heads-zero": (_edit("layers.0.1", 0), r"`layers\[0\].heads` must be an int in \[1, 1024\], got int 0"),
    "heads-differ": (_edit("layers.0.1", 4), r"`layers` must all have one head count"),
    "names-repeat": (_edit("layers.1.0", "blocks.0.attn1"), r"`layers` names must be unique"),
    "budget-negative": (_edit("selection.budget", -0.1), r"`selection.budget` must be a finite float >= 0, got float"),
    "target-one": (_edit("selection.target_sparsity", 1.0), r"`selection.target_sparsity` must be .* in \[0, 1\)"),
    "target-psnr-str": (
        _edit("selection.target_psnr", "35"),
        r"`selection.target_psnr` must be a finite float > 0 \(dB\) or None, got str '35'",
    ),
    "target-psnr-int": (
        _edit("selection.target_psnr", 35),
        r"`selection.target_psnr` must be a finite float .*, got int",
    ),
    "target-psnr-zero": (_edit("selection.target_psnr", 0.0), r"`selection.target_psnr` must be a finite float > 0"),
    "target-psnr-null": (_edit("selection.target_psnr", None), r"`selection.target_psnr` must be left out when it is"),
    "output-psnr-alone": (
        _edit("selection.output_psnr", 40.0),
        r"`selection.target_psnr` and `selection.output_psnr` must be given together \(or neither\), got None and 40.0",
    ),
    "output-psnr-bool": (_edit("selection.output_psnr", True), r"`selection.output_psnr` must be a finite float"),
    "judged-on-alone": (
        _edit("selection.judged_on", "videos"),
        r"`selection.judged_on` comes with `selection.target_psnr`, got 'videos' alone",
    ),
    "judged-on-unknown": (
        lambda h: h["selection"].update(target_psnr=35.0, output_psnr=36.0, judged_on="pixels"),
        r"`selection.judged_on` must be one of \('latents', 'videos'\), got str 'pixels'",
    ),
    "psnr-and-sparsity": (
        lambda h: h["selection"].update(target_sparsity=0.5, target_psnr=35.0, output_psnr=36.0),
        r"`selection.target_psnr` allocates per layer and excludes `selection.target_sparsity`",
    ),
    "candidate-zero": (_edit("candidates.0", 0.0), r"`candidates\[0\]` must be a finite float in \(0, 1\], got float"),
    "candidate-above-1": (_edit("candidates.2", 1.5), r"`candidates\[2\]` must be a finite float in \(0, 1\]"),
    "candidates-order": (_edit("candidates", [0.5, 0.1, 1.0]), r"`candidates` must be strictly ascending"),
    "candidates-empty": (_edit("candidates", []), r"`candidates` must not be empty"),
    "edge-negative": (_edit("bucket_edges.0", -1.0), r"`bucket_edges\[0\]` must be a finite float >= 0"),
    "edges-order": (_edit("bucket_edges", [600.0, 500.0]), r"`bucket_edges` must be strictly ascending"),
    # structure: missing, extra, wrong length, wrong container, nesting
    "field-missing": (_pop("selection.per_head"), r"`selection` must have the fields .*: missing \['per_head'\]"),
    "selection-extra": (
        _edit("selection.psnr", 35.0),
        r"`selection` must have the fields \['metric', 'budget', 'per_head', 'target_sparsity'\] \(optional: "
        r"\['target_psnr', 'output_psnr', 'judged_on'\]\): missing \[\], unexpected \['psnr'\]",
    ),
    "field-extra": (_edit("extra", 1), r"`header` must have the fields .*: missing \[\], unexpected \['extra'\]"),
    "settings-extra": (_edit("attention.block_v", 64), r"`attention` must have .*unexpected \['block_v'\]"),
    "layers-missing": (_pop("layers"), r"`header` must have the fields .*: missing \['layers'\]"),
    "layer-short": (_edit("layers.0", ["blocks.0.attn1", 2]), r"`layers\[0\]` must be an array \[name, heads, head_"),
    "layer-long": (_edit("layers.0", ["blocks.0.attn1", 2, 64, 1]), r"`layers\[0\]` must be an array \[name,"),
    "layer-object": (_edit("layers.0", {"name": "a"}), r"`layers\[0\]` must be an array \[name, heads, head_dim\]"),
    "layers-object": (_edit("layers", {}), r"`layers` must be a JSON array, got dict"),
    "attention-array": (_edit("attention", []), r"`attention` must be an object with the fields \['quantized'"),
    "info-array": (_edit("info", []), r"`info` must be a dict, got list"),
    "info-deep": (_edit("info.x", _nest(4)), r"`info.x.x.x.x` nests deeper than 4 levels from `info`"),
    "nested-value": (_edit("attention.block_q", [[[[[[64]]]]]]), r"`attention.block_q\[0\]\[0\]\[0\]\[0\]` nests dee"),
    "header-array": (lambda h: [h], r"`header` must be an object with the fields \['model_class', 'layers'"),
}


@pytest.mark.parametrize("change,message", list(MALFORMED.values()), ids=list(MALFORMED))
def test_a_malformed_header_names_the_field(saved, tmp_path, change, message):
    """A header that passes the checksum (recomputed) but breaks the schema: refused, naming the field."""
    bad = tmp_path / "bad.safetensors"
    rewrite(saved, bad, change, redigest=True)
    assert_refused(bad, message)


def _replace(old: str, new: str):
    def raw(text):
        assert old in text
        return text.replace(old, new, 1)

    return raw


RAW = {
    "nan": (_replace('"budget": 0.4', '"budget": NaN'), r"the header holds NaN: every number must be finite"),
    "infinity": (_replace('"budget": 0.4', '"budget": -Infinity'), r"the header holds -Infinity"),
    "overflow": (
        _replace('"budget": 0.4', '"budget": 1e400'),
        r"the header holds the number 1e400, which overflows a float",
    ),
    "duplicate-key": (
        _replace('"budget": 0.4', '"budget": 0.4, "budget": 0.1'),
        r"the header names the key 'budget' twice in one object",
    ),
    "huge-int": (_replace('"block_q": 128', '"block_q": ' + "9" * 5000), r"the header `profile` is not valid JSON"),
    "not-json": (_replace('"budget": 0.4', '"budget": 0.4,'), r"the header `profile` is not valid JSON"),
    "deep": (lambda text: "[" * 100_000 + "]" * 100_000, r"the header nests deeper than 6 levels"),
    "deep-parsable": (lambda text: "[" * 50 + "]" * 50, r"`\[0\]\[0\]\[0\]\[0\]\[0\]\[0\]` nests deeper than 6"),
}


@pytest.mark.parametrize("raw,message", list(RAW.values()), ids=list(RAW))
def test_header_json_is_parsed_strictly(saved, tmp_path, raw, message):
    """NaN, Infinity, overflowing numbers, a key given twice and deep nesting: refused before the checksum is taken."""
    bad = tmp_path / "bad.safetensors"
    rewrite(saved, bad, raw=raw)
    assert_refused(bad, message)


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: make_profile(attention=SLASettings()), r"`attention.block_q` must be an int in \[1, 1024\]"),
        (lambda: make_profile(attention=SLASettings(block_q=64, block_k=2048)), r"`attention.block_k` must be"),
        (lambda: Selection("rel_l1", 1), r"`selection.budget` must be a finite float >= 0, got int 1"),
        (lambda: Selection("rel_l1", 0.1, per_head=None), r"`selection.per_head` must be a bool, got NoneType"),
        (lambda: Selection("rel_l1", 0.1, target_psnr=35.0), r"must be given together \(or neither\), got 35.0 and"),
        (
            lambda: Selection("rel_l1", 0.1, target_psnr=float("inf"), output_psnr=1.0),
            r"`selection.target_psnr` must be a finite float > 0 \(dB\) or None, got float inf",
        ),
        (
            lambda: Selection("rel_l1", 0.1, True, target_psnr=35.0, output_psnr=36.0),
            r"excludes `selection.target_sparsity` and `selection.per_head`, got target_sparsity None, per_head True",
        ),
        (lambda: LayerSpec("a", "2", 64), None),
    ],
    ids=[
        "blocks-unresolved",
        "block-k-huge",
        "budget-int",
        "per-head-none",
        "psnr-alone",
        "psnr-inf",
        "psnr-per-head",
        "layer-spec",
    ],
)
def test_the_dataclasses_check_their_fields_when_built_in_code(build, message):
    if message is not None:
        with pytest.raises(ProfileError, match=message):
            build()
        return
    # LayerSpec is a tuple: Measurements checks it.
    spec = build()
    good = make_profile().measurements
    with pytest.raises(ProfileError, match=r"`layers\[0\].heads` must be an int in \[1, 1024\], got str '2'"):
        Measurements(**{**vars(good), "layers": (spec, *good.layers[1:])})


def test_info_holds_json_data_only():
    good = make_profile().measurements
    for info, message in [
        ({"tokens": torch.tensor([1])}, r"`info.tokens` must be JSON data .*, got Tensor"),
        ({"shift": float("nan")}, r"`info.shift` must be finite, got nan"),
        ({1: "a"}, r"`info` keys must be str, got int 1"),
    ]:
        with pytest.raises(ProfileError, match=message):
            Measurements(**{**vars(good), "info": info})


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _leaves(node, path=()):
    """The paths of every scalar in a JSON tree."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else None
    if items is None:
        return [path]
    return [leaf for key, item in items for leaf in _leaves(item, (*path, key))]


HEADER = make_profile()._header()
LEAVES = _leaves(json.loads(json.dumps(HEADER)))
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 70), 1 << 70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


def _set(header, path, value):
    node = header
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


@given(leaf=st.sampled_from(LEAVES), value=JSON_VALUES)
def test_any_changed_value_breaks_the_checksum(saved, tmp_path_factory, leaf, value):
    header = json.loads(json.dumps(HEADER))
    before = json.dumps(header, sort_keys=True)
    _set(header, leaf, value)
    hypothesis.assume(json.dumps(header, sort_keys=True) != before)
    bad = tmp_path_factory.mktemp("edited") / "bad.safetensors"
    rewrite(saved, bad, lambda h: h.clear() or h.update(header))
    with pytest.raises(ProfileError, match=r"corrupted or edited"):
        load_profile(bad)


@given(leaf=st.sampled_from(LEAVES), value=JSON_VALUES)
@example(leaf=("selection", "budget"), value=0.7)
@example(leaf=("info", "environment", "device"), value={"name": ["cpu", 1]})
@example(leaf=("attention", "block_k"), value=64.0)
def test_a_checksummed_header_loads_as_written_or_raises_profile_error(saved, tmp_path_factory, leaf, value):
    """With the checksum recomputed, any value anywhere either loads exactly as written (never converted) or raises
    ProfileError; never another exception."""
    header = json.loads(json.dumps(HEADER))
    _set(header, leaf, value)
    bad = tmp_path_factory.mktemp("checksummed") / "bad.safetensors"
    rewrite(saved, bad, lambda h: h.clear() or h.update(header), redigest=True)
    try:
        loaded = load_profile(bad)
    except ProfileError as error:
        assert "bad.safetensors" in str(error)
        return
    assert json.dumps(loaded._header(), sort_keys=True) == json.dumps(header, sort_keys=True)
