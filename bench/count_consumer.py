"""Counts the messages of one topic from the beginning, for the end-to-end
runs (the same consumer for the engine and the Python relay).

Usage: count_consumer.py BROKERS TOPIC PARTITIONS READY_FILE EXPECT_FILE

Assigns every partition at the beginning (no group join: tansu's are slow),
writes READY_FILE once the first fetch returned, then consumes. Once
EXPECT_FILE holds a number N, it stops when N messages have arrived (or
after 30 s without a new one) and prints one JSON line: the monotonic time
(CLOCK_MONOTONIC, comparable across processes) at which the count first
reached N, the count, and the time of the first message."""
import json, os, sys, time
from confluent_kafka import Consumer, TopicPartition, OFFSET_BEGINNING

brokers, topic, partitions, ready_file, expect_file = sys.argv[1:6]
c = Consumer({"bootstrap.servers": brokers, "group.id": "bench-count",
              "enable.auto.commit": False, "fetch.wait.max.ms": 20,
              "queued.min.messages": 200000})
c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(int(partitions))])
count, first_at, reached_at, expect, last_new = 0, None, None, None, time.monotonic()
history = []  # (monotonic time, count) after each non-empty batch
ready = False
while True:
    msgs = c.consume(num_messages=10000, timeout=0.05)
    now = time.monotonic()
    n = sum(1 for m in msgs if m.error() is None)
    if n:
        if first_at is None:
            first_at = now
        count += n
        last_new = now
        history.append((now, count))
    if not ready:
        open(ready_file, "w").write(str(now))
        ready = True
    if expect is None and os.path.exists(expect_file):
        text = open(expect_file).read().strip()
        expect = int(text) if text else None
    if expect is not None:
        if count >= expect:
            reached_at = next(t for t, k in history if k >= expect) if expect > 0 else now
            break
        if now - last_new > 30:
            break
c.close()
print(json.dumps({"count": count, "expected": expect, "reached_at": reached_at,
                  "first_at": first_at, "complete": reached_at is not None}))
