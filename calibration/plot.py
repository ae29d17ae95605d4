"""A PNG of a profile: topk, sparsity and worst error per layer (one bar per timestep bucket), drawn with Pillow.

Pillow, not matplotlib: diffusers depends on Pillow, so every environment that can calibrate can also plot, and
sagesla gains no dependency. Three panels share the x axis (layer index in the profile's order).
"""

import math

from sagesla.profile import Profile

_PANEL_HEIGHT, _LEFT, _RIGHT, _TOP, _GAP, _BOTTOM = 170, 72, 24, 84, 46, 40
# Widest bar in pixels (a profile of few layers would otherwise draw slabs).
_MAX_BAR = 28
_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
_GRID, _TEXT, _BUDGET = "#d0d0d0", "#202020", "#d62728"


def _nice_top(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^n at or above ``value`` (> 0)."""
    scale = 10 ** math.floor(math.log10(value))
    return next(step * scale for step in (1, 2, 2.5, 5, 10) if step * scale >= value * (1 - 1e-9))


def _pillow():
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        raise ImportError("plotting a profile needs Pillow: pip install pillow (diffusers installs it)") from None
    return Image, ImageDraw, ImageFont


def plot_profile(profile: Profile, path: str) -> None:
    """Write a PNG with three bar panels over the layers: chosen topk, its sparsity, its worst error.

    The error panel shows the selection metric (rel-L1, or 1 - cosine) with the budget as a red line; a red
    cross marks a setting that met the budget at no candidate. With timestep buckets each layer has one bar per
    bucket, coloured as the legend says.

    Raises:
        ImportError: Pillow is not installed.
    """
    image_module, draw_module, font_module = _pillow()
    selection = profile.selection
    error = profile.chosen("rel_l1_max") if selection.metric == "rel_l1" else 1 - profile.chosen("cosine_min")
    label = "worst rel-L1" if selection.metric == "rel_l1" else "worst 1 - cosine"
    panels = [
        ("topk", profile.topk, _nice_top(float(profile.topk.max())), None),
        ("sparsity", profile.chosen("sparsity"), 1.0, None),
        (label, error, _nice_top(max(float(error.max()), selection.budget, 1e-6) * 1.05), selection.budget),
    ]
    layers, buckets = profile.topk.shape
    slot = max(8 * buckets + 4, 14)
    width = _LEFT + _RIGHT + max(layers * slot, 560)
    height = _TOP + len(panels) * (_PANEL_HEIGHT + _GAP) + _BOTTOM - _GAP
    image = image_module.new("RGB", (width, height), "white")
    draw = draw_module.Draw(image)
    font, small = font_module.load_default(size=15), font_module.load_default(size=12)
    title = f"SageSLA profile: {layers} layers, {selection.metric} budget {selection.budget:.4g}"
    draw.text((_LEFT, 12), title, fill=_TEXT, font=font)
    for b in range(buckets if buckets > 1 else 0):
        x = _LEFT + 160 * b
        draw.rectangle((x, 40, x + 10, 50), fill=_COLORS[b % len(_COLORS)])
        draw.text((x + 14, 38), profile.bucket_label(b), fill=_TEXT, font=small)
    plot_width = width - _LEFT - _RIGHT
    column = plot_width / layers
    bar = min((column - 4) / buckets, _MAX_BAR)
    for p, (name, values, top, budget) in enumerate(panels):
        y0 = _TOP + p * (_PANEL_HEIGHT + _GAP)
        y1 = y0 + _PANEL_HEIGHT
        draw.text((_LEFT, y0 - 18), name, fill=_TEXT, font=font)
        for tick in range(5):
            y = y1 - tick * _PANEL_HEIGHT / 4
            draw.line((_LEFT, y, width - _RIGHT, y), fill=_GRID)
            text = f"{tick * top / 4:.0%}" if name == "sparsity" else f"{tick * top / 4:.3g}"
            draw.text((_LEFT - 6, y), text, fill=_TEXT, font=small, anchor="rm")
        for i in range(layers):
            for b in range(buckets):
                x = _LEFT + (i + 0.5) * column + (b - buckets / 2) * bar
                y = y1 - min(float(values[i, b]) / top, 1.0) * _PANEL_HEIGHT
                draw.rectangle((x, y, x + max(bar - 1, 1), y1), fill=_COLORS[b % len(_COLORS)])
                if budget is not None and not profile.met[i, b]:
                    draw.text((x + bar / 2, y - 2), "x", fill=_BUDGET, font=small, anchor="mb")
        if budget is not None:
            y = y1 - budget / top * _PANEL_HEIGHT
            for x in range(_LEFT, width - _RIGHT, 12):
                draw.line((x, y, min(x + 6, width - _RIGHT), y), fill=_BUDGET, width=2)
            draw.text((width - _RIGHT, y - 3), "budget", fill=_BUDGET, font=small, anchor="rb")
        draw.line((_LEFT, y0, _LEFT, y1), fill=_TEXT)
    every = max(1, math.ceil(layers * 28 / plot_width))
    for i in range(0, layers, every):
        x = _LEFT + (i + 0.5) * column
        draw.text((x, height - _BOTTOM + 6), str(i), fill=_TEXT, font=small, anchor="mt")
    draw.text(
        (_LEFT + plot_width / 2, height - 16), "layer (index in the profile)", fill=_TEXT, font=small, anchor="mt"
    )
    image.save(path, format="PNG")
