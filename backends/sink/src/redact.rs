/// Hides credentials in a database URI: `postgres://user:secret@host/db?password=x` →
/// `postgres://user:***@host/db?password=***`. Every backend uses it for log lines, errors and
/// printed config. Text that is not a URI is returned unchanged except
/// for `password=` values.
pub fn redact_uri(uri: &str) -> String {
    let mut redacted = match uri.split_once("://") {
        // A password may hold an unescaped `/`, `?`, `#` or `@`, so the authority cannot be cut at
        // the first of those: everything between the user's `:` and the last `@` is hidden. A
        // query holding an `@` hides more than needed, never less.
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((userinfo, host_and_rest)) => match userinfo.split_once(':') {
                Some((user, _password)) if !user.contains(['/', '?', '#']) => {
                    format!("{scheme}://{user}:***@{host_and_rest}")
                }
                _ => uri.to_owned(),
            },
            None => uri.to_owned(),
        },
        None => uri.to_owned(),
    };
    let mut search_from = 0;
    while let Some(found) = redacted[search_from..].find("password=") {
        let value_start = search_from + found + "password=".len();
        let value_end = redacted[value_start..]
            .find(['&', ' ', '#'])
            .map_or(redacted.len(), |end| value_start + end);
        redacted.replace_range(value_start..value_end, "***");
        search_from = value_start + 3;
    }
    redacted
}

#[cfg(test)]
mod tests {
    use super::redact_uri;

    #[test]
    fn passwords_are_hidden() {
        for (uri, expected) in [
            (
                "postgres://kohaku:s3cr%40t@db:5432/stats",
                "postgres://kohaku:***@db:5432/stats",
            ),
            ("postgresql://u:p@h", "postgresql://u:***@h"),
            ("postgres://u@h/db", "postgres://u@h/db"),
            (
                "postgres://h/db?user=u&password=pw&sslmode=verify-full",
                "postgres://h/db?user=u&password=***&sslmode=verify-full",
            ),
            ("postgres://u:a:b@c@h/db", "postgres://u:***@h/db"),
            ("postgres://u:pw/x@h/db", "postgres://u:***@h/db"),
            (
                "postgres://u:pw?x#y@h:5432/db",
                "postgres://u:***@h:5432/db",
            ),
            ("postgres://h/db?user=u@x", "postgres://h/db?user=u@x"),
            ("host=h password=pw user=u", "host=h password=*** user=u"),
        ] {
            assert_eq!(redact_uri(uri), expected);
            assert!(!redact_uri(uri).contains("pw"));
        }
    }
}
