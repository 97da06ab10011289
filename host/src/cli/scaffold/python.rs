//! The Python templates, built with componentize-py against the project's own copy of
//! the WIT (`wit/`). The logging method is examples/python-logger; the other points are
//! the contract's shape with every call failing "not implemented yet".

use super::{NOT_YET, Needs, needs, readme, snake, tool_manifest, wit};
use crate::points::Point;

pub(super) fn project(name: &str, point: Point) -> anyhow::Result<Vec<(String, String)>> {
    let module = snake(name);
    let world = format!("{point}-plugin");
    let mut files: Vec<(String, String)> = match point {
        Point::LoggingMethod => vec![
            (
                "app.py".into(),
                include_str!("../../../../examples/python-logger/app.py")
                    .replace("python-logger", name)
                    .replace("(`cargo xtask bundle` does it)", "(see README.md)")
                    .replace("-d ../../wit", "-d wit")
                    .replace("python_logger.wasm", &format!("{module}.wasm")),
            ),
            (
                "logging_method.py".into(),
                include_str!("../../../../examples/python-logger/logging_method.py").into(),
            ),
        ],
        Point::LogBrowser => vec![("app.py".into(), browser(name))],
        Point::CommandTransport => vec![
            ("app.py".into(), transport(name)),
            ("command_transport.py".into(), transport_resources()),
        ],
        Point::FenceAgent => vec![("app.py".into(), fence(name))],
    };
    let Needs { grants, test, .. } = needs(name, point);
    let build = format!(
        "```sh\ncomponentize-py -d wit -w {world} componentize app -o {module}.wasm\n```\n\n\
         (`pip install componentize-py==0.25.1` once; about 8 s, an 18 MB component. The host\n\
         compiles it once and caches the result; an instance starts in about 0.6 ms.) `wit/`\n\
         is the contract this project was made for, copied in so it builds offline."
    );
    files.push((
        "plugin.toml".into(),
        tool_manifest(name, point, "componentize-py"),
    ));
    files.push((
        "README.md".into(),
        readme(name, point, &build, &grants, test),
    ));
    files.push((".gitignore".into(), "*.wasm\n__pycache__/\n".into()));
    for (path, text) in wit::FILES {
        files.push((format!("wit/{path}"), text.to_string()));
    }
    Ok(files)
}

fn header(name: &str, point: Point, what: &str) -> String {
    format!(
        r#""""`{name}`: a Trellis {point} in Python. {what}
The contract is wit/{point}.wit: what each call must do and what the host guarantees.
Build: see README.md. An error is raised as `Err(types.Error_Retryable("why"))` (or
`Error_Permanent`, `Error_BadConfig`, `Error_Denied`)."""

from typing import List, Optional

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import types

NOT_YET = "{NOT_YET}"


class Lifecycle(exports.Lifecycle):
    def init(self, config: str) -> None:
        # Check the JSON configuration here; raise Error_BadConfig naming the key.
        pass
"#
    )
}

fn browser(name: &str) -> String {
    header(
        name,
        Point::LogBrowser,
        "Read back what your logging method\nstored; start with `read`, and `trellis plugin test . --with <your logging method>`\nshows what is left.",
    ) + r#"

from wit_world.exports import log_browser


class LogBrowser(exports.LogBrowser):
    def read(self, log: types.LogMetadata, request: log_browser.PageRequest) -> log_browser.Page:
        # Page(events=<packed batch>, next=<cursor>, total=<count, or None>)
        raise Err(types.Error_Permanent(f"{NOT_YET}: read"))

    def tail(self, log: types.LogMetadata, step: Optional[str], count: int) -> bytes:
        raise Err(types.Error_Permanent(f"{NOT_YET}: tail"))

    def completeness(self, log: types.LogMetadata) -> log_browser.LogCompleteness:
        # `open` until the final count is recorded; never `complete` before it is.
        return log_browser.LogCompleteness_Open()
"#
}

fn transport(name: &str) -> String {
    header(
        name,
        Point::CommandTransport,
        "Move the host's frames between\ncontroller and agent: in order per lane, control before bulk, keeping each frame's\nseq; raise `retryable` when the link broke. The host does the rest. The `channel` and\n`listener` resources are the classes in command_transport.py.",
    ) + r#"

import command_transport as impl


class CommandTransport(exports.CommandTransport):
    def listen(self) -> impl.Listener:
        raise Err(types.Error_Permanent(f"{NOT_YET}: listen"))

    def connect(self, agent: str) -> impl.Channel:
        raise Err(types.Error_Permanent(f"{NOT_YET}: connect"))
"#
}

fn transport_resources() -> String {
    format!(
        r#""""The `channel` and `listener` resources of `command-transport` (componentize-py
looks for resource classes in a module named after their interface)."""

from typing import List, Optional

from componentize_py_types import Err
from wit_world.exports.command_transport import Frame, Lane
from wit_world.imports import types

NOT_YET = "{NOT_YET}"


class Channel:
    def send(self, frames: List[Frame]) -> None:
        raise Err(types.Error_Retryable(f"{{NOT_YET}}: send"))

    def receive(self, timeout_ms: int) -> List[Frame]:
        return []

    def commit(self, lane: Lane, seq: int) -> None:
        pass


class Listener:
    def accept(self, timeout_ms: int) -> Optional[Channel]:
        return None
"#
    )
}

fn fence(name: &str) -> String {
    let snake = snake(name);
    header(
        name,
        Point::FenceAgent,
        "After ClusterLabs' fence-agents: the same\nparameter names and actions, so `trellis fence` can serve it to Pacemaker. Fail\nclosed: return from `fence` only once the device confirmed the new state.",
    ) + &format!(
        r#"

from wit_world.exports import fence_agent
from wit_world.exports.fence_agent import Action, AgentInfo, FenceAction, Parameter, PowerState, Target

Params = List[tuple]


def param(device: Params, key: str) -> str:
    for k, v in device:
        if k == key:
            return v
    raise Err(types.Error_BadConfig(f"parameter `{{key}}` is required"))


class FenceAgent(exports.FenceAgent):
    def metadata(self) -> AgentInfo:
        def p(name: str, description: str, secret: bool) -> Parameter:
            return Parameter(name=name, description=description, required=True,
                             secret=secret, default_value=None)
        return AgentInfo(
            name="fence_{snake}",
            description="Fences a node through its device",
            parameters=[
                p("ip", "The device's address", False),
                p("username", "Login", False),
                p("password", "The name of a granted secret holding the password", True),
            ],
            actions=[Action.ON, Action.OFF, Action.REBOOT, Action.STATUS, Action.MONITOR],
        )

    def validate(self, device: Params) -> None:
        for key in ("ip", "username", "password"):
            param(device, key)

    def status(self, device: Params) -> PowerState:
        self.validate(device)
        raise Err(types.Error_Retryable(f"{{NOT_YET}}: status"))

    def fence(self, device: Params, action: FenceAction) -> None:
        self.validate(device)
        raise Err(types.Error_Retryable(f"{{NOT_YET}}: fence"))

    def monitor(self, device: Params) -> None:
        self.validate(device)
        raise Err(types.Error_Retryable(f"{{NOT_YET}}: monitor"))

    def list(self, device: Params) -> List[Target]:
        return []
"#
    )
}
