"""DKIM signing cost per message: dkimpy's own RSA arithmetic vs. OpenSSL's (same bytes).

    PYTHONPATH=. .venv/bin/python bench/dkim_sign.py [--n 50]

Signs one 3 KB message N times per variant (RSA-2048 with dkimpy's Python RSA, RSA-2048
as mailflow signs, Ed25519) and prints medians in ms; the last line is JSON.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import dkim
import orjson

from mailflow.mta import domains as dom
from mailflow.mta import signing


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50)
    n = ap.parse_args().n
    key = os.urandom(32)
    rec = dom.new_domain(key, "example.com", ed25519=True)
    msg = (b"From: a@example.com\r\nTo: b@x.test\r\nSubject: hi\r\nDate: Tue, 01 Dec 2026 10:00:00 +0000\r\n"
           b"Message-ID: <1@example.com>\r\n\r\n" + b"hello world, a line of text\r\n" * 100)
    rsa, ed = rec["selectors"]
    keys = {"rsa_dkimpy": (rsa, signing._dkimpy_rsa_sign), "rsa_openssl": (rsa, signing._openssl_rsa_sign),
            "ed25519": (ed, signing._openssl_rsa_sign)}
    out = {}
    for name, (sel, rsa_impl) in keys.items():
        dkim.RSASSA_PKCS1_v1_5_sign = rsa_impl
        private = dom.private_key(key, rec, sel)
        times = []
        for _ in range(n):
            t = time.perf_counter()
            signing.sign_message(msg, "example.com", [(sel["selector"], sel["algorithm"], private)])
            times.append(time.perf_counter() - t)
        out[f"{name}_ms"] = round(statistics.median(times) * 1000, 3)
        print(f"{name:<12} median {out[f'{name}_ms']} ms over {n}")
    dkim.RSASSA_PKCS1_v1_5_sign = signing._openssl_rsa_sign
    print(orjson.dumps({"bench": "dkim_sign", "n": n, **out}).decode())


if __name__ == "__main__":
    main()
