"""Print a Markdown table comparing benchmark results from several machines or profiles.

    python benchmarks/merge.py benchmarks/results/*.json > comparison.md

The same as ``edgeembed bench --merge FILE...``: one row per headline number, one
column per run.
"""

from __future__ import annotations

import argparse
import logging
import sys

from edgeembed.bench_command import run_merge


def main() -> int:
    """Parse the result files and print the merged table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", metavar="RESULT.json", help="files written by edgeembed bench")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    return run_merge(args.results)


if __name__ == "__main__":
    sys.exit(main())
