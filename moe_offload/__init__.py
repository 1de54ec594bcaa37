"""moe-offload: run Mixture-of-Experts LLMs on one GPU smaller than the model."""

from .errors import MoEOffloadError
from .loading.config import OffloadConfig
from .loading.loader import from_pretrained
from .loading.tokenizer import load_tokenizer
from .offline import BatchResult, generate_batch, iter_batch

__version__ = "0.1.0"
__all__ = ["BatchResult", "MoEOffloadError", "OffloadConfig", "from_pretrained", "generate_batch", "iter_batch",
           "load_tokenizer", "__version__"]
