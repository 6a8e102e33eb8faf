//! URLs as they may appear in logs, errors and API answers: credentials hidden.

/// Query parameters that carry a credential (Redis takes `password`, and `pass` on unix
/// sockets).
const SECRET_PARAMS: &[&str] = &["password", "pass", "passwd", "pwd", "token", "secret"];

/// `url` with its userinfo and any credential-carrying query parameter replaced by `…`.
pub fn url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let (scheme, rest) = url.split_at(scheme_end + 3);
    // Everything up to the last `@` goes: an unencoded `/`, `?` or `#` in a password must not
    // make part of it look like a path.
    let rest = match rest.rfind('@') {
        Some(at) => format!("…{}", &rest[at..]),
        None => rest.to_owned(),
    };
    let (before_fragment, fragment) = match rest.find('#') {
        Some(hash) => rest.split_at(hash),
        None => (rest.as_str(), ""),
    };
    let Some((path, query)) = before_fragment.split_once('?') else {
        return format!("{scheme}{rest}");
    };
    let query = query
        .split('&')
        .map(|pair| {
            let name = pair.split('=').next().unwrap_or_default();
            if SECRET_PARAMS.contains(&name.to_ascii_lowercase().as_str()) {
                format!("{name}=…")
            } else {
                pair.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("&");
    format!("{scheme}{path}?{query}{fragment}")
}

#[cfg(test)]
mod tests {
    use super::url;

    #[test]
    fn userinfo_and_password_parameters_are_hidden() {
        let cases = [
            ("redis://:hunter2@redis:6379/0", "redis://…@redis:6379/0"),
            ("rediss://app:hunter2@redis:6380", "rediss://…@redis:6380"),
            (
                "redis://redis:6379/0?password=hunter2&protocol=resp3",
                "redis://redis:6379/0?password=…&protocol=resp3",
            ),
            (
                "unix:///run/redis.sock?db=2&pass=hunter2",
                "unix:///run/redis.sock?db=2&pass=…",
            ),
            (
                "redis://u:p@h:1/?PASSWORD=hunter2#insecure",
                "redis://…@h:1/?PASSWORD=…#insecure",
            ),
            ("redis://:pa/ss?w@h:1", "redis://…@h:1"),
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            ("/srv/repo", "/srv/repo"),
        ];
        for (given, shown) in cases {
            assert_eq!(url(given), shown, "{given}");
            assert!(!url(given).contains("hunter2"));
        }
    }
}
