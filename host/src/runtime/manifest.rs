//! `plugin.toml`: what a plugin is and what it asks for.
//!
//! ```toml
//! [plugin]
//! name = "file-logging"
//! version = "0.1.0"
//! description = "Build output as JSON lines, one file per run"
//! component = "file_logging.wasm"          # relative to this file
//! wit = "0.3.0"                            # the trellis:plugin version it was built for
//! worlds = ["logging-method-plugin"]
//! capabilities = ["log", "filesystem"]     # log, secrets, kafka, exec, filesystem, http, sockets
//!
//! [config.directory]                       # one table per configuration key
//! type = "string"                          # string, integer, float, boolean, array, table
//! default = "/logs"
//! description = "Where the log files go (inside a granted directory)"
//! ```

use crate::config::{Problem, Problems};
use crate::wit::Point;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

pub const MANIFEST_FILE: &str = "plugin.toml";

#[derive(Debug, Clone)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    pub description: String,
    /// Absolute path of the component file.
    pub component: PathBuf,
    /// Absolute path of the manifest itself.
    pub path: PathBuf,
    pub wit: WitVersion,
    pub worlds: Vec<World>,
    pub capabilities: BTreeSet<Capability>,
    pub config: BTreeMap<String, ConfigKey>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WitVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl WitVersion {
    pub fn parse(s: &str) -> Option<WitVersion> {
        let mut it = s.split('.').map(|p| p.parse::<u32>().ok());
        let v = WitVersion {
            major: it.next()??,
            minor: it.next()??,
            patch: it.next()??,
        };
        if it.next().is_some() { None } else { Some(v) }
    }
}

impl fmt::Display for WitVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The worlds of `trellis:plugin` a component can be built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum World {
    CommandTransport,
    LoggingMethod,
    LogBrowser,
    FenceAgent,
    LoggingPair,
}

impl World {
    pub const ALL: [World; 5] = [
        World::CommandTransport,
        World::LoggingMethod,
        World::LogBrowser,
        World::FenceAgent,
        World::LoggingPair,
    ];

    pub fn name(self) -> &'static str {
        match self {
            World::CommandTransport => "command-transport-plugin",
            World::LoggingMethod => "logging-method-plugin",
            World::LogBrowser => "log-browser-plugin",
            World::FenceAgent => "fence-agent-plugin",
            World::LoggingPair => "logging-pair-plugin",
        }
    }

    pub fn points(self) -> &'static [Point] {
        match self {
            World::CommandTransport => &[Point::CommandTransport],
            World::LoggingMethod => &[Point::LoggingMethod],
            World::LogBrowser => &[Point::LogBrowser],
            World::FenceAgent => &[Point::FenceAgent],
            World::LoggingPair => &[Point::LoggingMethod, Point::LogBrowser],
        }
    }

    fn parse(s: &str) -> Option<World> {
        World::ALL.into_iter().find(|w| w.name() == s)
    }
}

/// A capability a plugin can ask for. The first four are `trellis:host` interfaces; the
/// last three are the WASI parts an operator grants (directories, authorities, addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Capability {
    Log,
    Secrets,
    Kafka,
    Exec,
    Filesystem,
    Http,
    Sockets,
}

impl Capability {
    pub const ALL: [Capability; 7] = [
        Capability::Log,
        Capability::Secrets,
        Capability::Kafka,
        Capability::Exec,
        Capability::Filesystem,
        Capability::Http,
        Capability::Sockets,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Capability::Log => "log",
            Capability::Secrets => "secrets",
            Capability::Kafka => "kafka",
            Capability::Exec => "exec",
            Capability::Filesystem => "filesystem",
            Capability::Http => "http",
            Capability::Sockets => "sockets",
        }
    }

    /// The `trellis:host` interface behind this capability, if it is one.
    pub fn host_interface(self) -> Option<&'static str> {
        match self {
            Capability::Log => Some("log"),
            Capability::Secrets => Some("secrets"),
            Capability::Kafka => Some("kafka"),
            Capability::Exec => Some("exec"),
            _ => None,
        }
    }

    /// Whether this host version serves it (all do now; a capability reserved for a
    /// later version would answer false, and a component importing it is refused).
    pub fn served(self) -> bool {
        true
    }

    pub fn parse(s: &str) -> Option<Capability> {
        Capability::ALL.into_iter().find(|c| c.name() == s)
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConfigType {
    String,
    Integer,
    Float,
    Boolean,
    Array,
    Table,
}

impl ConfigType {
    fn matches(self, v: &toml::Value) -> bool {
        matches!(
            (self, v),
            (ConfigType::String, toml::Value::String(_))
                | (ConfigType::Integer, toml::Value::Integer(_))
                | (
                    ConfigType::Float,
                    toml::Value::Float(_) | toml::Value::Integer(_)
                )
                | (ConfigType::Boolean, toml::Value::Boolean(_))
                | (ConfigType::Array, toml::Value::Array(_))
                | (ConfigType::Table, toml::Value::Table(_))
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            ConfigType::String => "string",
            ConfigType::Integer => "integer",
            ConfigType::Float => "float",
            ConfigType::Boolean => "boolean",
            ConfigType::Array => "array",
            ConfigType::Table => "table",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConfigKey {
    #[serde(rename = "type")]
    pub ty: ConfigType,
    pub default: Option<toml::Value>,
    #[serde(default)]
    pub required: bool,
    #[serde(default)]
    pub description: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    plugin: RawPlugin,
    #[serde(default)]
    config: BTreeMap<String, ConfigKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugin {
    name: String,
    version: String,
    #[serde(default)]
    description: String,
    component: String,
    wit: String,
    worlds: Vec<String>,
    #[serde(default)]
    capabilities: Vec<String>,
}

impl Manifest {
    /// Find and read a manifest from a plugin.toml, a directory holding one, or a
    /// component file with a plugin.toml beside it.
    pub fn locate(path: &Path) -> Result<Manifest, Problems> {
        let manifest = if path.is_dir() {
            path.join(MANIFEST_FILE)
        } else if path.extension().is_some_and(|e| e == "wasm") {
            path.with_file_name(MANIFEST_FILE)
        } else {
            path.to_path_buf()
        };
        if !manifest.is_file() {
            return Err(Problems {
                file: manifest.display().to_string(),
                items: vec![Problem {
                    field: "(file)".into(),
                    problem: "no plugin manifest here".into(),
                    fix: format!(
                        "give the path of a {MANIFEST_FILE}, of a directory holding one, or of a .wasm with one beside it"
                    ),
                }],
            });
        }
        Self::load(&manifest)
    }

    pub fn load(path: &Path) -> Result<Manifest, Problems> {
        let file = path.display().to_string();
        let one = |field: &str, problem: String, fix: &str| Problems {
            file: file.clone(),
            items: vec![Problem {
                field: field.into(),
                problem,
                fix: fix.into(),
            }],
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            one(
                "(file)",
                format!("cannot read it: {e}"),
                "check the path and permissions",
            )
        })?;
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        Self::parse(&text, &path)
    }

    /// Parse manifest text; `path` is where it lives (components are relative to it).
    pub fn parse(text: &str, path: &Path) -> Result<Manifest, Problems> {
        let file = path.display().to_string();
        let raw: RawManifest = toml::from_str(text).map_err(|e| {
            let mut p = crate::config::toml_problem(&e);
            if p.problem.contains("missing field") {
                p.fix = "see the manifest reference in docs/PLUGINS.md: [plugin] needs name, version, component, wit and worlds".into();
            }
            Problems { file: file.clone(), items: vec![p] }
        })?;
        let mut items = Vec::new();
        let mut bad = |field: &str, problem: String, fix: String| {
            items.push(Problem {
                field: field.into(),
                problem,
                fix,
            })
        };
        let p = &raw.plugin;

        if p.name.is_empty()
            || !p
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            || p.name.starts_with('-')
        {
            bad(
                "plugin.name",
                format!("`{}` is not a valid plugin name", p.name),
                "use lowercase letters, digits and dashes, e.g. `file-logging`".into(),
            );
        }
        if WitVersion::parse(&p.version).is_none() {
            bad(
                "plugin.version",
                format!("`{}` is not a version", p.version),
                "write major.minor.patch, e.g. `0.1.0`".into(),
            );
        }
        let wit = WitVersion::parse(&p.wit);
        if wit.is_none() {
            bad(
                "plugin.wit",
                format!("`{}` is not a trellis:plugin version", p.wit),
                format!(
                    "write the version your component was built against, e.g. `{}`",
                    crate::wit::versioned::CURRENT
                ),
            );
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let component = dir.join(&p.component);
        if !p.component.ends_with(".wasm") {
            bad(
                "plugin.component",
                format!("`{}` is not a .wasm file name", p.component),
                "name the component file, e.g. `my_plugin.wasm`".into(),
            );
        } else if !component.is_file() {
            bad(
                "plugin.component",
                format!("{} does not exist", component.display()),
                "build the plugin (cargo xtask bundle) or correct the file name; it is relative to plugin.toml".into(),
            );
        }
        let mut worlds = Vec::new();
        if p.worlds.is_empty() {
            bad(
                "plugin.worlds",
                "no world given".into(),
                format!(
                    "list the world(s) the component implements: {}",
                    world_names()
                ),
            );
        }
        for (i, w) in p.worlds.iter().enumerate() {
            match World::parse(w) {
                Some(w) => worlds.push(w),
                None => {
                    let hint = World::ALL.iter().find(|k| {
                        k.name().starts_with(w.as_str())
                            || w.starts_with(k.name().trim_end_matches("-plugin"))
                    });
                    let fix = match hint {
                        Some(h) => format!(
                            "did you mean `{}`? Known worlds: {}",
                            h.name(),
                            world_names()
                        ),
                        None => format!("use one of: {}", world_names()),
                    };
                    bad(
                        &format!("plugin.worlds[{i}]"),
                        format!("unknown world `{w}`"),
                        fix,
                    );
                }
            }
        }
        let mut capabilities = BTreeSet::new();
        for (i, c) in p.capabilities.iter().enumerate() {
            match Capability::parse(c) {
                Some(c) if !capabilities.insert(c) => bad(
                    &format!("plugin.capabilities[{i}]"),
                    format!("`{c}` is listed twice"),
                    "list each capability once".into(),
                ),
                Some(_) => {}
                None => bad(
                    &format!("plugin.capabilities[{i}]"),
                    format!("unknown capability `{c}`"),
                    format!(
                        "use some of: {}",
                        Capability::ALL.map(|c| c.name()).join(", ")
                    ),
                ),
            }
        }
        for (key, k) in &raw.config {
            let at = format!("config.{key}");
            if let Some(d) = &k.default {
                if !k.ty.matches(d) {
                    bad(
                        &format!("{at}.default"),
                        format!(
                            "the default is a {}, but the key is declared as {}",
                            d.type_str(),
                            k.ty.name()
                        ),
                        "make the default match `type`".into(),
                    );
                }
                if k.required {
                    bad(
                        &format!("{at}.required"),
                        "a key with a default is never missing".into(),
                        "drop `required` or the default".into(),
                    );
                }
            }
        }
        if !items.is_empty() {
            return Err(Problems { file, items });
        }
        Ok(Manifest {
            name: p.name.clone(),
            version: p.version.clone(),
            description: p.description.clone(),
            component,
            path: path.to_path_buf(),
            wit: wit.expect("checked above"),
            worlds,
            capabilities,
            config: raw.config,
        })
    }

    /// The extension points this plugin implements, from its worlds.
    pub fn points(&self) -> BTreeSet<Point> {
        self.worlds
            .iter()
            .flat_map(|w| w.points().iter().copied())
            .collect()
    }

    /// The plugin's configuration: manifest defaults overlaid with the operator's table,
    /// checked against the schema, as the JSON object `lifecycle.init` receives.
    /// `at` is where the operator's table lives, for error messages.
    pub fn resolve_config(&self, operator: &toml::Table, at: &str) -> Result<String, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut out = serde_json::Map::new();
        for (key, value) in operator {
            match self.config.get(key) {
                None => problems.push(Problem {
                    field: format!("{at}.{key}"),
                    problem: format!("plugin `{}` has no config key `{key}`", self.name),
                    fix: if self.config.is_empty() {
                        "remove it: this plugin takes no configuration".into()
                    } else {
                        format!(
                            "remove it or use one of: {}",
                            self.config.keys().cloned().collect::<Vec<_>>().join(", ")
                        )
                    },
                }),
                Some(k) if !k.ty.matches(value) => problems.push(Problem {
                    field: format!("{at}.{key}"),
                    problem: format!("expected a {}, found a {}", k.ty.name(), value.type_str()),
                    fix: if k.description.is_empty() {
                        format!("give a {}", k.ty.name())
                    } else {
                        k.description.clone()
                    },
                }),
                Some(_) => {
                    out.insert(key.clone(), toml_to_json(value));
                }
            }
        }
        for (key, k) in &self.config {
            if out.contains_key(key) || operator.contains_key(key) {
                continue;
            }
            match &k.default {
                Some(d) => {
                    out.insert(key.clone(), toml_to_json(d));
                }
                None if k.required => problems.push(Problem {
                    field: format!("{at}.{key}"),
                    problem: format!(
                        "plugin `{}` requires config key `{key}` ({})",
                        self.name,
                        k.ty.name()
                    ),
                    fix: format!(
                        "add `{key} = ...` to [{at}]{}",
                        if k.description.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", k.description)
                        }
                    ),
                }),
                None => {}
            }
        }
        if problems.is_empty() {
            Ok(serde_json::Value::Object(out).to_string())
        } else {
            Err(problems)
        }
    }
}

fn world_names() -> String {
    World::ALL.map(|w| w.name()).join(", ")
}

fn toml_to_json(v: &toml::Value) -> serde_json::Value {
    match v {
        toml::Value::String(s) => serde_json::Value::String(s.clone()),
        toml::Value::Integer(i) => serde_json::Value::from(*i),
        toml::Value::Float(f) => serde_json::Value::from(*f),
        toml::Value::Boolean(b) => serde_json::Value::Bool(*b),
        toml::Value::Datetime(d) => serde_json::Value::String(d.to_string()),
        toml::Value::Array(a) => serde_json::Value::Array(a.iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => serde_json::Value::Object(
            t.iter()
                .map(|(k, v)| (k.clone(), toml_to_json(v)))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with_component() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("p.wasm"), b"").unwrap();
        d
    }

    fn parse(d: &tempfile::TempDir, text: &str) -> Result<Manifest, Vec<String>> {
        Manifest::parse(text, &d.path().join("plugin.toml"))
            .map_err(|p| p.items.iter().map(|p| p.to_string()).collect())
    }

    const GOOD: &str = r#"
        [plugin]
        name = "file-logging"
        version = "0.1.0"
        component = "p.wasm"
        wit = "0.1.0"
        worlds = ["logging-method-plugin"]
        capabilities = ["log", "filesystem"]

        [config.directory]
        type = "string"
        default = "/logs"
        description = "where logs go"

        [config.max-files]
        type = "integer"
    "#;

    #[test]
    fn a_good_manifest_loads() {
        let d = dir_with_component();
        let m = parse(&d, GOOD).unwrap();
        assert_eq!(m.name, "file-logging");
        assert_eq!(
            m.points().into_iter().collect::<Vec<_>>(),
            vec![Point::LoggingMethod]
        );
        assert!(m.capabilities.contains(&Capability::Filesystem));
    }

    #[test]
    fn each_mistake_names_the_field_and_the_fix() {
        let d = dir_with_component();
        let cases: &[(&str, &str, &str)] = &[
            (
                "name = \"file-logging\"",
                "name = \"File Logging\"",
                "plugin.name",
            ),
            ("version = \"0.1.0\"", "version = \"one\"", "plugin.version"),
            ("wit = \"0.1.0\"", "wit = \"latest\"", "plugin.wit"),
            (
                "component = \"p.wasm\"",
                "component = \"missing.wasm\"",
                "plugin.component",
            ),
            (
                "component = \"p.wasm\"",
                "component = \"p.so\"",
                "plugin.component",
            ),
            (
                "worlds = [\"logging-method-plugin\"]",
                "worlds = [\"logging-method\"]",
                "plugin.worlds[0]",
            ),
            (
                "worlds = [\"logging-method-plugin\"]",
                "worlds = []",
                "plugin.worlds",
            ),
            (
                "capabilities = [\"log\", \"filesystem\"]",
                "capabilities = [\"log\", \"network\"]",
                "plugin.capabilities[1]",
            ),
            (
                "capabilities = [\"log\", \"filesystem\"]",
                "capabilities = [\"log\", \"log\"]",
                "plugin.capabilities[1]",
            ),
            (
                "default = \"/logs\"",
                "default = 5",
                "config.directory.default",
            ),
            ("type = \"integer\"", "type = \"number\"", "type"),
        ];
        for (from, to, field) in cases {
            let text = GOOD.replacen(from, to, 1);
            let errs = parse(&d, &text).expect_err(to);
            let all = errs.join("\n");
            assert!(
                all.contains(field),
                "{to}: expected field {field} in: {all}"
            );
            assert!(
                all.contains("fix:") || all.contains("expected"),
                "{to}: no fix in: {all}"
            );
        }
        // a near-miss world name gets a suggestion
        let errs = parse(
            &d,
            &GOOD.replace(
                "worlds = [\"logging-method-plugin\"]",
                "worlds = [\"logging-method\"]",
            ),
        )
        .unwrap_err();
        assert!(
            errs[0].contains("did you mean `logging-method-plugin`"),
            "{errs:?}"
        );
    }

    #[test]
    fn unknown_and_missing_keys() {
        let d = dir_with_component();
        let errs = parse(
            &d,
            &GOOD.replace("wit = \"0.1.0\"", "wit = \"0.1.0\"\nauthor = \"me\""),
        )
        .unwrap_err();
        assert!(errs[0].contains("unknown field `author`"), "{errs:?}");
        let errs = parse(&d, &GOOD.replace("wit = \"0.1.0\"", "")).unwrap_err();
        assert!(errs[0].contains("missing field `wit`"), "{errs:?}");
        assert!(errs[0].contains("docs/PLUGINS.md"), "{errs:?}");
    }

    #[test]
    fn operator_config_is_checked_against_the_schema() {
        let d = dir_with_component();
        let m = parse(&d, GOOD).unwrap();
        let json = m
            .resolve_config(&toml::Table::new(), "plugins.file-logging.config")
            .unwrap();
        assert_eq!(json, r#"{"directory":"/logs"}"#);
        let t: toml::Table = toml::from_str("directory = 3\ncolour = \"red\"").unwrap();
        let errs = m
            .resolve_config(&t, "plugins.file-logging.config")
            .unwrap_err();
        let all = errs
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            all.contains("plugins.file-logging.config.directory")
                && all.contains("expected a string"),
            "{all}"
        );
        assert!(
            all.contains("plugins.file-logging.config.colour") && all.contains("no config key"),
            "{all}"
        );
        let req = GOOD.replace(
            "[config.max-files]\n        type = \"integer\"",
            "[config.max-files]\n        type = \"integer\"\n        required = true",
        );
        let m = parse(&d, &req).unwrap();
        let errs = m
            .resolve_config(&toml::Table::new(), "plugins.f.config")
            .unwrap_err();
        assert!(
            errs[0]
                .to_string()
                .contains("requires config key `max-files`"),
            "{errs:?}"
        );
    }
}
