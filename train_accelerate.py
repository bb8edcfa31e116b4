#!/usr/bin/env python
"""Train protmask: `python train_accelerate.py`, `accelerate launch train_accelerate.py` or
`torchrun --nproc_per_node N train_accelerate.py`, with the same flags. `--help` lists them."""

import sys

from protmask.training.loop import main

if __name__ == "__main__":
    sys.exit(main())
