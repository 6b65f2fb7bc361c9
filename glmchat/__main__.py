"""`python -m glmchat ...` (what torchrun -m glmchat runs): the glmchat command."""

import sys

from .cli import main

sys.exit(main())
