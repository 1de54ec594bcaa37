"""Load time: a GGUF's experts kept as stored vs the same weights from bf16 safetensors with int4 experts.

    python bench/gguf_load.py --gguf /work/data/mixtral-8x7b-l2-Q4_K_M.gguf --safetensors /work/data/mixtral-8x7b-l2
    python bench/gguf_load.py --smoke --out /tmp/gguf-load      # seconds: the committed tiny fixture

Rows, each from a cold page cache for the files it reads (bench/disk_tier.py's drop_cache), CPU device,
bfloat16 dense weights, every expert in host memory:

1. the GGUF: dense tensors dequantized on read, routed experts read into the host store as the file
   stores them (positional reads, no quantization step);
2. the bf16 safetensors with ``expert_dtype="int4"``, first load: every expert read and quantized, and the
   packed experts written to the quantize-once cache file;
3. the same, later load: the packed experts read back from that cache file.

After one warm-up load (not reported), each row: seconds, expert bytes in the host store, the bytes of the files read, and that over the seconds.
With --smoke the GGUF is the committed tests/fixtures/gguf Mixtral fixture and the safetensors are its
dequantized weights saved by transformers (the same weights); nothing is written under bench/results.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import moe_offload  # noqa: E402
from moe_offload.loading.gguf_checkpoint import split_files  # noqa: E402

from common import BenchRun, parse_bench_args, print_table  # noqa: E402
from disk_tier import drop_cache  # noqa: E402

SMOKE_FIXTURES = ("mixtral-Q4_K_M.gguf", "mixtral-Q8_0.gguf")


def timed_load(path: Path, files: list[Path], **fields) -> dict:
    """Cold-cache from_pretrained of ``path`` on the CPU; the seconds and what the store holds."""
    drop_cache(files)
    start = time.perf_counter()
    model = moe_offload.from_pretrained(path, device="cpu", dtype=torch.bfloat16, progress=False, **fields)
    seconds = time.perf_counter() - start
    store = model.offload.store
    row = {"seconds": seconds, "expert_format": store.format.describe(), "expert_bytes": store.nbytes,
           "file_bytes": sum(f.stat().st_size for f in files)}
    row["file_gbps"] = row["file_bytes"] / seconds / 1e9
    model.offload.close()
    del model
    gc.collect()
    return row


def safetensors_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def measure(gguf: Path, safetensors: Path, cache: Path) -> list[dict]:
    timed_load(gguf, split_files(gguf))      # warm-up (imports, first-call costs), not reported
    rows = [{"load": f"GGUF {gguf.name}, experts as stored", **timed_load(gguf, split_files(gguf))}]
    for label in ("first load: quantizes, writes the cache", "later load: from the cache file"):
        files = safetensors_files(safetensors) + sorted(cache.glob("*.safetensors"))
        rows.append({"load": f"bf16 safetensors -> int4, {label}",
                     **timed_load(safetensors, files, expert_dtype="int4", quant_cache=str(cache))})
    return rows


def smoke_inputs(work: Path) -> tuple[Path, Path]:
    """The committed Mixtral fixture, and its dequantized weights saved as a bf16 checkpoint."""
    from gguf_files import FIXTURES
    from gguf_reference import gguf_reference

    gguf = next((FIXTURES / n for n in SMOKE_FIXTURES if (FIXTURES / n).is_file()), None)
    if gguf is None:
        raise SystemExit(f"no Mixtral GGUF fixture ({', '.join(SMOKE_FIXTURES)}) in {FIXTURES}")
    gguf_reference(gguf, torch.bfloat16).save_pretrained(work / "bf16")
    return gguf, work / "bf16"


def main(args: argparse.Namespace) -> None:
    run = BenchRun.start(args)
    with tempfile.TemporaryDirectory(prefix="gguf-load-") as tmp:
        work = Path(tmp)
        gguf, safetensors = smoke_inputs(work) if args.smoke else (Path(args.gguf), Path(args.safetensors))
        rows = measure(gguf, safetensors, work / "cache")
    print_table(rows, [("load", "load", ""), ("seconds", "s", ".2f"), ("expert_bytes", "expert bytes", ",d"),
                       ("file_bytes", "file bytes read", ",d"), ("file_gbps", "file GB/s", ".2f")])
    base = rows[0]["seconds"]
    for row in rows[1:]:
        print(f"{row['load']}: {row['seconds'] / base:.2f}x the GGUF's load time")
    path = run.write_json("gguf_load.json", {"gguf": str(gguf), "safetensors": str(safetensors), "rows": rows})
    print(f"wrote {path}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", help="a GGUF of the model (Q4_K_M)")
    p.add_argument("--safetensors", help="the same model's bf16 safetensors checkpoint directory")
    args = parse_bench_args(p, argv, {})   # --smoke loads the committed tiny fixture
    if not args.smoke and not (args.gguf and args.safetensors):
        p.error("give --gguf and --safetensors, or --smoke")
    return args


if __name__ == "__main__":
    main(parse_args())
