"""``python -m flowkit ...``: the ``flowkit`` command line, e.g. under torchrun::

torchrun --nproc_per_node=2 -m flowkit train --data digits --batch-size 128 --out runs/ddp
"""

import sys

from flowkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
