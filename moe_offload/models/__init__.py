"""Tiny MoE checkpoints shipped inside the package, addressable by short name.

``shipped_model_dir("tiny-mixtral")`` gives the directory of a shipped
checkpoint (loadable with plain ``transformers``), or None for any other name,
so callers can accept either a short name or a path.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent

SHIPPED_MODELS: dict[str, Path] = {
    "tiny-mixtral": _HERE / "tiny-mixtral",
    "tiny-deepseek": _HERE / "tiny-deepseek",
}


def shipped_model_dir(name: str) -> Path | None:
    """Directory of the shipped model called ``name``, or None if there is none.

    Returns None too when the name is known but its directory holds no
    ``config.json`` (e.g. a source checkout without the weights).
    """
    path = SHIPPED_MODELS.get(str(name))
    if path is None or not (path / "config.json").is_file():
        return None
    return path
