"""ModelAdapter: what differs between MoE families, and nothing else."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import Tensor
from transformers import PretrainedConfig

# On disk a routed expert is either per-expert 2-D tensors (what save_pretrained
# and the hub checkpoints write) or, in newer checkpoints, the fused 3-D
# tensors transformers keeps in memory.
_PER_EXPERT = r"model\.layers\.(?P<layer>\d+)\.{block}\.experts\.(?P<expert>\d+)\.(?P<proj>{names})\.weight"
_FUSED = r"model\.layers\.(?P<layer>\d+)\.{block}\.experts\.(?P<proj>gate_up_proj|down_proj)"
NO_GROUPS = (1, 1, "none")   # (num_groups, top_groups, group_rule) of a router that does not limit groups


@dataclass(frozen=True)
class ExpertTensorName:
    """A routed-expert tensor on disk: model layer, expert (None when fused over experts), role."""

    layer: int
    expert: int | None
    role: str  # "gate" | "up" | "down" | "gate_up" (fused) | "down_fused"


@dataclass(frozen=True)
class ModelAdapter:
    """Per-family facts: names on disk, the in-memory experts class, the router, KV size."""

    model_type: str
    experts_class: str                      # transformers class replaced by OffloadedExperts
    disk_block: str = "mlp"                 # name of the MoE block on disk ("block_sparse_moe" for Mixtral)
    gate_name: str = "gate_proj"
    up_name: str = "up_proj"
    down_name: str = "down_proj"
    renames: tuple[tuple[str, str], ...] = ()   # disk -> memory regex renames for dense tensors
    router_attr: str = "gate"               # the router module beside the experts module
    router_scoring: str = "softmax"         # how router logits become per-expert scores
    router_norm_attr: str = "post_attention_layernorm"   # the decoder layer's norm whose output the router reads
    router_bias_attr: str | None = None     # the router's selection-bias tensor (DeepSeek-V3), or None
    router_logits_output: int = 0           # position of the logits [T, E] in the router's forward output
    router_chosen_output: int = 2           # position of the chosen expert ids [T, k] in it
    experts_field: str = "num_experts"      # config.json field: routed experts per MoE layer
    expert_size_field: str = "moe_intermediate_size"   # config.json field: a routed expert's intermediate size

    def expert_tensor(self, name: str) -> ExpertTensorName | None:
        """Parse a routed-expert tensor name; None for every other tensor."""
        names = "|".join((self.gate_name, self.up_name, self.down_name))
        for block in {self.disk_block, "mlp"}:
            m = re.fullmatch(_PER_EXPERT.format(block=re.escape(block), names=names), name)
            if m:
                role = {self.gate_name: "gate", self.up_name: "up", self.down_name: "down"}[m["proj"]]
                return ExpertTensorName(int(m["layer"]), int(m["expert"]), role)
            m = re.fullmatch(_FUSED.format(block=re.escape(block)), name)
            if m:
                role = "gate_up" if m["proj"] == "gate_up_proj" else "down_fused"
                return ExpertTensorName(int(m["layer"]), None, role)
        return None

    def router_outputs(self, output: Any) -> tuple[Tensor, Tensor]:
        """(logits [T, E], chosen ids [T, k]) from the router module's forward output."""
        return output[self.router_logits_output], output[self.router_chosen_output]

    def groups_experts(self, config: PretrainedConfig) -> bool:
        """Whether the router keeps each token inside its best expert groups (DeepSeek's group-limited routing)."""
        return False

    def router_groups(self, config: PretrainedConfig) -> tuple[int, int, str]:
        """(num_groups, top_groups, group_rule) of the router, as predictor.RouterParams takes them."""
        return NO_GROUPS

    def memory_name(self, disk_name: str) -> str:
        """Name of a dense tensor in the transformers module tree."""
        for pattern, repl in self.renames:
            disk_name = re.sub(pattern, repl, disk_name)
        return disk_name

    def kv_bytes_per_token(self, config: PretrainedConfig, element_size: int) -> int:
        """Bytes of KV cache one token adds across all layers (transformers' cache layout)."""
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return 2 * config.num_hidden_layers * heads * head_dim * element_size
