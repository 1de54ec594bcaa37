"""Host expert storage and host-to-device copies (moe_offload.transfer)."""

from .copy_engine import CopyEngine
from .host_store import ExpertShape, HostExpertStore

__all__ = ["CopyEngine", "ExpertShape", "HostExpertStore"]
