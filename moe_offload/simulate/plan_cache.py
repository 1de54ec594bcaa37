"""The configuration `run --plan` and `serve --plan` run with: `plan`'s pick for a model on this machine's
hardware profile, searched once and kept beside the profile.

A plan is keyed by what it depends on: the profile's bytes, the checkpoint (its config.json and weight files,
hashed as the trace cache hashes them), the GPU and host memory it is planned for and the search's version.
A changed profile (a new `moe-offload calibrate`) or checkpoint gives a new key: the next run plans again.
Plans live in a ``plans`` folder beside the profile (the user's profile folder for a shipped profile).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import MoEOffloadError
from ..loading.config import OffloadConfig
from .plan import PlanRequest, PlanResult, plan

PLAN_VERSION = 1          # bump when the search changes what it picks: every cached plan is searched again
CALIBRATED_PROFILE = "local"   # the profile `moe-offload calibrate` writes by default


@dataclass(frozen=True)
class CachedPlan:
    """A plan's configuration, its file, and whether it was read from the cache (else searched now)."""

    config: OffloadConfig
    path: Path
    hit: bool
    result: PlanResult | None = None   # the search, when it ran now


def profile_path(profile: str | None) -> Path:
    """The hardware profile a plan is made on: ``profile`` (a name or a YAML path), or this machine's
    calibrated one."""
    from ..runtime.cost import resolve_profile

    name = profile or CALIBRATED_PROFILE
    try:
        return resolve_profile(name)
    except MoEOffloadError:
        if profile:
            raise
        raise MoEOffloadError(f"--plan needs this machine's hardware profile and there is no calibrated one "
                              f"({CALIBRATED_PROFILE!r}); run `moe-offload calibrate` first, or name a profile: "
                              "--plan rtx4090-pcie4 (or a YAML path)") from None


def plan_folder(profile: Path) -> Path:
    """Where plans made on ``profile`` are kept: beside it, or in the user's profile folder when it is shipped."""
    from ..runtime.cost import shipped_profile_dir, user_profile_dir

    shipped = profile.resolve().parent == shipped_profile_dir().resolve()
    return (user_profile_dir() if shipped else profile.parent) / "plans"


def plan_key(request: PlanRequest, profile: Path) -> str:
    """Hex digest of what the plan depends on (see the module docstring)."""
    from ..loading.checkpoint import resolve_model_dir
    from ..runtime.tracing import hash_checkpoint

    digest = hashlib.sha256(json.dumps({
        "plan_version": PLAN_VERSION, "gpu_memory": request.gpu_memory, "host_memory": request.host_memory,
        "disk_gbps": request.disk_gbps, "predictor": request.predictor, "tokens": request.tokens,
    }, sort_keys=True).encode())
    digest.update(profile.read_bytes())
    model = Path(request.model).expanduser()
    if model.is_file():     # a GGUF file: by name, size and modification time
        stat = model.stat()
        digest.update(f"{model.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    else:
        hash_checkpoint(digest, resolve_model_dir(request.model))
    return digest.hexdigest()[:24]


def cached_plan(request: PlanRequest, profile: str | None = None) -> CachedPlan:
    """The plan for ``request`` on ``profile`` (default: the calibrated one): read from the cache when one was
    made for the same profile, checkpoint and memory, else searched now and saved (to a temporary name, then
    renamed, so a reader never sees half a file)."""
    path_of_profile = profile_path(profile)
    request = replace(request, hardware=str(path_of_profile))
    key = plan_key(request, path_of_profile)
    name = Path(request.model.rstrip("/")).name
    path = plan_folder(path_of_profile) / f"{name}-{path_of_profile.stem}-{key}.yaml"
    if path.is_file():
        return CachedPlan(OffloadConfig.from_yaml(path), path, True)
    start = time.perf_counter()
    result = plan(request)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial")
    result.write(partial, request, f"planned for {request.model} on {path_of_profile} in "
                                   f"{time.perf_counter() - start:.0f} s (moe-offload run --plan)")
    partial.replace(path)
    return CachedPlan(OffloadConfig.from_yaml(path), path, False, result)
