"""`moe-offload batch`: every prompt of a JSONL file through the offloaded model with continuous batching,
answers written as JSONL in input order; a rerun resumes after the answers already written."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import MoEOffloadError
from .argtypes import non_negative_float, positive_int
from .common import add_model_args, offload_config


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``batch`` subcommand."""
    p = subparsers.add_parser("batch", help="generate for every prompt of a JSONL file (offline, resumable)")
    add_model_args(p)
    p.add_argument("--input", required=True,
                   help="JSONL, one request per line: 'prompt' or 'messages', optional 'id', 'max_tokens', "
                        "'temperature', 'seed', 'stop' (OpenAI fields)")
    p.add_argument("--output", required=True,
                   help="JSONL answers in input order ('id', 'text', 'finish_reason', 'usage'); an existing file "
                        "is resumed after its last whole line")
    p.add_argument("--max-tokens", type=positive_int, default=128, help="for lines without max_tokens (default 128)")
    p.add_argument("--temperature", type=non_negative_float, default=0.0,
                   help="for lines without temperature (default 0: greedy)")
    p.add_argument("--max-batch", type=positive_int,
                   help="most sequences run together (default: what the KV memory plan allows, at most 256)")
    p.add_argument("--attention-rows", type=positive_int,
                   help="sequences per attention micro-batch, KV cache in host memory (default: the memory plan's; "
                        "the whole batch when its KV fits on the device)")
    p.add_argument("--prefill-chunk", type=positive_int, default=512, help="prompt tokens of one sequence per step")
    p.add_argument("--cache-policy", help="expert cache policy")
    p.set_defaults(func=main)


def read_requests(path: Path) -> list[dict]:
    """The request objects of a JSONL file (blank lines skipped); MoEOffloadError naming a bad line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise MoEOffloadError(f"cannot read {path}: {err}; give a readable UTF-8 JSONL file") from None
    requests = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            request = json.loads(line)
        except json.JSONDecodeError as err:
            raise MoEOffloadError(f"{path} line {number}: not valid JSON ({err.msg}); "
                                  "fix or remove that line") from None
        if not isinstance(request, dict) or not ("prompt" in request or "messages" in request):
            raise MoEOffloadError(f"{path} line {number}: each line must be an object with 'prompt' or 'messages'; "
                                  "fix or remove that line")
        requests.append(request | {"_line": number})
    if not requests:
        raise MoEOffloadError(f"{path} has no requests; give one JSON object per line")
    return requests


def answers_written(path: Path, requests: list[dict]) -> int:
    """How many answers ``path`` already holds (whole lines; a partial last line is cut off). Checks that
    they answer ``requests`` (the same ids in the same order)."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    whole = data[:data.rfind(b"\n") + 1]
    if len(whole) < len(data):
        with open(path, "r+b") as f:  # an interrupted write: drop the partial line, it is written again
            f.truncate(len(whole))
    answers = whole.decode("utf-8", errors="replace").splitlines()
    if len(answers) > len(requests):
        raise MoEOffloadError(f"{path} has {len(answers)} answers for {len(requests)} requests; it belongs to "
                              "another input: remove it or choose another --output")
    for number, (line, request) in enumerate(zip(answers, requests), 1):
        try:
            answer = json.loads(line)
        except json.JSONDecodeError:
            raise MoEOffloadError(f"{path} line {number} is not an answer; remove the file to start over") from None
        if answer.get("id") != request.get("id"):
            raise MoEOffloadError(f"{path} line {number} answers id {answer.get('id')!r}, the input's line "
                                  f"{request['_line']} has id {request.get('id')!r}: remove it or choose another "
                                  "--output")
    return len(answers)


def main(args: argparse.Namespace) -> int:
    from ..loading.loader import from_pretrained
    from ..offline import MAX_BATCH, make_job, model_tokenizer, plan_batch, run_jobs, served_model

    source, output = Path(args.input), Path(args.output)
    requests = read_requests(source)
    done = answers_written(output, requests)
    if done == len(requests):
        print(f"[moe-offload] {output} already answers all {done} requests")
        return 0
    model = from_pretrained(args.model, offload_config(args, cache_policy=args.cache_policy))
    try:
        tokenizer = model_tokenizer(model)
        served = served_model(model, tokenizer)
        defaults = {"max_tokens": args.max_tokens, "temperature": args.temperature}
        jobs = [make_job({k: v for k, v in r.items() if k != "_line"}, served, f"{source} line {r['_line']}", defaults)
                for r in requests[done:]]
        plan = plan_batch(model, jobs, args.max_batch or MAX_BATCH)
        print(f"[moe-offload] {len(jobs)} requests ({done} already answered in {output}); {plan.describe()}",
              flush=True)
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(output, "a", encoding="utf-8") as out:
            for result in run_jobs(model, tokenizer, jobs, plan.batch_size, args.prefill_chunk,
                                   model.offload.config.progress, args.attention_rows or plan.attention_rows):
                out.write(json.dumps(result.to_json(), ensure_ascii=False) + "\n")
                out.flush()
    finally:
        model.offload.close()
    stats = model.offload.stats
    print(f"[moe-offload] wrote {len(requests)} answers to {output}; {stats.bytes_copied.sum() / 1e9:.3f} GB of "
          "experts copied", file=sys.stderr)
    return 0
