"""Shared test set-up.

Kernel and training tests run on ``TEST_DEVICE`` (the ``device`` fixture): the GPU when
there is one, so that ``python -m pytest tests`` on a GPU machine is the GPU correctness
check, else the CPU with Triton's interpreter. Triton reads TRITON_INTERPRET when
``@triton.jit`` decorates a kernel, so the variable is set here, before any test module
imports ``red_kernels``, and only when no GPU is present.
"""
import os

import torch

#: The device of the kernel and training tests; for code that cannot take fixtures.
TEST_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

if TEST_DEVICE.type == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


import pytest

from helpers import make_teacher, write_corpus  # noqa: E402

ARCHS = ("llama", "qwen2", "qwen3")


@pytest.fixture(scope="session")
def device():
    """CUDA when available, else CPU (kernels then run under the Triton interpreter)."""
    return TEST_DEVICE


@pytest.fixture(scope="session")
def teacher_dirs(tmp_path_factory):
    """One tiny teacher per architecture, saved once per session: {arch: folder}."""
    root = tmp_path_factory.mktemp("teachers")
    return {arch: make_teacher(root / arch, arch, seed=i) for i, arch in enumerate(ARCHS)}


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture(scope="session")
def loaded_teachers(teacher_dirs):
    from red.model.teacher import load_teacher

    return {arch: load_teacher(d) for arch, d in teacher_dirs.items()}


@pytest.fixture()
def run_cli(capfd):
    """Run the `red` CLI in-process (fast) and return exit code, stdout, stderr."""
    from red.cli import main

    def run(*args):
        capfd.readouterr()
        rc = main([str(a) for a in args])
        out, err = capfd.readouterr()
        return rc, out, err
    return run
