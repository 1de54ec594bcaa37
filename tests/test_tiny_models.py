"""The shipped tiny MoE checkpoints load with plain transformers and behave like trained models."""

from __future__ import annotations

import ast

import pytest
import torch

from moe_offload.corpus import read_text, stdlib_split
from moe_offload.models import SHIPPED_MODELS, shipped_model_dir

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

NAMES = sorted(SHIPPED_MODELS)
PROMPTS = (
    "def main():\n    ",
    "import os\n\n\ndef",
    "class Point:\n    def __init__(self",
    'if __name__ == "__main__":\n    ',
)
MAX_FILE_BYTES = 16 * 10**6


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and do not stall on a busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=NAMES)
def shipped(request):
    """(name, fp32 model, tokenizer) of one shipped checkpoint: bf16 weights upcast for fast CPU math."""
    path = shipped_model_dir(request.param)
    assert path is not None, f"{request.param} is not shipped (no config.json)"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return request.param, model, AutoTokenizer.from_pretrained(path)


def heldout_batch(tokenizer, files: int = 4, length: int = 512) -> torch.Tensor:
    """The first ``length`` ids of the first ``files`` long-enough held-out stdlib files: (files, length)."""
    _, held_out = stdlib_split()
    rows = []
    for text in read_text(held_out):
        ids = tokenizer(text, verbose=False)["input_ids"]
        if len(ids) >= length:
            rows.append(ids[:length])
        if len(rows) == files:
            break
    return torch.tensor(rows)


def shuffled(batch: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Each row's tokens in a seeded random order: (n, T) -> (n, T)."""
    gen = torch.Generator().manual_seed(seed)
    return batch.gather(1, torch.rand(batch.shape, generator=gen).argsort(dim=1))


@torch.no_grad()
def lm_loss(model, batch: torch.Tensor) -> float:
    """Mean next-token loss on (n, T) ids."""
    return float(model(input_ids=batch, labels=batch, use_cache=False).loss)


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, new_tokens: int = 64) -> str:
    """Greedy continuation of ``prompt`` (without the prompt)."""
    inputs = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def _parses(lines: list[str]) -> bool:
    """True if ``lines`` parse as Python, allowing them to end inside a block or a docstring.

    A block opened on the last line may be closed by ``pass``, an unfinished
    triple-quoted string by its closing quotes.
    """
    text = "\n".join(lines)
    last = lines[-1]
    indent = " " * (len(last) - len(last.lstrip(" ")))
    closers = ("", f"\n{indent}    pass", '"""', "'''")
    for candidate in (text + closer for closer in closers):
        try:
            ast.parse(candidate)
            return True
        except SyntaxError:
            continue
    return False


def python_shaped(prompt: str, completion: str, min_lines: int = 2) -> bool:
    """Whether prompt + completion reads as Python code.

    The completed lines (the prompt's unfinished last line onwards, cut at the
    last newline) must all be indented by multiples of four spaces, and a
    prefix of them holding at least ``min_lines`` distinct non-blank lines
    must parse with ``ast``. Token salad from random weights has no newlines,
    odd indentation, a single repeated line, or does not parse.
    """
    lines = (prompt + completion).split("\n")[:-1]  # drop the unfinished last line
    start = prompt.count("\n")  # first line the completion touches
    if any((len(line) - len(line.lstrip(" "))) % 4 for line in lines[start:] if line.strip()):
        return False
    for end in range(len(lines), start, -1):
        if len({line.strip() for line in lines[start:end] if line.strip()}) < min_lines:
            return False
        if _parses(lines[:end]):
            return True
    return False


def test_short_names_resolve_to_checkpoint_dirs():
    for name in NAMES:
        path = shipped_model_dir(name)
        assert path is not None and (path / "model.safetensors").is_file()
        for file in path.iterdir():
            assert file.stat().st_size < MAX_FILE_BYTES, f"{file} is {file.stat().st_size} bytes"
    assert shipped_model_dir("no-such-model") is None


@pytest.mark.parametrize("name", NAMES)
def test_loads_with_plain_transformers(name):
    path = shipped_model_dir(name)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.dtype == torch.bfloat16
    assert model.config.vocab_size == len(tokenizer)
    code = "def f(x):\n    return x ** 2  # square\n"
    ids = tokenizer(code)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == code


def test_mixtral_architecture():
    config = AutoConfig.from_pretrained(shipped_model_dir("tiny-mixtral"))
    assert config.model_type == "mixtral"
    assert (config.num_local_experts, config.num_experts_per_tok) == (8, 2)
    assert config.num_hidden_layers >= 6 and config.max_position_embeddings >= 1024


def test_deepseek_architecture():
    config = AutoConfig.from_pretrained(shipped_model_dir("tiny-deepseek"))
    assert config.model_type == "deepseek_v3"
    assert config.n_routed_experts >= 32 and config.num_experts_per_tok >= 4
    assert config.n_shared_experts == 1 and config.first_k_dense_replace == 1
    assert config.num_hidden_layers >= 6 and config.n_routed_experts % config.n_group == 0
    assert config.topk_group <= config.n_group


def test_heldout_loss_beats_shuffled_tokens(shipped):
    name, model, tokenizer = shipped
    batch = heldout_batch(tokenizer)  # (4, 512) ids never trained on
    held, mixed = lm_loss(model, batch), lm_loss(model, shuffled(batch))
    assert held < 5.5, f"{name}: held-out loss {held:.2f}"
    assert mixed - held > 2.5, f"{name}: held-out {held:.2f} vs shuffled {mixed:.2f}"


def test_greedy_completion_is_python_shaped(shipped):
    name, model, tokenizer = shipped
    completions = {prompt: greedy(model, tokenizer, prompt) for prompt in PROMPTS}
    passed = [p for p, c in completions.items() if python_shaped(p, c)]
    assert len(passed) >= len(PROMPTS) // 2, f"{name}: {completions}"


def test_shape_check_rejects_random_weights(shipped):
    name, model, tokenizer = shipped
    torch.manual_seed(0)
    untrained = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32).eval()
    completions = {prompt: greedy(untrained, tokenizer, prompt) for prompt in PROMPTS}
    assert not any(python_shaped(p, c) for p, c in completions.items()), f"{name}: {completions}"
    batch = heldout_batch(tokenizer, files=2, length=256)
    assert lm_loss(untrained, shuffled(batch)) - lm_loss(untrained, batch) < 1.0
