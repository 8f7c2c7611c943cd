"""A torchrun worker for tests/test_distributed_train.py: one launch runs several
``python -m brcd`` command lines in turn, so the test pays the start-up of the ranks once. The
first command starts the process group (brcd.dist.init); the later ones join it.

Usage::

    torchrun --standalone --nproc_per_node 2 tests/dist_train_worker.py JOB.json OUT_DIR

``JOB.json`` is a list of argument lists. Each rank writes ``OUT_DIR/rank<R>.json`` (the exit
status of every command and every file it opened for writing, renamed or created: from a
``sys.addaudithook`` hook) and sends its stdout / stderr to ``OUT_DIR/rank<R>.out`` / ``.err``.
"""

import json
import os
import sys

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND


def _audit(writes: list[str]):
    def hook(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1], args[2]
            writing = (any(c in mode for c in "wax+") if isinstance(mode, str)
                       else isinstance(flags, int) and bool(flags & WRITE_FLAGS))
            if writing:
                writes.append(os.fsdecode(args[0]))
        elif event in ("os.rename", "os.mkdir"):
            writes.append(os.fsdecode(args[1] if event == "os.rename" else args[0]))
    return hook


def main() -> int:
    job, out = sys.argv[1], sys.argv[2]
    rank = os.environ["RANK"]
    for fd, suffix in ((1, "out"), (2, "err")):  # the rank's own output files
        f = os.open(os.path.join(out, f"rank{rank}.{suffix}"), os.O_WRONLY | os.O_CREAT, 0o644)
        os.dup2(f, fd)
    with open(job) as fh:
        commands = json.load(fh)
    writes: list[str] = []
    sys.addaudithook(_audit(writes))
    from brcd import dist
    from brcd.cli import main as brcd_main

    # brcd.dist.init starts the process group for the first command; the group is kept for
    # the next ones (which then join it: one process cannot start a second default group)
    dist.shutdown = lambda: None
    codes = []
    for argv in commands:
        codes.append(brcd_main(argv))
        sys.stdout.flush()
        sys.stderr.flush()
    import torch.distributed

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump({"codes": codes, "writes": writes}, fh)
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
