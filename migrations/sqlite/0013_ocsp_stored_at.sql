-- When each pre-signed OCSP response was stored (unix s, by the clock of the
-- node that stored it). Nodes that do not run the background jobs load what
-- was stored since they last looked: a pre-signing pass over many
-- certificates stores its answers over minutes, all with the thisUpdate of
-- its start. Responses stored before this column existed read 0.
ALTER TABLE ocsp_responses ADD COLUMN stored_at INTEGER NOT NULL DEFAULT 0;
CREATE INDEX ocsp_responses_stored ON ocsp_responses (issuer_id, stored_at);
