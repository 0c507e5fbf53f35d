"""`python parity_tests/fault_child.py FAULT STEP -- TRAIN FLAGS...`: train_tpu_gpu.py's command
line, run in this process after orbax's write of checkpoint STEP is made to fail inside the
write (its "meta" item, after the "state" arrays were written to the temporary folder):

  enospc       raises OSError(ENOSPC), as a full disk does
  permission   raises PermissionError, as a lost write permission does
  kill         the process SIGKILLs itself, a save killed mid-write
"""

import errno
import os
import signal
import sys

from orbax.checkpoint._src.handlers import json_checkpoint_handler

from jax_residual.train.cli import main


def failing_write(fault: str, step: int):
    """A JsonCheckpointHandler._save_fn that fails as `fault` says when it writes step `step`."""
    original = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def save_fn(self, item, directory):
        if item.get("step") == step:
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if fault == "permission":
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(directory))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return await original(self, item, directory)

    return save_fn


if __name__ == "__main__":
    fault, step, separator, *flags = sys.argv[1:]
    assert separator == "--" and fault in ("enospc", "permission", "kill"), sys.argv
    json_checkpoint_handler.JsonCheckpointHandler._save_fn = failing_write(fault, int(step))
    sys.exit(main(flags))
