"""Print samples from a training run: `python -m jax_residual.sample RUN_DIR [--prompt TEXT] ...`.

RUN_DIR is a train_tpu_gpu.py output folder; its newest readable checkpoint (or --step N) is
sampled with `generate.generate` (a decoding cache), the prompt encoded and the continuation
decoded with the run's tokenizer (bytes, or its tokenizer.json), cut at the first document
separator. Bad paths or settings: one line on stderr, exit status 2.
"""

from __future__ import annotations

import pathlib
import sys

import jax

from jax_residual.export import read_run, restore_params
from jax_residual.generate import generate
from jax_residual.model import LlamaForCausalLM
from jax_residual.command_line import OneLineParser
from jax_residual.data.tokenizer import TOKENIZER_FILE, read_tokenizer

DEFAULT_PROMPT = "def "


class TextCodec:
    """Text <-> ids of a run: UTF-8 bytes, or a `tokenizers.Tokenizer`; eos_id ends a sample."""

    def __init__(self, tokenizer, eos_id: int):
        self.tokenizer, self.eos_id = tokenizer, eos_id

    @classmethod
    def of_run(cls, run_dir: pathlib.Path, eos_id: int) -> "TextCodec":
        path = run_dir / TOKENIZER_FILE
        return cls(read_tokenizer(path) if path.is_file() else None, eos_id)

    def encode(self, text: str) -> list[int]:
        """Token ids as training encoded documents: no BOS, no special tokens added around the text."""
        return list(text.encode()) if self.tokenizer is None else self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        ids = ids[:ids.index(self.eos_id)] if self.eos_id in ids else ids
        return bytes(ids).decode("utf-8", errors="replace") if self.tokenizer is None else self.tokenizer.decode(ids)


def sample_run(run_dir, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 64, *, temperature: float = 0.8,
               top_k: int | None = 40, top_p: float | None = None, seed: int = 0, count: int = 1,
               at_step: int | None = None, params=None, warn=print) -> list[str]:
    """`count` continuations of `prompt` from the run in `run_dir` (its checkpoint `at_step`,
    the newest readable by default, or the given `params`), each prompt + sampled text."""
    run_dir = pathlib.Path(run_dir)
    run, cfg, eos_id = read_run(run_dir)
    if params is None:
        _, params = restore_params(run_dir, run, cfg, at_step, warn)
    codec = TextCodec.of_run(run_dir, eos_id)
    ids = codec.encode(prompt)
    tokens = generate(LlamaForCausalLM(cfg), params, [ids] * count, max_new_tokens, temperature=temperature,
                      top_k=top_k, top_p=top_p, seed=seed)
    return [prompt + codec.decode(row[len(ids):]) for row in jax.device_get(tokens)]


def print_final_sample(run_dir, max_new_tokens: int):
    """What train_tpu_gpu.py prints after a single run: one sample of its final checkpoint."""
    text, = sample_run(run_dir, max_new_tokens=max_new_tokens)
    print(f"sample (temperature 0.8, top-k 40; more: python -m jax_residual.sample {run_dir}):\n{text}")


def main(argv=None) -> int:
    """Exit status: 0 printed, 2 bad arguments, paths or settings (one line on stderr)."""
    parser = OneLineParser(prog="python -m jax_residual.sample", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a train_tpu_gpu.py output folder")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="text to continue (default: %(default)r)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, help="sample within the nucleus of this probability")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=1, help="how many samples")
    parser.add_argument("--step", type=int, help="sample this checkpoint (default: the newest readable one)")
    args = parser.parse_args(argv)
    try:
        samples = sample_run(args.run_dir, args.prompt, args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k or None, top_p=args.top_p, seed=args.seed, count=args.count,
                             at_step=args.step, warn=lambda line: print(line, file=sys.stderr))
    except (ValueError, OSError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    for text in samples:
        print(f"--- sample ---\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
