"""Host expert storage and host-to-device copies (moe_offload.transfer)."""

from .copy_engine import CopyEngine
from .host_store import ExpertShape, HostExpertStore, down_view, gate_up_view

__all__ = ["CopyEngine", "ExpertShape", "HostExpertStore", "down_view", "gate_up_view"]
