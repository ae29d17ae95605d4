"""What ``sagesla.patch`` did: the layers it replaced and the ones it left alone, with reasons."""

from dataclasses import dataclass

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
        skipped: layer module name -> why it was left as it was, e.g. ``{"blocks.0.attn2": "cross-attention ..."}``.
        notes: how a calibration profile was applied (budget, per-head and per-timestep settings), one line each.
    """

    attention: str
    backend: str
    replaced: dict[str, float]
    skipped: dict[str, str]
    notes: tuple[str, ...] = ()

    def __str__(self) -> str:
        lines = [f"sagesla.patch: {len(self.replaced)} layer(s) -> {self.attention} (backend={self.backend!r})"]
        lines.extend(
            f"  replaced {len(names)}, topk {topk}: {_names(names)}" for topk, names in _group(self.replaced).items()
        )
        lines.extend(
            f"  skipped {len(names)}, {reason}: {_names(names)}" for reason, names in _group(self.skipped).items()
        )
        lines.extend(f"  {note}" for note in self.notes)
        return "\n".join(lines)
