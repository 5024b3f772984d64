-- Callbacks and the status lifecycle: recipient directory (follow state, subscription consent),
-- tenant status webhooks, and indexes for the status API and the pending-event sweep.

-- Append-only history of provider events about recipients; event_id de-duplicates retries.
CREATE TABLE recipient_events (
    id                BIGSERIAL PRIMARY KEY,
    event_id          TEXT NOT NULL UNIQUE,
    provider          TEXT NOT NULL,
    provider_account  TEXT NOT NULL,
    recipient         TEXT NOT NULL,
    kind              TEXT NOT NULL,
    detail            JSONB NOT NULL DEFAULT '{}',
    occurred_at       TIMESTAMPTZ NOT NULL,
    received_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX recipient_events_recipient ON recipient_events (provider_account, recipient, id);

-- Whether a recipient follows a provider account (WeChat subscribe/unsubscribe). No row: unknown.
-- `changed_at` is the provider's time of the latest event applied, so an older event that
-- arrives late changes nothing.
CREATE TABLE recipient_follows (
    provider_account  TEXT NOT NULL,
    recipient         TEXT NOT NULL,
    following         BOOLEAN NOT NULL,
    changed_at        TIMESTAMPTZ NOT NULL,
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (provider_account, recipient)
);

-- A recipient's answer to subscription templates (subscribe_msg_popup_event / _change_event).
CREATE TABLE subscription_consents (
    provider_account  TEXT NOT NULL,
    recipient         TEXT NOT NULL,
    template_id       TEXT NOT NULL,
    status            TEXT NOT NULL,             -- accept, reject, ...
    changed_at        TIMESTAMPTZ NOT NULL,
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (provider_account, recipient, template_id)
);

-- Per-tenant status webhook (Standard Webhooks). The secret signs payloads, so it is stored.
CREATE TABLE tenant_webhooks (
    tenant_id   TEXT PRIMARY KEY REFERENCES tenants(id),
    url         TEXT NOT NULL,
    secret      TEXT NOT NULL,                   -- whsec_<base64>
    enabled     BOOLEAN NOT NULL DEFAULT true,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Status API: keyset pagination per tenant, look-up by recipient.
CREATE INDEX messages_tenant_created_id ON messages (tenant_id, created_at DESC, id DESC);
CREATE INDEX deliveries_tenant_recipient ON deliveries (tenant_id, recipient);

-- The sweep of events still waiting for their send result.
CREATE INDEX pending_provider_events_received ON pending_provider_events (received_at);
