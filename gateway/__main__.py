"""`python -m gateway`: the `agentpay` command line."""

import sys

from gateway.cli import main

sys.exit(main())
