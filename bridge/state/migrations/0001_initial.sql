-- Personas, DIDs and call records. The rules match bridge/state/models.py (which gives the clear errors);
-- the constraints here are the backstop for anything that writes to the database directly.

CREATE TABLE personas (
    id                bigserial PRIMARY KEY,
    name              text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    language          text NOT NULL CHECK (language IN ('en', 'ru', 'uz')),
    text_prompt       text NOT NULL DEFAULT '',
    voice_prompt_path text,
    lora_adapter      text,
    is_default        boolean NOT NULL DEFAULT false,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
-- At most one default persona.
CREATE UNIQUE INDEX personas_one_default ON personas (is_default) WHERE is_default;

CREATE TABLE dids (
    number          text PRIMARY KEY CHECK (number ~ '^\+[1-9][0-9]{1,14}$'),
    -- RESTRICT: a persona in use cannot be deleted (the CLI names the DIDs first).
    persona_id      bigint NOT NULL REFERENCES personas (id) ON DELETE RESTRICT,
    enabled         boolean NOT NULL DEFAULT true,
    transfer_target text,
    dtmf_actions    jsonb NOT NULL DEFAULT '{"0": "transfer", "#": "hangup"}'::jsonb
                    CHECK (jsonb_typeof(dtmf_actions) = 'object'),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dids_persona ON dids (persona_id);

-- Call records outlive DIDs and personas: they keep the number and persona name as they were.
CREATE TABLE calls (
    id              text PRIMARY KEY,
    did             text,
    caller          text,
    persona         text,
    started_at      timestamptz NOT NULL,
    answered_at     timestamptz,
    ended_at        timestamptz,
    end_cause       text,
    refused         boolean NOT NULL DEFAULT false,
    latency_summary jsonb,
    transcript      text,
    dtmf_digits     text NOT NULL DEFAULT ''
);
CREATE INDEX calls_started_at ON calls (started_at DESC);
CREATE INDEX calls_did ON calls (did, started_at DESC);

CREATE TABLE call_events (
    -- Chosen by the writer, so a batch retried after a lost commit acknowledgement is not doubled.
    id      uuid PRIMARY KEY,
    call_id text NOT NULL,
    at      timestamptz NOT NULL,
    kind    text NOT NULL,
    data    jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX call_events_call ON call_events (call_id, at);
