"""The OpenAI-compatible server (`moe-offload serve`): ``engine`` runs every request on one model with
continuous batching in one thread, ``app`` is the Starlette app over it, ``openai_api`` the wire format.

Needs the ``serve`` extra (starlette, uvicorn, sse-starlette); ``engine`` needs only torch.
"""
