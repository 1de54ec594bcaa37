"""The OpenAI-compatible server (`moe-offload serve`).

``engine``: BatchEngine, one thread that runs every request on one model with continuous batching;
``batch``: PaddedBatch, the running sequences' left-padded KV cache; ``text``: the released text and
stop strings; ``openai_api``: the wire format (request checks, response JSON, errors); ``app``: the
Starlette app over the engine; ``metrics``: /metrics; ``process``: the server in a subprocess, for
scripts and tests.

``app`` needs the ``serve`` extra (starlette, uvicorn, sse-starlette); the rest needs only torch and
transformers.
"""
