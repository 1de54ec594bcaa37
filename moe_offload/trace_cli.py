"""`moe-offload trace`: record a routing trace (experts, router scores, optional gate inputs) to .npz.

    moe-offload trace --model tiny-mixtral --stdlib-heldout 40 --max-new-tokens 32 --out trace.npz --gate-inputs
    moe-offload trace --model DIR --prompts prompts.jsonl --max-new-tokens 64 --out trace.npz
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .argtypes import positive_int
from .errors import MoEOffloadError

PROMPT_LINES = 40          # a stdlib prompt is the first lines of a file
PROMPT_CHARS = 2000        # ... cut to at most this many characters


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``trace`` subcommand."""
    from .cli import add_model_args

    p = subparsers.add_parser("trace", help="record which experts each token picks (a routing trace, .npz)")
    add_model_args(p)
    add_prompt_args(p)
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="greedy tokens generated per prompt")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--gate-inputs", action="store_true",
                   help="also store each MoE layer's router input (needed to fit and evaluate gate predictors)")
    p.set_defaults(func=main)


def add_prompt_args(p: argparse.ArgumentParser) -> argparse._MutuallyExclusiveGroup:
    """--prompts | --stdlib-heldout N | --stdlib-train N (one required); returns the group."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", help=".jsonl (a JSON string or {\"prompt\": ...} per line) or text, "
                                          "one prompt per line")
    source.add_argument("--stdlib-heldout", type=positive_int, metavar="N",
                        help="N prompts from standard-library files the shipped models never trained on")
    source.add_argument("--stdlib-train", type=positive_int, metavar="N",
                        help="N prompts from the shipped models' training files (for fitting predictors)")
    p.add_argument("--prompt-lines", type=positive_int, default=PROMPT_LINES,
                   help=f"lines of each stdlib file used as its prompt (default {PROMPT_LINES})")
    return source


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a .jsonl file (JSON strings or objects with "prompt") or a text file, one per line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise MoEOffloadError(f"cannot read prompts file {path}: {err.strerror}") from None
    lines = [line for line in lines if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    return [_jsonl_prompt(path, n, line) for n, line in enumerate(lines, 1)]


def _jsonl_prompt(path: Path, number: int, line: str) -> str:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as err:
        raise MoEOffloadError(f"{path}:{number} is not JSON ({err.msg})") from None
    if isinstance(item, dict) and isinstance(item.get("prompt"), str):
        return item["prompt"]
    if isinstance(item, str):
        return item
    raise MoEOffloadError(f"{path}:{number}: each line must be a JSON string or an object with a \"prompt\" string")


def stdlib_prompts(count: int, held_out: bool, lines: int = PROMPT_LINES, max_chars: int = PROMPT_CHARS) -> list[str]:
    """``count`` prompts of ``lines`` lines from one side of the corpus split (held-out or training files).

    The first windows (lines 1..lines) of files spread evenly over the split come
    first; past one per file, the next windows of every file follow. Empty
    windows are skipped.
    """
    from .models.corpus import read_file, stdlib_split

    train, held = stdlib_split()
    files = held if held_out else train
    if count < 1 or not files:
        raise MoEOffloadError(f"need at least one prompt and one corpus file (asked {count}, have {len(files)} files)")
    taken = min(count, len(files))
    picked = [files[(i * len(files)) // taken] for i in range(taken)]
    texts = {path: read_file(path).splitlines(keepends=True) for path in picked}
    prompts: list[str] = []
    window = 0
    while len(prompts) < count and any(len(t) > window * lines for t in texts.values()):
        for path in picked:
            text = "".join(texts[path][window * lines:(window + 1) * lines])[:max_chars]
            if text.strip() and len(prompts) < count:
                prompts.append(text)
        window += 1
    return prompts


def prompts_from_args(args: argparse.Namespace) -> list[str]:
    if args.prompts:
        prompts = read_prompts(args.prompts)
    elif args.stdlib_heldout is not None:
        prompts = stdlib_prompts(args.stdlib_heldout, held_out=True, lines=args.prompt_lines)
    else:
        prompts = stdlib_prompts(args.stdlib_train, held_out=False, lines=args.prompt_lines)
    if not prompts:
        raise MoEOffloadError("no prompts to trace (the prompts file is empty)")
    return prompts


def prompt_source(args: argparse.Namespace) -> str:
    """How the prompts were chosen, for the trace's metadata."""
    if args.prompts:
        return f"file {Path(args.prompts).name}"
    if args.stdlib_heldout is not None:
        return f"stdlib-heldout {args.stdlib_heldout} x {args.prompt_lines} lines"
    return f"stdlib-train {args.stdlib_train} x {args.prompt_lines} lines"


def load_tokenizer(model):
    """The tokenizer saved beside a loaded model's weights."""
    from transformers import AutoTokenizer

    directory = model.config._name_or_path
    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError):
        raise MoEOffloadError(f"{directory} has no tokenizer files; tracing needs them (tokenizer.json etc.)") from None


def main(args: argparse.Namespace) -> int:
    from .cli import offload_config
    from .loader import from_pretrained
    from .tracing import record_trace

    prompts = prompts_from_args(args)
    model = from_pretrained(args.model, offload_config(args))
    trace = record_trace(model, load_tokenizer(model), prompts, args.max_new_tokens, gate_inputs=args.gate_inputs,
                         progress=model.offload.config.progress)
    trace.meta |= {"prompts": prompt_source(args), "max_new_tokens": args.max_new_tokens}
    path = trace.save(args.out)
    print(f"[moe-offload] traced {len(prompts)} prompts, {trace.num_tokens} tokens "
          f"({int(trace.decode.sum())} generated), {trace.num_layers} MoE layers x {trace.num_experts} experts, "
          f"top-{trace.top_k}{', with gate inputs' if trace.gate_inputs is not None else ''} -> {path}")
    return 0
