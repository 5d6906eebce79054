//! The commented example configs that the packages install: one rule for
//! what counts as a commented-out setting, shared by the daemons' tests
//! that check every such setting is a real key.

/// `text` with every commented-out setting (`# key = value`, the key in
/// lowercase and underscores) uncommented; prose comments stay.
pub fn uncomment_settings(text: &str) -> String {
    text.lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(kv)
                if kv.split_once(" = ").is_some_and(|(k, _)| {
                    k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                }) =>
            {
                kv
            }
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_settings_are_uncommented() {
        let t = "# Prose = words here\n# key_one = 3\nkept = 1\n#no_space = 2";
        assert_eq!(
            uncomment_settings(t),
            "# Prose = words here\nkey_one = 3\nkept = 1\n#no_space = 2"
        );
    }
}
