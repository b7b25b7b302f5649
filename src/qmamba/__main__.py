"""``python -m qmamba`` = the ``qmamba`` command."""

from qmamba.cli import main

if __name__ == "__main__":
    main()
