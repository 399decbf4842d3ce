"""Shared test setup: one thread per op (small convolutions on 2 cores are erratic otherwise)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
