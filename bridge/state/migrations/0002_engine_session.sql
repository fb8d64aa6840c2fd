-- Which engine served a call, the sampling seed it used (a call can be replayed with it) and what the
-- engine warned about at its start (e.g. a persona's LoRA adapter that could not load).
ALTER TABLE calls ADD COLUMN engine_url text;
ALTER TABLE calls ADD COLUMN engine_seed bigint;
ALTER TABLE calls ADD COLUMN warnings text[] NOT NULL DEFAULT '{}';

-- A persona's sampling settings ({"temp", "top_k", "temp_text", "top_k_text"}); absent keys take the
-- engine's (Moshi's defaults).
ALTER TABLE personas ADD COLUMN sampling jsonb NOT NULL DEFAULT '{}'::jsonb;
