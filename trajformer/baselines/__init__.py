"""The baselines beside TT on the same data, split and evaluation protocol (DESIGN.md §9): one algorithm a file."""
