"""What ``sagesla.patch`` did: the layers it replaced and the ones it left alone, with reasons; the dense steps."""

from dataclasses import dataclass

# ``skipped`` reason of the layers ``patch(..., dense_layers=...)`` kept dense.
DENSE_LAYERS = "dense_layers"
# ``skipped`` reason of the layers a calibration ``Profile`` keeps at topk 1.0 in every timestep bucket
# (``Profile.dense_layers``), which ``patch`` leaves to diffusers' attention.
PROFILE_DENSE = "dense_layers: the profile keeps every key block (topk 1.0 in every timestep bucket)"
# A group of skipped layers prints at most this many names.
_NAMES_SHOWN = 4


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_NAMES_SHOWN])
    return shown if len(names) <= _NAMES_SHOWN else f"{shown}, ... ({len(names)} in all)"


def _group(by_name: dict[str, object]) -> dict[object, list[str]]:
    """{name: value} -> {value: [names]}, in first-seen order."""
    groups: dict[object, list[str]] = {}
    for name, value in by_name.items():
        groups.setdefault(value, []).append(name)
    return groups


@dataclass(frozen=True)
class PatchReport:
    """The outcome of ``sagesla.patch``.

    Attributes:
        attention: class name of the SLA modules installed ("SageSparseLinearAttention" or "SparseLinearAttention").
        backend: the backend they were given ("auto", "torch" or "triton").
        replaced: layer module name -> topk, for every self-attention now running SLA, e.g.
            ``{"blocks.0.attn1": 0.1}`` (``"transformer.blocks.0.attn1"`` when a pipeline was patched).
        skipped: layer module name -> why it was left as it was, e.g. ``{"blocks.0.attn2": "cross-attention ..."}``;
            "dense_layers" for the layers ``patch(..., dense_layers=...)`` kept dense, ``PROFILE_DENSE`` for those a
            calibration profile keeps at topk 1.0 in every timestep bucket.
        notes: how a calibration profile was applied (budget, per-head and per-timestep settings), one line each.
        dense_steps: the (low, high) timestep ranges whose forwards run diffusers' own attention in every replaced
            layer (``patch(..., dense_steps=...)``), empty if none.
    """

    attention: str
    backend: str
    replaced: dict[str, float]
    skipped: dict[str, str]
    notes: tuple[str, ...] = ()
    dense_steps: tuple[tuple[float, float], ...] = ()

    @property
    def dense_layers(self) -> list[str]:
        """The self-attention layers left to diffusers' attention (not patched): ``dense_layers``' and the profile's."""
        return [name for name, reason in self.skipped.items() if reason in (DENSE_LAYERS, PROFILE_DENSE)]

    def __str__(self) -> str:
        lines = [f"sagesla.patch: {len(self.replaced)} layer(s) -> {self.attention} (backend={self.backend!r})"]
        lines.extend(
            f"  replaced {len(names)}, topk {topk}: {_names(names)}" for topk, names in _group(self.replaced).items()
        )
        lines.extend(
            f"  skipped {len(names)}, {reason}: {_names(names)}" for reason, names in _group(self.skipped).items()
        )
        if self.dense_steps:
            ranges = " or ".join(f"{low:.9g} <= t <= {high:.9g}" for low, high in self.dense_steps)
            lines.append(f"  dense_steps: diffusers' own attention in every replaced layer where {ranges}")
        lines.extend(f"  {note}" for note in self.notes)
        return "\n".join(lines)
