-- The post's image, when the submission gave one (the original service's
-- `last_img`); written to Notion's `Image` property.
ALTER TABLE halakhot ADD COLUMN IF NOT EXISTS image_url text;
