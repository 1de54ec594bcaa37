"""Tiny MoE checkpoints shipped inside the package, and shape presets of full-size models (a config.json
without weights, for planning and simulation), addressable by short name.

``shipped_model_dir("tiny-mixtral")`` gives the directory of a shipped
checkpoint (loadable with plain ``transformers``), or None for any other name,
so callers can accept either a short name or a path.
"""

from __future__ import annotations

from pathlib import Path

from ..resources import shipped_path

SHIPPED_MODELS = ("tiny-mixtral", "tiny-deepseek")   # folders of this package


def shipped_model_dir(name: str) -> Path | None:
    """Directory of the shipped model called ``name``, or None if there is none.

    Returns None too when the name is known but its directory holds no
    ``config.json`` (e.g. a source checkout without the weights).
    """
    if str(name) not in SHIPPED_MODELS:
        return None
    path = shipped_path(__name__, str(name))
    return path if (path / "config.json").is_file() else None


SHAPE_PRESETS = ("mixtral-8x7b", "deepseek-v2-lite", "qwen3-30b-a3b", "deepseek-v3")   # configs/presets/<name>/config.json


def preset_dir(name: str) -> Path | None:
    """Directory holding the config.json of the shape preset ``name`` (the model's own config.json, no
    weights), or None if there is none."""
    if str(name) not in SHAPE_PRESETS:
        return None
    path = shipped_path("moe_offload.configs", "presets", str(name))
    return path if (path / "config.json").is_file() else None
