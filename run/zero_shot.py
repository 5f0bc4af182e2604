#!/usr/bin/env python
"""Zero-shot multiple-choice accuracy of an HMoE export or checkpoint (lm-evaluation-harness).

    python run/zero_shot.py --prepare_data                       # once (run/setup.sh does it)
    python run/zero_shot.py exported/quickstart                  # shipped offline tasks (group hmoe_bigbench)
    python run/zero_shot.py outputs/quickstart --tag step_200    # a checkpoint: exported to a temp dir first
    deepspeed --num_accelerators 2 run/zero_shot.py exported/quickstart   # processes split the requests
    python run/zero_shot.py exported/quickstart --tasks piqa,hellaswag    # harness tasks in the local HF cache

Prints accuracy and normalised accuracy per task and writes them as JSON
(default: <export>/zero_shot.json, <run>/zero_shot[_<tag>].json). See hmoe_ds/zero_shot.py.
"""

from __future__ import annotations

import sys

from hmoe_ds.env import configure_environment

# Hubs offline (as run/env.sh): task data and model come from local files only.
configure_environment()

if __name__ == "__main__":
    from hmoe_ds.zero_shot import main

    sys.exit(main())
