#!/usr/bin/env python
"""Export a trained HMoE as a Hugging Face model directory (no launcher, no GPU needed).

    python run/export.py outputs/quickstart exported/quickstart               # newest complete checkpoint
    python run/export.py outputs/quickstart exported/step_200 --tag step_200
    python run/export.py outputs/quickstart/checkpoints/step_200 exported/step_200

Works for checkpoints of any ZeRO stage, expert-parallel size, placement or
offload setting: it streams the per-rank logical shards every checkpoint
holds (hmoe_shard_<rank>.safetensors), one tensor at a time. The result has config.json (moe.ep_size=1,
frontend "moe", auto_map), generation_config.json, model.safetensors (Hugging Face MoE weight names), the
run's tokenizer and the model's own code, and loads wherever transformers is installed (no hmoe-ds needed):

    AutoModelForCausalLM.from_pretrained("exported/quickstart", trust_remote_code=True)

By default the export is loaded back and its logits compared with those the
training engine computed at save time (--no-verify skips that). It can also
start a new run at another EP size or placement: run.init_from: <export dir>.
"""

from __future__ import annotations

import sys

from hmoe_ds.env import configure_environment

# Before DeepSpeed is imported: CPU accelerator without CUDA, hubs offline (as run/env.sh).
configure_environment()

if __name__ == "__main__":
    from hmoe_ds.export import main

    sys.exit(main())
