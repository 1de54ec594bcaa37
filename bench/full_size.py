"""Random-weight checkpoints with the shapes of real MoE models, streamed to disk in shards.

    python bench/full_size.py --preset mixtral-8x7b --layers 8 --out /data/mixtral-8x7b-l8
    python bench/full_size.py --preset deepseek-v3 --smoke --out /tmp/tiny-v3   # same layout, tiny widths

Written one layer at a time with per-expert tensor names as hub checkpoints use
them, so loading goes through the same safetensors path as a real model and no
full model is ever in memory. ``--layers`` keeps the first N decoder layers
(full width), for disks smaller than the model; tokens/s then covers N layers.
Random weights route almost uniformly: benchmarks pair these models with
routing replay (bench/routing_replay.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from moe_offload.models import SHAPE_PRESETS, preset_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parse_bench_args  # noqa: E402

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
    if "norm" in name or name.endswith("e_score_correction_bias"):
        return torch.ones(shape, dtype=dtype) if "norm" in name else torch.zeros(shape, dtype=torch.float32)
    return (torch.randn(shape, generator=gen) * 0.02).to(dtype)


def write_checkpoint(preset: str, out: Path, layers: int | None, dtype: torch.dtype, shard_gb: float,
                     tiny: bool = False) -> Path:
    config = preset_config(preset, layers, dtype, tiny)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    gen = torch.Generator().manual_seed(0)
    names = [t for n, p in skeleton.named_parameters() for t in disk_tensors(n, p.shape, config.model_type)]
    weight_map, shard, shard_bytes, index = {}, {}, 0, 0
    for name, shape, _ in tqdm(names, desc=f"writing {preset}", unit="tensor"):
        tensor = random_tensor(name, shape, dtype, gen)
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


def main(args: argparse.Namespace) -> int:
    dtype = getattr(torch, args.dtype)
    path = write_checkpoint(args.preset, Path(args.out), args.layers, dtype, args.shard_gb, tiny=args.smoke)
    print(f"wrote {path}")
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=SHAPE_PRESETS, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, help="keep the first N decoder layers")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--shard-gb", type=float, default=4.0)
    return parse_bench_args(p, argv, {"layers": 2, "shard_gb": 0.0003}, out_flag=False)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
