"""fastdpo benchmarks: `python benchmarks/run.py --help`."""
