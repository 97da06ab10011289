"""A Trellis logging method in Python: each run's events as JSON lines, one file per
run in a directory the operator grants (JEP-212's fields: id, message, timestamp,
data, plus the log's metadata), in the default file store's layout, so the default
`file-browser` reads what it writes.

Built with componentize-py against the project's WIT (`cargo xtask bundle` does it):

    componentize-py -d ../../wit -w logging-method-plugin componentize app -o python_logger.wasm

The host keeps every batch in its durable buffer until `write` returns, and sends a
batch again after a failure, so a method must store each event at most once: here,
events at or below the highest seq already in the file are skipped.
"""

import json
import os

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports import logging_method
from wit_world.imports import types

import logging_method as impl

DIRECTORY = None


class Lifecycle(exports.Lifecycle):
    def init(self, config: str) -> None:
        global DIRECTORY
        try:
            directory = json.loads(config).get("directory", "/logs")
        except ValueError as e:
            raise Err(types.Error_BadConfig(f"config is not JSON: {e}"))
        if not isinstance(directory, str):
            raise Err(types.Error_BadConfig("config key `directory`: expected a string"))
        # Without a grant the directory does not exist in the sandbox: say so plainly.
        if not os.path.isdir(directory):
            raise Err(types.Error_Denied(
                f"directory `{directory}` is not available: grant it read-write in "
                "[[plugins.python-logger.dirs]]"))
        DIRECTORY = directory


class LoggingMethod(exports.LoggingMethod):
    def runs_on(self) -> logging_method.Side:
        return logging_method.Side.CONTROLLER

    def open(self, meta: types.LogMetadata) -> logging_method.Writer:
        if DIRECTORY is None:
            raise Err(types.Error_Permanent("open before init"))
        return impl.Writer(DIRECTORY, meta)
