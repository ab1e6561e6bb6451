"""`ixc-engine serve` as a process: killed mid-load and restarted (a retrying client gets every answer once), and
SIGTERM drains the requests in flight."""

from __future__ import annotations

import signal
import threading
import time
import urllib.request

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from ixc_engine.client import RewardClient
from tests.serve_support import ServerProcess, free_port
from tests.test_serve import conversations


@pytest.fixture(scope="module")
def ref(demo_ref):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the servers (--threads 1): two OpenMP threads stall each other on a busy 2-core box
    yield demo_ref
    torch.set_num_threads(before)


def test_server_killed_restarted_then_sigterm_drains(ref):
    """One server process for both checks (each start loads torch and the model: seconds on a busy CI box).

    1. SIGKILL mid-load, restart on the same port: four retrying clients sending one request per sample get every
       answer exactly once, equal to RewardEngine.score.
    2. SIGTERM while six large requests are being scored: all six are answered in full, then the process exits."""
    convs = conversations(40, seed=21)
    want = ref.score(convs)
    port = free_port()
    srv = ServerProcess(port, "--max-wait-ms", "2").start()
    answers: dict[int, list[float]] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []
    clients = [RewardClient(srv.url, retries=200, backoff=0.05, max_backoff=0.5, timeout=30) for _ in range(4)]

    def worker(w: int) -> None:
        try:
            for i in range(w, len(convs), len(clients)):
                got = clients[w].score([convs[i]])  # one request per sample, as an RL loop sends them
                with lock:
                    answers.setdefault(i, []).extend(got)
                time.sleep(0.02)  # keep the load going while the server is killed
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(len(clients))]
    try:
        for t in threads:
            t.start()
        while len(answers) < 6 and not errors:
            time.sleep(0.01)
        srv.kill()  # SIGKILL mid-load: the requests in flight die with it
        done_at_kill = len(answers)
        srv = ServerProcess(port, "--max-wait-ms", "2").start()  # the same port
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert done_at_kill < len(convs)
        assert sorted(answers) == list(range(len(convs)))  # every sample answered ...
        assert all(len(v) == 1 for v in answers.values())  # ... exactly once
        assert [answers[i][0] for i in range(len(convs))] == pytest.approx(want, rel=1e-5, abs=1e-5)
        assert sum(c.attempts for c in clients) > len(convs)  # some requests were retried across the restart

        # --- SIGTERM drains what is in flight: six requests of 200 samples each (seconds of scoring)
        big = conversations(200, seed=23)
        out: dict[int, list[float]] = {}

        def one(i: int) -> None:
            try:
                out[i] = RewardClient(srv.url, retries=0, timeout=120, batch_size=200).score(big)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        srv.terminate()
        answered_before_sigterm = len(out)
        for t in threads:
            t.join(60)
        rc = srv.proc.wait(60)
    finally:
        srv.kill()
    assert not errors, errors
    assert answered_before_sigterm < 6  # so some were in flight when the signal came
    want_big = ref.score(big)
    assert sorted(out) == list(range(6))
    assert all(out[i] == pytest.approx(want_big, rel=1e-5, abs=1e-5) for i in range(6))
    assert rc in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down cleanly
    assert "Traceback" not in srv.log()
    with pytest.raises(OSError):
        urllib.request.urlopen(srv.url + "/health", timeout=2)
