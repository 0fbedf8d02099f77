"""``python -m snakepool_worker``: run a worker process."""

import sys

from .runtime import main

if __name__ == "__main__":
    sys.exit(main())
