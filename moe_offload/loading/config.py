"""OffloadConfig: every knob of an offloaded model in one frozen dataclass."""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ..cache import ALLOCATIONS, POLICIES, RUNTIME_ALLOCATIONS, SIMULATION_ONLY
from ..cpu_kernels.packed import FORMAT_NAMES, canonical_expert_format
from ..errors import MoEOffloadError
from ..predictor.registry import PREDICTORS, RUNTIME_PREDICTORS
from ..runtime.dense_cpu import CPU_DENSE
from ..runtime.scheduler import CPU_EXPERTS
from ..transfer.readback import HOST_WAITS
from ..transfer.streams import BACKENDS as COPY_BACKENDS

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
# The names of policies, allocations and predictors are their registries' (moe_offload.cache,
# moe_offload.predictor.registry): what runs at runtime is checked here, the rest is simulation-only.


def parse_bytes(value: int | float | str) -> int:
    """'6GiB', '500MB', '1.5 gib' or a plain number of bytes -> int bytes."""
    if isinstance(value, bool):
        raise MoEOffloadError(f"memory size {value!r} is not a size; give bytes or a string like '6GiB'")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise MoEOffloadError(f"memory size must be positive, got {value}")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise MoEOffloadError(
            f"cannot read memory size {value!r}; use bytes or a number with a unit "
            "such as '6GiB', '500MB', '1.5GB'"
        )
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise MoEOffloadError(f"memory size must be positive, got {value!r}")
    return size


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16; None or 'auto' -> None (checkpoint's)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if str(value).lower() == "auto":
        return None
    name = str(value).lower().removeprefix("torch.")
    if name not in _DTYPES:
        raise MoEOffloadError(f"unknown dtype {value!r}; use one of float32, float16, bfloat16 or auto")
    return _DTYPES[name]


def parse_device(value: str) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' -> torch.device; anything else raises MoEOffloadError."""
    supported = "use 'cuda', 'cuda:N' or 'cpu'"
    if not isinstance(value, str):
        raise MoEOffloadError(f"device {value!r} is not a device name; {supported}")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise MoEOffloadError(f"unknown device {value!r}; {supported}") from None
    if device.type not in ("cuda", "cpu"):
        raise MoEOffloadError(f"device {value!r} is not supported; {supported}")
    return device


def check_cache_policy(name: str) -> None:
    """MoEOffloadError unless ``name`` is a runtime cache policy (cache.POLICIES)."""
    if name in SIMULATION_ONLY:
        raise MoEOffloadError(
            f"cache_policy {name!r} needs the future routing and is simulation-only "
            f"(moe-offload sweep --simulate); at runtime choose one of {', '.join(POLICIES)}"
        )
    if name not in POLICIES:
        raise MoEOffloadError(f"unknown cache_policy {name!r}; choose one of {', '.join(POLICIES)}")


def check_slot_allocation(name: str) -> None:
    """MoEOffloadError unless ``name`` is an allocation the runtime can compute (no miss curves needed)."""
    if name in ALLOCATIONS and ALLOCATIONS[name].needs_miss_curves:
        raise MoEOffloadError(
            f"slot_allocation {name!r} needs per-layer miss curves measured on a routing trace, so it exists only "
            "in the simulator (moe-offload sweep --simulate); at runtime choose one of "
            f"{', '.join(RUNTIME_ALLOCATIONS)}"
        )
    if name not in RUNTIME_ALLOCATIONS:
        raise MoEOffloadError(
            f"unknown slot_allocation {name!r}; choose one of {', '.join(RUNTIME_ALLOCATIONS)}"
        )


def check_predictor(name: str | None) -> None:
    """MoEOffloadError unless ``name`` is None, 'none' or a runtime predictor of predictor.PREDICTORS."""
    if name is None or name in RUNTIME_PREDICTORS:
        return
    if name in PREDICTORS:
        raise MoEOffloadError(
            f"predictor {name!r} {PREDICTORS[name].why_trace_only}, so it exists only in the simulator "
            f"(moe-offload sweep --simulate --predictor {name}); at runtime choose one of "
            f"{', '.join(RUNTIME_PREDICTORS)}"
        )
    raise MoEOffloadError(f"unknown predictor {name!r}; choose one of {', '.join(RUNTIME_PREDICTORS)}")


# What unset fields become on each device type: beside a GPU the hybrid scheduler and prefetch over CUDA streams
# with the predictor and depth searched over the shipped models (SEARCHED_DEFAULTS_FILE); on the CPU plain copies
# that land at once and no prefetch.
STATIC_DEFAULTS = {
    "cuda": {"cpu_experts": "auto", "copy_backend": "cuda"},
    "cpu": {"cpu_experts": "never", "predictor": "none", "copy_backend": "immediate", "prefetch_depth": 1},
}
SEARCHED_DEFAULTS_FILE = "runtime-defaults.yaml"   # in moe_offload.configs, written by bench/runtime_defaults.py
SEARCHED_FIELDS = ("predictor", "prefetch_depth")


def read_searched_defaults(path: str | Path) -> dict[str, Any]:
    """The CUDA defaults a defaults search wrote to ``path``: {"predictor": ..., "prefetch_depth": ...}."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise MoEOffloadError(f"cannot read the searched defaults {path}: {err}; reinstall moe-offload or "
                              "regenerate it with `python bench/runtime_defaults.py`") from None
    found = {name: data.get(name) for name in SEARCHED_FIELDS}
    depth = found["prefetch_depth"]
    if found["predictor"] not in RUNTIME_PREDICTORS or isinstance(depth, bool) or not isinstance(depth, int) \
            or depth < 1:
        raise MoEOffloadError(f"the searched defaults {path} need a runtime predictor and a prefetch_depth >= 1, "
                              f"got {found}; regenerate it with `python bench/runtime_defaults.py`")
    return found


@functools.cache
def searched_defaults() -> dict[str, Any]:
    """The shipped searched CUDA defaults (read once)."""
    from ..resources import shipped_path

    return read_searched_defaults(shipped_path("moe_offload.configs", SEARCHED_DEFAULTS_FILE))


def device_defaults(device_type: str) -> dict[str, Any]:
    """What unset fields become on ``device_type`` ('cuda' or 'cpu')."""
    static = STATIC_DEFAULTS[device_type]
    return static | searched_defaults() if device_type == "cuda" else static


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class OffloadConfig:
    """How an MoE model is split between device and host and how experts move.

    Exactly one of ``gpu_memory`` (total device bytes the model may use: dense
    weights + KV reserve + expert slots) and ``expert_slots`` sets the size of
    the device expert cache; with neither, every routed expert gets a slot.
    """

    device: str = field(default_factory=default_device)
    dtype: torch.dtype | None = None          # None: the checkpoint's dtype
    gpu_memory: int | None = None             # bytes
    expert_slots: int | None = None
    cache_policy: str = "score"
    score_alpha: float = 0.5                  # score policy: weight of the newest router scores (HybriMoE: 0.5)
    score_top_p: int | None = None            # score policy: experts credited per call; None: each layer
                                              # duels 2 * top_k (HybriMoE) against top_k
    slot_allocation: str = "global"           # global | uniform | shallow: slots per MoE layer
    kv_reserve_tokens: int = 2048             # KV cache kept free inside gpu_memory
    workspace_bytes: int = 64 * 2**20         # activations and allocator slack inside gpu_memory
    progress: bool = True                     # tqdm bar while loading experts
    cpu_experts: str | None = None            # "auto": the scheduler picks copy or CPU per miss;
                                              # "never": copy every miss; "always": every miss on the CPU;
                                              # None: "auto" on CUDA, "never" on CPU
    cpu_threads: int | None = None            # CPU kernel threads (default: all cores)
    host_wait: str = "spin"                   # how the host waits for the device's readbacks: "spin" (polls: the
                                              # lowest latency, a core busy) or "block" (sleeps: the core is left
                                              # to the CPU experts' threads)
    hardware: str | None = None               # hardware profile (YAML path, or name of a calibrated or shipped one);
                                              # None: measured at load when the scheduler needs costs
    predictor: str | None = None              # "none", "cross_layer", "learned", ...; None: cross_layer on CUDA
    prefetch_depth: int | None = None         # layers ahead to prefetch; None: the searched default on CUDA
    prefetch_width: int | None = None         # experts per token prefetched per layer (default: top-k)
    copy_backend: str | None = None           # "cuda" (streams and events); on CPU "immediate" (a copy lands
                                              # when issued) or "deferred" (copies land late, in a seeded random
                                              # order their dependencies allow: tests); None: cuda or immediate
    copy_seed: int = 0                        # deferred backend: seed of the landing order
    expert_dtype: str | None = None           # routed experts' stored format: None (the compute dtype), "int8",
                                              # "int4" (groups of 64), "int4-g32", "int4-g128", "fp8", or a float dtype
    quant_cache: str | None = None            # folder of the quantized-experts cache files; None: the user's
                                              # cache folder ($XDG_CACHE_HOME/moe-offload/experts)
    host_memory: int | None = None            # bytes of page-locked host memory for experts; fewer than all of
                                              # them: the rest stay on disk and are read on demand and ahead
    host_policy: str = "lru"                  # the host cache's eviction policy (the device cache's names)
    disk_threads: int = 4                     # reads from disk kept in flight
    cpu_dense: str = "auto"                   # dense nn.Linear layers on a CPU device: "auto" (the fastest of the
                                              # model's dtype, a float32 upcast and the Numba kernel, measured at
                                              # load per shape), "native", "float32" or "kernel"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        if self.expert_dtype is not None:
            try:
                object.__setattr__(self, "expert_dtype", canonical_expert_format(self.expert_dtype))
            except ValueError:
                raise MoEOffloadError(f"unknown expert_dtype {self.expert_dtype!r}; choose one of "
                                      f"{', '.join(FORMAT_NAMES)} (or leave it unset for the model's dtype)") from None
        if self.gpu_memory is not None:
            object.__setattr__(self, "gpu_memory", parse_bytes(self.gpu_memory))
        if self.host_memory is not None:
            object.__setattr__(self, "host_memory", parse_bytes(self.host_memory))
        if self.cpu_dense not in CPU_DENSE:
            raise MoEOffloadError(f"cpu_dense must be one of {', '.join(CPU_DENSE)}, got {self.cpu_dense!r}")
        if self.host_policy not in POLICIES:
            raise MoEOffloadError(f"unknown host_policy {self.host_policy!r}; choose one of {', '.join(POLICIES)}")
        if isinstance(self.disk_threads, bool) or not isinstance(self.disk_threads, int) or self.disk_threads < 1:
            raise MoEOffloadError(f"disk_threads must be an integer >= 1, got {self.disk_threads!r}")
        if self.gpu_memory is not None and self.expert_slots is not None:
            raise MoEOffloadError("give either gpu_memory or expert_slots, not both")
        if self.expert_slots is not None and int(self.expert_slots) < 1:
            raise MoEOffloadError(f"expert_slots must be at least 1, got {self.expert_slots}")
        check_cache_policy(self.cache_policy)
        if not isinstance(self.score_alpha, (int, float)) or not 0.0 < self.score_alpha <= 1.0:
            raise MoEOffloadError(f"score_alpha must be a number in (0, 1], got {self.score_alpha!r}")
        if self.score_top_p is not None and (isinstance(self.score_top_p, bool) or not isinstance(
                self.score_top_p, int) or self.score_top_p < 1):
            raise MoEOffloadError(f"score_top_p must be an integer >= 1 (or null to duel 2 * top_k against top_k), "
                                  f"got {self.score_top_p!r}")
        check_slot_allocation(self.slot_allocation)
        if self.cpu_experts is not None and self.cpu_experts not in CPU_EXPERTS:
            raise MoEOffloadError(f"cpu_experts must be one of {', '.join(CPU_EXPERTS)}, got {self.cpu_experts!r}")
        if self.host_wait not in HOST_WAITS:
            raise MoEOffloadError(f"host_wait must be one of {', '.join(HOST_WAITS)}, got {self.host_wait!r}")
        check_predictor(self.predictor)
        if (self.prefetch_depth is not None and self.prefetch_depth < 0) or \
                (self.prefetch_width is not None and self.prefetch_width < 1):
            raise MoEOffloadError("prefetch_depth must be >= 0 and prefetch_width >= 1")
        if self.copy_backend is not None and self.copy_backend not in COPY_BACKENDS:
            raise MoEOffloadError(f"copy_backend must be one of {', '.join(COPY_BACKENDS)}, got {self.copy_backend!r}")
        device = parse_device(self.device)
        if (self.copy_backend == "cuda") != (device.type == "cuda") and self.copy_backend is not None:
            raise MoEOffloadError(f"copy_backend {self.copy_backend!r} does not run on device {self.device!r}; "
                                  "use 'cuda' on a GPU and 'immediate' or 'deferred' on the CPU")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise MoEOffloadError("device 'cuda' requested but no CUDA GPU is visible; use device='cpu'")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def on_cuda(self) -> bool:
        return self.torch_device.type == "cuda"

    def _resolved(self, name: str) -> str:
        """Field ``name`` as the engine runs it: its value, or the device's default when unset."""
        value = getattr(self, name)
        return device_defaults(self.torch_device.type)[name] if value is None else value

    @property
    def resolved_cpu_experts(self) -> str:
        """cpu_experts as the engine runs it; unset: the scheduler beside a GPU, plain copies on CPU."""
        return self._resolved("cpu_experts")

    @property
    def policy_params(self) -> dict[str, Any]:
        """Keyword arguments for cache_policy's class (the score policy's alpha and p)."""
        if self.cache_policy != "score":
            return {}
        return {"alpha": float(self.score_alpha), "top_p": self.score_top_p}

    @property
    def resolved_copy_backend(self) -> str:
        """copy_backend as the engine runs it; unset: streams on CUDA, immediate copies on CPU."""
        return self._resolved("copy_backend")

    @property
    def resolved_prefetch_depth(self) -> int:
        """prefetch_depth as the engine runs it; unset: the searched default on CUDA."""
        return self._resolved("prefetch_depth")

    @property
    def resolved_predictor(self) -> str:
        """predictor as the engine runs it; unset: the searched default on CUDA, none on CPU."""
        return self._resolved("predictor")

    def replace(self, **fields: Any) -> "OffloadConfig":
        """A copy with ``fields`` changed; unknown names raise MoEOffloadError."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise MoEOffloadError(
                f"unknown OffloadConfig field(s) {unknown}; known fields: {', '.join(sorted(known))}"
            )
        if "gpu_memory" in fields and fields["gpu_memory"] is not None:
            fields.setdefault("expert_slots", None)
        elif "expert_slots" in fields and fields["expert_slots"] is not None:
            fields.setdefault("gpu_memory", None)
        return dataclasses.replace(self, **fields)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "OffloadConfig":
        """Load from a YAML mapping of field names to values."""
        path = Path(path)
        if not path.is_file():
            raise MoEOffloadError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise MoEOffloadError(f"config file {path} is not valid YAML{where}: {problem}") from None
        if not isinstance(data, dict):
            raise MoEOffloadError(f"config file {path} must hold a mapping of OffloadConfig fields")
        return cls().replace(**data)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["dtype"] = None if self.dtype is None else str(self.dtype).removeprefix("torch.")
        return out
