-- Status announcements may have no listener yet; only work must reach a queue.
ALTER TABLE outbox ADD COLUMN mandatory BOOLEAN NOT NULL DEFAULT true;
