"""The judge program's entry: the last part of the joined source (see __init__.py).

No part imports anything but `sys` at module level (the join checks it), so no module is
looked up before the line below takes the working directory, where the program may write,
off sys.path.
"""
import sys

from .candidate_process import candidate
from .judge_process import judge

sys.path[:] = [p for p in sys.path if p not in ("", ".")]  # a file the program writes is never imported

if len(sys.argv) > 1 and sys.argv[1] == "candidate":
    candidate()
else:
    judge()
