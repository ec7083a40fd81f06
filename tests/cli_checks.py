"""Helpers shared by the tests of user errors: run the `red` CLI in-process, check that an
error is one line, and check that nothing that existed was touched."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from red.cli import main


def snapshot(*folders: Path) -> dict:
    """path -> sha256 of every file under ``folders`` (missing folders: empty)."""
    out = {}
    for f in folders:
        if f.is_file():
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
        elif f.is_dir():
            for p in sorted(f.rglob("*")):
                if p.is_file():
                    out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_cli_err(argv, capfd) -> tuple[int, str]:
    """(exit code, stderr) of ``red argv`` run in-process (argparse's exits included)."""
    capfd.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own exits
        rc = e.code
    return rc, capfd.readouterr().err


def one_line(capfd, rc, *needles) -> str:
    """Assert the command just run ended with exit 2 and one stderr line holding ``needles``."""
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1, err
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


def error_table_failures(cases, capfd, new_out: Path) -> list[str]:
    """Run every (name, argv, needle) case; return what failed: an exit code other than 2,
    a traceback, more than one stderr line, a line not of the form "red <cmd>: error: ..."
    or without ``needle`` (None: any), or ``new_out`` created (it is removed again)."""
    failures = []
    for name, argv, needle in cases:
        rc, err = run_cli_err(argv, capfd)
        lines = [l for l in err.splitlines() if l.strip()]
        ok = (rc == 2 and "Traceback" not in err and len(lines) == 1
              and lines[0].startswith(f"red {argv[0]}: error:") and (needle is None or needle in lines[0]))
        if not ok:
            failures.append(f"{name}: rc={rc} err={err.strip()[-400:]!r}")
        if new_out.exists():
            failures.append(f"{name}: created the output path")
            shutil.rmtree(new_out) if new_out.is_dir() else new_out.unlink()
    return failures
