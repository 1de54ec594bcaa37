"""The tokenizer of a checkpoint: its tokenizer files, or (a GGUF) the vocabulary in its metadata."""

from __future__ import annotations

import os
from pathlib import Path

from .gguf_checkpoint import is_gguf


def load_tokenizer(model: str | os.PathLike):
    """transformers' tokenizer for ``model`` (a checkpoint directory, or a .gguf file whose vocabulary
    transformers turns into a fast tokenizer). Raises OSError or ValueError when there is none."""
    if is_gguf(model):
        from transformers import PreTrainedTokenizerFast

        path = Path(model).expanduser()
        return PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)
