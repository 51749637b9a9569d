"""Speed benchmarks: `dogbench bench` (extraction, extract.py) and `dogbench bench --train` (train.py)."""
