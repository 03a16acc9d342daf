"""`mailflow domains add|list|dns|rotate|remove|check DOMAIN`: sending domains and DKIM keys.

* ``add DOMAIN [--ed25519]``: a new RSA-2048 key under a dated selector (and an
  Ed25519 one as a second signature), then the records to publish.
* ``list [--json]``: domains, selectors and their states; never a private key.
* ``dns DOMAIN [--json]``: the DKIM TXT record of every selector, and SPF and DMARC
  suggestions, as zone-file lines, or one JSON line ``{"records": [{name, type, value}]}``.
* ``rotate DOMAIN``: a new pending selector (per algorithm in use); it signs as soon
  as its record resolves. Run ``rotate`` again once it resolves to make the switch
  durable (the old selector is retired: keep its record published for a few days,
  mail in flight is signed with it). ``--force`` starts another rotation.
* ``remove DOMAIN``: delete the domain and its keys (mail from it goes unsigned, or
  is refused with ``MAILFLOW_DKIM=required``).
* ``check DOMAIN [--json]``: SPF, each selector's DKIM record and DMARC as DNS
  (``MAILFLOW_DNS``) answers them; exit 1 when something is missing or wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
from typing import Any

import orjson

from mailflow.config import Settings
from mailflow.mta import domains as dom


def add_parser(sub: Any) -> None:
    d = sub.add_parser("domains", help="sending domains: DKIM keys, DNS records, checks")
    dsub = d.add_subparsers(dest="domains_cmd", required=True)
    a = dsub.add_parser("add", help="make DKIM keys for DOMAIN and print the DNS records")
    a.add_argument("domain")
    a.add_argument("--ed25519", action="store_true", help="also an Ed25519 key (a second signature)")
    ls = dsub.add_parser("list", help="domains, selectors, states")
    ls.add_argument("--json", action="store_true")
    dn = dsub.add_parser("dns", help="the DNS records to publish for DOMAIN")
    dn.add_argument("domain")
    dn.add_argument("--json", action="store_true", help='one JSON line {"records": [...]}')
    r = dsub.add_parser("rotate", help="a new selector, switched to once its record resolves")
    r.add_argument("domain")
    r.add_argument("--force", action="store_true", help="start a new rotation even if one is pending")
    rm = dsub.add_parser("remove", help="delete DOMAIN and its keys")
    rm.add_argument("domain")
    c = dsub.add_parser("check", help="resolve SPF, DKIM and DMARC for DOMAIN and say what is wrong")
    c.add_argument("domain")
    c.add_argument("--json", action="store_true")


def _get(settings: Settings, domain: str) -> dict[str, Any] | None:
    rec = dom.read_all(settings).get(dom.normalize_domain(domain))
    if rec is None:
        print(f"mailflow: {domain} is not a sending domain (add it with `mailflow domains add {domain}`)",
              file=sys.stderr)
    return rec


def _print_dns(settings: Settings, rec: dict[str, Any], as_json: bool = False) -> None:
    records = dom.dns_records(rec, settings)
    if as_json:
        print(orjson.dumps({"records": records}).decode())
    else:
        print("\n".join(dom.zone_lines(records)))


def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        return _run(args, settings)
    except dom.DomainError as exc:
        print(f"mailflow: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, settings: Settings) -> int:
    cmd = args.domains_cmd
    if cmd == "add":
        added = dom.add(settings, args.domain, ed25519=args.ed25519)
        sels = ", ".join(f"{s['selector']} ({s['algorithm']})" for s in added["selectors"])
        print(f"{added['domain']}: DKIM selector {sels}; publish these records:", file=sys.stderr)
        _print_dns(settings, added)
        return 0
    if cmd == "list":
        recs = sorted(dom.read_all(settings).values(), key=lambda r: r["domain"])
        if args.json:
            print(orjson.dumps([dom.public_view(r) for r in recs]).decode())
            return 0
        print(f"{'DOMAIN':<32} {'SELECTOR':<16} {'ALGORITHM':<16} {'STATE':<8} CREATED")
        for r in recs:
            for s in r["selectors"]:
                when = dt.datetime.fromtimestamp(s["created"]).strftime("%Y-%m-%d %H:%M")
                print(f"{r['domain']:<32} {s['selector']:<16} {s['algorithm']:<16} {s['state']:<8} {when}")
        return 0
    rec = _get(settings, args.domain)
    if rec is None:
        return 1
    if cmd == "dns":
        _print_dns(settings, rec, args.json)
        return 0
    if cmd == "remove":
        dom.write(settings, rec["domain"], None)
        print(f"removed {rec['domain']} and its DKIM keys; unpublish its DKIM records once its mail "
              "in flight is delivered", file=sys.stderr)
        return 0
    if cmd == "rotate":
        return _rotate(settings, rec, args.force)
    if cmd == "check":
        findings = asyncio.run(dom.check(settings, rec))
        if args.json:
            print(orjson.dumps({"domain": rec["domain"], "ok": all(f.ok for f in findings),
                                "findings": [f.__dict__ for f in findings]}).decode())
        else:
            for f in findings:
                print(f"{'ok' if f.ok else 'PROBLEM':<8} {f.what:<36} {f.text}")
        return 0 if all(f.ok for f in findings) else 1
    return 2


def _rotate(settings: Settings, rec: dict[str, Any], force: bool) -> int:
    pending = [s for s in rec["selectors"] if s["state"] == "pending"]
    if pending and not force:
        res = dom.resolver(settings)
        ready = [s for s in pending if asyncio.run(dom.selector_published(res, rec["domain"], s))]
        for s in ready:
            rec = dom.promoted(rec, s["selector"])
        if ready:
            dom.write(settings, rec["domain"], rec)
            print(f"{rec['domain']}: switched to {', '.join(s['selector'] for s in ready)}; keep the "
                  "retired selectors' records published for a few days", file=sys.stderr)
        waiting = [s["selector"] for s in pending if s not in ready]
        if waiting:
            print(f"{rec['domain']}: {', '.join(waiting)} not resolving yet; publish:", file=sys.stderr)
            _print_dns(settings, {**rec, "selectors": [s for s in pending if s not in ready]})
            return 1
        return 0
    from mailflow.mta.keyring import operator_key

    rec = dom.rotated(operator_key(settings), rec)
    dom.write(settings, rec["domain"], rec)
    new = [s for s in rec["selectors"] if s["state"] == "pending"]
    print(f"{rec['domain']}: new selector {', '.join(s['selector'] for s in new)}; it signs once its "
          "record resolves (run `rotate` again then to make it final). Publish:", file=sys.stderr)
    _print_dns(settings, {**rec, "selectors": new})
    return 0
