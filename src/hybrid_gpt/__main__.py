"""`python -m hybrid_gpt ...` is the `hybrid-gpt` command (for machines without uv's console script)."""

import sys

from hybrid_gpt.cli import main

sys.exit(main())
