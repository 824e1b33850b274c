#!/usr/bin/env python3
"""An independent consumer of a connect-json topic (confluent-kafka, not
pgcdc's code): reads every record of TOPIC from BROKERS and prints one JSON
line per change, {"op", "key", "row"}, the key and the new row rebuilt from
each record's Kafka Connect `schema` and `payload` alone, without knowledge
of the table. Values become PostgreSQL's input forms: bytes as hex bytea
text, JSON text as JSON, dates and times (Debezium's and Kafka Connect's
temporal types) as ISO 8601 text.

usage: connect_consumer.py BROKERS TOPIC COUNT TIMEOUT_SECS
Exits 1 if fewer than COUNT change records arrive within TIMEOUT_SECS.
"""

import base64
import datetime
import json
import sys
import time

from confluent_kafka import Consumer, TopicPartition, OFFSET_BEGINNING

EPOCH = datetime.datetime(1970, 1, 1)


def temporal(name, value):
    """The ISO text of a temporal value of Connect type `name`, or None."""
    micros = {
        "io.debezium.time.MicroTimestamp": 1,
        "io.debezium.time.Timestamp": 1000,
        "org.apache.kafka.connect.data.Timestamp": 1000,
    }
    if name in micros:
        return (EPOCH + datetime.timedelta(microseconds=value * micros[name])).isoformat()
    if name in ("io.debezium.time.Date", "org.apache.kafka.connect.data.Date"):
        return (EPOCH + datetime.timedelta(days=value)).date().isoformat()
    per_unit = {
        "io.debezium.time.MicroTime": 1,
        "io.debezium.time.Time": 1000,
        "org.apache.kafka.connect.data.Time": 1000,
    }
    if name in per_unit:
        us = value * per_unit[name]
        seconds, micro = divmod(us, 1_000_000)
        minutes, second = divmod(seconds, 60)
        hour, minute = divmod(minutes, 60)
        return f"{hour:02}:{minute:02}:{second:02}.{micro:06}"
    return None


def decode(schema, value):
    """`value` rebuilt from its Connect `schema`."""
    if value is None:
        return None
    kind, name = schema.get("type"), schema.get("name")
    if kind == "struct":
        return {f["field"]: decode(f, value.get(f["field"])) for f in schema["fields"]}
    if kind == "array":
        return [decode(schema["items"], v) for v in value]
    if kind == "bytes":
        return "\\x" + base64.b64decode(value).hex()
    if name == "io.debezium.data.Json":
        return json.loads(value)
    if isinstance(value, int) and name:
        iso = temporal(name, value)
        if iso is not None:
            return iso
    return value


def field(struct_schema, name):
    """The schema of field `name` of a struct schema."""
    return next(f for f in struct_schema["fields"] if f["field"] == name)


def main():
    brokers, topic, count, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    consumer = Consumer({
        "bootstrap.servers": brokers,
        "group.id": "connect-consumer-test",
        "enable.auto.commit": False,
    })
    partitions = consumer.list_topics(topic, timeout=timeout).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    deadline = time.monotonic() + timeout
    seen = 0
    while seen < count and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None:
            continue
        if msg.error():
            raise SystemExit(f"consumer error: {msg.error()}")
        if msg.value() is None:
            continue  # a tombstone
        key = json.loads(msg.key())
        value = json.loads(msg.value())
        payload = value["payload"]
        row = decode(field(value["schema"], "after"), payload["after"])
        print(json.dumps({"op": payload["op"], "key": decode(key["schema"], key["payload"]), "row": row}))
        seen += 1
    consumer.close()
    sys.exit(0 if seen >= count else 1)


if __name__ == "__main__":
    main()
