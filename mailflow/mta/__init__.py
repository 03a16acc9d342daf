"""The MTA edge: SMTP out, MX lookup, DSNs, scanners, DKIM signing and its keys, sending domains, MTA-STS."""
