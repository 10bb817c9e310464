from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

_EXIT_STATUS = pytest.StashKey[int]()


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    """The generated tiny Llama (weights + tokenizer), built once per cache folder."""
    from cluster.embedded_model import ensure_embedded_model

    return ensure_embedded_model()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """After a run that started Ray in this process, leave with pytest's own status without
    the interpreter's teardown. Every fixture has called ray.shutdown(), yet after dozens of
    init/shutdown cycles a thread of Ray's core worker can still run while Python finalizes
    and jump into freed memory: `make test` passed 573 of 573 and then the process died with
    SIGSEGV (the kernel log: "python: segfault at ... error 15", the faulting page holding
    Ray's GCS pubsub message names). Nothing is lost by skipping the teardown: the results,
    the summary and every plugin's unconfigure are done by now (trylast)."""
    if "ray" in sys.modules and _EXIT_STATUS in config.stash:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(config.stash[_EXIT_STATUS])
