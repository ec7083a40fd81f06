"""Fault injection for the SIGKILL tests, kept out of the product.

``python -m faults POINT:STEP <red arguments>`` runs the `red` command with a hook on
``red.run.folder.HOOKS`` that, when the run reaches POINT at STEP, drops a marker file
``.hold-<point>-<step>`` in the run's checkpoints folder and sleeps, so that the test can
kill the process there. POINT is "save" (inside a checkpoint write: its tensors are on
disk in the temporary folder, not yet renamed into place) or "train" (after an optimizer
step and its checkpoint).
"""
import sys
import time
from pathlib import Path

EVENTS = {"save": "checkpoint-written", "train": "step-done"}


def hold_at(spec: str) -> None:
    import red.run.folder

    point, step = spec.split(":")

    def hook(event, at, folder):
        if event == EVENTS[point] and at == int(step):
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / f".hold-{point}-{step}").write_text("held")
            time.sleep(3600)

    red.run.folder.HOOKS.append(hook)


if __name__ == "__main__":
    hold_at(sys.argv[1])
    from red.cli import run

    sys.exit(run(sys.argv[2:]))
