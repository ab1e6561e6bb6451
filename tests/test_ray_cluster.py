"""`score --ray` on a simulated two-node Ray cluster (ray.cluster_utils.Cluster, one CPU per node, so that the
preparation actor and the scoring actor run on different nodes and prepared samples cross the object store between
them); a preparation actor killed in the middle of a batch is restarted, the batch redone, and the output is still
exactly once."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pytest.importorskip("av")

from ray.cluster_utils import Cluster

from ixc_engine.cli import main
from tests.ray_common import N_LINES, assert_same_results, lines_written, local_results, make_corpus, pids_of, summary


@pytest.fixture(scope="module")
def two_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 200 << 20,
                                                            "include_dashboard": False})
    cluster.add_node(num_cpus=1, object_store_memory=200 << 20)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_two_nodes_equal_local_job_with_a_preparation_actor_killed_mid_batch(two_nodes, tiny_ckpt, tmp_path, capsys):
    corpus = make_corpus(tmp_path / "data")
    local = local_results(corpus, tiny_ckpt, tmp_path / "local" / "scores.jsonl")
    assert sum(n["Alive"] for n in ray.nodes()) == 2
    out = tmp_path / "scores.jsonl"
    before = set(pids_of(b"MapBatches(Prepare)"))
    seen = {}

    def kill_preparation_actor():
        # Ray titles an actor's process ray::MapWorker(MapBatches(Prepare)).submit while it runs a batch: kill it
        # then, in the middle of a batch (not while it starts up).
        busy = b"MapBatches(Prepare)).submit"
        t0 = time.monotonic()
        while time.monotonic() - t0 < 240 and not (set(pids_of(busy)) - before):
            time.sleep(0.002)
        new = set(pids_of(busy)) - before
        if not new:
            return
        victim = min(new)
        seen["at_kill"] = lines_written(out)
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            seen["gone"] = True
            return
        t0 = time.monotonic()
        while time.monotonic() - t0 < 240 and "restarted" not in seen:
            if set(pids_of(b"MapBatches(Prepare)")) - before - {victim}:
                seen["restarted"] = True
            time.sleep(0.02)

    killer = threading.Thread(target=kill_preparation_actor, daemon=True)
    killer.start()
    assert main(["score", str(corpus), "--model", str(tiny_ckpt), "-o", str(out), "--ray", "--ray-batch-size", "2",
                 "--no-progress"]) == 0
    killer.join(timeout=60)
    assert "at_kill" in seen and "gone" not in seen and seen["at_kill"] < N_LINES, seen
    assert seen.get("restarted"), "no new preparation actor was seen after the kill"
    assert_same_results(out, local)
    assert summary(capsys.readouterr().out)["duplicates_dropped"] == 0
