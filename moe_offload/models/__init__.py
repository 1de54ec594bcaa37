"""Tiny MoE checkpoints shipped inside the package, addressable by short name.

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
