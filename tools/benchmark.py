#!/usr/bin/env python
"""Benchmark what distillation costs; see dkd_det/benchmark.py.

    python tools/benchmark.py [--device cuda --amp] [--toy]
"""
from dkd_det.benchmark import main

if __name__ == "__main__":
    main()
