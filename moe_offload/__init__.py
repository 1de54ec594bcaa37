"""moe-offload: run Mixture-of-Experts LLMs on one GPU smaller than the model."""

from .errors import MoEOffloadError
from .loading.config import OffloadConfig
from .loading.loader import from_pretrained
from .loading.tokenizer import load_tokenizer

__version__ = "0.1.0"
__all__ = ["MoEOffloadError", "OffloadConfig", "from_pretrained", "load_tokenizer", "__version__"]
