"""`python -m finetune ...` is the same as the `finetune` command."""

import sys

from finetune.cli import main

sys.exit(main())
