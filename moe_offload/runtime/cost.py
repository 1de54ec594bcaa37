"""Hardware profiles and the cost model the scheduler and the simulator share.

A HardwareProfile holds model-independent, measured or published rates (copy
GB/s, memory GB/s, matmul FLOP/s, fixed costs). A CostModel applies one to an
expert's size: every expert cost is a roofline, fixed + max(bytes / bandwidth,
flops / throughput), as a function of the token count, except a CPU expert of a
format the profile has measured seconds for (``cpu_expert_s``, from `calibrate`
timing the CPU runner's chosen backend): those are interpolated between the
measured token counts and scaled to the expert's size.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import MoEOffloadError
from ..resources import shipped_path


def shipped_profile_dir() -> Path:
    """The hardware profiles shipped with the package (moe_offload/configs/hardware)."""
    return shipped_path("moe_offload.configs", "hardware")


def user_profile_dir() -> Path:
    """Where `moe-offload calibrate` saves profiles: $XDG_CONFIG_HOME/moe-offload/hardware (~/.config/...)."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "moe-offload" / "hardware"


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    h2d_gbps: float           # pinned host -> device copy bandwidth, GB/s
    copy_latency_us: float    # fixed cost per expert copy
    gpu_mem_gbps: float       # device memory read bandwidth reached by expert matmuls, GB/s
    gpu_tflops: float         # matmul throughput at the model dtype, TFLOP/s
    gpu_launch_us: float      # fixed cost of one expert on the device (kernel launches)
    cpu_mem_gbps: float       # host memory read bandwidth reached by the CPU expert kernel, GB/s
    cpu_gflops: float         # CPU expert kernel throughput, GFLOP/s
    cpu_start_us: float       # fixed cost of one expert job on the CPU
    source: str = ""          # where the numbers come from
    disk_gbps: float = 0.0    # expert reads from disk (the disk tier), GB/s; 0: not known (reads cost nothing)
    # measured CPU expert seconds per format and token count ({format: {tokens: s}}) with the runner's chosen
    # backend, on an expert of cpu_expert_params weights (3 * H * I); cpu_backend: {format: {tokens: backend}}
    cpu_expert_s: dict | None = None
    cpu_expert_params: int = 0
    cpu_backend: dict | None = None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "HardwareProfile":
        path = resolve_profile(path)
        data = yaml.safe_load(path.read_text()) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        unknown, missing = set(data) - known, required - set(data)
        if unknown or missing:
            raise MoEOffloadError(f"hardware profile {path}: unknown fields {sorted(unknown)}, missing {sorted(missing)}")
        return cls(**data)

    def to_yaml(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(dataclasses.asdict(self), sort_keys=False))
        return path


def resolve_profile(name_or_path: str | Path) -> Path:
    """A YAML path, or a profile name: one saved by `calibrate` (user_profile_dir) or a shipped one ('h100-pcie5')."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    folders = (user_profile_dir(), shipped_profile_dir())
    for folder in folders:
        if (folder / f"{name_or_path}.yaml").is_file():
            return folder / f"{name_or_path}.yaml"
    names = sorted({p.stem for folder in folders if folder.is_dir() for p in folder.glob("*.yaml")})
    raise MoEOffloadError(f"hardware profile {name_or_path!r} not found; give a YAML path or one of {names}")


@dataclass(frozen=True)
class CostModel:
    """Seconds for one expert: copying it, or running it on the device or the CPU for ``tokens`` tokens."""

    profile: HardwareProfile
    bytes_per_expert: int
    flops_per_token: int      # 2 * 3 * H * I for a gated FFN
    expert_format: str = ""   # the experts' stored format (canonical name): picks the profile's measured CPU seconds
    # seconds already computed, by (device, tokens): the costs are pure functions of the fields, and a
    # simulated sweep asks for the same few token counts millions of times
    _memo: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    @classmethod
    def for_expert(cls, profile: HardwareProfile, hidden: int, intermediate: int, element_size: int,
                   nbytes: int | None = None, expert_format: str = "") -> "CostModel":
        """Costs of one H x I gated expert stored in ``nbytes`` (default: 3HI elements of ``element_size``;
        packed formats give their byte size, scales included) in ``expert_format`` (picks the profile's
        measured CPU seconds)."""
        size = 3 * hidden * intermediate * element_size if nbytes is None else int(nbytes)
        return cls(profile, size, 6 * hidden * intermediate, expert_format)

    def copy_s(self) -> float:
        seconds = self._memo.get("copy")
        if seconds is None:
            p = self.profile
            seconds = self._memo["copy"] = p.copy_latency_us * 1e-6 + self.bytes_per_expert / (p.h2d_gbps * 1e9)
        return seconds

    def disk_s(self) -> float:
        """Seconds to read one expert from disk into host memory (0 without a disk rate)."""
        rate = self.profile.disk_gbps
        return self.bytes_per_expert / (rate * 1e9) if rate > 0 else 0.0

    def link_s(self, nbytes: int) -> float:
        """Seconds the link needs for ``nbytes`` already queued on it (no per-copy latency)."""
        return nbytes / (self.profile.h2d_gbps * 1e9)

    def gpu_s(self, tokens: int) -> float:
        seconds = self._memo.get(("gpu", tokens))
        if seconds is None:
            p = self.profile
            seconds = self._memo[("gpu", tokens)] = self._roofline(tokens, p.gpu_launch_us, p.gpu_mem_gbps,
                                                                   p.gpu_tflops * 1e12)
        return seconds

    def cpu_s(self, tokens: int) -> float:
        """Seconds on the CPU: start-up plus the profile's measured seconds for ``expert_format`` when it has
        them (scaled from the measured expert's size to this one's), else the roofline."""
        seconds = self._memo.get(("cpu", tokens))
        if seconds is None:
            seconds = self._memo[("cpu", tokens)] = self._cpu_s(tokens)
        return seconds

    def _cpu_s(self, tokens: int) -> float:
        p = self.profile
        measured = (p.cpu_expert_s or {}).get(self.expert_format)
        if measured and p.cpu_expert_params > 0 and tokens > 0:
            scale = (self.flops_per_token / 2) / p.cpu_expert_params     # this expert's weights / the measured one's
            return p.cpu_start_us * 1e-6 + interpolate_seconds(measured, tokens) * scale
        return self._roofline(tokens, p.cpu_start_us, p.cpu_mem_gbps, p.cpu_gflops * 1e9)

    def _roofline(self, tokens: int, start_us: float, mem_gbps: float, flops_per_s: float) -> float:
        """Start-up plus the slower of streaming the expert's weights and its FLOPs for ``tokens``."""
        if tokens <= 0:
            return 0.0
        return start_us * 1e-6 + max(self.bytes_per_expert / (mem_gbps * 1e9), tokens * self.flops_per_token / flops_per_s)


def interpolate_seconds(measured: dict, tokens: int) -> float:
    """Seconds at ``tokens`` from {token count: seconds}: linear between the measured counts, the first
    count's seconds below it (one pass over the weights either way), the last segment's slope beyond."""
    points = sorted((int(t), float(s)) for t, s in measured.items())
    first, first_s = points[0]
    if tokens <= first:
        return first_s
    if len(points) == 1:
        return first_s * tokens / first
    for (t0, s0), (t1, s1) in zip(points, points[1:]):
        if tokens <= t1:
            return s0 + (s1 - s0) * (tokens - t0) / (t1 - t0)
    (t0, s0), (t1, s1) = points[-2], points[-1]
    return s1 + max(s1 - s0, 0.0) * (tokens - t1) / (t1 - t0)
