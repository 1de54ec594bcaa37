"""The OpenAI-compatible server (`moe-offload serve`).

``engine``: BatchEngine, one thread that runs every request on one model with continuous batching;
``engine_process``: EngineProcess, that engine and its model in a child process (the server's default);
``batch``: PaddedBatch, the running sequences' left-padded KV cache; ``text``: the released text and
stop strings; ``logprobs``: generated tokens' log probabilities and their JSON; ``openai_api``: the
wire format (request checks, response JSON, errors); ``app``: the Starlette app over the engine;
``metrics``: /metrics; ``process``: the server in a subprocess, for scripts and tests.

``app`` needs the ``serve`` extra (starlette, uvicorn, sse-starlette); the rest needs only torch and
transformers.
"""
