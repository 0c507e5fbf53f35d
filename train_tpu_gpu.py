"""Train a residual-method Llama (jax_residual) on CPU, GPU or TPU: `python train_tpu_gpu.py --help`.

With no arguments it trains a small byte-level model on the Python standard library's own
sources for a few minutes and prints where its metrics, checkpoints and plots are.
"""

import sys

from jax_residual.sample import print_final_sample
from jax_residual.train.cli import main

if __name__ == "__main__":
    sys.exit(main(after_single_run=print_final_sample))
