"""``python -m snakepool_worker``: run a worker process."""

from .runtime import exit_process, main

if __name__ == "__main__":
    exit_process(main())
