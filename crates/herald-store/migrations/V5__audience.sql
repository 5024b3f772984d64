-- Audience, scheduling and fan-out (issue #5, items 4-7).

-- A message's state is kept from per-state counts of its deliveries, updated in the same
-- transaction as each delivery's change, instead of re-reading every delivery (O(n) per
-- update, which made a 10,000-recipient message crawl).
ALTER TABLE messages ADD COLUMN state_counts JSONB NOT NULL DEFAULT '{}';
UPDATE messages m SET state_counts = COALESCE(
    (SELECT jsonb_object_agg(state, n)
     FROM (SELECT state, count(*) AS n FROM deliveries d WHERE d.message_id = m.id
           GROUP BY state) s),
    '{}');
-- How many recipients of the request are written (fan-out resumes here after a crash).
ALTER TABLE messages ADD COLUMN fanout_done INTEGER NOT NULL DEFAULT 0;
-- Set by a cancellation; the renderer writes no more deliveries after it.
ALTER TABLE messages ADD COLUMN cancelled_at TIMESTAMPTZ;

-- Delivery jobs are published through the outbox too; they carry these AMQP properties.
ALTER TABLE outbox ADD COLUMN message_id TEXT;
ALTER TABLE outbox ADD COLUMN priority SMALLINT;

-- Rendered jobs held back until `due_at` (send_at, quiet hours): moved to the outbox by a
-- poller (FOR UPDATE SKIP LOCKED), so a schedule survives restarts of every service.
CREATE TABLE scheduled_jobs (
    delivery_id  UUID PRIMARY KEY REFERENCES deliveries(id),
    message_id   UUID NOT NULL,
    due_at       TIMESTAMPTZ NOT NULL,
    exchange     TEXT NOT NULL,
    routing_key  TEXT NOT NULL,
    headers      JSONB NOT NULL DEFAULT '{}',
    body         BYTEA NOT NULL,
    priority     SMALLINT,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX scheduled_jobs_due ON scheduled_jobs (due_at);
CREATE INDEX scheduled_jobs_message ON scheduled_jobs (message_id);

-- Cancellation finds a message's pending deliveries by state.
CREATE INDEX deliveries_message_state ON deliveries (message_id, state);

-- The recipient directory: a tenant's user id -> addresses and preferences.
CREATE TABLE recipients (
    tenant_id    TEXT NOT NULL REFERENCES tenants(id),
    user_id      TEXT NOT NULL,
    timezone     TEXT,
    addresses    JSONB NOT NULL DEFAULT '{}',
    preferences  JSONB NOT NULL DEFAULT '{}',
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, user_id)
);

-- A tenant's default preferences; a recipient's own override them field by field.
CREATE TABLE tenant_preferences (
    tenant_id    TEXT PRIMARY KEY REFERENCES tenants(id),
    preferences  JSONB NOT NULL DEFAULT '{}',
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
