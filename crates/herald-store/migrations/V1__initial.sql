-- Herald's initial schema. Provider secrets never live here: accounts hold ids and settings,
-- secrets come from the environment or a secret store.

CREATE TABLE tenants (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    -- The RabbitMQ user whose validated user_id identifies this tenant's AMQP publishes.
    amqp_user   TEXT UNIQUE,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id          UUID PRIMARY KEY,
    tenant_id   TEXT NOT NULL REFERENCES tenants(id),
    -- First characters of the key, to tell keys apart in listings.
    key_prefix  TEXT NOT NULL,
    -- SHA-256 of the whole key; the key itself is shown once and never stored.
    key_hash    BYTEA NOT NULL UNIQUE,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at  TIMESTAMPTZ
);

CREATE TABLE provider_accounts (
    id          TEXT PRIMARY KEY,             -- also the token service's account id
    tenant_id   TEXT NOT NULL REFERENCES tenants(id),
    kind        TEXT NOT NULL,                -- wechat_official_account, wecom_app, ...
    channel     TEXT NOT NULL,                -- wechat.template, ...
    app_id      TEXT NOT NULL,
    is_default  BOOLEAN NOT NULL DEFAULT false,
    settings    JSONB NOT NULL DEFAULT '{}',
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX provider_accounts_one_default
    ON provider_accounts (tenant_id, channel) WHERE is_default;

CREATE TABLE templates (
    tenant_id          TEXT NOT NULL REFERENCES tenants(id),
    id                 TEXT NOT NULL,
    published_version  INTEGER,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);

-- Immutable versions; `templates.published_version` points at the live one.
CREATE TABLE template_versions (
    tenant_id    TEXT NOT NULL,
    template_id  TEXT NOT NULL,
    version      INTEGER NOT NULL,
    definition   JSONB NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, template_id, version),
    FOREIGN KEY (tenant_id, template_id) REFERENCES templates (tenant_id, id)
);

CREATE TABLE messages (
    id               UUID PRIMARY KEY,
    tenant_id        TEXT NOT NULL REFERENCES tenants(id),
    template_id      TEXT NOT NULL,
    idempotency_key  TEXT,
    -- SHA-256 of the canonical request, to tell a replay from a conflicting reuse of a key.
    request_hash     BYTEA NOT NULL,
    request          JSONB NOT NULL,
    source           TEXT NOT NULL,           -- rest, amqp
    state            TEXT NOT NULL,           -- accepted, rendered, rejected, or the deliveries' aggregate
    error            TEXT,
    traceparent      TEXT,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX messages_idempotency ON messages (tenant_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX messages_tenant_created ON messages (tenant_id, created_at DESC);

CREATE TABLE deliveries (
    id                UUID PRIMARY KEY,
    message_id        UUID NOT NULL REFERENCES messages(id),
    tenant_id         TEXT NOT NULL,
    channel           TEXT NOT NULL,
    provider_account  TEXT NOT NULL,
    recipient         TEXT NOT NULL,
    state             TEXT NOT NULL,
    attempt           INTEGER NOT NULL DEFAULT 0,
    provider_msgid    TEXT,
    last_error_code   TEXT,
    last_error        TEXT,
    traceparent       TEXT,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX deliveries_message ON deliveries (message_id);
CREATE UNIQUE INDEX deliveries_provider_msgid ON deliveries (provider_account, provider_msgid)
    WHERE provider_msgid IS NOT NULL;

-- Append-only history of every state change.
CREATE TABLE delivery_events (
    id            BIGSERIAL PRIMARY KEY,
    delivery_id   UUID NOT NULL REFERENCES deliveries(id),
    state         TEXT NOT NULL,
    source        TEXT NOT NULL,              -- renderer, sender, callback
    detail        JSONB NOT NULL DEFAULT '{}',
    trace_id      TEXT,
    -- Present for events that may arrive twice (provider callbacks).
    dedup_key     TEXT UNIQUE,
    occurred_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX delivery_events_delivery ON delivery_events (delivery_id, id);

-- Provider events that arrived before the send result naming their msgid was stored.
CREATE TABLE pending_provider_events (
    provider_account  TEXT NOT NULL,
    provider_msgid    TEXT NOT NULL,
    event_id          TEXT NOT NULL,
    event             JSONB NOT NULL,
    received_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (provider_account, provider_msgid, event_id)
);

-- Transactional outbox: rows written with the state change, published (confirmed) by a relay.
CREATE TABLE outbox (
    id           BIGSERIAL PRIMARY KEY,
    exchange     TEXT NOT NULL,
    routing_key  TEXT NOT NULL,
    headers      JSONB NOT NULL DEFAULT '{}',
    body         BYTEA NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
