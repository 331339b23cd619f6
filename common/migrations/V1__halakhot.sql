-- The data model of the service this pipeline replaces (halakhot with
-- question and answer as columns; tags, themes and sources in their own
-- tables joined by link tables), plus the pipeline's own columns.
-- Migrations are append-only: never edit a released file, add a new one.

CREATE TABLE IF NOT EXISTS halakhot (
    id                text PRIMARY KEY,
    status            text NOT NULL CHECK (status IN ('accepted', 'enriched', 'published', 'failed')),
    content           text NOT NULL,
    source            text,
    lang              text,
    schedule_days     integer NOT NULL DEFAULT 0,
    received_at       timestamptz NOT NULL,
    title             text,
    question          text,
    answer            text,
    difficulty_level  smallint CHECK (difficulty_level BETWEEN 1 AND 5),
    text_post         text,
    legend            text,
    language          text,
    date_post         date,
    notion_page_id    text,
    notion_page_url   text,
    notion_attempted_at timestamptz,
    model             text,
    prompt_version    text,
    schema_version    integer,
    prompt_tokens     integer,
    completion_tokens integer,
    total_tokens      integer,
    error             text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    published_at      timestamptz
);

CREATE INDEX IF NOT EXISTS halakhot_status_idx ON halakhot (status);
CREATE INDEX IF NOT EXISTS halakhot_date_post_idx ON halakhot (date_post);
CREATE INDEX IF NOT EXISTS halakhot_created_at_idx ON halakhot (created_at);

CREATE TABLE IF NOT EXISTS tags (
    id   bigserial PRIMARY KEY,
    name text NOT NULL UNIQUE
);

CREATE TABLE IF NOT EXISTS themes (
    id   bigserial PRIMARY KEY,
    name text NOT NULL UNIQUE
);

CREATE TABLE IF NOT EXISTS sources (
    id        bigserial PRIMARY KEY,
    name      text NOT NULL,
    reference text NOT NULL DEFAULT '',
    UNIQUE (name, reference)
);

CREATE TABLE IF NOT EXISTS halakha_tags (
    halakha_id text NOT NULL REFERENCES halakhot (id) ON DELETE CASCADE,
    tag_id     bigint NOT NULL REFERENCES tags (id) ON DELETE CASCADE,
    PRIMARY KEY (halakha_id, tag_id)
);

CREATE TABLE IF NOT EXISTS halakha_themes (
    halakha_id text NOT NULL REFERENCES halakhot (id) ON DELETE CASCADE,
    theme_id   bigint NOT NULL REFERENCES themes (id) ON DELETE CASCADE,
    PRIMARY KEY (halakha_id, theme_id)
);

CREATE TABLE IF NOT EXISTS halakha_sources (
    halakha_id text NOT NULL REFERENCES halakhot (id) ON DELETE CASCADE,
    source_id  bigint NOT NULL REFERENCES sources (id) ON DELETE CASCADE,
    PRIMARY KEY (halakha_id, source_id)
);
