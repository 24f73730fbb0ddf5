"""A benchmark record's plots drawn again from its JSON: ``python benchmarks/replot.py --help``.

A thin entry point: the plots are drawn by :mod:`surgery_edge.bench.replot`.
"""

from surgery_edge.bench.replot import main

if __name__ == "__main__":
    main()
