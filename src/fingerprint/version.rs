//! The QEMU version from `qemu-system-* -version` output.

/// Extracts the version number from `-version` output, like `7.2.22` from
/// `QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)`.
///
/// Takes the digits and dots after the first `version ` that is followed by a digit, which is
/// what Nomad's built-in driver matches. Returns `None` when there is no such number.
pub fn parse_version(output: &str) -> Option<String> {
    output
        .match_indices("version ")
        .find_map(|(start, marker)| {
            let rest = &output[start + marker.len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(rest.len());
            let number = rest[..end].trim_end_matches('.');
            number
                .starts_with(|c: char| c.is_ascii_digit())
                .then(|| number.to_owned())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let path = format!("{}/fixtures/fingerprint/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("read {path}: {error}"))
    }

    #[test]
    fn parse_debian_7_2() {
        assert_eq!(
            parse_version(&fixture("qemu-7.2-debian.txt")).as_deref(),
            Some("7.2.22")
        );
    }

    #[test]
    fn parse_debian_10_0() {
        assert_eq!(
            parse_version(&fixture("qemu-10.0-debian.txt")).as_deref(),
            Some("10.0.2")
        );
    }

    #[test]
    fn parse_rejects_missing_number() {
        assert_eq!(parse_version(&fixture("broken-no-version.txt")), None);
        assert_eq!(parse_version(""), None);
        assert_eq!(parse_version("version x"), None);
    }

    #[test]
    fn parse_skips_non_numeric_match() {
        assert_eq!(
            parse_version("version: see below, version 8.0.0").as_deref(),
            Some("8.0.0")
        );
    }
}
