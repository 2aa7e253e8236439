"""Run every benchmark module in bench/ (those named bench_*.py), one after another."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path


def main(names: list[str]) -> None:
    modules = sorted(p.stem for p in Path(__file__).parent.glob("bench_*.py"))
    chosen = [m for m in modules if not names or any(n in m for n in names)]
    for module in chosen:
        print(f"\n#### bench.{module}")
        importlib.import_module(f"bench.{module}").main()


if __name__ == "__main__":
    main(sys.argv[1:])
