#!/usr/bin/env python3
"""Publish one Herald notification over AMQP and follow its status events.

    pip install pika
    python3 examples/publish.py            # against `heraldctl up` on this machine

Environment: HERALD_AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f),
HERALD_AMQP_USER (the RabbitMQ user in that URL; default guest), HERALD_TENANT (default demo),
HERALD_OPENID (the recipient; default the sandbox's demo user).
See docs/contract.md for every field and header.
"""

import json
import os
import secrets
import sys
import time
import uuid

import pika

AMQP_URL = os.environ.get("HERALD_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
AMQP_USER = os.environ.get("HERALD_AMQP_USER", "guest")  # must be the user you connect as
TENANT = os.environ.get("HERALD_TENANT", "demo")
OPENID = os.environ.get("HERALD_OPENID", "oDemoUser000000000000000001x")
FINAL = {"DELIVERY_STATE_DELIVERED", "DELIVERY_STATE_FAILED",
         "DELIVERY_STATE_EXPIRED", "DELIVERY_STATE_SUPPRESSED"}
TIMEOUT_S = 30

connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
channel = connection.channel()

# 1. Subscribe to this tenant's status events *before* publishing, so none is missed:
#    a private, server-named queue that disappears with the connection.
status_queue = channel.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue
channel.queue_bind(queue=status_queue, exchange="herald.status", routing_key=f"status.{TENANT}.#")

# 2. The request: canonical proto3 JSON of herald.v1.NotificationRequest.
message_id = str(uuid.uuid4())
order_id = f"A-{secrets.token_hex(3)}"
request = {
    "template": {"id": "order_shipped"},
    "variables": {"order_id": order_id, "carrier": "SF Express", "eta": "tomorrow"},
    "recipients": [{"wechatOpenid": OPENID}],
    "channels": ["wechat.template"],
    "priority": "PRIORITY_HIGH",
    "metadata": {"order_id": order_id},
}
# W3C trace context: Herald's spans for this message join your trace.
traceparent = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"

# 3. Publish with publisher confirms; mandatory=True turns "no route" into an error.
channel.confirm_delivery()
try:
    channel.basic_publish(
        exchange="herald.requests",
        routing_key="request.shop",  # any key; "request.<your-system>" by convention
        body=json.dumps(request).encode(),
        properties=pika.BasicProperties(
            content_type="application/json",
            delivery_mode=2,  # persistent
            user_id=AMQP_USER,  # required: Herald maps it to your tenant
            message_id=message_id,  # a UUID becomes Herald's message id
            headers={"x-herald-schema": "herald.v1", "traceparent": traceparent},
        ),
        mandatory=True,
    )
except pika.exceptions.UnroutableError:
    sys.exit("not routed: is Herald's topology declared (heraldctl up / heraldctl topology)?")
except pika.exceptions.NackError:
    sys.exit("RabbitMQ refused the message; publish it again")
print(f"published message {message_id} (order {order_id}, trace {traceparent.split('-')[1]})")

# 4. Follow the deliveries of this message until each one settles.
deadline = time.monotonic() + TIMEOUT_S
open_deliveries = set()
for method, properties, body in channel.consume(status_queue, auto_ack=True, inactivity_timeout=1):
    if time.monotonic() > deadline:
        sys.exit(f"no final status within {TIMEOUT_S}s; try GET /v1/messages/{message_id}")
    if method is None:  # inactivity tick
        continue
    event = json.loads(body)
    if event.get("messageId") != message_id:
        continue  # another message of the same tenant
    state = event.get("state", "")
    error = f"  {event.get('errorCode')}: {event.get('errorMessage')}" if event.get("errorCode") else ""
    print(f"  {method.routing_key:28} delivery {event['deliveryId']} via {event['channel']}{error}")
    open_deliveries.add(event["deliveryId"])
    if state in FINAL:
        open_deliveries.discard(event["deliveryId"])
        if not open_deliveries:
            break

channel.cancel()
connection.close()
