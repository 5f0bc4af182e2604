#!/usr/bin/env python
"""Train an HMoE causal LM on DeepSpeed.

    deepspeed --num_accelerators 2 run/train.py --config run/configs/quickstart.yaml \\
        --deepspeed_config ds_configs/cpu_default.json [--set run.train_steps=500 ...] [--resume [TAG]]

The experiment YAML says what to train (model, data, run); the DeepSpeed JSON
says how to optimise it. The logic lives in ``hmoe_ds.training``.
"""

from __future__ import annotations

import argparse

from hmoe_ds.env import configure_environment

# Before DeepSpeed is imported: CPU accelerator without CUDA, hubs offline (as run/env.sh).
configure_environment()


def build_parser() -> argparse.ArgumentParser:
    import deepspeed

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML (sections model, data, run)")
    parser.add_argument(
        "--set", nargs="+", action="append", default=[], metavar="KEY=VALUE",
        help="override experiment keys, e.g. --set run.train_steps=200 model.moe.top_p=0.5 (values parsed as YAML)",
    )
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="auto|TAG",
                        help="continue the run in run.output_dir: from its newest complete checkpoint (no value, or "
                             "auto), or from checkpoint TAG (e.g. step_400; later checkpoints are moved aside); "
                             "settings may differ")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    return deepspeed.add_config_arguments(parser)


def main() -> int:
    from hmoe_ds.training.trainer import run_training

    return run_training(build_parser().parse_args())


if __name__ == "__main__":
    from hmoe_ds.distributed_env import exit_process

    # Not sys.exit: a ZeRO-3 engine keeps gloo threads alive, and interpreter teardown beside them can abort.
    exit_process(main())
