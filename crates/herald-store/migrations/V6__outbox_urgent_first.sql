-- The relay takes urgent and high-priority delivery jobs (AMQP priority above normal's 3)
-- before older rows, so an OTP is not published after a campaign's 100,000 jobs.
CREATE INDEX outbox_urgent_first ON outbox (id) WHERE priority > 3;
