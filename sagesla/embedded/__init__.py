"""The embedded video model: procedural moving-shape videos, their prompts, and a small Wan transformer for them."""
