"""Mixtral: experts `block_sparse_moe.experts.{e}.w1/w3/w2` on disk (gate/up/down)."""

from .base import ModelAdapter

ADAPTER = ModelAdapter(
    model_type="mixtral",
    experts_class="MixtralExperts",
    disk_block="block_sparse_moe",
    gate_name="w1",
    up_name="w3",
    down_name="w2",
    renames=((r"\.block_sparse_moe\.", ".mlp."),),
    experts_field="num_local_experts",
    expert_size_field="intermediate_size",
)
