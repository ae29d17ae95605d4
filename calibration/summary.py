"""The summary of a profile: one table row per layer (and timestep bucket) and the budget's (or target's) outcome."""

import torch

from sagesla.profile import Profile
from sagesla.tables import markdown_table


def summary(profile: Profile) -> str:
    """A markdown table of each layer's chosen topk with its measured sparsity and errors, then totals.

    Columns: layer, bucket (with timestep buckets), topk, sparsity, worst and mean rel-L1, worst cosine, worst
    head rel-L1 (per-head selection), and whether the budget was met ("NO" rows run the largest candidate, or
    diffusers' attention in a dense layer). After the table: the budget, the mean sparsity, the dense layers
    (topk 1.0 in every bucket: ``sagesla.patch`` runs diffusers' attention there; their sparsity counts as 0) and
    the rows no candidate met. A profile chosen for a target output PSNR (``choose_at_quality``) has no "budget
    met" column; the lines after the table give the target, the measured PSNR and whether it was reached.
    """
    selection, edges = profile.selection, profile.bucket_edges
    quality = selection.target_psnr is not None
    columns = {
        "sparsity": profile.chosen("sparsity"),
        "worst rel-L1": profile.chosen("rel_l1_max"),
        "mean rel-L1": profile.chosen("rel_l1_mean"),
        "worst cosine": profile.chosen("cosine_min"),
    }
    if selection.per_head:
        columns["worst head rel-L1"] = profile.chosen("head_rel_l1_max").amax(dim=-1)
    headers = ["layer", *(["timesteps"] if edges else []), "topk", *columns, *([] if quality else ["budget met"])]
    rows = []
    for i, layer in enumerate(profile.layers):
        for b in range(len(edges) + 1):
            cells = [
                f"{values[i, b]:.2%}" if name == "sparsity" else f"{values[i, b]:.4f}"
                for name, values in columns.items()
            ]
            when = [profile.bucket_label(b)] if edges else []
            met = [] if quality else ["yes" if profile.met[i, b] else "NO"]
            rows.append([layer.name, *when, f"{profile.topk[i, b]:g}", *cells, *met])
    lines = [
        markdown_table(headers, rows),
        "",
        *(_quality_rule(profile) if quality else [_budget_rule(profile)]),
        f"mean sparsity {profile.mean_sparsity():.2%} over {int(profile.measurements.calls.sum())} observations; "
        f"candidates {list(profile.measurements.candidates)}",
    ]
    dense = profile.dense_layers()
    if dense:
        lines.append(
            f"dense: {', '.join(dense)} ({len(dense)} of {len(profile.layers)} layer(s); topk 1.0 everywhere: "
            "diffusers' attention)"
        )
    if quality:
        return "\n".join(lines)
    in_dense = torch.tensor([layer.name in dense for layer in profile.layers])[:, None]
    short, short_dense = int((~profile.met & ~in_dense).sum()), int((~profile.met & in_dense).sum())
    if short:
        lines.append(
            f"{short} row(s) met the budget at no candidate and run the largest, topk "
            f"{profile.measurements.candidates[-1]:g} (with 1.0 no block is skipped: quantization error only)"
        )
    if short_dense:
        lines.append(
            f"{short_dense} row(s) of the dense layers met the budget at no candidate: diffusers' attention runs "
            "there, with no error"
        )
    return "\n".join(lines)


def _budget_rule(profile: Profile) -> str:
    selection = profile.selection
    rule = f"budget: {_error_name(selection.metric)} <= {selection.budget:.4g} on every observation"
    if selection.per_head:
        rule += " in every head"
    if selection.target_sparsity is not None:
        rule += f" (the tightest budget reaching mean sparsity {selection.target_sparsity:g})"
    return rule


def _quality_rule(profile: Profile) -> list[str]:
    """The target PSNR, the measured one and the outcome, and what the allocation spent."""
    selection = profile.selection
    error = _error_name(selection.metric)
    outcome = "met" if bool(profile.met.all()) else "NOT met: even the largest candidate everywhere misses it"
    compared = "final latents" if selection.judged_on == "latents" else "decoded videos"
    return [
        f"target: output PSNR >= {selection.target_psnr:g} dB ({compared} against the dense model's, mean over "
        f"samples); measured {selection.output_psnr:.2f} dB: {outcome}",
        f"allocation: mean {error} spent where it buys the most sparsity (Lagrangian); worst {error} at the "
        f"chosen topk <= {selection.budget:.4g}",
    ]


def _error_name(metric: str) -> str:
    """How the summary names the error a ``metric`` measures."""
    return "rel-L1" if metric == "rel_l1" else "1 - cosine"
