"""`python -m hf_koopman ...` runs the `hf-koopman` command (`hf_koopman.cli.main`)."""

import sys

from hf_koopman.cli import main

if __name__ == "__main__":
    sys.exit(main())
