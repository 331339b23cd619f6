//! Instructions and the output schema, versioned together.

use std::path::Path;

use halakha_common::envelope::Ingested;
use halakha_common::text::sha256_hex;
use serde_json::{Value, json};

/// The file holding the structuring instructions.
pub const STRUCTURE_FILE: &str = "structure.md";
const BUILTIN: &str = include_str!("../prompts/structure.md");

/// The schema name sent to the provider.
pub const SCHEMA_NAME: &str = "halakha_enrichment";

/// The JSON schema of [`halakha_common::Enrichment`], in the subset that
/// strict structured outputs accept (every property required, no extra
/// properties, optional values as `null`).
pub fn schema() -> Value {
    let string = json!({"type": "string"});
    let strings = json!({"type": "array", "items": {"type": "string"}});
    json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["title", "question", "answer", "tags", "themes", "sources", "difficulty_level", "text_post", "legend", "language"],
        "properties": {
            "title": string,
            "question": string,
            "answer": string,
            "tags": strings,
            "themes": strings,
            "sources": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["name", "reference"],
                    "properties": {
                        "name": {"type": "string"},
                        "reference": {"type": ["string", "null"]}
                    }
                }
            },
            "difficulty_level": {"type": "integer", "enum": [1, 2, 3, 4, 5]},
            "text_post": string,
            "legend": string,
            "language": {"type": "string", "enum": ["he", "en", "fr"]}
        }
    })
}

/// Instructions and their version.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub system: String,
    /// `sha256:` and 12 hex digits of the instructions and the schema: any
    /// change to either gives a new version.
    pub version: String,
}

impl Prompt {
    pub fn builtin() -> Self {
        Self::from_text(BUILTIN.to_owned())
    }

    pub fn load(dir: Option<&Path>) -> std::io::Result<Self> {
        match dir {
            Some(d) => Ok(Self::from_text(std::fs::read_to_string(d.join(STRUCTURE_FILE))?)),
            None => Ok(Self::builtin()),
        }
    }

    fn from_text(system: String) -> Self {
        let mut material = system.clone().into_bytes();
        material.extend_from_slice(schema().to_string().as_bytes());
        let version = format!("sha256:{}", &sha256_hex(&material)[..12]);
        Self { system, version }
    }

    /// The user message: the text as delimited data. A closing marker
    /// inside the text is defused so the data block cannot be ended early.
    pub fn user_message(&self, m: &Ingested) -> String {
        let content = m.halakha.content.replace("HALAKHA_TEXT>>>", "HALAKHA_TEXT> > >");
        let lang = m.halakha.lang.map(|l| l.as_str()).unwrap_or("unknown");
        format!("Declared language: {lang}\n<<<HALAKHA_TEXT\n{content}\nHALAKHA_TEXT>>>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_changes_with_the_instructions() {
        let a = Prompt::from_text("a".into());
        let b = Prompt::from_text("b".into());
        assert_ne!(a.version, b.version);
        assert!(a.version.starts_with("sha256:"));
        assert_eq!(Prompt::builtin().version, Prompt::builtin().version);
    }

    #[test]
    fn the_schema_requires_every_field_of_the_enrichment() {
        let s = schema();
        let required: Vec<&str> = s["required"].as_array().expect("array").iter().filter_map(Value::as_str).collect();
        let sample = halakha_common::Enrichment {
            title: "t".into(),
            question: "q".into(),
            answer: "a".into(),
            tags: vec![],
            themes: vec![],
            sources: vec![],
            difficulty_level: 1,
            text_post: "p".into(),
            legend: "l".into(),
            language: halakha_common::Lang::En,
        };
        let v = serde_json::to_value(sample).expect("serialises");
        let fields: Vec<&str> = v.as_object().expect("object").keys().map(String::as_str).collect();
        let mut a = required.clone();
        a.sort_unstable();
        let mut b = fields.clone();
        b.sort_unstable();
        assert_eq!(a, b);
    }
}
