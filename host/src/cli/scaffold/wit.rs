//! The current contract's WIT, built into the binary: a Python or JavaScript project
//! gets its own copy of exactly what this host serves, so it builds offline and without
//! a Trellis checkout. A unit test keeps the list equal to `wit/`.

/// (path under `wit/`, text): the `trellis:plugin` package, then its dependencies.
pub const FILES: &[(&str, &str)] = &[
    (
        "command-transport.wit",
        include_str!("../../../../wit/command-transport.wit"),
    ),
    (
        "fence-agent.wit",
        include_str!("../../../../wit/fence-agent.wit"),
    ),
    (
        "log-browser.wit",
        include_str!("../../../../wit/log-browser.wit"),
    ),
    (
        "logging-method.wit",
        include_str!("../../../../wit/logging-method.wit"),
    ),
    ("types.wit", include_str!("../../../../wit/types.wit")),
    ("worlds.wit", include_str!("../../../../wit/worlds.wit")),
    (
        "deps/trellis-host/host.wit",
        include_str!("../../../../wit/deps/trellis-host/host.wit"),
    ),
    (
        "deps/wasi-cli.wit",
        include_str!("../../../../wit/deps/wasi-cli.wit"),
    ),
    (
        "deps/wasi-clocks.wit",
        include_str!("../../../../wit/deps/wasi-clocks.wit"),
    ),
    (
        "deps/wasi-filesystem.wit",
        include_str!("../../../../wit/deps/wasi-filesystem.wit"),
    ),
    (
        "deps/wasi-http.wit",
        include_str!("../../../../wit/deps/wasi-http.wit"),
    ),
    (
        "deps/wasi-io.wit",
        include_str!("../../../../wit/deps/wasi-io.wit"),
    ),
    (
        "deps/wasi-random.wit",
        include_str!("../../../../wit/deps/wasi-random.wit"),
    ),
    (
        "deps/wasi-sockets.wit",
        include_str!("../../../../wit/deps/wasi-sockets.wit"),
    ),
];

/// The `trellis:plugin` package's own files (not its dependencies).
pub fn package() -> impl Iterator<Item = (&'static str, &'static str)> {
    FILES
        .iter()
        .copied()
        .filter(|(p, _)| !p.starts_with("deps/"))
}

/// Its dependencies, by path under `deps/`.
pub fn deps() -> impl Iterator<Item = (&'static str, &'static str)> {
    FILES
        .iter()
        .copied()
        .filter_map(|(p, t)| p.strip_prefix("deps/").map(|p| (p, t)))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Every `.wit` file of the current contract, as `FILES` names them.
    fn on_disk(dir: &Path, prefix: &str, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            if path.is_dir() && !path.is_symlink() && (prefix.starts_with("deps") || name == "deps")
            {
                on_disk(&path, &format!("{prefix}{name}/"), out);
            } else if name.ends_with(".wit") {
                out.push(format!("{prefix}{name}"));
            }
        }
    }

    #[test]
    fn the_embedded_wit_is_all_of_wit() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit");
        let mut files = Vec::new();
        on_disk(&root, "", &mut files);
        files.sort();
        let mut embedded: Vec<String> = super::FILES.iter().map(|(p, _)| p.to_string()).collect();
        embedded.sort();
        assert_eq!(
            embedded, files,
            "add the new WIT file to cli/scaffold/wit.rs"
        );
        for (p, text) in super::FILES {
            assert_eq!(*text, std::fs::read_to_string(root.join(p)).unwrap(), "{p}");
        }
    }
}
