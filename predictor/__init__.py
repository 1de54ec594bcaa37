"""moe_offload.predictor"""
