"""``python -m ppo_fast``: a self-check of the compiled ops against the eager reference (see ppo_fast/_selfcheck.py)."""

import sys

from ppo_fast._selfcheck import main

if __name__ == "__main__":
    sys.exit(main())
