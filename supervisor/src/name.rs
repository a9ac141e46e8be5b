//! What a name may be. Plugin, listener, rule and health-check names
//! become directory names under `state_dir`, journal fields and Prometheus
//! label values, so one rule for all of them lives here, below every
//! module that reads a name from a file.

/// Whether `name` is an acceptable plugin, listener, rule or check name:
/// 1 to 64 bytes of lowercase ASCII letters, digits, `-` and `_`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::valid_name;

    #[test]
    fn names_are_small_lowercase_words() {
        assert!(valid_name("echo"));
        assert!(valid_name("legacy-echo_2"));
        for bad in ["", "Echo", "a/b", "..", "a b", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
