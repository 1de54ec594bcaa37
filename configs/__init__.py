"""moe_offload.configs"""
