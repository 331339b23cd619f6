//! The domain rules a model answer must keep, beyond the schema. Each
//! violation is named in words the repair turn and the dead letter can use.

use halakha_common::envelope::{Enrichment, Ingested, Lang};

/// Longest title, in characters.
pub const MAX_TITLE: usize = 200;
/// Longest question, in characters.
pub const MAX_QUESTION: usize = 1_000;
/// Longest answer, post text or caption, in characters.
pub const MAX_LONG: usize = 10_000;
/// How many tags, and how long each.
pub const TAGS: std::ops::RangeInclusive<usize> = 1..=8;
pub const MAX_TAG: usize = 40;
/// How many themes, and how long each.
pub const THEMES: std::ops::RangeInclusive<usize> = 1..=5;
pub const MAX_THEME: usize = 60;

/// The script a text is written in, by its letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Script {
    Hebrew,
    Latin,
    Other,
}

pub fn script(text: &str) -> Script {
    let (mut hebrew, mut latin, mut other) = (0usize, 0usize, 0usize);
    for c in text.chars() {
        // ASCII and the Hebrew letters answer without the Unicode tables
        // (`is_alphabetic` looks the others up).
        match c {
            c if c.is_ascii() => latin += usize::from(c.is_ascii_alphabetic()),
            '\u{5d0}'..='\u{5ea}' => hebrew += 1,
            c if !c.is_alphabetic() => {}
            '\u{591}'..='\u{5ff}' | '\u{fb1d}'..='\u{fb4f}' => hebrew += 1,
            '\u{c0}'..='\u{24f}' => latin += 1,
            _ => other += 1,
        }
    }
    by_majority(hebrew, latin, other)
}

/// The script most of the letters are in.
fn by_majority(hebrew: usize, latin: usize, other: usize) -> Script {
    if hebrew > latin && hebrew > other {
        Script::Hebrew
    } else if latin > other {
        Script::Latin
    } else {
        Script::Other
    }
}

/// Lowercase, without Hebrew points, with single spaces: how a cited name
/// is looked for in the text.
/// One pass and one allocation (the text is long, the names short).
fn fold(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut space = false;
    for c in s.chars() {
        let point = ('\u{591}'..='\u{5c7}').contains(&c) && !matches!(c, '\u{5be}' | '\u{5c0}' | '\u{5c3}' | '\u{5c6}');
        if point {
            continue;
        }
        if c.is_whitespace() {
            space = !out.is_empty();
            continue;
        }
        if space {
            out.push(' ');
            space = false;
        }
        if c.is_ascii() {
            out.push(c.to_ascii_lowercase());
        } else {
            out.extend(c.to_lowercase());
        }
    }
    out
}

/// Every rule `e` breaks for `input`; empty when it keeps them all.
pub fn check(e: &Enrichment, input: &Ingested) -> Vec<String> {
    let mut v = Vec::new();
    for (name, value, max) in [
        ("title", &e.title, MAX_TITLE),
        ("question", &e.question, MAX_QUESTION),
        ("answer", &e.answer, MAX_LONG),
        ("text_post", &e.text_post, MAX_LONG),
        ("legend", &e.legend, MAX_LONG),
    ] {
        let n = value.trim().chars().count();
        if n == 0 {
            v.push(format!("{name} is empty"));
        } else if n > max {
            v.push(format!("{name} has {n} characters (at most {max})"));
        }
    }
    if !(1..=5).contains(&e.difficulty_level) {
        v.push(format!("difficulty_level is {} (expected 1 to 5)", e.difficulty_level));
    }
    let written = script(&input.halakha.content);
    let fits = matches!((written, e.language), (Script::Hebrew, Lang::He) | (Script::Latin, Lang::En | Lang::Fr));
    if !fits {
        let shown = match written {
            Script::Hebrew => "Hebrew letters",
            Script::Latin => "Latin letters",
            Script::Other => "neither Hebrew nor Latin letters",
        };
        v.push(format!("language is {} but the text is written in {shown}", e.language.as_str()));
    }
    if !TAGS.contains(&e.tags.len()) {
        v.push(format!("tags has {} items (expected {} to {})", e.tags.len(), TAGS.start(), TAGS.end()));
    }
    for (i, tag) in e.tags.iter().enumerate() {
        let ok = !tag.trim().is_empty()
            && tag.chars().count() <= MAX_TAG
            && tag.chars().all(|c| {
                (c.is_alphanumeric() && !c.is_uppercase())
                    || matches!(c, ' ' | '-' | '\'' | '"' | '\u{5f3}' | '\u{5f4}')
            });
        if !ok {
            v.push(format!(
                "tags[{i}] {tag:?} is not a short lowercase keyword (letters, digits, spaces, hyphens; at most {MAX_TAG})"
            ));
        }
    }
    if !THEMES.contains(&e.themes.len()) {
        v.push(format!("themes has {} items (expected {} to {})", e.themes.len(), THEMES.start(), THEMES.end()));
    }
    for (i, theme) in e.themes.iter().enumerate() {
        let n = theme.trim().chars().count();
        if n == 0 || n > MAX_THEME {
            v.push(format!("themes[{i}] must have 1 to {MAX_THEME} characters"));
        }
    }
    // Folded once, and only when there are names to look for.
    let haystack = if e.sources.is_empty() {
        String::new()
    } else {
        match input.halakha.source.as_deref() {
            Some(source) => fold(&format!("{} {source}", input.halakha.content)),
            None => fold(&input.halakha.content),
        }
    };
    for (i, s) in e.sources.iter().enumerate() {
        let name = fold(&s.name);
        if name.is_empty() {
            v.push(format!("sources[{i}].name is empty"));
        } else if !haystack.contains(&name) {
            v.push(format!(
                "sources[{i}].name {:?} does not appear in the text (cite only what the text names)",
                s.name
            ));
        }
    }
    v
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use halakha_common::envelope::{Halakha, SourceRef};

    pub fn ingested(content: &str, source: Option<&str>) -> Ingested {
        Ingested {
            schema_version: 1,
            id: "x".into(),
            halakha: Halakha {
                content: content.into(),
                lang: None,
                source: source.map(String::from),
                schedule_days: 0,
                received_at: time::OffsetDateTime::UNIX_EPOCH,
                image_url: None,
            },
        }
    }

    fn enrichment(language: Lang) -> Enrichment {
        Enrichment {
            title: "t".into(),
            question: "q".into(),
            answer: "a".into(),
            tags: vec!["שבת".into(), "berakhot".into()],
            themes: vec!["prayer".into()],
            sources: vec![],
            difficulty_level: 2,
            text_post: "p".into(),
            legend: "l".into(),
            language,
        }
    }

    #[test]
    fn a_faithful_answer_breaks_no_rule() {
        let input = ingested("יתגבר כארי לעמוד בבוקר לעבודת בוראו", Some("Shulchan Arukh, Orach Chayim 1:1"));
        let mut e = enrichment(Lang::He);
        e.sources = vec![SourceRef { name: "Shulchan Arukh".into(), reference: Some("1:1".into()) }];
        assert_eq!(check(&e, &input), Vec::<String>::new());
    }

    #[test]
    fn every_character_counts_for_the_script_it_counted_for_before_the_fast_path() {
        // The plain definition: alphabetic characters, by block.
        fn reference(text: &str) -> Script {
            let (mut hebrew, mut latin, mut other) = (0usize, 0usize, 0usize);
            for c in text.chars().filter(|c| c.is_alphabetic()) {
                match c {
                    '\u{591}'..='\u{5ff}' | '\u{fb1d}'..='\u{fb4f}' => hebrew += 1,
                    c if c.is_ascii_alphabetic() || ('\u{c0}'..='\u{24f}').contains(&c) => latin += 1,
                    _ => other += 1,
                }
            }
            by_majority(hebrew, latin, other)
        }
        // `c` alone and `c c a` together tell each character's class apart.
        for c in ('\0'..='\u{ffff}').filter(|c| !c.is_control() || *c == '\n') {
            for probe in [c.to_string(), format!("{c}{c}a")] {
                assert_eq!(script(&probe), reference(&probe), "{:?}", c);
            }
        }
    }

    /// Every text of the real corpus (`tests/fixtures/corpus/`).
    pub fn corpus_texts() -> Vec<String> {
        include_str!("../../tests/fixtures/corpus/halakhot.jsonl")
            .lines()
            .map(|l| {
                let item: serde_json::Value = serde_json::from_str(l).expect("a corpus line");
                item["text"].as_str().expect("its text").to_owned()
            })
            .collect()
    }

    #[test]
    fn folding_in_one_pass_gives_what_the_plain_definition_gives() {
        // The plain definition: drop the points, lowercase, single spaces.
        fn reference(s: &str) -> String {
            let kept: String = s
                .chars()
                .filter(|c| {
                    !('\u{591}'..='\u{5c7}').contains(c) || matches!(c, '\u{5be}' | '\u{5c0}' | '\u{5c3}' | '\u{5c6}')
                })
                .collect();
            kept.to_lowercase().split_whitespace().collect::<Vec<_>>().join(" ")
        }
        let mut texts = corpus_texts();
        assert!(texts.len() > 400, "{} texts", texts.len());
        // Every character of the Basic Multilingual Plane but Greek's
        // capital sigma (lowercased by its place in a word by the plain
        // definition; neither Hebrew, English nor French has it), alone
        // and between spaces and letters.
        for c in ('\0'..='\u{ffff}').filter(|c| *c != 'Σ') {
            texts.push(format!("{c}"));
            texts.push(format!(" \t{c}A {c}\u{5b0}b\n{c} "));
        }
        for t in &texts {
            assert_eq!(fold(t), reference(t), "{t:?}");
        }
    }

    #[test]
    fn the_language_must_match_the_script_of_the_text() {
        let input = ingested("יתגבר כארי לעמוד בבוקר", None);
        let v = check(&enrichment(Lang::En), &input);
        assert_eq!(v, vec!["language is en but the text is written in Hebrew letters"]);
        let russian = ingested("Кроме того, есть обычай", None);
        assert_eq!(check(&enrichment(Lang::En), &russian).len(), 1);
    }

    #[test]
    fn a_source_the_text_does_not_name_is_refused_even_with_niqqud_around() {
        let input = ingested("כְּמוֹ שֶׁכָּתוּב בְּתְּהִלִּים", None);
        let mut e = enrichment(Lang::He);
        e.sources = vec![
            SourceRef { name: "תהלים".into(), reference: None },
            SourceRef { name: "The Secret Book".into(), reference: None },
        ];
        let v = check(&e, &input);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].starts_with("sources[1].name"));
    }

    #[test]
    fn every_broken_rule_is_named() {
        let input = ingested("You should be careful not to put on two garments simultaneously.", None);
        let mut e = enrichment(Lang::Fr);
        e.legend = " ".into();
        e.difficulty_level = 7;
        e.tags = vec!["#Shabbat".into()];
        e.themes = vec![];
        let v = check(&e, &input).join("\n");
        for expected in ["legend is empty", "difficulty_level is 7", "tags[0] \"#Shabbat\"", "themes has 0 items"] {
            assert!(v.contains(expected), "{expected} missing from:\n{v}");
        }
    }
}
