"""Random-weight checkpoints with the shapes of real MoE models, streamed to disk in shards.

    python bench/full_size.py --preset mixtral-8x7b --layers 8 --out /data/mixtral-8x7b-l8
    python bench/full_size.py --preset mixtral-8x7b --layers 2 --device cuda --out /data/mixtral-8x7b-l2  # seconds
    python bench/full_size.py --smoke          # the shipped tiny-mixtral's shapes, into a temporary folder

Written one layer at a time with per-expert tensor names as hub checkpoints use
them, so loading goes through the same safetensors path as a real model and no
full model is ever in memory. ``--layers`` keeps the first N decoder layers
(full width), for disks smaller than the model; tokens/s then covers N layers.
Random weights route almost uniformly: benchmarks pair these models with
routing replay (bench/routing_replay.py). ``--device cuda`` draws the weights on
the GPU (Mixtral-8x7B's 2.8 G expert weights of two layers take about 36 s of
CPU ``randn``), then writes them from host memory as before.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from moe_offload.models import SHAPE_PRESETS, preset_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))

_DISK_NAMES = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2")}
_DEFAULT_NAMES = ("mlp", "gate_proj", "up_proj", "down_proj")


# --smoke: the preset's layout (families, expert count, routing) at widths a test writes in a second.
TINY_WIDTHS = {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "vocab_size": 512,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "q_lora_rank": 32,
               "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16}


def preset_config(preset: str, layers: int | None, dtype: torch.dtype, tiny: bool = False):
    """The shape preset's config.json (the package's configs/presets/: the models' own configs), with
    ``layers`` decoder layers and ``dtype``; ``tiny``: TINY_WIDTHS for the widths the config has."""
    config = AutoConfig.from_pretrained(preset_dir(preset))
    if layers is not None:
        config.num_hidden_layers = layers
    if tiny:
        for name, value in TINY_WIDTHS.items():
            if getattr(config, name, None) is not None:
                setattr(config, name, value)
        if getattr(config, "qk_head_dim", None) is not None:
            config.qk_head_dim = config.qk_rope_head_dim + config.qk_nope_head_dim
    config.dtype = dtype
    return config


def disk_tensors(name: str, shape: torch.Size, model_type: str) -> list[tuple[str, tuple, str]]:
    """On-disk (name, shape, role) of one in-memory parameter; fused experts become per-expert tensors."""
    block, gate, up, down = _DISK_NAMES.get(model_type, _DEFAULT_NAMES)
    if block != "mlp":
        name = name.replace(".mlp.", f".{block}.")
    if name.endswith(".experts.gate_up_proj"):
        e, two_i, h = shape
        base = name.removesuffix("gate_up_proj")
        return [(f"{base}{x}.{p}.weight", (two_i // 2, h), "expert") for x in range(e) for p in (gate, up)]
    if name.endswith(".experts.down_proj"):
        e, h, i = shape
        base = name.removesuffix("down_proj")
        return [(f"{base}{x}.{down}.weight", (h, i), "expert") for x in range(e)]
    return [(name, tuple(shape), "dense")]


def random_tensor(name: str, shape: tuple, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A host tensor of ``name``'s kind: norms ones, DeepSeek's score bias zeros, the rest N(0, 0.02) drawn on
    the generator's device."""
    if "norm" in name or name.endswith("e_score_correction_bias"):
        return torch.ones(shape, dtype=dtype) if "norm" in name else torch.zeros(shape, dtype=torch.float32)
    return (torch.randn(shape, generator=gen, device=gen.device) * 0.02).to(dtype).cpu()


class BuildStopped(RuntimeError):
    """The write was asked to stop before it finished (the folder holds part of a checkpoint)."""


def write_checkpoint(preset: str, out: Path, layers: int | None, dtype: torch.dtype, shard_gb: float,
                     device: str = "cpu", stop: threading.Event | None = None) -> Path:
    return write_random(preset_config(preset, layers, dtype), out, shard_gb, device, stop, preset)


def write_random(config, out: Path, shard_gb: float, device: str = "cpu", stop: threading.Event | None = None,
                 desc: str = "") -> Path:
    """``config``'s model with random weights drawn on ``device``, in shards of ``shard_gb``. ``stop``: checked
    between tensors; once set, the write ends with BuildStopped."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    gen = torch.Generator(device=device).manual_seed(0)
    names = [t for n, p in skeleton.named_parameters() for t in disk_tensors(n, p.shape, config.model_type)]
    weight_map, shard, shard_bytes, index = {}, {}, 0, 0
    for name, shape, _ in tqdm(names, desc=f"writing {desc or config.model_type}", unit="tensor"):
        if stop is not None and stop.is_set():
            raise BuildStopped(f"stopped after {len(weight_map) + len(shard)} of {len(names)} tensors")
        tensor = random_tensor(name, shape, config.dtype, gen)
        shard[name] = tensor
        shard_bytes += tensor.numel() * tensor.element_size()
        if shard_bytes >= shard_gb * 1e9:
            index = _flush(out, shard, index, weight_map)
            shard, shard_bytes = {}, 0
    _flush(out, shard, index, weight_map)
    total = sum((out / f).stat().st_size for f in set(weight_map.values()))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return out


def _flush(out: Path, shard: dict, index: int, weight_map: dict) -> int:
    if not shard:
        return index
    file = f"model-{index + 1:05d}.safetensors"
    save_file(shard, out / file, metadata={"format": "pt"})
    weight_map.update({name: file for name in shard})
    return index + 1


def smoke_config(dtype: torch.dtype):
    """The shipped tiny-mixtral's config (a smoke run writes its shapes: every code path, in seconds)."""
    from moe_offload.loading.checkpoint import resolve_model_dir

    config = AutoConfig.from_pretrained(resolve_model_dir("tiny-mixtral"))
    config.dtype = dtype
    return config


def main(args: argparse.Namespace) -> int:
    dtype = getattr(torch, args.dtype)
    if args.smoke:
        out = Path(args.out or tempfile.mkdtemp(prefix="full-size-smoke-"))
        path = write_random(smoke_config(dtype), out, shard_gb=1e-3, device=args.device, desc="smoke")
    else:
        path = write_checkpoint(args.preset, Path(args.out), args.layers, dtype, args.shard_gb, args.device)
    print(f"wrote {path}")
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=SHAPE_PRESETS)
    p.add_argument("--out", help="checkpoint folder to write (with --smoke, default a temporary one)")
    p.add_argument("--layers", type=int, help="keep the first N decoder layers")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--shard-gb", type=float, default=4.0)
    p.add_argument("--device", default="cpu", help="where the random weights are drawn: cpu, or cuda (faster)")
    p.add_argument("--smoke", action="store_true", help="tiny-mixtral's shapes in seconds (--preset not needed)")
    args = p.parse_args(argv)
    if not args.smoke and (args.preset is None or args.out is None):
        p.error("--preset and --out are required (or --smoke)")
    return args


if __name__ == "__main__":
    sys.exit(main(parse_args()))
