//! A fence agent's device parameters read the way ClusterLabs fence-agents read them:
//! `ssl_insecure` and `ssl-insecure` are one name, the last value given wins, and a
//! blank value is no value. Plain Rust, usable natively (tests) and in a component.

/// The parameters of one device, as the host passes them.
pub struct DeviceParams<'a>(pub &'a [(String, String)]);

impl DeviceParams<'_> {
    /// The value of `name` (spelled with `-`), trimmed; None when absent or blank.
    pub fn get(&self, name: &str) -> Option<String> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k.replace('_', "-") == name)
            .map(|(_, v)| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }

    /// The first parameter that is neither one the agent takes nor one it ignores (the
    /// fence-agents protocol's own, like `action` or `nodename`), spelled with `-`.
    pub fn unknown(&self, takes: &[&str], ignores: &[&str]) -> Option<String> {
        self.0
            .iter()
            .map(|(k, _)| k.replace('_', "-"))
            .find(|k| !takes.contains(&k.as_str()) && !ignores.contains(&k.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_alike_last_wins_blank_is_none() {
        let p = vec![
            ("ssl_insecure".to_string(), "0".to_string()),
            ("ssl-insecure".to_string(), " 1 ".to_string()),
            ("ip".to_string(), "  ".to_string()),
            ("nodename".to_string(), "n1".to_string()),
        ];
        let d = DeviceParams(&p);
        assert_eq!(d.get("ssl-insecure").as_deref(), Some("1"));
        assert_eq!(d.get("ip"), None);
        assert_eq!(d.unknown(&["ip", "ssl-insecure"], &["nodename"]), None);
        assert_eq!(
            d.unknown(&["ip"], &["nodename"]).as_deref(),
            Some("ssl-insecure")
        );
    }
}
