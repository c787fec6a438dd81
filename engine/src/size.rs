//! The one syntax of sizes, for every size flag and value (`--out-shard-size`,
//! `--max-memory`, ...): a number of bytes, optionally with a unit. `K`, `M`,
//! `G`, `T` are powers of 1000 and `B` alone is 10⁹ (mergekit's
//! `--out-shard-size 5B`); `Ki`, `Mi`, `Gi`, `Ti` are powers of 1024; a
//! trailing `B` after a unit is allowed (`20MB`, `2GiB`). Case does not matter.
//! Fractions are allowed (`1.5G`); the result is rounded down to whole bytes.
//! And the other way: [`human_bytes`], how sizes are shown.

/// A byte count for people: `812 B`, `3.71 GB` (powers of 1000, as disk and
/// network sizes are quoted).
pub fn human_bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.2} {}", UNITS[unit])
    }
}

/// A text that is not a size; each variant holds the text as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error(
        "'{0}' is not a size: a number of bytes with an optional unit (K, M, G, T = 10^3..10^12, \
         B = 10^9 as mergekit; Ki, Mi, Gi, Ti = 2^10..2^40; e.g. 5B, 500M, 20MB, 2GiB, 1048576)"
    )]
    Syntax(String),
    #[error("'{0}' must be a positive size (at least one byte)")]
    NotPositive(String),
    #[error("'{0}' is larger than any size this machine can hold")]
    TooLarge(String),
}

/// Parses a size (see the module's comment) into bytes; it must be positive.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let bad = || SizeError::Syntax(s.to_string());
    let upper = s.trim().to_ascii_uppercase();
    const UNITS: &[(&str, f64)] = &[
        ("KIB", 1024.0),
        ("MIB", 1048576.0),
        ("GIB", 1073741824.0),
        ("TIB", 1099511627776.0),
        ("KI", 1024.0),
        ("MI", 1048576.0),
        ("GI", 1073741824.0),
        ("TI", 1099511627776.0),
        ("KB", 1e3),
        ("MB", 1e6),
        ("GB", 1e9),
        ("TB", 1e12),
        ("K", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("B", 1e9),
    ];
    let (num, mult) = UNITS
        .iter()
        .find_map(|(unit, m)| upper.strip_suffix(unit).map(|n| (n, *m)))
        .unwrap_or((upper.as_str(), 1.0));
    let num = num.trim();
    // Digits and one dot only: no signs, exponents, "inf" or "nan".
    if num.is_empty() || !num.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(bad());
    }
    let v: f64 = num.parse().map_err(|_| bad())?;
    let bytes = v * mult;
    if bytes.is_nan() || bytes < 1.0 {
        return Err(SizeError::NotPositive(s.to_string()));
    }
    if bytes >= u64::MAX as f64 {
        return Err(SizeError::TooLarge(s.to_string()));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::{parse_size, SizeError};

    #[test]
    fn decimal_binary_and_mergekit_units() {
        for (text, bytes) in [
            ("4096", 4096u64),
            ("5B", 5_000_000_000),
            ("5b", 5_000_000_000),
            ("500M", 500_000_000),
            ("500m", 500_000_000),
            ("20MB", 20_000_000),
            ("1.5K", 1500),
            ("1.5KB", 1500),
            ("8G", 8_000_000_000),
            ("1.5GB", 1_500_000_000),
            ("2T", 2_000_000_000_000),
            ("512MiB", 512 << 20),
            ("512Mi", 512 << 20),
            ("2GiB", 2 << 30),
            ("2gi", 2 << 30),
            ("1KiB", 1024),
            ("1TiB", 1 << 40),
            (" 7 ", 7),
            ("0.5K", 500),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
    }

    #[test]
    fn nonsense_is_refused_with_the_syntax() {
        for text in [
            "",
            "lots",
            "0",
            "-5M",
            "+5M",
            "1e9",
            "inf",
            "nan",
            "5 XB",
            "MB",
            "1.2.3G",
            "0.0001",
            "99999999999T",
        ] {
            let e = parse_size(text).unwrap_err().to_string();
            assert!(e.contains(&format!("'{text}'")), "{text}: {e}");
        }
        assert!(parse_size("lots").unwrap_err().to_string().contains("2GiB"));
        assert_eq!(parse_size("0"), Err(SizeError::NotPositive("0".into())));
        assert_eq!(
            parse_size("0.0001"),
            Err(SizeError::NotPositive("0.0001".into()))
        );
        assert_eq!(
            parse_size("99999999999T"),
            Err(SizeError::TooLarge("99999999999T".into()))
        );
        assert_eq!(parse_size("-5M"), Err(SizeError::Syntax("-5M".into())));
    }
}
