"""The simple relay issue 10 compares the engine with: one plain table,
`delete … for update skip locked … returning` in batches of 1000, a
confluent-kafka producer, flush per batch, commit after the flush.
(Not safe: several copies reorder an aggregate; it is a speed floor.)
Usage: python_relay.py DSN BROKERS TOPIC   (SIGTERM stops it)"""
import signal, sys, time
import psycopg2
from confluent_kafka import Producer

dsn, brokers, topic = sys.argv[1:4]
stop = False
signal.signal(signal.SIGTERM, lambda *_: globals().update(stop=True))
db = psycopg2.connect(dsn)
producer = Producer({"bootstrap.servers": brokers, "linger.ms": 5,
                     "enable.idempotence": True, "partitioner": "murmur2_random"})
FETCH = """delete from plain_outbox where id in (
             select id from plain_outbox order by id for update skip locked limit 1000)
           returning id, event_id::text, aggregate_type, aggregate_id, event_type, payload::text"""
failed, sent, batches = [], 0, 0
def on_delivery(err, _msg):
    if err is not None:
        failed.append(err)
while not stop:
    with db, db.cursor() as cur:           # one transaction per batch
        cur.execute(FETCH)
        rows = sorted(cur.fetchall())      # `returning` has no order
        for pos, eid, agg_type, agg_id, etype, payload in rows:
            producer.produce(topic, key=agg_id, value=payload, on_delivery=on_delivery,
                             headers=[("id", eid), ("event_type", etype),
                                      ("aggregate_type", agg_type), ("position", str(pos))])
        producer.flush()                   # every message acknowledged ...
        if failed:
            raise SystemExit(f"delivery failed: {failed[0]}")  # ... or roll back
    sent, batches = sent + len(rows), batches + (1 if rows else 0)
    if not rows:
        time.sleep(0.01)
print(f"python_relay: {sent} events in {batches} batches", file=sys.stderr)
