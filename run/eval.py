#!/usr/bin/env python
"""Validation loss, perplexity and per-expert routing of a trained HMoE.

    python run/eval.py outputs/quickstart                     # latest DeepSpeed checkpoint of a run
    python run/eval.py outputs/quickstart --tag step_200      # a given checkpoint
    deepspeed --num_accelerators 2 run/eval.py outputs/quickstart
    python run/eval.py path/to/hf_export --config run/configs/quickstart.yaml   # an exported HF model

Prints a table (token fraction per expert per MoE layer, experts per token,
activated parameters per token) and writes it all as JSON (default
<run>/eval_<tag>.json or <hf_dir>/eval.json). The data (validation split) comes
from the checkpoint's saved experiment, or --config. Any checkpoint (any ZeRO
stage, expert-parallel size or placement) evaluates on any number of processes:
the model is rebuilt from the checkpoint's logical shards, tensor by tensor, with
the experts spread over the ranks (expert parallelism), and ranks split the
validation set.
"""

from __future__ import annotations

import argparse
import os
import sys

from hmoe_ds.env import configure_environment

# Before DeepSpeed is imported: CPU accelerator without CUDA, hubs offline (as run/env.sh).
configure_environment()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="run dir, its checkpoints/ dir, one checkpoint dir, or an exported HF model dir")
    parser.add_argument("--tag", help="checkpoint tag (default: the run's latest)")
    parser.add_argument("--config", help="experiment YAML for the data (default: the run's experiment.yaml)")
    parser.add_argument("--set", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                        help="override experiment keys, e.g. --set data.cache_dir=/data/cache")
    parser.add_argument("--eval_batches", type=int, default=None,
                        help="validation micro-batches per rank (default: the whole validation split)")
    parser.add_argument("--output", help="JSON file to write (default next to the checkpoint / model)")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    rank = int(os.environ.get("RANK", "0"))
    from hmoe_ds.cli import run_evaluation
    from hmoe_ds.errors import ExperimentError
    from hmoe_ds.training.trainer import quiet_deepspeed

    quiet_deepspeed()
    from hmoe_ds.distributed_env import init_distributed, leave_the_report_to_rank0, shutdown_distributed

    finished = False
    try:
        init_distributed()  # and unlink DeepSpeed's /dev/shm segments of this run once every rank mapped them
        run_evaluation(args.path, args.tag, args.config, [s for group in args.set for s in group], args.eval_batches,
                       args.output)
        finished = True
        return 0
    except ExperimentError as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        else:
            leave_the_report_to_rank0()
        return 2
    finally:
        # Only a finished evaluation synchronises: after a failure a peer may never arrive.
        shutdown_distributed(synchronize=finished)


if __name__ == "__main__":
    from hmoe_ds.distributed_env import exit_process

    exit_process(main())
