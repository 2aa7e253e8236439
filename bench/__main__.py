"""Run the benchmark modules in bench/ (those named bench_*.py), one after another.

python -m bench                 # every benchmark
python -m bench rpo pitr        # those whose module name contains a given word
python -m bench pitr --size-mb 200   # options go to the chosen benchmarks
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    modules = sorted(p.stem for p in Path(__file__).parent.glob("bench_*.py"))
    # Words naming a module choose it; the rest (options and their values) are the benchmarks' own.
    names = [a for a in argv if not a.startswith("-") and any(a in m for m in modules)]
    chosen = [m for m in modules if not names or any(n in m for n in names)]
    for module in chosen:
        print(f"\n#### bench.{module}")
        importlib.import_module(f"bench.{module}").main()


if __name__ == "__main__":
    main(sys.argv[1:])
