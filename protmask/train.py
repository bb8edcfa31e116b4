"""The trainer as a module, for an installed package:

    python -m protmask.train --pdb_path DIR ...
    accelerate launch -m protmask.train --pdb_path DIR ...
    torchrun --nproc_per_node 8 -m protmask.train --pdb_path DIR ...

the same trainer, flags and behaviour as ``train_accelerate.py`` in a checkout."""

import sys

from protmask.training.loop import main

if __name__ == "__main__":
    sys.exit(main())
