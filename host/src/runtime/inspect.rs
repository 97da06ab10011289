//! Reading a component's own imports and exports, and checking them against its
//! manifest and against what this host serves — before anything is instantiated.

use crate::config::Problem;
use crate::runtime::manifest::{Capability, Manifest, WitVersion};
use crate::runtime::{SERVED_HOST_WIT, SERVED_WIT};
use crate::wit::Point;
use std::collections::{BTreeMap, BTreeSet};
use wasmtime::Engine;
use wasmtime::component::Component;

/// An interface name as it appears in a component: `ns:pkg/iface@version`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct InterfaceName {
    pub namespace: String,
    pub package: String,
    pub interface: String,
    pub version: Option<String>,
}

impl InterfaceName {
    pub fn parse(s: &str) -> Option<InterfaceName> {
        let (pkg, rest) = s.split_once('/')?;
        let (namespace, package) = pkg.split_once(':')?;
        let (interface, version) = match rest.split_once('@') {
            Some((i, v)) => (i, Some(v.to_string())),
            None => (rest, None),
        };
        Some(InterfaceName {
            namespace: namespace.into(),
            package: package.into(),
            interface: interface.into(),
            version,
        })
    }

    fn is(&self, namespace: &str, package: &str) -> bool {
        self.namespace == namespace && self.package == package
    }
}

/// What a component imports and exports, sorted into what matters to the host.
#[derive(Debug, Clone, Default)]
pub struct ComponentInfo {
    /// Exported `trellis:plugin` interfaces and their version.
    pub plugin_exports: BTreeMap<String, String>,
    /// Imported `trellis:host` interfaces and their version.
    pub host_imports: BTreeMap<String, String>,
    /// Imported `trellis:plugin` interfaces: only types (e.g. `types`), never functions.
    pub plugin_type_imports: BTreeMap<String, String>,
    /// Imported WASI interfaces (`wasi:*/*@v`).
    pub wasi_imports: Vec<String>,
    /// Anything else imported (never served).
    pub other_imports: Vec<String>,
    /// Anything else exported (ignored; e.g. componentize-py's own interface).
    pub other_exports: Vec<String>,
}

impl ComponentInfo {
    pub fn read(engine: &Engine, component: &Component) -> ComponentInfo {
        let ty = component.component_type();
        let mut info = ComponentInfo::default();
        for (name, _) in ty.imports(engine) {
            match InterfaceName::parse(name) {
                Some(n) if n.is("trellis", "host") => {
                    info.host_imports
                        .insert(n.interface, n.version.unwrap_or_default());
                }
                Some(n) if n.namespace == "wasi" => info.wasi_imports.push(name.to_string()),
                // Types-only interfaces the exports use (e.g. `types`): nothing to link,
                // but their version says which contract the component was built for.
                Some(n) if n.is("trellis", "plugin") => {
                    info.plugin_type_imports
                        .insert(n.interface, n.version.unwrap_or_default());
                }
                _ => info.other_imports.push(name.to_string()),
            }
        }
        for (name, _) in ty.exports(engine) {
            match InterfaceName::parse(name) {
                Some(n) if n.is("trellis", "plugin") => {
                    info.plugin_exports
                        .insert(n.interface, n.version.unwrap_or_default());
                }
                _ => info.other_exports.push(name.to_string()),
            }
        }
        info
    }

    /// The extension points the component exports.
    pub fn points(&self) -> BTreeSet<Point> {
        Point::ALL
            .into_iter()
            .filter(|p| self.plugin_exports.contains_key(p.interface()))
            .collect()
    }

    /// The `trellis:plugin` version(s) the component was built for.
    pub fn plugin_versions(&self) -> BTreeSet<&str> {
        self.plugin_exports
            .values()
            .chain(self.plugin_type_imports.values())
            .map(|v| v.as_str())
            .collect()
    }

    /// Everything wrong with this component for this manifest and this host.
    pub fn check(&self, m: &Manifest) -> Vec<Problem> {
        let mut out = Vec::new();
        let served = SERVED_WIT.join(", ");
        let mut p = |field: &str, problem: String, fix: String| {
            out.push(Problem {
                field: field.into(),
                problem,
                fix,
            })
        };

        if self.plugin_exports.is_empty() {
            p(
                "plugin.component",
                "the component exports no trellis:plugin interface".into(),
                format!(
                    "build it against the Trellis WIT (trellis:plugin@{}), e.g. with trellis-sdk",
                    SERVED_WIT[0]
                ),
            );
        }
        let versions = self.plugin_versions();
        if versions.len() > 1 {
            p(
                "plugin.component",
                format!(
                    "the component mixes trellis:plugin versions ({}); a plugin is built for one",
                    versions.iter().copied().collect::<Vec<_>>().join(", ")
                ),
                "build every world and interface from one version of the WIT".into(),
            );
        }
        for v in versions {
            if !SERVED_WIT.contains(&v) {
                p(
                    "plugin.component",
                    format!(
                        "the component was built for trellis:plugin@{v}, but this host serves trellis:plugin@{served}"
                    ),
                    format!(
                        "rebuild the plugin against trellis:plugin@{} or run a Trellis that serves {v}",
                        SERVED_WIT[SERVED_WIT.len() - 1]
                    ),
                );
            } else if WitVersion::parse(v) != Some(m.wit) {
                p(
                    "plugin.wit",
                    format!(
                        "the manifest says wit = \"{}\" but the component exports trellis:plugin@{v}",
                        m.wit
                    ),
                    format!("set wit = \"{v}\""),
                );
            }
        }
        if !self.plugin_exports.is_empty() && !self.plugin_exports.contains_key("lifecycle") {
            p(
                "plugin.component",
                "the component does not export trellis:plugin/lifecycle (init)".into(),
                "export the lifecycle interface; every world includes it".into(),
            );
        }
        let declared = m.points();
        let exported = self.points();
        for point in declared.difference(&exported) {
            p(
                "plugin.worlds",
                format!(
                    "the manifest's worlds include {point}, but the component does not export trellis:plugin/{point}"
                ),
                format!("implement {point} or remove its world from `worlds`"),
            );
        }
        for point in exported.difference(&declared) {
            p(
                "plugin.worlds",
                format!(
                    "the component exports trellis:plugin/{point}, but no world in the manifest includes it"
                ),
                format!("add `{point}-plugin` to `worlds`"),
            );
        }
        for (iface, version) in &self.host_imports {
            let cap = Capability::ALL
                .into_iter()
                .find(|c| c.host_interface() == Some(iface.as_str()));
            match cap {
                None => p(
                    "plugin.component",
                    format!(
                        "the component imports trellis:host/{iface}@{version}, which no Trellis host serves"
                    ),
                    format!(
                        "use only: {}",
                        Capability::ALL
                            .iter()
                            .filter_map(|c| c.host_interface())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ),
                Some(c) if !c.served() => p(
                    "plugin.component",
                    format!(
                        "the component imports trellis:host/{iface}, which this host version does not serve yet"
                    ),
                    "remove the import or run a Trellis that serves it".into(),
                ),
                Some(c) if !m.capabilities.contains(&c) => p(
                    "plugin.capabilities",
                    format!(
                        "the component imports trellis:host/{iface} but the manifest does not declare capability `{}`",
                        c.name()
                    ),
                    format!(
                        "add \"{}\" to `capabilities` (the operator must still grant what it gives access to)",
                        c.name()
                    ),
                ),
                Some(_) if !SERVED_HOST_WIT.contains(&version.as_str()) => p(
                    "plugin.component",
                    format!(
                        "the component imports trellis:host/{iface}@{version}; this host serves trellis:host@{}",
                        SERVED_HOST_WIT.join(", ")
                    ),
                    "rebuild the plugin against a served version".into(),
                ),
                Some(_) => {}
            }
        }
        for name in &self.other_imports {
            p(
                "plugin.component",
                format!("the component imports `{name}`, which this host does not provide"),
                "plugins may import only trellis:host capabilities and WASI 0.2".into(),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_component_mixing_contract_versions_is_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("p.wasm"), b"").unwrap();
        let m = Manifest::parse(
            "[plugin]\nname = \"x\"\nversion = \"0.1.0\"\ncomponent = \"p.wasm\"\nwit = \"0.2.0\"\nworlds = [\"logging-pair-plugin\"]\n",
            &d.path().join("plugin.toml"),
        )
        .unwrap();
        let exports = |logging: &str| ComponentInfo {
            plugin_exports: [
                ("lifecycle", "0.2.0"),
                ("logging-method", logging),
                ("log-browser", "0.2.0"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            ..Default::default()
        };
        let text = |ps: Vec<Problem>| {
            ps.iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(text(exports("0.2.0").check(&m)), "");
        let mixed = text(exports("0.1.0").check(&m));
        assert!(
            mixed.contains("the component mixes trellis:plugin versions (0.1.0, 0.2.0)")
                && mixed.contains("build every world and interface from one version"),
            "{mixed}"
        );
    }

    #[test]
    fn names() {
        let n = InterfaceName::parse("trellis:plugin/logging-method@0.1.0").unwrap();
        assert_eq!(
            (
                n.namespace.as_str(),
                n.package.as_str(),
                n.interface.as_str()
            ),
            ("trellis", "plugin", "logging-method")
        );
        assert_eq!(n.version.as_deref(), Some("0.1.0"));
        assert!(InterfaceName::parse("run").is_none());
    }
}
