"""The `mailflow` command."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import orjson

from mailflow.config import Settings


def _api(settings: Settings, api: str | None) -> str:
    return (api or os.environ.get("MAILFLOW_API") or f"http://{settings.api_host}:{settings.api_port}").rstrip("/")


def _credential(args: argparse.Namespace | None = None) -> str | None:
    """--key, else MAILFLOW_API_KEY, else MAILFLOW_TOKEN (a mailbox token)."""
    return (getattr(args, "key", None) or os.environ.get("MAILFLOW_API_KEY")
            or os.environ.get("MAILFLOW_TOKEN") or None)


def _http(method: str, url: str, body: bytes | None = None, ctype: str | None = None,
          key: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method)
    if ctype:
        req.add_header("Content-Type", ctype)
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except urllib.error.URLError as exc:
        raise SystemExit(f"mailflow: cannot reach the API at {url}: {exc.reason}") from None


def cmd_send(args: argparse.Namespace, settings: Settings) -> int:
    base = _api(settings, args.api)
    if args.file:
        raw = Path(args.file).read_bytes()
        q = urllib.parse.urlencode({"from": args.sender, "to": ",".join(args.to)})
        status, body = _http("POST", f"{base}/v1/messages?{q}", raw, "message/rfc822",
                             key=_credential(args))
    else:
        doc = {"from": args.sender, "to": args.to, "subject": args.subject or "",
               "text": args.text if args.text is not None else ""}
        status, body = _http("POST", f"{base}/v1/messages", orjson.dumps(doc), "application/json",
                             key=_credential(args))
    if status != 202:
        print(f"mailflow: refused ({status}): {body.decode(errors='replace')}", file=sys.stderr)
        return 1
    print(orjson.loads(body)["id"])
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    import time

    url = f"{_api(settings, args.api)}/v1/messages/{args.id}"
    deadline = time.monotonic() + (args.wait or 0)
    while True:
        status, body = _http("GET", url, key=_credential(args))
        # --wait: a message accepted a moment ago is not known to the status stage
        # yet (404), a status replica may be restarting (503); then until every
        # recipient has reached a final state.
        if time.monotonic() >= deadline or (status == 200 and orjson.loads(body).get("final")) \
                or status not in (200, 404, 503):
            break
        time.sleep(0.3)
    if status != 200:
        print(f"mailflow: {status}: {body.decode(errors='replace')}", file=sys.stderr)
        return 1
    doc = orjson.loads(body)
    if args.json:
        print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
        return 0
    import datetime as dt

    print(f"message {doc['id']} from {doc.get('sender', '?')}: {doc['state']}")
    for rcpt, st in doc["recipients"].items():
        extra = st.get("waiting_on") and f" (waiting on {st['waiting_on']})" or ""
        detail = st.get("detail") or {}
        why = detail.get("message") or detail.get("reply") or ""
        print(f"  {rcpt:<40} {st['state']}{extra} {why}".rstrip())
    print("timeline:")
    for e in doc["timeline"]:
        t = dt.datetime.fromtimestamp(e["ts"]).strftime("%H:%M:%S.%f")[:-3]
        who = ",".join(e.get("recipients") or []) or "-"
        print(f"  {t} {e['stage']:<10} {e['state']:<12} {who}")
    return 0


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    """`mailflow keys create|list|revoke`: API keys on the `auth` topic."""
    import datetime as dt

    from mailflow.api import auth

    try:
        if args.keys_cmd == "create":
            key, rec = auth.create_key(settings, args.domains.split(","), name=args.name or "")
            print(f"key id {rec['id']} for {','.join(rec['domains'])}"
                  + (" (admin: every domain)" if auth.ADMIN in rec["domains"] else ""), file=sys.stderr)
            print("store it now: it is shown only once", file=sys.stderr)
            print(key)
            return 0
        if args.keys_cmd == "list":
            recs = sorted(auth.read_all(settings).values(), key=lambda r: r.get("created", 0))
            recs = [r for r in recs if args.all or r.get("kind") == "key"]
            if args.json:
                print(orjson.dumps([{k: v for k, v in r.items() if k != "hash"} for r in recs]).decode())
                return 0
            print(f"{'ID':<13} {'KIND':<6} {'NAME':<16} {'CREATED':<20} {'REVOKED':<20} DOMAINS/ADDRESS")
            for r in recs:
                def when(ts: float | None) -> str:
                    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"
                print(f"{r['id']:<13} {r.get('kind', '?'):<6} {(r.get('name') or '-'):<16} "
                      f"{when(r.get('created')):<20} {when(r.get('revoked')):<20} "
                      f"{r.get('address') or ','.join(r.get('domains') or [])}")
            return 0
        if args.keys_cmd == "revoke":
            revoked = auth.revoke(settings, args.id)
            if revoked is None:
                print(f"mailflow: no credential {args.id}", file=sys.stderr)
                return 1
            print(f"revoked {args.id}")
            return 0
    except ValueError as exc:
        print(f"mailflow: {exc}", file=sys.stderr)
        return 2
    return 2


def cmd_mailboxes(args: argparse.Namespace, settings: Settings) -> int:
    """`mailflow mailboxes create ADDRESS`: a mailbox token (revoke with `keys revoke ID`)."""
    from mailflow.api import auth
    from mailflow.rules.mailrules import AddressError

    try:
        token, rec = auth.create_token(settings, args.address, name=args.name or "")
    except AddressError as exc:
        print(f"mailflow: not an address: {exc}", file=sys.stderr)
        return 2
    print(f"token id {rec['id']} for mailbox {rec['address']}; shown only once", file=sys.stderr)
    print(token)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mailflow", description="Outbound mail pipeline on Kafka")
    sub = p.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="run the whole local stack (one per data dir: refuses, naming it, "
                        "while another runs there or holds its ports)")
    up.add_argument("--detach", action="store_true", help="run in the background; stop with `mailflow down`")
    up.add_argument("--no-scanners", action="store_true", help="do not start clamd and rspamd")
    up.add_argument("--brokers", type=int, metavar="N",
                    help="run Kafka as a local cluster of N nodes (sets MAILFLOW_BROKER_NODES)")
    sub.add_parser("down", help="stop the stack running on this data dir (MAILFLOW_DATA_DIR), "
                   "whether started in the foreground or with --detach, and wait until it has stopped")
    sub.add_parser("env", help="print export lines (MAILFLOW_API, MAILFLOW_API_KEY, MAILFLOW_TOKEN) "
                   "for the stack on this data dir: eval \"$(mailflow env)\"")

    b = sub.add_parser("broker", help="the embedded Kafka broker (KRaft; one node, or a local cluster)")
    b.add_argument("--port", type=int, default=9092,
                   help="client port (of node 1; node k uses PORT + 2(k-1))")
    b.add_argument("--controller-port", type=int,
                   help="controller port (default PORT + 1; node k uses it + 2(k-1))")
    b.add_argument("--nodes", type=int, default=None,
                   help="run a local cluster of this many nodes (default $MAILFLOW_BROKER_NODES or 1)")
    b.add_argument("--node", type=int, metavar="K", help="run only node K of the cluster")
    b.add_argument("--heap", help="each JVM's -Xmx (default 1g for one node, 512m per cluster node)")
    b.add_argument("--loglevel", default="warn")

    w = sub.add_parser("worker", help="run stages")
    w.add_argument("--stages", required=True, help="comma-separated stages, or all")
    w.add_argument("--loglevel", default="warning")

    a = sub.add_parser("api", help="the HTTP API")
    a.add_argument("--host")
    a.add_argument("--port", type=int)
    a.add_argument("--reuse-port", action="store_true", help="share the port with sibling API processes")

    s = sub.add_parser("send", help="submit one message through the HTTP API")
    s.add_argument("--from", dest="sender", required=True)
    s.add_argument("--to", action="append", required=True)
    s.add_argument("--subject")
    s.add_argument("--text")
    s.add_argument("--api")
    s.add_argument("--key", help="API key or mailbox token (default: $MAILFLOW_API_KEY, $MAILFLOW_TOKEN)")
    s.add_argument("file", nargs="?")

    st = sub.add_parser("status", help="one message's state and timeline")
    st.add_argument("id")
    st.add_argument("--json", action="store_true")
    st.add_argument("--wait", type=float, metavar="SECONDS", default=0,
                    help="wait up to SECONDS until every recipient is in a final state")
    st.add_argument("--api")
    st.add_argument("--key", help="API key or mailbox token (default: $MAILFLOW_API_KEY, $MAILFLOW_TOKEN)")

    ks = sub.add_parser("keys", help="API keys for services (create, list, revoke)")
    ksub = ks.add_subparsers(dest="keys_cmd", required=True)
    kc = ksub.add_parser("create", help="create a key; prints it once")
    kc.add_argument("--domains", required=True,
                    help="comma-separated sender domains (`*.example.com` for subdomains, `*` for all: admin)")
    kc.add_argument("--name")
    kl = ksub.add_parser("list", help="id, name, domains, created, revoked")
    kl.add_argument("--all", action="store_true", help="mailbox tokens too")
    kl.add_argument("--json", action="store_true")
    kr = ksub.add_parser("revoke", help="revoke a key or mailbox token by id")
    kr.add_argument("id")

    mbx = sub.add_parser("mailboxes", help="mailbox tokens for people")
    msub = mbx.add_subparsers(dest="mailboxes_cmd", required=True)
    mc = msub.add_parser("create", help="create a token for ADDRESS; prints it once")
    mc.add_argument("address")
    mc.add_argument("--name")

    from mailflow.ops import domains_cli

    domains_cli.add_parser(sub)
    lg = sub.add_parser("lag", help="consumer lag per stage")
    lg.add_argument("--watch", action="store_true")
    lg.add_argument("--json", action="store_true")
    lg.add_argument("--serve", type=int, metavar="PORT", help="export lag gauges for Prometheus")

    sk = sub.add_parser("sink", help="a local SMTP server writing .eml files")
    sk.add_argument("--host", default="127.0.0.1")
    sk.add_argument("--port", type=int, default=2525)
    sk.add_argument("--dir", type=Path)

    rp = sub.add_parser("replay", help="put parked messages back into the flow")
    rp.add_argument("source", choices=["errors", "dead"])
    rp.add_argument("--reason")
    rp.add_argument("--since", help="only what was parked this recently (e.g. 2h)")
    rp.add_argument("--id", action="append", dest="ids", metavar="MESSAGE_ID",
                    help="only this message (repeatable)")
    rp.add_argument("--dry-run", action="store_true")

    qu = sub.add_parser("queue", help="waiting mail by stage, domain and age; hold, release, flush, bounce",
                        description="Without an action: `show`. Actions are durable records on "
                                    "queue.control, read by the deliver and retry stages within a second.")
    qu.add_argument("--json", action="store_true", help="(show) end with one line of JSON")
    qsub = qu.add_subparsers(dest="queue_cmd")
    qs = qsub.add_parser("show", help="lag per stage, and delivery/deferred/held mail by domain and age")
    qs.add_argument("--json", dest="show_json", action="store_true", help="end with one line of JSON")
    for name, what in (("hold", "stop delivery attempts (none is spent) until released"),
                       ("release", "resume delivery attempts of held mail")):
        qh = qsub.add_parser(name, help=what)
        qh.add_argument("domain", nargs="?", metavar="DOMAIN")
        qh.add_argument("--id", dest="msg_id", metavar="ID", help="one message instead of a domain")
    qf = qsub.add_parser("flush", help="make deferred mail (of DOMAIN, or all) due now")
    qf.add_argument("domain", nargs="?", metavar="DOMAIN")
    qb = qsub.add_parser("bounce", help="end a message with a bounce (RFC 3464) to its sender")
    qb.add_argument("--id", dest="msg_id", metavar="ID", required=True)

    bn = sub.add_parser("bench", help="load generator and report")
    argv = sys.argv[1:] if argv is None else argv
    if "bench" in argv:
        # Its options only when asked for: the development tools (devtools/) stay
        # out of the stages' and the API's processes, which start through here too.
        from devtools.bench import add_arguments

        add_arguments(bn)

    args = p.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"mailflow: bad setting: {exc}", file=sys.stderr)
        return 2
    if settings.event_loop == "uvloop":
        # Before any loop exists: Faust's worker, aiohttp's run_app and asyncio.run
        # all take their loop from the policy.
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    if args.cmd == "broker":
        from devtools import broker

        return broker.run(settings.data_dir, args.port, args.controller_port, args.loglevel,
                          nodes=args.nodes or settings.broker_nodes, only=args.node, heap=args.heap)
    if args.cmd == "worker":
        from mailflow.ops import worker

        try:
            stages = worker.parse_stages(args.stages)
        except ValueError as exc:
            print(f"mailflow: {exc}", file=sys.stderr)
            return 2
        return worker.run(stages, settings, args.loglevel)
    if args.cmd == "api":
        from mailflow.api import server

        return server.run(settings, args.host, args.port, reuse_port=args.reuse_port)
    if args.cmd == "up":
        from devtools import stack

        if args.brokers:
            # Through the environment, so that every process the stack starts (and the
            # detached `up` itself) sees the cluster's addresses and replication.
            os.environ["MAILFLOW_BROKER_NODES"] = str(args.brokers)
            settings = Settings.from_env()

        return stack.up(settings, detach=args.detach, scanners=not args.no_scanners)
    if args.cmd == "down":
        from devtools import stack

        return stack.down(settings)
    if args.cmd == "env":
        from devtools import stack

        return stack.print_env(settings)
    if args.cmd == "send":
        return cmd_send(args, settings)
    if args.cmd == "status":
        return cmd_status(args, settings)
    if args.cmd == "keys":
        return cmd_keys(args, settings)
    if args.cmd == "mailboxes":
        return cmd_mailboxes(args, settings)
    if args.cmd == "domains":
        from mailflow.ops import domains_cli

        return domains_cli.run(args, settings)
    if args.cmd == "lag":
        from mailflow.ops import lag

        if args.serve:
            return lag.serve(settings, args.serve)
        return lag.run(settings, args.watch, args.json)
    if args.cmd == "sink":
        from devtools import sink

        return sink.run(args.host, args.port, args.dir or settings.data_dir / "sink")
    if args.cmd == "replay":
        from mailflow.ops import replay

        return replay.run(settings, args.source, args.reason, args.since, args.dry_run, args.ids)
    if args.cmd == "queue":
        from mailflow.ops import queue

        return queue.run(settings, args.queue_cmd or "show", getattr(args, "domain", None),
                         getattr(args, "msg_id", None), args.json or getattr(args, "show_json", False))
    if args.cmd == "bench":
        from devtools import bench

        return bench.run(settings, args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
