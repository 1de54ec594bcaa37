"""`moe-offload fit-predictor`: fit the learned-correction predictor and save it next to the model.

    moe-offload fit-predictor --model tiny-mixtral --stdlib-train 240
    moe-offload fit-predictor --model DIR --trace fit-trace.npz      # a trace recorded with --gate-inputs

The correction goes to ``<model_dir>/predictor/learned-correction.safetensors``
(or ``--out``), where ``load_predictor("learned", model_dir, params)`` finds it.
"""

from __future__ import annotations

import argparse

from ..errors import MoEOffloadError
from .argtypes import positive_int
from .common import add_model_args, add_prompt_args, offload_config, prompts_from_args, record_prompts

DEFAULT_FIT_NEW_TOKENS = 16


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``fit-predictor`` subcommand."""
    from ..predictor.learned import FEATURE_SETS

    p = subparsers.add_parser("fit-predictor", help="fit the learned expert predictor on a routing trace")
    add_model_args(p)
    source = add_prompt_args(p)
    source.add_argument("--trace", help="fit on this trace (.npz with gate inputs) instead of recording one")
    p.add_argument("--max-new-tokens", type=positive_int, default=DEFAULT_FIT_NEW_TOKENS,
                   help=f"greedy tokens generated per prompt when recording (default {DEFAULT_FIT_NEW_TOKENS})")
    p.add_argument("--features", choices=FEATURE_SETS, default="layers",
                   help="what the map from layer l reads: its gate input (gate), plus its routing (gate+routing), "
                        "or gate input and routing of every layer up to l (layers, the default)")
    p.add_argument("--distances", type=positive_int, default=3, help="fit distances 1..N (default 3)")
    p.add_argument("--out", help="output file (default <model_dir>/predictor/learned-correction.safetensors)")
    p.set_defaults(func=main)


def fit_trace(args: argparse.Namespace, model):
    """The trace to fit on: ``--trace``, or one recorded now from the prompt arguments."""
    from ..predictor import Trace

    if args.trace:
        trace = Trace.load(args.trace)
        if trace.gate_inputs is None:
            raise MoEOffloadError(f"{args.trace} has no gate inputs; record it with `moe-offload trace --gate-inputs`")
        return trace
    return record_prompts(args, model, prompts_from_args(args), gate_inputs=True)


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..loading.loader import from_pretrained
    from ..loading.router_params import router_params
    from ..predictor import CorrectionFitConfig, correction_path, fit_correction

    model = from_pretrained(args.model, offload_config(args))
    trace = fit_trace(args, model)
    params = router_params(model)
    if trace.num_layers != params.num_layers or trace.num_experts != params.num_experts:
        raise MoEOffloadError(f"the trace has {trace.num_layers} MoE layers x {trace.num_experts} experts; "
                              f"the model {params.num_layers} x {params.num_experts}")
    config = CorrectionFitConfig(distances=tuple(range(1, args.distances + 1)), feature_set=args.features)
    correction = fit_correction(trace, params, config)
    path = correction.save(Path(args.out) if args.out else correction_path(model.config._name_or_path))
    print(f"[moe-offload] learned correction fitted on {trace.num_tokens} tokens "
          f"({correction.meta['fit_sequences']} sequences), distances 1..{args.distances}, "
          f"features {args.features}: {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return 0
