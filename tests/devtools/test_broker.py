"""The local cluster's layout and configuration (devtools/broker.py), and the
settings that point the stack at it. No JVM here: tests/pipeline/test_cluster.py
runs the cluster itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from devtools import broker
from mailflow.config import Settings


def props(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def test_node_k_listens_two_ports_above_node_k_minus_one():
    nodes = broker.cluster_nodes(3)
    assert [(n.node_id, n.port, n.controller_port) for n in nodes] == [
        (1, 9092, 9093), (2, 9094, 9095), (3, 9096, 9097)]
    assert [n.port for n in broker.cluster_nodes(3, 31000)] == [31000, 31002, 31004]
    assert [n.controller_port for n in broker.cluster_nodes(2, 31000, 32000)] == [32000, 32002]
    assert broker.cluster_bootstrap(3, 31000) == "127.0.0.1:31000,127.0.0.1:31002,127.0.0.1:31004"
    with pytest.raises(ValueError):
        broker.cluster_nodes(0)


def test_cluster_node_properties_replicate_everything_and_fail_over_fast(tmp_path: Path):
    voters = broker.cluster_nodes(3, 31000)
    p = props(broker.server_properties(tmp_path, 31002, 31003, node=voters[1], voters=voters))
    assert p["node.id"] == "2"
    assert p["controller.quorum.voters"] == "1@127.0.0.1:31001,2@127.0.0.1:31003,3@127.0.0.1:31005"
    assert "controller.quorum.bootstrap.servers" not in p
    assert p["listeners"] == "PLAINTEXT://127.0.0.1:31002,CONTROLLER://127.0.0.1:31003"
    assert p["process.roles"] == "broker,controller"
    for key in ("default.replication.factor", "offsets.topic.replication.factor",
                "transaction.state.log.replication.factor"):
        assert p[key] == "3", key
    assert p["min.insync.replicas"] == p["transaction.state.log.min.isr"] == "2"
    assert p["unclean.leader.election.enable"] == "false"
    assert int(p["broker.session.timeout.ms"]) == broker.BROKER_SESSION_MS
    assert int(p["broker.heartbeat.interval.ms"]) < broker.BROKER_SESSION_MS / 3
    # Two nodes: replicas capped at the node count.
    two = broker.cluster_nodes(2, 31000)
    p2 = props(broker.server_properties(tmp_path, 31000, 31001, node=two[0], voters=two))
    assert p2["offsets.topic.replication.factor"] == "2" and p2["min.insync.replicas"] == "2"


def test_single_node_properties_are_unchanged(tmp_path: Path):
    p = props(broker.server_properties(tmp_path, 9092, 9093))
    assert p["node.id"] == "1" and p["controller.quorum.bootstrap.servers"] == "127.0.0.1:9093"
    assert p["offsets.topic.replication.factor"] == "1"
    assert "min.insync.replicas" not in p and "default.replication.factor" not in p


def test_storage_formatted_for_other_voters_is_refused(tmp_path: Path):
    home = broker.cluster_home(tmp_path)
    home.mkdir(parents=True)
    (home / "voters").write_text("1@127.0.0.1:9093,2@127.0.0.1:9095")
    voters = broker.cluster_nodes(3)
    with pytest.raises(broker.BrokerError, match="same --nodes and ports"):
        broker.prepare_node(tmp_path, voters[0], voters, log=lambda _m: None)


def test_broker_nodes_setting_points_the_stack_at_the_cluster(monkeypatch: pytest.MonkeyPatch):
    for key in ("MAILFLOW_KAFKA_BOOTSTRAP", "MAILFLOW_REPLICATION", "MAILFLOW_BROKER_NODES"):
        monkeypatch.delenv(key, raising=False)
    s = Settings.from_env()
    assert (s.broker_nodes, s.kafka_bootstrap, s.replication) == (1, "127.0.0.1:9092", 1)
    monkeypatch.setenv("MAILFLOW_BROKER_NODES", "3")
    s = Settings.from_env()
    assert s.kafka_bootstrap == "127.0.0.1:9092,127.0.0.1:9094,127.0.0.1:9096"
    assert s.replication == 3
    monkeypatch.setenv("MAILFLOW_KAFKA_BOOTSTRAP", "127.0.0.1:31000,127.0.0.1:31002,127.0.0.1:31004")
    monkeypatch.setenv("MAILFLOW_REPLICATION", "2")
    s = Settings.from_env()
    assert s.kafka_bootstrap.startswith("127.0.0.1:31000,") and s.replication == 2
    monkeypatch.setenv("MAILFLOW_BROKER_NODES", "0")
    with pytest.raises(ValueError, match="BROKER_NODES"):
        Settings.from_env()


class Recorder:
    """Records what a `mailflow.ops.supervise.Supervisor` would be asked to run."""

    def __init__(self) -> None:
        self.added: list[tuple[str, list[str], bool, bool]] = []
        self.stops_last: list[bool] = []

    def add(self, name: str, argv: list[str], *, restart: bool = False, ready=None, env=None,
            stops_last: bool = False) -> None:
        self.added.append((name, argv, restart, ready is not None))
        self.stops_last.append(stops_last)


def test_up_supervises_each_node_and_waits_for_the_whole_cluster():
    sup = Recorder()
    port = 39990  # nothing listens there: every node is to be started
    broker.supervise_cluster(sup, ["mailflow"], broker.cluster_bootstrap(3, port), 3)
    assert [a[0] for a in sup.added] == ["kafka node 1", "kafka node 2", "kafka node 3"]
    assert sup.added[1][1] == ["mailflow", "broker", "--nodes", "3", "--node", "2", "--port", str(port)]
    assert all(restart for _, _, restart, _ in sup.added)
    # Only the last waits (for all three): a lone node is never ready without a quorum.
    assert [ready for *_, ready in sup.added] == [False, False, True]
    assert all(sup.stops_last)  # after the stages, which flush and commit to them
