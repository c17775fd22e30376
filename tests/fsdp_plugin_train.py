"""erase/train.py as Accelerate's FSDP plugin runs it (`accelerate launch --use_fsdp --fsdp_version 2`).

Accelerate selects FSDP on GPUs only (a CPU launch with --use_fsdp runs plain DDP), so over gloo this
sets the one thing the plugin changes in the training loop: `Accelerator.is_fsdp2`, under which
`accelerator.accumulate(model)` holds the gradient sync back (`set_requires_gradient_sync(False)`)."""

import sys

from accelerate import Accelerator

from erase.train import main

Accelerator.is_fsdp2 = property(lambda self: True)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
