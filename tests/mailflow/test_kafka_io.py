"""mailflow.kafka_io.producer_config: the one producer configuration."""

from __future__ import annotations

import re
from pathlib import Path

from mailflow.kafka_io import producer_config

ROOT = Path(__file__).resolve().parents[2]


def test_producer_config_is_acks_all_idempotent_murmur2() -> None:
    c = producer_config("h:1")
    assert c == {"bootstrap.servers": "h:1", "acks": "all", "enable.idempotence": True,
                 "partitioner": "murmur2_random"}
    assert producer_config("h:1", **{"linger.ms": 5})["linger.ms"] == 5


def test_no_runtime_module_writes_its_own_producer_configuration() -> None:
    # The stages, the API and the operator tools take producer_config, so that none
    # lacks acks=all or the partitioner the others use.
    sources = [*ROOT.glob("agents/*.py"), *ROOT.glob("streams/*.py"), *ROOT.glob("mailflow/**/*.py")]
    own = [str(p.relative_to(ROOT)) for p in sources
           if p.name != "kafka_io.py" and re.search(r'"acks":\s*"all"', p.read_text())]
    assert not own
