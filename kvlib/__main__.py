"""`python -m kvlib ...`: the same entry point as the `kvlib` console script."""
import sys

from kvlib.pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main())
