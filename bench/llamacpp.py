"""llama.cpp as a measuring stick: its converter, its quantizer and its benchmark, driven from Python.

    python bench/llamacpp.py [--llama-cpp DIR] convert CHECKPOINT OUT.gguf [--outtype bf16]
    python bench/llamacpp.py [--llama-cpp DIR] quantize IN.gguf OUT.gguf Q4_0 [--experts-only]
    python bench/llamacpp.py [--llama-cpp DIR] bench MODEL.gguf [-p 64] [-n 32] [-t 2]

DIR is a llama.cpp CPU build: the source folder (holding convert_hf_to_gguf.py and gguf-py/) or its
build/ folder (holding bin/llama-quantize and bin/llama-bench); without --llama-cpp the
LLAMA_CPP_DIR environment variable names it. To make one from the sdist that llama-cpp-python
ships (CPU only):

    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cd llama_cpp_python-*/vendor/llama.cpp
    cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF
    cmake --build build --target llama-bench llama-quantize -j

Conversion runs llama.cpp's own converter in a child process (its gguf-py first on the path, so a
`gguf` package installed beside this project is not mixed in). The converter names each model's
BPE pre-tokenizer by hashing how the tokenizer splits a fixed text; a tokenizer it does not know
(the project's tiny models') stops it. The child patches that lookup so an unknown hash maps to the
GPT-2 pre-tokenizer (tokenization is no part of what these files are used for: their weights are),
and says so in its log. A checkpoint without any tokenizer (bench/full_size.py's random ones) is
converted from a staging folder that links its files and adds the shipped tiny-mixtral's tokenizer
(4096 entries; the converter pads the vocabulary to the model's vocab_size), and config.json's
`architectures` where it is missing.

Expert-only quantization (`experts_only=True`) quantizes the routed experts
(`blk.N.ffn_{gate,up,down}_exps`) to the named type, with llama.cpp's own per-tensor choices for
that type (Q4_K_M keeps some down projections in Q6_K), and writes every other weight (token
embeddings, attention, shared experts, output) in BF16; norms and routers stay as converted (F32),
as llama-quantize never quantizes them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from moe_offload.errors import MoEOffloadError
from moe_offload.models import shipped_model_dir

ENV_VAR = "LLAMA_CPP_DIR"
CONVERTER = "convert_hf_to_gguf.py"
TOOLS = ("llama-quantize", "llama-bench")
# Converter output types (its --outtype) and the llama-quantize types this module names.
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
QUANT_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M",
               "Q6_K", "BF16", "F16", "F32")
DENSE_TYPE = "bf16"                       # what expert-only quantization writes for every non-expert weight
EXPERT_TENSORS = r"ffn_(gate|up|down)_exps"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tekken.json")
FALLBACK_PRE_TOKENIZER = "gpt-2"
IN_PROCESS = "convert-in-process"          # the child's subcommand: llama.cpp's converter in that process


@dataclass(frozen=True)
class LlamaCpp:
    """One llama.cpp build: ``source`` holds the converter and gguf-py, ``bin_dir`` the tools."""

    source: Path
    bin_dir: Path

    @classmethod
    def locate(cls, directory: str | Path | None = None) -> LlamaCpp | None:
        """The llama.cpp at ``directory`` (else $LLAMA_CPP_DIR), or None when neither names one.

        ``directory`` may be the source folder, its build/ folder or build/bin/. A named folder
        without the converter is an error, not None; the tools are looked for when used (``tool``),
        so a source folder whose build is not done yet still converts."""
        named = directory or os.environ.get(ENV_VAR)
        if not named:
            return None
        path = Path(named).expanduser().resolve()
        for source, bin_dir in ((path, path / "build" / "bin"), (path.parent, path / "bin"),
                                (path.parent.parent, path)):
            if (source / CONVERTER).is_file():
                return cls(source, bin_dir)
        raise MoEOffloadError(
            f"{path} is not a llama.cpp folder: expected {CONVERTER} in it or above its build/ folder "
            f"(make one as `python bench/llamacpp.py --help` shows)")

    def has_tool(self, name: str) -> bool:
        return (self.bin_dir / name).is_file()

    def tool(self, name: str) -> Path:
        if not self.has_tool(name):
            raise MoEOffloadError(f"{self.bin_dir} holds no {name}: build it in {self.source} with "
                                  f"`cmake --build build --target {name}`")
        return self.bin_dir / name

    def built(self) -> bool:
        """Whether llama-quantize and llama-bench are built."""
        return all(self.has_tool(t) for t in TOOLS)

    def version(self) -> str:
        """`llama-bench --version`'s first line, e.g. 'version: 1 (0c1e570)'; without a built llama-bench,
        the source's git commit."""
        if self.has_tool("llama-bench"):
            done = subprocess.run([self.tool("llama-bench"), "--version"], capture_output=True, text=True)
            text = (done.stdout + done.stderr).strip()
            return text.splitlines()[0] if text else "unknown"
        done = subprocess.run(["git", "-C", str(self.source), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True)
        return f"source commit {done.stdout.strip() or 'unknown'}"

    def convert(self, checkpoint: Path, out: Path, outtype: str = "bf16") -> Path:
        """``checkpoint`` (a transformers checkpoint folder) to ``out`` (.gguf) with llama.cpp's converter."""
        if outtype not in OUTTYPES:
            raise MoEOffloadError(f"converter output type {outtype!r} is not one of {OUTTYPES}")
        checkpoint = Path(checkpoint)
        if not (checkpoint / "config.json").is_file():
            raise MoEOffloadError(f"{checkpoint} holds no config.json: pass a transformers checkpoint folder")
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".convert-") as staging:
            source = converter_view(checkpoint, Path(staging))
            partial = Path(staging) / out.name
            self._run([sys.executable, str(Path(__file__).resolve()), "--llama-cpp", str(self.source),
                       IN_PROCESS, str(source), str(partial), "--outtype", outtype], what=f"converting {checkpoint}")
            partial.replace(out)           # nobody sees a half-written file
        return out

    def quantize(self, source: Path, out: Path, qtype: str, experts_only: bool = False,
                 threads: int | None = None) -> Path:
        """``source`` (.gguf, 16/32-bit) quantized to ``qtype`` with llama-quantize.

        experts_only: only the routed experts take ``qtype``; every other weight is written in BF16."""
        if qtype.upper() not in QUANT_TYPES:
            raise MoEOffloadError(f"quantization type {qtype!r} is not one of {QUANT_TYPES}")
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(f".{out.name}.partial")
        flags = dense_kept_flags() if experts_only else []
        try:
            self._run([str(self.tool("llama-quantize")), *flags, str(source), str(partial), qtype.upper(),
                       *([str(threads)] if threads else [])], what=f"quantizing {source} to {qtype}")
            partial.replace(out)           # nobody sees a half-written file
        finally:
            partial.unlink(missing_ok=True)
        return out

    def bench(self, model: Path, prompt_tokens: int = 64, gen_tokens: int = 32, threads: int = 2,
              repetitions: int = 3) -> list[BenchRow]:
        """llama-bench on the CPU: one row for prefill (``prompt_tokens``) and one for decode (``gen_tokens``)."""
        done = self._run([str(self.tool("llama-bench")), "-m", str(model), "-p", str(prompt_tokens),
                          "-n", str(gen_tokens), "-t", str(threads), "-r", str(repetitions), "-ngl", "0",
                          "-o", "json"], what=f"llama-bench on {model}")
        return [BenchRow.from_json(r) for r in parse_bench_json(done.stdout)]

    def _run(self, command: list[str], what: str) -> subprocess.CompletedProcess:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise MoEOffloadError(f"{what} failed (exit {done.returncode}):\n{tail}")
        return done


@dataclass(frozen=True)
class BenchRow:
    """One llama-bench test: prefill (n_prompt > 0) or decode (n_gen > 0), tokens/s over its repetitions."""

    test: str                 # "pp64" (prefill of 64 tokens) or "tg32" (32 decoded tokens)
    tokens_per_s: float
    stddev_tokens_per_s: float
    model_bytes: int
    model_params: int
    threads: int
    build: str                # "<build_number> (<commit>)"
    raw: dict

    @classmethod
    def from_json(cls, row: dict) -> BenchRow:
        test = f"pp{row['n_prompt']}" if row.get("n_prompt") else f"tg{row['n_gen']}"
        return cls(test=test, tokens_per_s=float(row["avg_ts"]), stddev_tokens_per_s=float(row["stddev_ts"]),
                   model_bytes=int(row["model_size"]), model_params=int(row["model_n_params"]),
                   threads=int(row["n_threads"]), build=f"{row['build_number']} ({row['build_commit']})", raw=row)


def parse_bench_json(text: str) -> list[dict]:
    """llama-bench's `-o json` output: a JSON list of test records (anything printed before it is skipped)."""
    start = text.find("[")
    try:
        rows = json.loads(text[start:]) if start >= 0 else None
    except json.JSONDecodeError as e:
        raise MoEOffloadError(f"llama-bench printed no readable JSON ({e}); its output began: {text[:200]!r}") from e
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "avg_ts" in r for r in rows):
        raise MoEOffloadError(f"llama-bench printed no test records; its output began: {text[:200]!r}")
    return rows


def dense_kept_flags() -> list[str]:
    """llama-quantize flags that write every weight except the routed experts in BF16.

    llama-quantize applies --tensor-type patterns only when its base type is a quantized one, so
    the base type stays the expert type and the patterns name what is not an expert."""
    return ["--token-embedding-type", DENSE_TYPE, "--output-tensor-type", DENSE_TYPE,
            "--tensor-type", f"^(?!.*{EXPERT_TENSORS}).*={DENSE_TYPE}"]


def converter_view(checkpoint: Path, staging: Path) -> Path:
    """``checkpoint`` itself when llama.cpp's converter can read it as it is, else a folder in ``staging``
    with links to its files plus what the converter needs and random checkpoints (bench/full_size.py's)
    lack: config.json's ``architectures`` (transformers' causal-LM class of its model_type) and a tokenizer
    (the shipped tiny-mixtral's, which fits any vocab_size of at least its 4096 entries)."""
    config = json.loads((checkpoint / "config.json").read_text())
    has_tokenizer = any((checkpoint / f).is_file() for f in TOKENIZER_FILES)
    if has_tokenizer and config.get("architectures"):
        return checkpoint
    folder = staging / checkpoint.name
    folder.mkdir()
    for f in checkpoint.iterdir():
        (folder / f.name).symlink_to(f.resolve())
    if not config.get("architectures"):
        (folder / "config.json").unlink()
        (folder / "config.json").write_text(json.dumps(config | {"architectures": [causal_lm_class(config)]}))
    if not has_tokenizer:
        add_shipped_tokenizer(folder, config.get("vocab_size", 0))
    return folder


def causal_lm_class(config: dict) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type"))
    if name is None:
        raise MoEOffloadError(f"config.json names no architectures and transformers knows no causal LM for "
                              f"model_type {config.get('model_type')!r}: add \"architectures\" to config.json")
    return name


def add_shipped_tokenizer(folder: Path, vocab_size: int) -> None:
    donor = shipped_model_dir("tiny-mixtral")
    donor_size = len(json.loads((donor / "tokenizer.json").read_text())["model"]["vocab"]) if donor else None
    if donor is None or vocab_size < donor_size:
        raise MoEOffloadError(f"{folder.name} has no tokenizer and its vocab_size {vocab_size} is below the "
                              f"shipped tokenizer's {donor_size}: add a tokenizer.json to the checkpoint")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(donor / name, folder / name)


def convert_in_this_process(source: Path, checkpoint: Path, out: Path, outtype: str) -> None:
    """Run llama.cpp's converter here, with unknown BPE pre-tokenizers mapped to GPT-2's.

    Call only in a process of its own: it puts llama.cpp's folders first on sys.path."""
    sys.path[:0] = [str(source), str(source / "gguf-py")]
    import convert_hf_to_gguf  # llama.cpp's own converter (imports its gguf-py)

    owner = _pre_tokenizer_owner(convert_hf_to_gguf)
    known = owner.get_vocab_base_pre

    def pre_tokenizer(model, tokenizer) -> str:
        try:
            return known(model, tokenizer)
        except NotImplementedError:
            logging.getLogger("llamacpp").warning("unknown BPE pre-tokenizer: writing %r", FALLBACK_PRE_TOKENIZER)
            return FALLBACK_PRE_TOKENIZER

    owner.get_vocab_base_pre = pre_tokenizer
    sys.argv = [CONVERTER, str(checkpoint), "--outfile", str(out), "--outtype", outtype]
    convert_hf_to_gguf.main()


def _pre_tokenizer_owner(converter_module) -> type:
    """The converter class that defines get_vocab_base_pre (a package module in newer llama.cpp, the
    converter script itself in older ones)."""
    candidates = [getattr(converter_module, n, None) for n in ("TextModel", "Model")]
    try:
        from conversion.base import TextModel
        candidates.insert(0, TextModel)
    except ImportError:
        pass
    for cls in candidates:
        if cls is not None and "get_vocab_base_pre" in vars(cls):
            return cls
    raise MoEOffloadError("this llama.cpp converter has no get_vocab_base_pre to extend; use a newer build")


def build_or_exit(directory: str | None) -> LlamaCpp:
    build = LlamaCpp.locate(directory)
    if build is None:
        sys.exit(f"no llama.cpp build: pass --llama-cpp DIR or set {ENV_VAR} (see --help for how to build one)")
    return build


def main(args: argparse.Namespace) -> None:
    if args.command == IN_PROCESS:
        build = build_or_exit(args.llama_cpp)
        convert_in_this_process(build.source, Path(args.checkpoint), Path(args.out), args.outtype)
    elif args.command == "convert":
        build_or_exit(args.llama_cpp).convert(Path(args.checkpoint), Path(args.out), args.outtype)
    elif args.command == "quantize":
        build_or_exit(args.llama_cpp).quantize(Path(args.source), Path(args.out), args.type, args.experts_only)
    else:
        rows = build_or_exit(args.llama_cpp).bench(Path(args.model), args.p, args.n, args.t, args.r)
        for row in rows:
            print(f"{row.test:>6}  {row.tokens_per_s:9.2f} tok/s  +- {row.stddev_tokens_per_s:.2f}  "
                  f"{row.model_bytes / 2**20:.1f} MiB  build {row.build}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp", help=f"llama.cpp source or build folder (default: ${ENV_VAR})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{convert,quantize,bench}")
    for name in ("convert", IN_PROCESS):
        shown = {"help": "HF checkpoint -> GGUF with llama.cpp's converter"} if name == "convert" else {}
        convert = sub.add_parser(name, **shown)
        convert.add_argument("checkpoint")
        convert.add_argument("out")
        convert.add_argument("--outtype", choices=OUTTYPES, default="bf16")
    quantize = sub.add_parser("quantize", help="GGUF -> quantized GGUF with llama-quantize")
    quantize.add_argument("source")
    quantize.add_argument("out")
    quantize.add_argument("type", choices=QUANT_TYPES, type=str.upper)
    quantize.add_argument("--experts-only", action="store_true", help="keep every non-expert weight in BF16")
    bench = sub.add_parser("bench", help="llama-bench on the CPU")
    bench.add_argument("model")
    bench.add_argument("-p", type=int, default=64, help="prompt tokens (prefill)")
    bench.add_argument("-n", type=int, default=32, help="generated tokens (decode)")
    bench.add_argument("-t", type=int, default=2, help="threads")
    bench.add_argument("-r", type=int, default=3, help="repetitions")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
