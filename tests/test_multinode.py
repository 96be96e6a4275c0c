"""Several nodes: two torchrun agents on this machine stand in for two nodes (one process each,
meeting at a c10d rendezvous as on a cluster). A data-parallel run, and a --pipeline run whose two
stages sit on different "nodes", must both exit 0 on both agents and end exactly as the same run
under one agent (--standalone --nproc-per-node 2)."""
import os
import socket
import subprocess
import sys

import pytest

from conftest import QUICK, ROOT, read_json
from test_pipeline import SMALL, assert_same_run

RUN = ["dgl.py", *QUICK, *SMALL, "--k", "4", "--epochs", "1"]  # 4 steps: a checkpoint, metrics, summary.json
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_agent(out, *args):
    cmd = [*TORCHRUN, "--standalone", "--nproc-per-node", "2", *RUN, "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]


def two_agents(out, *args):
    """The run launched as on two nodes, both agents given the same command; returns their exit
    codes and their output. The rendezvous assigns the ranks (--node-rank is for the static one)."""
    port = free_port()
    cmd = [*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"test-{port}", *RUN, "--out", str(out), *args]
    logs = [open(f"{out}-node{n}.log", "w+") for n in (0, 1)]
    agents = [subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=ENV) for log in logs]
    try:
        codes = [agent.wait(timeout=600) for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.terminate()  # the agent stops its worker
                agent.wait(timeout=60)
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    return codes, texts


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["--pipeline"]], ids=["data-parallel", "pipeline"])
def test_two_nodes_equal_one_node(tmp_path, mode):
    one_agent(tmp_path / "one", *mode)
    codes, texts = two_agents(tmp_path / "two", *mode)
    assert codes == [0, 0], "\n".join(t[-3000:] for t in texts)
    assert not any("stopped by" in t for t in texts)  # no rank took its agent for gone (StopRequest)
    assert_same_run(tmp_path / "one", tmp_path / "two")
    summary = read_json(tmp_path / "two" / "summary.json")
    assert summary["world_size"] == 2 and summary["steps"] == 4 and summary["rank_max_abs_diff"] == 0.0
    assert len(summary.get("stages", [])) == (2 if mode else 0)
