"""``python -m dynarch run ...``: the same command as the ``dynarch`` console script."""

from dynarch.cli import main

if __name__ == "__main__":
    main()
