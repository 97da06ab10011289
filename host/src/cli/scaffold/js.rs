//! The JavaScript templates, built with componentize-js (npm) against the project's own
//! WIT folder: `wit/world.wit` (the point's world, plus the WASI filesystem for the
//! logging method) with the contract and WASI under `wit/deps/`. The logging method is
//! examples/js-logger; the other points are the contract's shape with every call
//! failing "not implemented yet".

use super::{NOT_YET, Needs, needs, readme, snake, tool_manifest, wit};
use crate::points::Point;
use crate::wit::versioned::CURRENT;

pub(super) fn project(name: &str, point: Point) -> anyhow::Result<Vec<(String, String)>> {
    let module = snake(name);
    let app = match point {
        Point::LoggingMethod => include_str!("../../../../examples/js-logger/app.js")
            .replace("js-logger", name)
            .replace("(`cargo xtask bundle` does it)", "(see README.md)"),
        Point::LogBrowser => browser(name),
        Point::CommandTransport => transport(name),
        Point::FenceAgent => fence(name),
    };
    // The example's package.json pins componentize-js and the shim it needs; the
    // project gets the same pins and a build script.
    // (Written out rather than serialised, to keep the order people expect.)
    let example: serde_json::Value =
        serde_json::from_str(include_str!("../../../../examples/js-logger/package.json"))?;
    let package = format!(
        "{{\n  \"name\": {name},\n  \"private\": true,\n  \"description\": {description},\n  \
         \"scripts\": {{\n    \"build\": {build}\n  }},\n  \"devDependencies\": {dev},\n  \
         \"overrides\": {overrides}\n}}\n",
        name = serde_json::Value::from(name),
        description = serde_json::Value::from(format!(
            "A Trellis {point} plugin in JavaScript, built with componentize-js"
        )),
        build = serde_json::Value::from(format!(
            "componentize-js app.js --wit wit -n plugin -o {module}.wasm"
        )),
        dev = pins(&example["devDependencies"]),
        overrides = pins(&example["overrides"]),
    );
    let filesystem = if point == Point::LoggingMethod {
        "\n  // The directory the logs go to (the operator grants it).\n  import wasi:filesystem/preopens@0.2.12;"
    } else {
        ""
    };
    let world = format!(
        "// The world this plugin is built for: Trellis' {point} world{also}. The contract\n\
         // and WASI are under deps/ (copied from the Trellis that made this project).\n\
         package local:plugin;\n\nworld plugin {{\n  include trellis:plugin/{point}-plugin@{CURRENT};{filesystem}\n}}\n",
        also = if filesystem.is_empty() {
            ""
        } else {
            " and the WASI filesystem"
        }
    );
    let Needs { grants, test, .. } = needs(name, point);
    let mut files: Vec<(String, String)> = vec![
        ("app.js".into(), app),
        ("package.json".into(), package),
        ("wit/world.wit".into(), world),
        (
            "plugin.toml".into(),
            tool_manifest(name, point, "componentize-js"),
        ),
        (
            "README.md".into(),
            readme(
                name,
                point,
                "```sh\nnpm install        # componentize-js, once\nnpm run build      # app.js -> the .wasm next to plugin.toml\n```\n\n\
                 (About 15 s, a 12 MB component. The host compiles it once and caches the result;\n\
                 an instance starts in about 40 µs.) `wit/` is the contract this project was made\n\
                 for, copied in so it builds offline.",
                &grants,
                test,
            ),
        ),
        (".gitignore".into(), "*.wasm\nnode_modules/\n".into()),
    ];
    for (path, text) in wit::package() {
        files.push((format!("wit/deps/trellis-plugin/{path}"), text.to_string()));
    }
    for (path, text) in wit::deps() {
        files.push((format!("wit/deps/{path}"), text.to_string()));
    }
    Ok(files)
}

/// A `{ "package": "version" }` object of package.json, indented at the second level.
fn pins(object: &serde_json::Value) -> String {
    let lines: Vec<String> = object
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("    {}: {v}", serde_json::Value::from(k.as_str())))
        .collect();
    format!("{{\n{}\n  }}", lines.join(",\n"))
}

fn header(name: &str, point: Point, what: &str) -> String {
    format!(
        r#"// `{name}`: a Trellis {point} in JavaScript. {what}
// The contract is wit/deps/trellis-plugin/{point}.wit: what each call must do and what
// the host guarantees. Build: see README.md.
//
// How the WIT maps to JavaScript: exported interfaces are objects named in camel case,
// a resource is a class, u64 values are BigInts, `list<u8>` is a Uint8Array, an option
// is the value or undefined, and an `error` result is thrown as its variant:
// `throw {{ tag: "retryable", val: "why" }}` (or permanent, bad-config, denied).

const NOT_YET = "{NOT_YET}";
const fail = (tag, val) => ({{ tag, val }});

export const lifecycle = {{
  init(config) {{
    // Check the JSON configuration here; throw fail("bad-config", "...") naming the key.
  }},
}};
"#
    )
}

fn browser(name: &str) -> String {
    header(
        name,
        Point::LogBrowser,
        "Read back what your logging\n// method stored; start with `read`, and `trellis plugin test . --with <your logging\n// method>` shows what is left.",
    ) + r#"
export const logBrowser = {
  // -> { events: Uint8Array (a packed batch), next: "cursor", total: BigInt or undefined }
  read(log, request) {
    throw fail("permanent", `${NOT_YET}: read`);
  },
  tail(log, step, count) {
    throw fail("permanent", `${NOT_YET}: tail`);
  },
  // `open` until the final count is recorded; never `complete` before it is.
  completeness(log) {
    return { tag: "open" };
  },
};
"#
}

fn transport(name: &str) -> String {
    header(
        name,
        Point::CommandTransport,
        "Move the host's frames\n// between controller and agent: in order per lane, control before bulk, keeping each\n// frame's seq; throw `retryable` when the link broke. The host does the rest.",
    ) + r#"
class Channel {
  send(frames) {
    throw fail("retryable", `${NOT_YET}: send`);
  }
  receive(timeoutMs) {
    return [];
  }
  commit(lane, seq) {}
}

class Listener {
  accept(timeoutMs) {
    return undefined;
  }
}

export const commandTransport = {
  Channel,
  Listener,
  listen() {
    throw fail("permanent", `${NOT_YET}: listen`);
  },
  connect(agent) {
    throw fail("permanent", `${NOT_YET}: connect`);
  },
};
"#
}

fn fence(name: &str) -> String {
    let snake = snake(name);
    header(
        name,
        Point::FenceAgent,
        "After ClusterLabs'\n// fence-agents: the same parameter names and actions, so `trellis fence` can serve it\n// to Pacemaker. Fail closed: return from `fence` only once the device confirmed the\n// new state.",
    ) + &format!(
        r#"
// `device` is a list of [name, value] pairs.
function param(device, key) {{
  const found = device.find(([k]) => k === key);
  if (!found) throw fail("bad-config", `parameter \`${{key}}\` is required`);
  return found[1];
}}

function validate(device) {{
  for (const key of ["ip", "username", "password"]) param(device, key);
}}

const p = (name, description, secret) =>
  ({{ name, description, required: true, secret, defaultValue: undefined }});

export const fenceAgent = {{
  metadata() {{
    return {{
      name: "fence_{snake}",
      description: "Fences a node through its device",
      parameters: [
        p("ip", "The device's address", false),
        p("username", "Login", false),
        p("password", "The name of a granted secret holding the password", true),
      ],
      actions: ["on", "off", "reboot", "status", "monitor"],
    }};
  }},
  validate,
  status(device) {{
    validate(device);
    throw fail("retryable", `${{NOT_YET}}: status`);
  }},
  fence(device, action) {{
    validate(device);
    throw fail("retryable", `${{NOT_YET}}: fence`);
  }},
  monitor(device) {{
    validate(device);
    throw fail("retryable", `${{NOT_YET}}: monitor`);
  }},
  list(device) {{
    return [];
  }},
}};
"#
    )
}
