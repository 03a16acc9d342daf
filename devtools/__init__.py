"""Development and test tooling: what runs a whole stack on one machine, never
production.

`broker` (the embedded Kafka broker, `mailflow broker`), `services` (clamd, rspamd
and the loopback DNS server, ``python -m devtools.services up``), `stack`
(`mailflow up`, `mailflow down`, `mailflow env`), `sink` (the SMTP sink,
`mailflow sink`) and `bench` (the load generator, `mailflow bench`).

No stage and no part of the API imports this package (tests/devtools/test_apart.py
checks it); `mailflow.ops.cli` reaches these commands by lazy imports.
"""
