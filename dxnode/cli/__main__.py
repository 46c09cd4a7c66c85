"""`python -m dxnode.cli`: the dxnode command."""

import sys

from dxnode.cli import main

sys.exit(main())
