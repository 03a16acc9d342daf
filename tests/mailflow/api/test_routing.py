"""Which stage replicas the ingress asks for a routed read (`Ingress.stage_urls`)."""

from __future__ import annotations

import time
from types import SimpleNamespace

from mailflow.api.server import REGISTRY_KEEP_SECONDS, Ingress
from mailflow.config import Settings
from streams.topics import full_name


def _ingress(entries: dict[str, dict[str, object]]) -> Ingress:
    settings = Settings.from_env()
    ingress = Ingress(settings)
    ingress.reader = SimpleNamespace(values={full_name(settings, "registry"): entries})  # type: ignore[assignment]
    return ingress


def test_latest_heard_from_first_and_stale_ones_kept_after_them() -> None:
    now = time.time()
    ingress = _ingress({
        "store|a": {"stage": "store", "url": "http://a", "ts": now - 30},  # past a heartbeat or two
        "store|b": {"stage": "store", "url": "http://b", "ts": now - 1},
        "store|c": {"stage": "store", "url": "http://c", "ts": now - REGISTRY_KEEP_SECONDS - 1},
        "status|d": {"stage": "status", "url": "http://d", "ts": now},
    })
    assert ingress.stage_urls("store") == ["http://b", "http://a"]
    assert ingress.stage_urls("status") == ["http://d"]
    assert ingress.stage_urls("deliver") == []
