#!/usr/bin/env python3
"""Deaggregates Kinesis records with AWS's own module (aws_kinesis_agg, as a Lambda
consumer would): reads JSON lines {"partitionKey", "data" (base64), "sequenceNumber"}
in stream order on stdin, writes one JSON line {"partitionKey", "data"} per user record.
Exits 1 when a record that carries the KPL magic bytes is not deaggregated (the module
then hands it back untouched, e.g. on an MD5 mismatch)."""
import base64
import json
import sys

from aws_kinesis_agg import MAGIC
from aws_kinesis_agg.deaggregator import iter_deaggregate_records

failed = False
for line in sys.stdin:
    r = json.loads(line)
    record = {
        "kinesis": {
            "kinesisSchemaVersion": "1.0",
            "sequenceNumber": r["sequenceNumber"],
            "approximateArrivalTimestamp": 0,
            "partitionKey": r["partitionKey"],
            "data": r["data"],
        }
    }
    raw = base64.b64decode(r["data"])
    users = list(iter_deaggregate_records(record))
    if raw.startswith(MAGIC) and len(users) == 1 and users[0] is record:
        print("not deaggregated: sequence number %s" % r["sequenceNumber"], file=sys.stderr)
        failed = True
    for u in users:
        data = u["kinesis"]["data"]
        if isinstance(data, bytes):
            data = data.decode()
        print(json.dumps({"partitionKey": u["kinesis"]["partitionKey"], "data": data}))
sys.exit(1 if failed else 0)
