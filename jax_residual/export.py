"""Export a training run as a HuggingFace folder: `python -m jax_residual.export RUN_DIR OUT_DIR [--step N]`.

RUN_DIR is a train_tpu_gpu.py output folder (config.json + checkpoints/). The newest readable
checkpoint (or --step N) is written with `convert.save_hf_checkpoint`: a plain Llama for
`standard`, otherwise a folder that `AutoModelForCausalLM.from_pretrained(OUT_DIR,
trust_remote_code=True)` loads as the torch_ref model of the run's method. The run's
tokenizer (its tokenizer.json, or bytes as `tokenizer.byte_tokenizer()`) is written with what
`AutoTokenizer` needs (`convert.save_hf_tokenizer`), and config.json's eos_token_id (and
pad_token_id) is the run's document separator, so `generate()` stops there and lm-evaluation-harness
prefixes documents with it. Bad paths: one line on stderr, exit status 2.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax

from jax_residual.config import ModelConfig
from jax_residual.convert import save_hf_checkpoint, save_hf_tokenizer
from jax_residual.sharding import make_mesh
from jax_residual.train import checkpoint, optim, step
from jax_residual.train.checkpoint import first_line
from jax_residual.command_line import OneLineParser
from jax_residual.data.tokenizer import EOS
from jax_residual.train.run_config import RunConfig
from jax_residual.data.tokenizer import TOKENIZER_FILE, byte_tokenizer, read_tokenizer


def read_run(run_dir: pathlib.Path) -> tuple[RunConfig, ModelConfig, int]:
    """The run's settings, model and EOS token id (the document separator of its tokenizer) from
    its config.json; ValueError if it is not a run folder."""
    path = run_dir / "config.json"
    if not run_dir.is_dir():
        raise ValueError(f"run folder {run_dir} does not exist or is not a folder")
    try:
        saved = json.loads(path.read_text())
        eos_id = saved.get("tokenizer", {}).get("eos_id", EOS)  # runs from before tokenizers: bytes
        return RunConfig(**saved["run"]), ModelConfig(**saved["model"]), eos_id
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a training run's config.json ({first_line(error)})") from None


def restore_params(run_dir: pathlib.Path, run: RunConfig, cfg: ModelConfig, at_step: int | None, warn,
                   mesh: jax.sharding.Mesh | None = None):
    """(step, params on `mesh`, default one device) of checkpoint `at_step`, or of the newest readable one."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        raise ValueError(f"{run_dir} has no checkpoints/ folder")
    manager = checkpoint.open_manager(folder, run.keep_checkpoints)
    try:
        steps = manager.all_steps()
        if at_step is not None and at_step not in steps:
            raise ValueError(f"--step {at_step}: no checkpoint of that step in {folder} (there are: {sorted(steps)})")
        tx = optim.make_optimizer(run.lr, run.warmup_steps, run.schedule_steps, run.weight_decay, run.grad_clip)
        mesh = make_mesh(None, jax.devices()[:1]) if mesh is None else mesh
        _, abstract_state = step.state_shardings(mesh, cfg, tx, run.seq_len)
        if at_step is None:
            restored = checkpoint.restore_newest_readable(manager, abstract_state, warn, move_unreadable=False)
            if restored is None:
                raise ValueError(f"no readable checkpoint in {folder}")
            at_step, state, _ = restored
        else:
            try:
                with checkpoint.quiet_orbax():
                    state, _ = checkpoint.restore(manager, at_step, abstract_state)
            except Exception as error:  # damaged files fail in orbax, tensorstore or json
                raise ValueError(f"checkpoint {at_step} in {folder} cannot be read ({first_line(error)})") from None
    finally:
        manager.close()
    return at_step, state.params


def export_run(run_dir, out_dir, at_step: int | None = None, warn=print) -> int:
    """Write checkpoint `at_step` (default: the newest readable) of the run in `run_dir` to
    `out_dir` as a HF folder; returns the step exported. ValueError for bad paths."""
    run_dir, out_dir = pathlib.Path(run_dir), pathlib.Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output folder {out_dir} is a file, not a folder")
    run, cfg, eos_id = read_run(run_dir)
    exported_step, params = restore_params(run_dir, run, cfg, at_step, warn)
    save_hf_checkpoint(params, cfg, out_dir, bos_token_id=None, eos_token_id=eos_id, pad_token_id=eos_id)
    saved = run_dir / TOKENIZER_FILE
    tokenizer = read_tokenizer(saved) if saved.is_file() else byte_tokenizer()
    save_hf_tokenizer(tokenizer, out_dir, eos_id, cfg.max_position_embeddings)
    return exported_step


def main(argv=None) -> int:
    """Exit status: 0 exported, 2 bad arguments or paths (one line on stderr)."""
    parser = OneLineParser(prog="python -m jax_residual.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a train_tpu_gpu.py output folder")
    parser.add_argument("out_dir", help="the HF folder to write (created if needed)")
    parser.add_argument("--step", type=int, help="export this checkpoint (default: the newest readable one)")
    args = parser.parse_args(argv)

    def warn(line):
        print(line, file=sys.stderr)

    try:
        exported_step = export_run(args.run_dir, args.out_dir, args.step, warn)
    except (ValueError, OSError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(f"exported step {exported_step} of {args.run_dir} to {pathlib.Path(args.out_dir).absolute()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
