"""`python -m diffcoder` = the `diffcoder` command."""
import sys

from diffcoder.cli import main

sys.exit(main())
