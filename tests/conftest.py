"""Shared fixtures: tiny random models (no download), offline hub, quiet progress bars."""

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from analysis.llm.models import load_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama():
    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_gpt2():
    return load_model("tiny-gpt2")


@pytest.fixture(scope="session")
def default_model():
    """The real embedded SmolLM2-135M-Instruct (converted once into cache/models)."""
    return load_model("default")


@pytest.fixture(scope="session", autouse=True)
def close_the_image_browser():
    """Kaleido's Chromium (started by export tests and by pages in-process) is closed before the interpreter
    exits: left open, its pipe thread once printed a choreographer JSONError after pytest's summary."""
    yield
    import sys

    if "kaleido" in sys.modules:
        from analysis.views import export

        export.stop_image_server()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices: one torch thread is much faster, and robust on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def stop_all_jobs() -> None:
    """Cancel every queued or running job of the current cache and kill its worker (tests leave none behind)."""
    import signal

    from analysis.core import jobs
    from analysis.core.store import process_alive

    killed = []
    for status in jobs.list_jobs(active_only=True):
        jobs.cancel(status.job_id)
        if status.pid:
            try:
                os.killpg(status.pid, signal.SIGKILL)
                killed.append(status.pid)
            except OSError:
                pass
    deadline = time.monotonic() + 30  # SIGKILL is delivered asynchronously: wait until the workers are gone
    while any(process_alive(pid) for pid in killed) and time.monotonic() < deadline:
        time.sleep(0.05)


def wait_for_job(kind: str, timeout: float = 600):
    """The last job of ``kind`` in the current cache, waited for until it has ended."""
    from analysis.core import jobs

    submitted = jobs.list_jobs(kind=kind)
    assert submitted, f"no {kind} job was submitted"
    return jobs.wait(submitted[-1].job_id, timeout)
