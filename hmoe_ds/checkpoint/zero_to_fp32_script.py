#!/usr/bin/env python
"""Consolidate an hmoe-ds checkpoint into one fp32 model (this replaces DeepSpeed's ``zero_to_fp32.py``).

DeepSpeed copies its ``zero_to_fp32.py`` and ``zero_to_torch.py`` next to every
checkpoint it saves. They cannot read hmoe-ds's MoE checkpoints (experts split
over expert-parallel ranks and packed for ZeRO-3: "... is not a model state
checkpoint"), so after every save hmoe-ds writes this file in their place. It
does what they promise, for any ZeRO stage, EP size or placement, with
hmoe-ds's exporter (``run/export.py``): the result is a Hugging Face directory
with the fp32 weights (``model.safetensors``), ``config.json``, the tokenizer
and the standalone model code::

    python zero_to_fp32.py <this checkpoints dir | one step_N dir | the run dir> <output dir> [-t step_N]

and loads anywhere transformers is installed::

    AutoModelForCausalLM.from_pretrained("<output dir>", trust_remote_code=True)

It needs hmoe-ds installed (the Python that trained the model has it).
"""

import sys

if __name__ == "__main__":
    try:
        from hmoe_ds.env import configure_environment
    except ImportError:
        print("this script needs hmoe-ds (pip install hmoe-ds, or run it with the Python that trained the model); "
              "it runs hmoe-ds's exporter: python run/export.py <checkpoints dir> <output dir>", file=sys.stderr)
        sys.exit(2)
    configure_environment()
    from hmoe_ds.export import main

    sys.exit(main())
