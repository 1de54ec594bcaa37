"""Files shipped inside the package (hardware profiles, tiny models), found the way any install lays them out.

Everything goes through ``importlib.resources``, never ``__file__``: the
``moe_offload.configs`` package, for one, is the repository's ``configs/``
folder in a checkout but ``site-packages/moe_offload/configs`` in a wheel.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

_extracted: dict[tuple[str, ...], Path] = {}


def shipped_path(package: str, *parts: str) -> Path:
    """A filesystem path to the file or folder ``parts`` inside ``package`` (it may not exist).

    Installed packages are plain folders, so this is the file's own path; a
    package imported from a zip archive has its resource extracted once, to a
    temporary folder removed at exit.
    """
    resource = files(package).joinpath(*parts)
    if isinstance(resource, Path):
        return resource
    key = (package, *parts)
    if key not in _extracted:
        folder = Path(tempfile.mkdtemp(prefix="moe-offload-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        target = folder / (parts[-1] if parts else package)
        if resource.is_dir() or resource.is_file():
            _extract(resource, target)
        _extracted[key] = target
    return _extracted[key]


def _extract(resource: Traversable, target: Path) -> None:
    if resource.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        for child in resource.iterdir():
            _extract(child, target / child.name)
    else:
        target.write_bytes(resource.read_bytes())
