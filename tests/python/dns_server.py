"""A tiny authoritative DNS server for dns-01 tests, on 127.0.0.1 (UDP and TCP).

TXT records live in RECORDS_DIR as one JSON file per record,
`{"name": "_acme-challenge.app.localhost.", "txt": "..."}`; only files ending
in `.json` are read, and the directory is re-read on every query, so a hook
script adds a record by writing a file (atomically: write, then rename) and
removes it by deleting the file. Several records may share a name.

Every name's zone is its top-level label (`localhost.`, `internal.`), served
with an SOA and an NS so that resolvers and clients looking for the zone apex
get sensible answers. A name without records gets NXDOMAIN, or an empty
NOERROR at a zone apex, with the SOA in the authority section.

usage: dns_server.py --port PORT --records-dir DIR
Prints "ready" on stdout once both sockets are bound; logs queries on stderr.
"""

import argparse
import json
import pathlib
import signal
import sys

from dnslib import A, NS, QTYPE, RCODE, RR, SOA, TXT, DNSLabel
from dnslib.server import BaseResolver, DNSLogger, DNSServer

TTL = 1


def load_records(records_dir):
    """{lower-cased name: [txt, ...]} from the *.json files in records_dir."""
    records = {}
    for path in sorted(pathlib.Path(records_dir).glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            # Deleted or half-written between listing and reading: skip it.
            continue
        name = str(DNSLabel(rec["name"])).lower()
        records.setdefault(name, []).append(rec["txt"])
    return records


class Resolver(BaseResolver):
    def __init__(self, records_dir):
        self.records_dir = records_dir

    def resolve(self, request, handler):
        reply = request.reply()
        qname = request.q.qname
        qtype = QTYPE[request.q.qtype]
        name = str(qname).lower()
        zone = DNSLabel(qname.label[-1:]) if qname.label else DNSLabel(".")
        ns = zone.add("ns")
        soa = RR(zone, QTYPE.SOA, ttl=TTL,
                 rdata=SOA(ns, zone.add("hostmaster"), (1, 60, 60, 60, TTL)))
        records = load_records(self.records_dir)

        if qtype in ("TXT", "ANY"):
            for txt in records.get(name, []):
                reply.add_answer(RR(qname, QTYPE.TXT, ttl=TTL, rdata=TXT(txt)))
        if qname == zone and qtype in ("SOA", "ANY"):
            reply.add_answer(soa)
        if qname == zone and qtype in ("NS", "ANY"):
            reply.add_answer(RR(zone, QTYPE.NS, ttl=TTL, rdata=NS(ns)))
        if qname == ns and qtype in ("A", "ANY"):
            reply.add_answer(RR(ns, QTYPE.A, ttl=TTL, rdata=A("127.0.0.1")))

        if not reply.rr:
            reply.add_auth(soa)
            # A name exists if it or a name below it has records.
            exists = qname in (zone, ns) or any(
                r == name or r.endswith("." + name) for r in records)
            if not exists:
                reply.header.rcode = RCODE.NXDOMAIN
        return reply


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--records-dir", required=True)
    args = parser.parse_args()

    resolver = Resolver(args.records_dir)
    logger = DNSLogger("request,reply,truncated,error",
                       logf=lambda s: print(s, file=sys.stderr, flush=True))
    servers = [DNSServer(resolver, address="127.0.0.1", port=args.port,
                         tcp=tcp, logger=logger) for tcp in (False, True)]
    for server in servers:
        server.start_thread()
    print("ready", flush=True)

    signal.pause()


if __name__ == "__main__":
    main()
