//! Text normalisation and the stable id, shared by every path into the
//! pipeline so that HTTP and NATS submissions of one text get one id.

use sha2::{Digest, Sha256};
use unicode_normalization::UnicodeNormalization;

/// NFC-normalise and trim a text.
///
/// NFC keeps Hebrew niqqud and cantillation (they compose, they are not
/// removed); trimming makes `"\nטקסט\n\n"` and `"טקסט"` the same text.
pub fn normalize(content: &str) -> String {
    let nfc: String = content.nfc().collect();
    nfc.trim().to_owned()
}

/// Hex SHA-256 of the given bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The stable id of a halakha: 32 hex characters (128 bits) of a SHA-256,
/// over the upstream `idempotency_key` when given, else over the normalised
/// content. The two inputs are domain-separated so a key can never collide
/// with a text that happens to equal it.
pub fn derive_id(idempotency_key: Option<&str>, normalized_content: &str) -> String {
    let mut hasher = Sha256::new();
    match idempotency_key {
        Some(key) => {
            hasher.update(b"key\0");
            hasher.update(key.as_bytes());
        }
        None => {
            hasher.update(b"content\0");
            hasher.update(normalized_content.as_bytes());
        }
    }
    let digest = hasher.finalize();
    hex::encode(&digest[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_composes_to_nfc_and_trims() {
        // "é" as e + combining acute becomes the single code point U+00E9.
        assert_eq!(normalize("  e\u{301}cole\n"), "\u{e9}cole");
    }

    #[test]
    fn niqqud_survives_normalisation() {
        let with_niqqud = "שַׁבָּת";
        let n = normalize(with_niqqud);
        assert!(n.chars().any(|c| ('\u{591}'..='\u{5c7}').contains(&c)));
    }

    #[test]
    fn id_from_content_ignores_surrounding_whitespace_and_normal_form() {
        let a = derive_id(None, &normalize("\ne\u{301}\n\n"));
        let b = derive_id(None, &normalize("\u{e9}"));
        assert_eq!(a, b);
        assert_eq!(a.len(), 32);
    }

    #[test]
    fn idempotency_key_wins_over_content_and_is_domain_separated() {
        assert_eq!(derive_id(Some("k1"), "a"), derive_id(Some("k1"), "b"));
        assert_ne!(derive_id(Some("a"), "x"), derive_id(None, "a"));
    }
}
