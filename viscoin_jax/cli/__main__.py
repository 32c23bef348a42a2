"""`python -m viscoin_jax.cli ...`: the same as the `viscoin-jax` command."""

import sys

from . import main

sys.exit(main())
