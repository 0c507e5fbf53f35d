"""What every command line of the package shares (train, prepare, sample, export, evaluate)."""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr ('PROG: error: ...', then
    exit status 2) instead of the usage text and the error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
