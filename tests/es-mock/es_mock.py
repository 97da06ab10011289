#!/usr/bin/env python3
"""es_mock.py - an in-memory stand-in for the part of the Elasticsearch 8.x REST API
that Trellis' logging plugins use. Python 3.11, standard library only.

    python3 tests/es-mock/es_mock.py --port P [--refresh-interval-ms N] [--data FILE]
                                     [--basic-auth USER:PASS] [--api-key KEY]
                                     [--tls-cert PEM --tls-key PEM [--plain-port Q]]

It listens on 127.0.0.1 only and prints "listening on 127.0.0.1:P" (flushed) once the
socket is accepting. --port 0 picks a free port; the line then shows the real port.
With --tls-cert/--tls-key it speaks HTTPS on P (as Elasticsearch with
xpack.security.http.ssl) and, for the tests' own checks, plain HTTP on --plain-port
(0 = any); the line is then "listening on 127.0.0.1:P tls plain 127.0.0.1:Q".

It is NOT Elasticsearch. It follows the documented REST behaviour below and leaves out
everything else (see README.md, "Deliberately not implemented"). The suites run against
a real engine (OpenSearch 2.19.6, host/tests/common/opensearch.rs); this mock stays only
for faults that engine will not produce on demand (429 storms, refused items) and for
auth and TLS. Differences found against OpenSearch: docs/TESTING.md.

Documented behaviour followed (Elasticsearch Reference 8.15):
  POST|PUT /_bulk, /{index}/_bulk
      https://www.elastic.co/guide/en/elasticsearch/reference/8.15/docs-bulk.html
      ?refresh=true|wait_for|false:
      https://www.elastic.co/guide/en/elasticsearch/reference/8.15/docs-refresh.html
  PUT|POST /{index}/_doc/{id}, POST /{index}/_doc, PUT|POST /{index}/_create/{id}
      https://www.elastic.co/guide/en/elasticsearch/reference/8.15/docs-index_.html
  GET|HEAD|DELETE /{index}/_doc/{id}  (real-time get: sees documents before a refresh)
      https://www.elastic.co/guide/en/elasticsearch/reference/8.15/docs-get.html
      https://www.elastic.co/guide/en/elasticsearch/reference/8.15/docs-delete.html
  GET|POST /_search, /{index}/_search
      https://www.elastic.co/guide/en/elasticsearch/reference/8.15/search-search.html
      https://www.elastic.co/guide/en/elasticsearch/reference/8.15/sort-search-results.html
      https://www.elastic.co/guide/en/elasticsearch/reference/8.15/paginate-search-results.html
        (search_after and point in time; the implicit _shard_doc tiebreaker)
      Query DSL: query-dsl-match-all-query.html, query-dsl-term-query.html,
        query-dsl-terms-query.html, query-dsl-range-query.html, query-dsl-bool-query.html,
        query-dsl-exists-query.html, query-dsl-ids-query.html, query-dsl-match-query.html
      index.max_result_window (10000):
      https://www.elastic.co/guide/en/elasticsearch/reference/8.15/index-modules.html
  POST /{index}/_pit?keep_alive=..., DELETE /_pit
      https://www.elastic.co/guide/en/elasticsearch/reference/8.15/point-in-time-api.html
  GET|POST /_count, /{index}/_count
      https://www.elastic.co/guide/en/elasticsearch/reference/8.15/search-count.html
  GET|POST /_refresh, /{index}/_refresh; index.refresh_interval (default 1s)
      https://www.elastic.co/guide/en/elasticsearch/reference/8.15/indices-refresh.html
      https://www.elastic.co/guide/en/elasticsearch/reference/8.15/near-real-time.html
  PUT|POST|GET|HEAD|DELETE /_index_template/{name}, GET /_index_template
      https://www.elastic.co/guide/en/elasticsearch/reference/8.15/index-templates.html
      https://www.elastic.co/guide/en/elasticsearch/reference/8.15/indices-put-template.html
      https://www.elastic.co/guide/en/elasticsearch/reference/8.15/indices-get-template.html
      https://www.elastic.co/guide/en/elasticsearch/reference/8.15/indices-delete-template.html
  PUT|GET|HEAD|DELETE /{index}, GET /{index}/_mapping, GET /{index}/_settings
      https://www.elastic.co/guide/en/elasticsearch/reference/8.15/indices-create-index.html
      https://www.elastic.co/guide/en/elasticsearch/reference/8.15/indices-get-index.html
      https://www.elastic.co/guide/en/elasticsearch/reference/8.15/indices-exists.html
      https://www.elastic.co/guide/en/elasticsearch/reference/8.15/indices-delete-index.html
      Dynamic mapping: dynamic-field-mapping.html, dynamic-templates.html, dynamic.html
  GET /_cluster/health[/{index}]
      https://www.elastic.co/guide/en/elasticsearch/reference/8.15/cluster-health.html
  GET|HEAD /   (cluster info)
      https://www.elastic.co/docs/api/doc/elasticsearch/v8/operation/operation-info
  Multi-target syntax (comma lists, * wildcards, -exclusions, ignore_unavailable,
  allow_no_indices) and Content-Type rules:
      https://www.elastic.co/guide/en/elasticsearch/reference/8.15/api-conventions.html
  Security (optional): basic auth and "Authorization: ApiKey <base64(id:api_key)>"
      https://www.elastic.co/guide/en/elasticsearch/reference/8.15/http-clients.html
      https://www.elastic.co/guide/en/elasticsearch/reference/8.15/security-api-create-api-key.html

Admin API for tests (NOT an Elasticsearch API; exempt from auth and from every fault):
  POST /_mock/faults   JSON, any combination of:
      {"down": true | false | {"mode": "close"|"reset"|"hang", "for_ms": N}}
      {"status_storm": {"status": 429, "count": 5, "match": "_bulk", "retry_after": 1,
                        "type": "...", "reason": "..."}}            (null clears it)
      {"fail_items": {"ids": ["a", "b"] | "every_nth": 3, "status": 429, "times": 1,
                      "index": "only-this-index", "type": "...", "reason": "..."}}
      {"refresh_interval_ms": 5000}      (null goes back to the per-index/CLI value)
      {"latency_ms": 200}                (delay every non-admin response)
      {"clear_faults": true}             (faults only)
      {"reset": true}                    (everything: data, templates, PITs, faults, stats)
  GET  /_mock/faults   the current fault settings
  GET  /_mock/stats    request counts per endpoint, bulk item counts, docs per index
                       (visible and total), duplicate _ids rejected/overwritten
  POST /_mock/reset    same as {"reset": true}

"down" closes the connection of every non-admin request without answering (mode "close":
FIN, "reset": TCP RST, "hang": keep it open and silent until the fault ends). A truly
*refused* connection cannot be simulated from inside the process: tests must stop the
process. For that the mock can be killed (even SIGKILL) and restarted on the same --port
(SO_REUSEADDR, and binding is retried for --bind-retry-ms); with --data FILE every write
is dumped to FILE (atomically, before the response is sent) and FILE is loaded at start,
so "store down, then back" keeps everything acknowledged. As after a real restart (shard
recovery refreshes), every loaded document is visible to search at once.
"""

import argparse
import base64
import binascii
import copy
import datetime as _dt
import gzip
import io
import json
import os
import re
import secrets
import signal
import socket
import struct
import sys
import threading
import time
import uuid
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, unquote, urlsplit

ES_VERSION = "8.15.0"
LUCENE_VERSION = "9.11.1"
MAX_RESULT_WINDOW = 10000            # index.max_result_window default
DEFAULT_TRACK_TOTAL_HITS = 10000     # search: track_total_hits default
LONG_MAX = (1 << 63) - 1
LONG_MIN = -(1 << 63)
SHARDS_WRITE = {"total": 2, "successful": 1, "failed": 0}   # 1 primary + 1 unassigned replica
NODE_ID = "esmockNodeId0000000000"
MOCK = "[es-mock] "                  # prefix of reasons for things the mock does not do


# --------------------------------------------------------------------------- errors

class EsError(Exception):
    """An error answered with an Elasticsearch-style body."""

    def __init__(self, status, etype, reason, *, extra=None, root=None, caused_by=None,
                 plain=False, headers=None):
        super().__init__(reason)
        self.status, self.etype, self.reason = status, etype, reason
        self.extra = extra or {}
        self.root = root
        self.caused_by = caused_by
        self.plain = plain
        self.headers = headers or []

    def cause(self):
        c = {"type": self.etype, "reason": self.reason}
        c.update(self.extra)
        if self.caused_by:
            c["caused_by"] = self.caused_by
        return c

    def body(self):
        if self.plain:
            return {"error": self.reason, "status": self.status}
        err = {"root_cause": self.root if self.root is not None else
               [dict({"type": self.etype, "reason": self.reason}, **self.extra)]}
        err.update(self.cause())
        return {"error": err, "status": self.status}


def bad_request(reason, etype="illegal_argument_exception"):
    return EsError(400, etype, reason)


def parsing_error(reason):
    return EsError(400, "parsing_exception", reason)


def validation_error(*msgs):
    text = "Validation Failed: " + "".join(f"{i}: {m};" for i, m in enumerate(msgs, 1))
    return EsError(400, "action_request_validation_exception", text)


def index_not_found(name, reason=None, resource_type="index_or_alias"):
    # Single-document APIs (get) name the resource "index_expression", searches and
    # index APIs "index_or_alias".
    return EsError(404, "index_not_found_exception", reason or f"no such index [{name}]",
                   extra={"resource.type": resource_type, "resource.id": name,
                          "index_uuid": "_na_", "index": name})


def all_shards_failed(cause, indices, status=400):
    failed = [{"shard": 0, "index": n, "node": NODE_ID, "reason": cause} for n in indices]
    return EsError(status, "search_phase_execution_exception", "all shards failed",
                   extra={"phase": "query", "grouped": True, "failed_shards": failed},
                   root=[cause], caused_by=cause)


def json_error(exc, what="request body"):
    """Malformed JSON: x_content_parse_exception caused by a json_parse_exception."""
    if isinstance(exc, json.JSONDecodeError):
        pos = f"[{exc.lineno}:{exc.colno}] "
        detail = exc.msg
    else:
        pos, detail = "", str(exc)
    cause = {"type": "json_parse_exception", "reason": f"{detail} in {what}"}
    return EsError(400, "x_content_parse_exception", f"{pos}{detail}", caused_by=cause)


def plain_error(status, text):
    return EsError(status, "", text, plain=True)


# --------------------------------------------------------------------------- small helpers

TIME_UNITS = {"nanos": 1e-6, "micros": 1e-3, "ms": 1, "s": 1000, "m": 60000,
              "h": 3600000, "d": 86400000}


def parse_time_ms(value, setting):
    s = str(value).strip()
    if s == "-1":
        return -1
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(nanos|micros|ms|s|m|h|d)", s)
    if not m:
        raise EsError(400, "illegal_argument_exception" if s else "parse_exception",
                      f"failed to parse setting [{setting}] with value [{s}] as a time value: "
                      "unit is missing or unrecognized")
    return int(float(m.group(1)) * TIME_UNITS[m.group(2)])


def parse_bool_param(params, name, default=False):
    v = params.get(name)
    if v is None:
        return default
    if v in ("", "true"):
        return True
    if v == "false":
        return False
    raise bad_request(f"Failed to parse value [{v}] as only [true] or [false] are allowed.")


def now_ms():
    return int(time.time() * 1000)


DATE_RE = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2})(?::(\d{2})(?::(\d{2})"
                     r"(?:[.,](\d{1,9}))?)?)?)?)?)?(Z|[+-]\d{2}(?::?\d{2})?)?")


def parse_date_ms(v):
    """strict_date_optional_time||epoch_millis (the default date format) -> epoch ms."""
    if isinstance(v, bool):
        raise ValueError(f"failed to parse date field [{v}]")
    if isinstance(v, (int, float)):
        return int(v)
    s = str(v).strip()
    if re.fullmatch(r"-?\d+(\.\d+)?", s) and not (len(s) == 4 and s.isdigit()):
        return int(float(s))
    m = DATE_RE.fullmatch(s)
    if not m:
        raise ValueError(f"failed to parse date field [{s}] with format "
                         "[strict_date_optional_time||epoch_millis]")
    y, mo, d, hh, mi, ss, frac, tz = m.groups()
    try:
        t = _dt.datetime(int(y), int(mo or 1), int(d or 1), int(hh or 0), int(mi or 0),
                         int(ss or 0), tzinfo=_dt.timezone.utc)
    except ValueError as e:
        raise ValueError(f"failed to parse date field [{s}]: {e}")
    ms = int(t.timestamp()) * 1000 + (int((frac or "0").ljust(3, "0")[:3]))
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        digits = tz[1:].replace(":", "")
        off = int(digits[:2]) * 60 + int(digits[2:4] or 0)
        ms -= sign * off * 60000
    return ms


DATE_MATH_RE = re.compile(r"now((?:[+-]\d+[yMwdhHms])*)(?:/([yMwdhHms]))?")
UNIT_MS = {"y": 365 * 86400000, "M": 30 * 86400000, "w": 7 * 86400000, "d": 86400000,
           "h": 3600000, "H": 3600000, "m": 60000, "s": 1000}


def parse_date_bound(v):
    """Date values in queries also accept simple date math ("now-1d/d")."""
    if isinstance(v, str):
        m = DATE_MATH_RE.fullmatch(v.strip())
        if m:
            t = now_ms()
            for sign, n, unit in re.findall(r"([+-])(\d+)([yMwdhHms])", m.group(1)):
                t += (1 if sign == "+" else -1) * int(n) * UNIT_MS[unit]
            if m.group(2):
                t -= t % UNIT_MS[m.group(2)]
            return t
    return parse_date_ms(v)


def tokens(s):
    """Rough approximation of the standard analyzer: lowercase word tokens."""
    return re.findall(r"\w+", s.lower())


def glob_to_re(pattern):
    return re.compile("^" + ".*".join(re.escape(p) for p in pattern.split("*")) + "$")


def glob_match(pattern, name):
    if "*" not in pattern:
        return pattern == name
    return glob_to_re(pattern).match(name) is not None


def globs_intersect(p, q):
    """Can some string match both *-only glob patterns p and q?"""
    memo = {}

    def go(i, j):
        key = (i, j)
        if key in memo:
            return memo[key]
        if i == len(p) and j == len(q):
            r = True
        elif i < len(p) and p[i] == "*":
            r = go(i + 1, j) or (j < len(q) and go(i, j + 1))
        elif j < len(q) and q[j] == "*":
            r = go(i, j + 1) or (i < len(p) and go(i + 1, j))
        elif i < len(p) and j < len(q) and p[i] == q[j]:
            r = go(i + 1, j + 1)
        else:
            r = False
        memo[key] = r
        return r

    return go(0, 0)


def gen_id():
    """A 20-character URL-safe id, like Elasticsearch's auto-generated _id."""
    return base64.urlsafe_b64encode(os.urandom(15)).decode()


INVALID_INDEX_CHARS = ["\\", "/", "*", "?", '"', "<", ">", "|", " ", ",", "#", ":"]


def validate_index_name(name):
    def bad(msg):
        return EsError(400, "invalid_index_name_exception",
                       f"Invalid index name [{name}], {msg}",
                       extra={"index_uuid": "_na_", "index": name})
    if name != name.lower():
        raise bad("must be lowercase")
    if any(c in name for c in INVALID_INDEX_CHARS):
        raise bad("must not contain the following characters " +
                  "[" + ", ".join(INVALID_INDEX_CHARS) + "]")
    if name.startswith(("_", "-", "+")):
        raise bad("must not start with '_', '-', or '+'")
    if name in (".", ".."):
        raise bad("must not be '.' or '..'")
    if len(name.encode()) > 255:
        raise bad(f"index name is too long, ({len(name.encode())} > 255)")


def flatten_settings(d, prefix=""):
    out = {}
    for k, v in (d or {}).items():
        key = prefix + k
        if isinstance(v, dict):
            out.update(flatten_settings(v, key + "."))
        else:
            out[key] = v
    return out


def normalize_settings(settings):
    """Settings as GET returns them: nested under "index", scalar values as strings."""
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise bad_request("settings must be an object", "settings_exception")
    flat = {}
    for k, v in flatten_settings(settings).items():
        if not k.startswith("index."):
            k = "index." + k
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif isinstance(v, list):
            v = [str(x) for x in v]
        elif v is not None:
            v = str(v)
        flat[k] = v
    return unflatten(flat)


def unflatten(flat):
    out = {}
    for k, v in flat.items():
        parts = k.split(".")
        node = out
        for p in parts[:-1]:
            nxt = node.get(p)
            if not isinstance(nxt, dict):
                nxt = node[p] = {}
            node = nxt
        node[parts[-1]] = v
    return out


def deep_merge(base, over):
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def expand_dots(obj):
    """{"a.b": 1} -> {"a": {"b": 1}} (how Elasticsearch maps dotted field names)."""
    if isinstance(obj, list):
        return [expand_dots(x) for x in obj]
    if not isinstance(obj, dict):
        return obj
    out = {}
    for k, v in obj.items():
        v = expand_dots(v)
        parts = k.split(".") if "." in k and k.strip(".") == k and "" not in k.split(".") else [k]
        node = out
        for p in parts[:-1]:
            nxt = node.get(p)
            if not isinstance(nxt, dict):
                nxt = node[p] = {}
            node = nxt
        last = parts[-1]
        if isinstance(v, dict) and isinstance(node.get(last), dict):
            node[last] = deep_merge(node[last], v)
        else:
            node[last] = v
    return out


def raw_values(obj, path):
    """Leaf values at a dotted path, through arrays and dotted keys; nulls dropped."""
    out = []
    _collect(obj, path.split("."), 0, out)
    return out


def _collect(obj, parts, i, out):
    if isinstance(obj, list):
        for el in obj:
            _collect(el, parts, i, out)
        return
    if i == len(parts):
        if obj is not None and not isinstance(obj, dict):
            out.append(obj)
        return
    if not isinstance(obj, dict):
        return
    for j in range(i + 1, len(parts) + 1):
        key = ".".join(parts[i:j])
        if key in obj:
            _collect(obj[key], parts, j, out)


def filter_source(src, includes, excludes):
    if not includes and not excludes:
        return src
    inc = [glob_to_re(p) for p in includes]
    exc = [glob_to_re(p) for p in excludes]

    def keep(path, is_obj):
        if any(r.match(path) for r in exc):
            return False
        if not inc:
            return True
        if any(r.match(path) for r in inc):
            return True
        return is_obj  # descend; pruned later if empty

    def walk(obj, prefix):
        if isinstance(obj, dict):
            out = {}
            for k, v in obj.items():
                p = prefix + k
                if isinstance(v, dict):
                    if not keep(p, True):
                        continue
                    if inc and any(r.match(p) for r in inc):
                        sub = walk(v, p + ".") if exc else v
                    else:
                        sub = walk(v, p + ".")
                        if not sub:
                            continue
                    out[k] = sub
                elif keep(p, False):
                    out[k] = v
            return out
        return obj

    return walk(src, "")


# --------------------------------------------------------------------------- mappings

INT_TYPES = {"long": (LONG_MIN, LONG_MAX), "integer": (-(1 << 31), (1 << 31) - 1),
             "short": (-(1 << 15), (1 << 15) - 1), "byte": (-128, 127),
             "unsigned_long": (0, (1 << 64) - 1)}
FLOAT_TYPES = {"double", "float", "half_float", "scaled_float"}
KEYWORD_TYPES = {"keyword", "constant_keyword", "wildcard", "version", "ip"}
TEXT_TYPES = {"text", "match_only_text", "search_as_you_type"}
DATE_TYPES = {"date", "date_nanos"}
OBJECT_TYPES = {"object", "nested"}
KNOWN_TYPES = (set(INT_TYPES) | FLOAT_TYPES | KEYWORD_TYPES | TEXT_TYPES | DATE_TYPES |
               OBJECT_TYPES | {"boolean", "flattened", "binary", "geo_point", "geo_shape",
                               "alias", "integer_range", "float_range", "long_range",
                               "double_range", "date_range", "ip_range", "dense_vector",
                               "sparse_vector", "rank_feature", "rank_features",
                               "completion", "token_count", "histogram",
                               "aggregate_metric_double", "point", "shape", "semantic_text",
                               "percolator", "join", "counted_keyword"})
MAPPING_ROOT_KEYS = {"properties", "dynamic", "dynamic_templates", "date_detection",
                     "numeric_detection", "dynamic_date_formats", "_source", "_meta",
                     "_routing", "runtime", "enabled", "subobjects", "_data_stream_timestamp",
                     "_field_names", "_size"}


def mapper_error(msg):
    return EsError(400, "mapper_parsing_exception", f"Failed to parse mapping: {msg}",
                   caused_by={"type": "mapper_parsing_exception", "reason": msg})


def ftype_of(fdef):
    t = fdef.get("type")
    if t is None:
        return "object"
    return t


def normalize_mappings(m):
    if m is None:
        return {}
    if not isinstance(m, dict):
        raise mapper_error("Expected map for property [mappings]")
    unknown = [k for k in m if k not in MAPPING_ROOT_KEYS]
    if unknown:
        raise mapper_error("Root mapping definition has unsupported parameters:  " +
                           " ".join(f"[{k} : {json.dumps(m[k])}]" for k in unknown))
    out = copy.deepcopy(m)
    if "properties" in out:
        out["properties"] = normalize_props(out["properties"], "")
    return out


def normalize_props(props, prefix):
    if not isinstance(props, dict):
        raise mapper_error(f"Expected map for property [properties] on field [{prefix or '_doc'}]")
    res = {}
    for name, fdef in props.items():
        full = prefix + name
        if not isinstance(fdef, dict):
            raise mapper_error(f"Expected map for property [fields] on field [{full}] "
                               f"but got a class java.lang.String")
        fdef = dict(fdef)
        t = fdef.get("type")
        if t is not None and t not in KNOWN_TYPES:
            raise mapper_error(f"No handler for type [{t}] declared on field [{name}]")
        if "properties" in fdef:
            if t not in (None, "object", "nested"):
                raise mapper_error(f"unknown parameter [properties] on mapper [{name}] "
                                   f"of type [{t}]")
            fdef["properties"] = normalize_props(fdef["properties"], full + ".")
        if "fields" in fdef:
            if not isinstance(fdef["fields"], dict):
                raise mapper_error(f"Expected map for property [fields] on field [{name}]")
            for sub, sdef in fdef["fields"].items():
                if not isinstance(sdef, dict) or sdef.get("type", "object") not in KNOWN_TYPES:
                    raise mapper_error(f"No handler for type [{(sdef or {}).get('type')}] "
                                       f"declared on field [{sub}]")
        parts = name.split(".")
        node = res
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {"properties": {}}
            nxt.setdefault("properties", {})
            node = nxt["properties"]
        last = parts[-1]
        if last in node and "properties" in node[last] and "properties" in fdef:
            merged = dict(node[last])
            merged.update({k: v for k, v in fdef.items() if k != "properties"})
            merged["properties"] = dict(node[last]["properties"], **fdef["properties"])
            node[last] = merged
        else:
            node[last] = fdef
    return res


def lookup_field(mappings, path):
    """-> (source_path, type, definition) for a mapped leaf field (incl. multi-fields)."""
    props = mappings.get("properties") or {}
    parts = path.split(".")
    node = None
    src = []
    i = 0
    while i < len(parts):
        # field names in mappings are nested objects, but allow dotted leaf names too
        found = False
        for j in range(len(parts), i, -1):
            key = ".".join(parts[i:j])
            if props is not None and key in props:
                node = props[key]
                src.append(key)
                i = j
                found = True
                break
        if not found:
            if node is not None and isinstance(node.get("fields"), dict) and i == len(parts) - 1 \
                    and parts[i] in node["fields"]:
                sub = node["fields"][parts[i]]
                return ".".join(src), ftype_of(sub), sub
            return None
        props = node.get("properties") if ftype_of(node) in OBJECT_TYPES else None
    return ".".join(src), ftype_of(node), node


class DocParseError(Exception):
    def __init__(self, etype, reason, caused_by=None):
        super().__init__(reason)
        self.etype, self.reason, self.caused_by = etype, reason, caused_by

    def as_dict(self, ix_name, ix_uuid):
        d = {"type": self.etype, "reason": self.reason}
        if self.caused_by:
            d["caused_by"] = self.caused_by
        return d


class _NeedsUpdate(Exception):
    pass


def check_scalar(v, t, fdef, full, doc_id):
    """Validate/coerce one value against a field type, like the field mappers do."""
    def fail(why, cause_type="illegal_argument_exception"):
        prev = v if not isinstance(v, (dict, list)) else json.dumps(v)
        raise DocParseError("document_parsing_exception",
                            f"failed to parse field [{full}] of type [{t}] in document with "
                            f"id '{doc_id}'. Preview of field's value: '{prev}'",
                            {"type": cause_type, "reason": why})
    if isinstance(v, dict):
        if t == "flattened":
            return
        fail(f"Can't parse [{t}] value from an object" if t not in TEXT_TYPES | KEYWORD_TYPES
             else "failed to parse field: expected a value but found an object")
    if t in INT_TYPES:
        if isinstance(v, bool):
            fail(f"Current token (VALUE_{str(v).upper()}) not numeric, can not use numeric "
                 f"value accessors")
        try:
            n = float(v) if not isinstance(v, int) else v
            if isinstance(n, float) and (n != n or n in (float("inf"), float("-inf"))):
                raise ValueError
            n = int(n)
        except (ValueError, TypeError):
            fail(f'For input string: "{v}"', "number_format_exception")
        lo, hi = INT_TYPES[t]
        if not lo <= n <= hi:
            fail(f"Value [{v}] is out of range for {'an' if t == 'integer' else 'a'} {t}")
    elif t in FLOAT_TYPES:
        if isinstance(v, bool):
            fail(f"Current token (VALUE_{str(v).upper()}) not numeric")
        try:
            float(v)
        except (ValueError, TypeError):
            fail(f'For input string: "{v}"', "number_format_exception")
    elif t == "boolean":
        if not (isinstance(v, bool) or v in ("true", "false", "")):
            fail(f"Failed to parse value [{v}] as only [true] or [false] are allowed.")
    elif t in DATE_TYPES:
        try:
            parse_date_ms(v)
        except ValueError as e:
            fail(str(e))


def infer_mapping(value, mappings, name, full):
    """Dynamic field mapping, with dynamic_templates honoured first."""
    if isinstance(value, bool):
        mtype = "boolean"
    elif isinstance(value, int):
        mtype = "long"
    elif isinstance(value, float):
        mtype = "double"
    elif isinstance(value, dict):
        mtype = "object"
    else:
        s = str(value)
        mtype = "string"
        if mappings.get("date_detection", True) and DATE_RE.fullmatch(s.strip()):
            mtype = "date"
        elif mappings.get("numeric_detection", False):
            try:
                int(s)
                mtype = "long"
            except ValueError:
                try:
                    float(s)
                    mtype = "double"
                except ValueError:
                    pass
    for entry in mappings.get("dynamic_templates") or []:
        if not isinstance(entry, dict) or len(entry) != 1:
            continue
        (_, tpl), = entry.items()
        if not isinstance(tpl, dict):
            continue
        mmt = tpl.get("match_mapping_type")
        if mmt is not None:
            mmts = mmt if isinstance(mmt, list) else [mmt]
            if "*" not in mmts and mtype not in mmts:
                continue
        checks = [("match", name, True), ("unmatch", name, False),
                  ("path_match", full, True), ("path_unmatch", full, False)]
        ok = True
        for key, subject, want in checks:
            pats = tpl.get(key)
            if pats is None:
                continue
            pats = pats if isinstance(pats, list) else [pats]
            hit = any(glob_match(p, subject) for p in pats)
            if hit != want:
                ok = False
        if not ok or "mapping" not in tpl:
            continue
        dyn_type = {"string": "text", "double": "float"}.get(mtype, mtype)
        text = json.dumps(tpl["mapping"]).replace("{name}", name).replace("{dynamic_type}", dyn_type)
        m = json.loads(text)
        if mtype == "object" and "type" not in m:
            m = dict(m, properties={})
        return m
    if mtype == "object":
        return {"properties": {}}
    if mtype == "string":
        return {"type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": 256}}}
    if mtype == "double":
        return {"type": "float"}
    return {"type": mtype}


def map_document(mappings, source, doc_id, writable):
    """Validate a document against the mapping; with writable=True add dynamic fields.
    Raises _NeedsUpdate (read-only pass found a new field) or DocParseError."""
    root_dyn = mappings.get("dynamic", True)
    if writable:
        mappings.setdefault("properties", {})
    _map_obj(mappings, mappings.get("properties") if mappings.get("properties") is not None else {},
             root_dyn, expand_dots(source), "", "_doc", doc_id, writable)


def _dyn(v):
    return {"true": True, "false": False}.get(v, v) if isinstance(v, str) else v


def _map_obj(root, props, dynamic, obj, prefix, parent_name, doc_id, writable):
    dynamic = _dyn(dynamic)
    for k, v in obj.items():
        full = prefix + k
        if k.strip() == "":
            raise DocParseError("document_parsing_exception",
                                "field name cannot be an empty string")
        items = v if isinstance(v, list) else [v]
        flat = []
        while items:
            it = items.pop(0)
            if isinstance(it, list):
                items[0:0] = it
            elif it is not None:
                flat.append(it)
        for item in flat:
            fdef = props.get(k)
            if fdef is None:
                if dynamic == "strict":
                    raise DocParseError("strict_dynamic_mapping_exception",
                                        f"mapping set to strict, dynamic introduction of [{k}] "
                                        f"within [{parent_name}] is not allowed")
                if dynamic is False or dynamic == "runtime":
                    continue
                if not writable:
                    raise _NeedsUpdate()
                fdef = infer_mapping(item, root, k, full)
                props[k] = fdef
            t = ftype_of(fdef)
            if isinstance(item, dict):
                if t in OBJECT_TYPES:
                    if fdef.get("enabled", True) is False:
                        continue
                    sub = fdef.get("properties")
                    if sub is None:
                        if not writable:
                            sub = {}
                        else:
                            sub = fdef["properties"] = {}
                    _map_obj(root, sub, fdef.get("dynamic", dynamic), item, full + ".",
                             full, doc_id, writable)
                else:
                    check_scalar(item, t, fdef, full, doc_id)
            else:
                if t in OBJECT_TYPES:
                    raise DocParseError("document_parsing_exception",
                                        f"object mapping for [{full}] tried to parse field "
                                        f"[{k}] as object, but found a concrete value")
                check_scalar(item, t, fdef, full, doc_id)


def typed_values(raw, t, fdef):
    """Index-time view of raw source values for a mapped field type."""
    out = []
    for v in raw:
        try:
            if t in INT_TYPES:
                if isinstance(v, bool):
                    continue
                out.append(int(float(v)) if not isinstance(v, int) else v)
            elif t in FLOAT_TYPES:
                if isinstance(v, bool):
                    continue
                out.append(float(v))
            elif t in DATE_TYPES:
                out.append(parse_date_ms(v))
            elif t == "boolean":
                out.append(1 if v is True or v == "true" else 0)
            elif t in TEXT_TYPES:
                out.extend(tokens(v if isinstance(v, str) else json.dumps(v)))
            else:
                s = v if isinstance(v, str) else ("true" if v is True else "false" if v is False
                                                  else json.dumps(v))
                ia = fdef.get("ignore_above")
                if ia is not None and len(s) > int(ia):
                    continue
                out.append(s)
        except (ValueError, TypeError):
            continue
    return out


def convert_query_value(t, v, field):
    """Convert a query term to the field's type (query_shard_exception if it can't)."""
    try:
        if t in INT_TYPES:
            if isinstance(v, bool):
                raise ValueError
            f = float(v)
            return int(f) if f == int(f) else f
        if t in FLOAT_TYPES:
            if isinstance(v, bool):
                raise ValueError
            return float(v)
        if t in DATE_TYPES:
            return parse_date_bound(v)
        if t == "boolean":
            if v is True or v == "true":
                return 1
            if v is False or v in ("false", ""):
                return 0
            raise ValueError
    except (ValueError, TypeError):
        raise EsError(400, "query_shard_exception",
                      f"failed to create query: For input string: \"{v}\"",
                      extra={"index_uuid": "_na_", "index": field})
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (dict, list)):
        raise parsing_error("[term] query does not support array of values")
    return v if isinstance(v, str) else json.dumps(v)


# --------------------------------------------------------------------------- query DSL

def parse_query(q, where="query"):
    """Syntax check + normalise to a tuple AST (independent of any index)."""
    if not isinstance(q, dict):
        raise parsing_error(f"[_na] query malformed, must start with start_object")
    if not q:
        raise parsing_error("query malformed, empty clause found")
    if len(q) > 1:
        keys = list(q)
        raise parsing_error(f"[{keys[0]}] malformed query, expected [END_OBJECT] but found "
                            f"[FIELD_NAME]")
    (kind, body), = q.items()
    if kind in ("match_all", "match_none"):
        if not isinstance(body, dict):
            raise parsing_error(f"[{kind}] query malformed, no start_object after query name")
        for k in body:
            if k not in ("boost", "_name"):
                raise parsing_error(f"[{kind}] query does not support [{k}]")
        return ("all", float(body.get("boost", 1.0))) if kind == "match_all" else ("none",)
    if kind in ("term", "match"):
        if not isinstance(body, dict):
            raise parsing_error(f"[{kind}] query malformed, no start_object after query name")
        fields = [k for k in body if k not in ("boost", "_name")]
        if len(fields) != 1:
            if not fields:
                raise bad_request(f"field name is null or empty")
            raise parsing_error(f"[{kind}] query doesn't support multiple fields, found "
                                f"[{fields[0]}] and [{fields[1]}]")
        field = fields[0]
        spec = body[field]
        boost, ci, op = float(body.get("boost", 1.0)), False, "or"
        if isinstance(spec, dict):
            vkey = "value" if kind == "term" else "query"
            allowed = {vkey, "boost", "_name"} | ({"case_insensitive"} if kind == "term" else
                                                  {"operator", "analyzer", "lenient",
                                                   "zero_terms_query", "fuzziness",
                                                   "minimum_should_match",
                                                   "auto_generate_synonyms_phrase_query"})
            for k in spec:
                if k not in allowed:
                    raise parsing_error(f"[{kind}] query does not support [{k}]")
            if vkey not in spec:
                raise bad_request(f"[{kind}] requires {vkey}")
            value = spec[vkey]
            boost = float(spec.get("boost", boost))
            ci = bool(spec.get("case_insensitive", False))
            op = str(spec.get("operator", "or")).lower()
        else:
            value = spec
        if isinstance(value, (dict, list)):
            raise parsing_error(f"[{kind}] query does not support array of values"
                                if isinstance(value, list) else
                                f"[{kind}] unknown token [START_OBJECT] after [{field}]")
        if value is None:
            raise bad_request(f"value cannot be null")
        return (kind, field, value, boost, ci, op)
    if kind == "terms":
        if not isinstance(body, dict):
            raise parsing_error("[terms] query malformed, no start_object after query name")
        fields = [k for k in body if k not in ("boost", "_name")]
        if len(fields) != 1:
            raise parsing_error("[terms] query does not support multiple fields" if fields
                                else "[terms] query requires a field")
        vals = body[fields[0]]
        if not isinstance(vals, list):
            raise parsing_error(f"[terms] query does not support [{fields[0]}]")
        return ("terms", fields[0], vals, float(body.get("boost", 1.0)))
    if kind == "range":
        if not isinstance(body, dict) or len(body) != 1:
            raise parsing_error("[range] query doesn't support multiple fields" if
                                isinstance(body, dict) and body else
                                "[range] query malformed, no start_object after query name")
        (field, spec), = body.items()
        if not isinstance(spec, dict):
            raise parsing_error(f"[range] query malformed, after field missing start object")
        allowed = {"gt", "gte", "lt", "lte", "from", "to", "include_lower", "include_upper",
                   "format", "time_zone", "boost", "relation", "_name"}
        for k in spec:
            if k not in allowed:
                raise parsing_error(f"[range] query does not support [{k}]")
        lo = hi = None
        lo_inc = hi_inc = True
        if "from" in spec:
            lo, lo_inc = spec["from"], bool(spec.get("include_lower", True))
        if "to" in spec:
            hi, hi_inc = spec["to"], bool(spec.get("include_upper", True))
        if "gt" in spec:
            lo, lo_inc = spec["gt"], False
        if "gte" in spec:
            lo, lo_inc = spec["gte"], True
        if "lt" in spec:
            hi, hi_inc = spec["lt"], False
        if "lte" in spec:
            hi, hi_inc = spec["lte"], True
        return ("range", field, lo, lo_inc, hi, hi_inc, float(spec.get("boost", 1.0)))
    if kind == "exists":
        if not isinstance(body, dict) or not isinstance(body.get("field"), str):
            raise parsing_error("[exists] must be provided with a [field]")
        return ("exists", body["field"], float(body.get("boost", 1.0)))
    if kind == "ids":
        if not isinstance(body, dict) or not isinstance(body.get("values", []), list):
            raise parsing_error("[ids] query malformed, no start_object after query name")
        return ("ids", frozenset(str(v) for v in body.get("values", [])),
                float(body.get("boost", 1.0)))
    if kind == "bool":
        if not isinstance(body, dict):
            raise parsing_error("[bool] query malformed, no start_object after query name")
        clauses = {}
        for k, v in body.items():
            if k in ("must", "filter", "should", "must_not"):
                lst = v if isinstance(v, list) else [v]
                clauses[k] = [parse_query(x) for x in lst]
            elif k not in ("minimum_should_match", "boost", "_name", "adjust_pure_negative"):
                raise parsing_error(f"[bool] query does not support [{k}]")
        msm = body.get("minimum_should_match")
        return ("bool", clauses.get("must", []), clauses.get("filter", []),
                clauses.get("should", []), clauses.get("must_not", []), msm,
                float(body.get("boost", 1.0)))
    raise parsing_error(f"unknown query [{kind}]")


class DocCtx:
    __slots__ = ("doc", "cache")

    def __init__(self, doc):
        self.doc = doc
        self.cache = {}

    def values(self, fi):
        key = fi[0], fi[1]
        v = self.cache.get(key)
        if v is None:
            v = typed_values(raw_values(self.doc.source, fi[0]), fi[1], fi[2])
            self.cache[key] = v
        return v


def _msm(spec, n_should):
    if spec is None:
        return None
    s = str(spec).strip()
    if s.endswith("%"):
        pct = int(s[:-1])
        k = int(n_should * abs(pct) / 100)
        return k if pct >= 0 else n_should - k
    k = int(s)
    return k if k >= 0 else n_should + k


def bind_query(ast, mappings, scoring=True):
    """AST -> fn(DocCtx) returning a score (float) or None when the doc doesn't match."""
    kind = ast[0]
    if kind == "all":
        s = ast[1] if scoring else 0.0
        return lambda c: s
    if kind == "none":
        return lambda c: None
    if kind in ("term", "match", "terms", "range", "exists"):
        field = ast[1]
        fi = lookup_field(mappings, field)
        boost = ast[-1] if kind in ("terms", "range", "exists") else ast[3]
        s = boost if scoring else 0.0
        if fi is None:
            return lambda c: None
        t = fi[1]
        if t in OBJECT_TYPES:
            return lambda c: None
        if kind == "exists":
            return lambda c: s if c.values(fi) else None
        if kind == "term":
            value, ci = ast[2], ast[4]
            if t in TEXT_TYPES:
                want = str(value) if not isinstance(value, bool) else str(value).lower()
                if ci:
                    want = want.lower()
                return lambda c: s if want in c.values(fi) else None
            qv = convert_query_value(t, value, field)
            if ci and isinstance(qv, str):
                low = qv.lower()
                return lambda c: s if any(isinstance(x, str) and x.lower() == low
                                          for x in c.values(fi)) else None
            return lambda c: s if qv in c.values(fi) else None
        if kind == "match":
            value, op = ast[2], ast[5]
            if t in TEXT_TYPES:
                want = tokens(str(value))
                if not want:
                    return lambda c: None
                if op == "and":
                    return lambda c: s if all(w in c.values(fi) for w in want) else None
                return lambda c: s if any(w in c.values(fi) for w in want) else None
            qv = convert_query_value(t, value, field)
            return lambda c: s if qv in c.values(fi) else None
        if kind == "terms":
            if t in TEXT_TYPES:
                wants = {str(v) for v in ast[2]}
            else:
                wants = {convert_query_value(t, v, field) for v in ast[2]}
            return lambda c: s if any(x in wants for x in c.values(fi)) else None
        # range
        _, _, lo, lo_inc, hi, hi_inc, _ = ast
        if t in TEXT_TYPES or t in KEYWORD_TYPES or t not in (set(INT_TYPES) | FLOAT_TYPES |
                                                              DATE_TYPES | {"boolean"}):
            conv = (lambda v: v if isinstance(v, str) else json.dumps(v))
        else:
            conv = (lambda v: convert_query_value(t, v, field))
        lo_v = conv(lo) if lo is not None else None
        hi_v = conv(hi) if hi is not None else None

        def in_range(x):
            try:
                if lo_v is not None and (x < lo_v if lo_inc else x <= lo_v):
                    return False
                if hi_v is not None and (x > hi_v if hi_inc else x >= hi_v):
                    return False
            except TypeError:
                return False
            return True
        return lambda c: s if any(in_range(x) for x in c.values(fi)) else None
    if kind == "ids":
        ids, boost = ast[1], ast[2]
        s = boost if scoring else 0.0
        return lambda c: s if c.doc.id in ids else None
    if kind == "bool":
        _, must, filt, should, must_not, msm, boost = ast
        must_f = [bind_query(x, mappings, scoring) for x in must]
        filt_f = [bind_query(x, mappings, False) for x in filt]
        should_f = [bind_query(x, mappings, scoring) for x in should]
        not_f = [bind_query(x, mappings, False) for x in must_not]
        need = _msm(msm, len(should_f))
        if need is None:
            need = 1 if (should_f and not must_f and not filt_f) else 0

        def run(c):
            score = 0.0
            for f in filt_f:
                if f(c) is None:
                    return None
            for f in not_f:
                if f(c) is not None:
                    return None
            for f in must_f:
                r = f(c)
                if r is None:
                    return None
                score += r
            hits = 0
            for f in should_f:
                r = f(c)
                if r is not None:
                    hits += 1
                    score += r
            if hits < need:
                return None
            return score * boost if scoring else 0.0
        return run
    raise parsing_error(f"unknown query [{kind}]")


# --------------------------------------------------------------------------- sorting

class SortSpec:
    __slots__ = ("field", "desc", "missing", "mode", "unmapped_type", "implicit")

    def __init__(self, field, desc=False, missing="_last", mode=None, unmapped_type=None,
                 implicit=False):
        self.field, self.desc, self.missing = field, desc, missing
        self.mode, self.unmapped_type, self.implicit = mode, unmapped_type, implicit

    def key(self):
        return (self.field, self.desc, json.dumps(self.missing), self.mode, self.unmapped_type)


def parse_sort(sort):
    if sort is None:
        return []
    items = sort if isinstance(sort, list) else [sort]
    specs = []
    for it in items:
        if isinstance(it, str):
            if ":" in it and not it.startswith("_"):
                f, o = it.rsplit(":", 1)
                specs.append(SortSpec(f, o == "desc"))
            else:
                specs.append(SortSpec(it, it == "_score"))
            continue
        if not isinstance(it, dict) or len(it) != 1:
            raise parsing_error("[sort] malformed; expected a field name or {field: order}")
        (field, spec), = it.items()
        if isinstance(spec, str):
            if spec not in ("asc", "desc"):
                raise bad_request(f"Unknown SortOrder [{spec}]")
            specs.append(SortSpec(field, spec == "desc"))
        elif isinstance(spec, dict):
            allowed = {"order", "missing", "mode", "unmapped_type", "numeric_type", "format",
                       "nested"}
            for k in spec:
                if k not in allowed:
                    raise parsing_error(f"[field_sort] unknown field [{k}]")
            order = spec.get("order", "desc" if field == "_score" else "asc")
            if order not in ("asc", "desc"):
                raise bad_request(f"Unknown SortOrder [{order}]")
            specs.append(SortSpec(field, order == "desc", spec.get("missing", "_last"),
                                  spec.get("mode"), spec.get("unmapped_type")))
        else:
            raise parsing_error(f"[sort] malformed for field [{field}]")
    return specs


class _Missing:
    __slots__ = ()

    def __repr__(self):
        return "MISSING"


MISSING = _Missing()


def _cmp_scalar(a, b):
    try:
        return (a > b) - (a < b)
    except TypeError:
        ra, rb = (0 if isinstance(a, (int, float)) else 1), (0 if isinstance(b, (int, float)) else 1)
        if ra != rb:
            return ra - rb
        sa, sb = str(a), str(b)
        return (sa > sb) - (sa < sb)


class SortKey:
    """Compares the visible sort values of a hit, honouring order and missing placement."""
    __slots__ = ("vals", "specs")

    def __init__(self, vals, specs):
        self.vals, self.specs = vals, specs

    def cmp(self, other):
        for a, b, sp in zip(self.vals, other.vals, self.specs):
            if a is MISSING or b is MISSING:
                if a is b:
                    continue
                first = sp.missing == "_first"
                return (-1 if first else 1) if a is MISSING else (1 if first else -1)
            c = _cmp_scalar(a, b)
            if c:
                return -c if sp.desc else c
        return 0

    def __lt__(self, other):
        return self.cmp(other) < 0

    def __eq__(self, other):
        return self.cmp(other) == 0


FIELD_FAMILY = {}
for _t in INT_TYPES:
    FIELD_FAMILY[_t] = "long"
for _t in FLOAT_TYPES:
    FIELD_FAMILY[_t] = "double"
for _t in DATE_TYPES:
    FIELD_FAMILY[_t] = "long"
FIELD_FAMILY["boolean"] = "long"


def missing_sort_value(spec, ftype):
    """The value Elasticsearch puts in hit.sort for a document missing the field."""
    fam = FIELD_FAMILY.get(ftype, "string")
    low = (spec.missing == "_first") != spec.desc   # position at the low end?
    if fam == "long":
        return LONG_MIN if low else LONG_MAX
    if fam == "double":
        return "-Infinity" if low else "Infinity"
    return None


# --------------------------------------------------------------------------- data model

class Doc:
    __slots__ = ("id", "source", "version", "seq_no", "docseq")

    def __init__(self, id_, source, version, seq_no, docseq):
        self.id, self.source, self.version, self.seq_no, self.docseq = \
            id_, source, version, seq_no, docseq


class Index:
    def __init__(self, name, settings, mappings, template, created_ms=None, uuid_=None):
        self.name = name
        self.uuid = uuid_ or base64.urlsafe_b64encode(uuid.uuid4().bytes).decode()[:22]
        self.created_ms = created_ms or now_ms()
        self.settings = settings          # normalized {"index": {...}} (user/template part)
        self.mappings = mappings          # replaced copy-on-write, never mutated in place
        self.template = template
        self.aliases = {}
        self.docs = {}                    # _id -> Doc (real-time view)
        self.visible = {}                 # _id -> Doc (as of the last refresh)
        self.dirty_since = None           # monotonic time of first unrefreshed change
        self.last_refresh = time.monotonic()
        self.refresh_gen = 0
        self.seq_no = -1
        self.docseq = 0
        self.refreshes = 0
        self.create_conflicts = 0
        self.overwrites = 0

    def refresh_interval_setting(self):
        v = (self.settings.get("index") or {}).get("refresh_interval")
        if v is None:
            return None
        try:
            return parse_time_ms(v, "index.refresh_interval")
        except EsError:
            return None

    def full_settings(self):
        base = {"index": {"routing": {"allocation": {"include": {"_tier_preference": "data_content"}}},
                          "number_of_shards": "1", "provided_name": self.name,
                          "creation_date": str(self.created_ms), "number_of_replicas": "1",
                          "uuid": self.uuid, "version": {"created": "8512000"}}}
        return deep_merge(base, self.settings)

    def describe(self):
        return {"aliases": dict(self.aliases), "mappings": copy.deepcopy(self.mappings),
                "settings": self.full_settings()}


class Template:
    def __init__(self, name, body):
        self.name = name
        self.body = body

    @property
    def patterns(self):
        return self.body["index_patterns"]

    @property
    def priority(self):
        return self.body.get("priority", 0)


# --------------------------------------------------------------------------- the store

class Store:
    def __init__(self, args):
        self.args = args
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.default_refresh_ms = args.refresh_interval_ms
        self.cluster_uuid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode()[:22]
        self.search_cache = {}
        self._reset_all()
        if args.data and os.path.exists(args.data):
            self._load(args.data)

    # ---- state
    def _reset_all(self):
        self.indices = {}
        self.templates = {}
        self.pits = {}
        self.search_cache = {}
        self.override_refresh_ms = None
        self._reset_faults()
        self._reset_stats()

    def _reset_faults(self):
        self.down = None            # None or {"mode":..., "until": monotonic|None}
        self.storm = None           # dict with remaining count
        self.fail_items = None
        self.fail_counts = Counter()
        self.item_counter = 0
        self.latency_ms = 0
        self.override_refresh_ms = None

    def _reset_stats(self):
        self.stats = {"requests_total": 0, "requests": Counter(), "responses": Counter(),
                      "connections_dropped": 0, "storm_responses": 0, "auth_failures": 0,
                      "bulk": Counter(), "pits_opened": 0, "pits_closed": 0}

    # ---- persistence (--data)
    def persist(self):
        path = self.args.data
        if not path:
            return
        with self.lock:
            data = {"format": 1, "templates": {n: t.body for n, t in self.templates.items()},
                    "indices": {}}
            for n, ix in self.indices.items():
                data["indices"][n] = {
                    "uuid": ix.uuid, "created_ms": ix.created_ms, "settings": ix.settings,
                    "mappings": ix.mappings, "template": ix.template, "seq_no": ix.seq_no,
                    "docseq": ix.docseq,
                    "docs": [[d.id, d.version, d.seq_no, d.docseq, d.source]
                             for d in ix.docs.values()]}
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f, separators=(",", ":"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

    def _load(self, path):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            sys.stderr.write(f"es-mock: cannot load --data {path}: {e}\n")
            sys.exit(2)
        for n, body in (data.get("templates") or {}).items():
            self.templates[n] = Template(n, body)
        for n, d in (data.get("indices") or {}).items():
            ix = Index(n, d.get("settings") or {}, d.get("mappings") or {}, d.get("template"),
                       d.get("created_ms"), d.get("uuid"))
            ix.seq_no, ix.docseq = d.get("seq_no", -1), d.get("docseq", 0)
            for id_, ver, seq, dseq, src in d.get("docs", []):
                ix.docs[id_] = Doc(id_, src, ver, seq, dseq)
            ix.visible = dict(ix.docs)    # shard recovery refreshes: everything visible
            self.indices[n] = ix

    # ---- refresh
    def effective_refresh_ms(self, ix):
        if self.override_refresh_ms is not None:
            return self.override_refresh_ms
        v = ix.refresh_interval_setting()
        return self.default_refresh_ms if v is None else v

    def refresh_index(self, ix):
        ix.visible = dict(ix.docs)
        ix.dirty_since = None
        ix.last_refresh = time.monotonic()
        ix.refresh_gen += 1
        ix.refreshes += 1
        self.cond.notify_all()

    def mark_dirty(self, ix):
        if ix.dirty_since is None:
            ix.dirty_since = time.monotonic()

    def refresher(self):
        """Periodic refresh. A change becomes visible refresh_interval after the first
        unrefreshed change (the pessimistic end of Elasticsearch's 0..interval window)."""
        while True:
            time.sleep(0.02)
            with self.lock:
                now = time.monotonic()
                for ix in list(self.indices.values()):
                    if ix.dirty_since is None:
                        continue
                    iv = self.effective_refresh_ms(ix)
                    if iv >= 0 and (now - ix.dirty_since) * 1000 >= iv:
                        self.refresh_index(ix)
                if self.down and self.down.get("until") and now >= self.down["until"]:
                    self.down = None
                for pid, pit in list(self.pits.items()):
                    if now >= pit["expires"]:
                        del self.pits[pid]

    # ---- index resolution (multi-target syntax)
    def resolve(self, expr, params, *, default_all=True, for_write=False):
        ignore_unavailable = parse_bool_param(params, "ignore_unavailable", False)
        allow_no_indices = parse_bool_param(params, "allow_no_indices", True)
        ew = params.get("expand_wildcards", "open")
        show_hidden = "all" in ew or "hidden" in ew
        names = sorted(self.indices)
        if expr in (None, "", "_all", "*"):
            if not default_all:
                return []
            res = [n for n in names if show_hidden or not n.startswith(".")]
            if not res and not allow_no_indices:
                raise index_not_found(expr or "_all")
            return res
        result = []
        wildcard_seen = False
        for i, part in enumerate(expr.split(",")):
            part = part.strip()
            if not part:
                continue
            if part.startswith("-") and i > 0 and wildcard_seen:
                pat = part[1:]
                result = [n for n in result if not glob_match(pat, n)]
                continue
            if "*" in part:
                wildcard_seen = True
                hits = [n for n in names if glob_match(part, n) and
                        (show_hidden or not n.startswith(".") or part.startswith("."))]
                if not hits and not allow_no_indices:
                    raise index_not_found(part)
                result.extend(h for h in hits if h not in result)
            elif part == "_all":
                result.extend(n for n in names if n not in result)
            else:
                if part in self.indices:
                    if part not in result:
                        result.append(part)
                elif not ignore_unavailable:
                    raise index_not_found(part)
        return result

    def matching_template(self, name):
        best = None
        for t in self.templates.values():
            if any(glob_match(p, name) for p in t.patterns):
                if best is None or t.priority > best.priority:
                    best = t
        return best

    def create_index(self, name, body=None):
        validate_index_name(name)
        body = body or {}
        tpl = self.matching_template(name)
        settings, mappings, aliases = {}, {}, {}
        if tpl:
            if "data_stream" in tpl.body:
                raise bad_request(MOCK + f"index template [{tpl.name}] creates data streams; "
                                  "data streams are not implemented by the mock")
            t = tpl.body.get("template") or {}
            settings = normalize_settings(t.get("settings"))
            mappings = normalize_mappings(t.get("mappings"))
            aliases = t.get("aliases") or {}
        if body.get("settings"):
            settings = deep_merge(settings, normalize_settings(body["settings"]))
        if body.get("mappings"):
            mappings = deep_merge(mappings, normalize_mappings(body["mappings"]))
        ix = Index(name, settings, mappings, tpl.name if tpl else None)
        ix.aliases = dict(aliases, **(body.get("aliases") or {}))
        self.indices[name] = ix
        return ix


# --------------------------------------------------------------------------- the API

class Api:
    """Request handlers. Each returns (status, body_obj_or_None, extra_headers)."""

    def __init__(self, store):
        self.s = store

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def check_params(params, path, allowed):
        common = {"pretty", "human", "error_trace", "filter_path", "format"}
        bad = [k for k in params if k not in allowed and k not in common]
        if bad:
            if len(bad) == 1:
                raise bad_request(f"request [{path}] contains unrecognized parameter: [{bad[0]}]")
            raise bad_request(f"request [{path}] contains unrecognized parameters: " +
                              ", ".join(f"[{b}]" for b in bad))

    @staticmethod
    def json_body(raw, required=False, what="request body"):
        if not raw or not raw.strip():
            if required:
                raise EsError(400, "parse_exception", "request body is required")
            return None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise json_error(ValueError("Invalid UTF-8 start byte"), what)
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise json_error(e, what)

    # ---------------------------------------------------------------- root
    def root(self, req):
        self.check_params(req.params, req.path, set())
        body = {"name": "es-mock", "cluster_name": self.s.args.cluster_name,
                "cluster_uuid": self.s.cluster_uuid,
                "version": {"number": self.s.args.es_version, "build_flavor": "default",
                            "build_type": "docker",
                            "build_hash": "0000000000000000000000000000000000000000",
                            "build_date": "2024-08-05T10:05:34.233336849Z",
                            "build_snapshot": False, "lucene_version": LUCENE_VERSION,
                            "minimum_wire_compatibility_version": "7.17.0",
                            "minimum_index_compatibility_version": "7.0.0"},
                "tagline": "You Know, for Search"}
        return 200, body

    def health(self, req, expr=None):
        """GET /_cluster/health: one node, replicas unassigned -> "yellow" once any index
        exists (cluster-health.html)."""
        self.check_params(req.params, req.path, {
            "level", "local", "master_timeout", "timeout", "wait_for_active_shards",
            "wait_for_events", "wait_for_nodes", "wait_for_no_relocating_shards",
            "wait_for_no_initializing_shards", "wait_for_status", "expand_wildcards"})
        with self.s.lock:
            names = self.s.resolve(expr, req.params)
        n = len(names)
        return 200, {"cluster_name": self.s.args.cluster_name,
                     "status": "yellow" if n else "green", "timed_out": False,
                     "number_of_nodes": 1, "number_of_data_nodes": 1, "active_primary_shards": n,
                     "active_shards": n, "relocating_shards": 0, "initializing_shards": 0,
                     "unassigned_shards": n, "delayed_unassigned_shards": 0,
                     "number_of_pending_tasks": 0, "number_of_in_flight_fetch": 0,
                     "task_max_waiting_in_queue_millis": 0,
                     "active_shards_percent_as_number": 100.0 if not n else 50.0}

    # ---------------------------------------------------------------- writes
    def _write_one(self, action, index, meta, source_raw, src_obj, refresh_touched, line_no):
        """Apply one write action. Returns (status, result dict for the items array).
        Called with the store lock held."""
        s = self.s
        st = s.stats["bulk"]
        doc_id = meta.get("_id")
        if doc_id is not None and not isinstance(doc_id, str):
            doc_id = json.dumps(doc_id) if not isinstance(doc_id, (int, float)) else str(doc_id)
        if action in ("index", "create") and doc_id is None:
            doc_id = gen_id()
        item = {"_index": index, "_id": doc_id}

        def fail(status, etype, reason, ix=None, **extra):
            err = {"type": etype, "reason": reason}
            if ix is not None:
                err.update({"index_uuid": ix.uuid, "shard": "0", "index": ix.name})
            err.update(extra)
            out = dict(item, status=status, error=err)
            return status, out

        if doc_id is not None:
            if doc_id == "":
                return fail(400, "illegal_argument_exception",
                            "if _id is specified it must not be empty")
            if len(doc_id.encode()) > 512:
                return fail(400, "illegal_argument_exception",
                            f"id [{doc_id}] is too long, must be no longer than 512 bytes but "
                            f"was: {len(doc_id.encode())}")
        pipeline = meta.get("pipeline")
        if pipeline not in (None, "_none"):
            return fail(400, "illegal_argument_exception",
                        f"pipeline with id [{pipeline}] does not exist")
        if meta.get("require_alias") is True:
            return fail(404, "index_not_found_exception",
                        f"no such index [{index}] and [require_alias] request flag is [true] "
                        f"and [{index}] is not an alias", **{"index": index})

        # fault injection (per item)
        fi = s.fail_items
        if fi and (fi.get("index") in (None, index)):
            s.item_counter += 1
            selected = False
            if fi.get("ids") is not None:
                selected = doc_id in fi["ids"]
            elif fi.get("every_nth"):
                selected = s.item_counter % fi["every_nth"] == 0
            times = fi.get("times", 1)
            if selected and (times < 0 or s.fail_counts[doc_id] < times):
                s.fail_counts[doc_id] += 1
                st["items_failed_injected"] += 1
                status = fi.get("status", 429)
                etype, reason = fault_error(status, index, fi.get("type"), fi.get("reason"),
                                            item_level=True)
                ix = s.indices.get(index)
                out = dict(item, status=status, error=dict(
                    {"type": etype, "reason": reason},
                    **({"index_uuid": ix.uuid, "shard": "0", "index": index} if ix else {})))
                return status, out

        ix = s.indices.get(index)
        if ix is None:
            if action == "delete":
                # deletes don't auto-create; ES answers not_found for a missing doc/index
                ix = None
            else:
                try:
                    ix = s.create_index(index)
                except EsError as e:
                    return fail(e.status, e.etype, e.reason, **e.extra)
        if ix is None:
            return 404, dict(item, _version=1, result="not_found", _shards=SHARDS_WRITE,
                             _seq_no=0, _primary_term=1, status=404)

        existing = ix.docs.get(doc_id)
        # optimistic concurrency
        if "if_seq_no" in meta or "if_primary_term" in meta:
            want_seq, want_term = meta.get("if_seq_no"), meta.get("if_primary_term", 1)
            if existing is None or existing.seq_no != want_seq or want_term != 1:
                cur = (f"current document has seqNo [{existing.seq_no}] and primary term [1]"
                       if existing else "document does not exist (expected seqNo "
                       f"[{want_seq}] and primary term [{want_term}])")
                reason = (f"[{doc_id}]: version conflict, required seqNo [{want_seq}], primary "
                          f"term [{want_term}]. {cur}" if existing else
                          f"[{doc_id}]: version conflict, {cur}")
                return fail(409, "version_conflict_engine_exception", reason, ix)
        vtype = meta.get("version_type")
        if vtype in ("external", "external_gte") and "version" in meta and action != "delete":
            v = int(meta["version"])
            if existing is not None and (v <= existing.version if vtype == "external"
                                         else v < existing.version):
                return fail(409, "version_conflict_engine_exception",
                            f"[{doc_id}]: version conflict, current version "
                            f"[{existing.version}] is higher or equal to the one provided [{v}]",
                            ix)

        if action == "delete":
            if existing is None:
                ix.seq_no += 1
                return 404, dict(item, _version=1, result="not_found", _shards=SHARDS_WRITE,
                                 _seq_no=ix.seq_no, _primary_term=1, status=404)
            del ix.docs[doc_id]
            ix.seq_no += 1
            s.mark_dirty(ix)
            refresh_touched.add(ix.name)
            st["deleted"] += 1
            return 200, dict(item, _version=existing.version + 1, result="deleted",
                             _shards=SHARDS_WRITE, _seq_no=ix.seq_no, _primary_term=1,
                             status=200)

        if action == "update":
            body = src_obj
            if not isinstance(body, dict):
                return fail(400, "illegal_argument_exception", "update body must be an object")
            if "script" in body:
                return fail(400, "illegal_argument_exception",
                            MOCK + "scripted updates are not implemented by the mock")
            if existing is None:
                if body.get("doc_as_upsert") and isinstance(body.get("doc"), dict):
                    new_src = body["doc"]
                elif isinstance(body.get("upsert"), dict):
                    new_src = body["upsert"]
                else:
                    return fail(404, "document_missing_exception",
                                f"[{doc_id}]: document missing", ix)
            else:
                if not isinstance(body.get("doc"), dict):
                    return fail(400, "action_request_validation_exception",
                                "Validation Failed: 1: script or doc is missing;")
                new_src = deep_merge(existing.source, body["doc"])
                if new_src == existing.source and body.get("detect_noop", True):
                    return 200, dict(item, _version=existing.version, result="noop",
                                     _shards={"total": 0, "successful": 0, "failed": 0},
                                     _seq_no=existing.seq_no, _primary_term=1, status=200)
            src_obj = new_src
        else:
            if src_obj is _BAD_JSON or not isinstance(src_obj, dict):
                detail = (source_raw[1] if isinstance(source_raw, tuple) else
                          "failed to parse, document is empty" if src_obj is None else
                          "failed to parse: source is not an object")
                return fail(400, "document_parsing_exception", f"[1:1] {detail}", ix)
            if action == "create" and existing is not None:
                ix.create_conflicts += 1
                st["create_conflicts"] += 1
                return fail(409, "version_conflict_engine_exception",
                            f"[{doc_id}]: version conflict, document already exists (current "
                            f"version [{existing.version}])", ix)

        # mapping (dynamic mapping / type checks)
        try:
            try:
                map_document(ix.mappings, src_obj, doc_id, writable=False)
            except _NeedsUpdate:
                newmap = copy.deepcopy(ix.mappings)
                map_document(newmap, src_obj, doc_id, writable=True)
                ix.mappings = newmap
        except DocParseError as e:
            return fail(400, e.etype, e.reason, ix,
                        **({"caused_by": e.caused_by} if e.caused_by else {}))

        ix.seq_no += 1
        ix.docseq += 1
        if existing is None:
            version = int(meta["version"]) if vtype in ("external", "external_gte") else 1
            ix.docs[doc_id] = Doc(doc_id, src_obj, version, ix.seq_no, ix.docseq)
            status, result = 201, "created"
            st["created"] += 1
        else:
            version = (int(meta["version"]) if vtype in ("external", "external_gte")
                       else existing.version + 1)
            ix.docs[doc_id] = Doc(doc_id, src_obj, version, ix.seq_no, ix.docseq)
            status, result = 200, "updated"
            st["updated"] += 1
            if action == "index":
                ix.overwrites += 1
                st["overwrites"] += 1
        s.mark_dirty(ix)
        refresh_touched.add(ix.name)
        return status, dict(item, _version=version, result=result, _shards=SHARDS_WRITE,
                            _seq_no=ix.seq_no, _primary_term=1, status=status)

    def _finish_refresh(self, refresh, touched, items):
        """Apply ?refresh semantics for a write request (store lock NOT held)."""
        s = self.s
        if refresh in ("true", ""):
            with s.lock:
                for n in touched:
                    ix = s.indices.get(n)
                    if ix is not None:
                        s.refresh_index(ix)
            for it in items:
                if it.get("status", 500) < 300:
                    it["forced_refresh"] = True
        elif refresh == "wait_for":
            with s.lock:
                targets = [(s.indices[n], s.indices[n].refresh_gen + 1) for n in touched
                           if n in s.indices and s.indices[n].dirty_since is not None]
                while any(ix.refresh_gen < gen and s.indices.get(ix.name) is ix
                          for ix, gen in targets):
                    s.cond.wait(0.5)

    @staticmethod
    def refresh_param(params):
        r = params.get("refresh", "false")
        if r not in ("true", "false", "wait_for", ""):
            raise bad_request(f"Unknown value for refresh: [{r}].")
        return r

    def bulk(self, req, path_index=None):
        s = self.s
        self.check_params(req.params, req.path, {
            "refresh", "routing", "timeout", "wait_for_active_shards", "pipeline",
            "require_alias", "require_data_stream", "_source", "_source_includes",
            "_source_excludes", "list_executed_pipelines", "include_source_on_error"})
        refresh = self.refresh_param(req.params)
        t0 = time.monotonic()
        raw = req.body
        if not raw:
            raise EsError(400, "parse_exception", "request body is required")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise bad_request("The bulk request must be UTF-8 encoded")
        if not text.endswith("\n"):
            raise bad_request("The bulk request must be terminated by a newline [\\n]")
        default_pipeline = req.params.get("pipeline")
        default_require_alias = parse_bool_param(req.params, "require_alias", False)
        lines = text.split("\n")[:-1]
        ops = []
        i = 0
        while i < len(lines):
            line = lines[i].rstrip("\r")
            line_no = i + 1
            i += 1
            if not line.strip():
                continue
            try:
                act = json.loads(line)
            except json.JSONDecodeError as e:
                raise EsError(400, "x_content_parse_exception",
                              f"[{e.lineno}:{e.colno}] Malformed action/metadata line "
                              f"[{line_no}]: {e.msg}",
                              caused_by={"type": "json_parse_exception", "reason": e.msg})
            if not isinstance(act, dict):
                raise bad_request(f"Malformed action/metadata line [{line_no}], expected "
                                  f"START_OBJECT but found [{_tok(act)}]")
            if len(act) != 1:
                raise bad_request(f"Malformed action/metadata line [{line_no}], expected "
                                  f"a simple value for field [{list(act)[0]}] but found "
                                  f"[START_OBJECT]" if act else
                                  f"Malformed action/metadata line [{line_no}], expected "
                                  f"FIELD_NAME but found [END_OBJECT]")
            (action, meta), = act.items()
            if action not in ("index", "create", "delete", "update"):
                raise bad_request(f"Malformed action/metadata line [{line_no}], expected one of "
                                  f"[create, delete, index, update] but found [{action}]")
            if not isinstance(meta, dict):
                raise bad_request(f"Malformed action/metadata line [{line_no}], expected "
                                  f"START_OBJECT or END_OBJECT but found [{_tok(meta)}]")
            allowed = {"_index", "_id", "routing", "version", "version_type", "if_seq_no",
                       "if_primary_term", "op_type", "pipeline", "require_alias",
                       "require_data_stream", "dynamic_templates", "retry_on_conflict",
                       "_source", "list_executed_pipelines"}
            for k in meta:
                if k not in allowed:
                    raise bad_request(f"Action/metadata line [{line_no}] contains an unknown "
                                      f"parameter [{k}]")
            meta = dict(meta)
            if action == "index" and meta.get("op_type") == "create":
                action = "create"
            meta.setdefault("pipeline", default_pipeline)
            if default_require_alias and "require_alias" not in meta:
                meta["require_alias"] = True
            index = meta.get("_index", path_index)
            if index is not None and not isinstance(index, str):
                index = json.dumps(index)
            src_raw, src_obj = None, None
            if action != "delete":
                if i >= len(lines):
                    raise bad_request("The bulk request must be terminated by a newline [\\n]")
                src_line = lines[i].rstrip("\r")
                i += 1
                try:
                    src_obj = json.loads(src_line) if src_line.strip() else None
                except json.JSONDecodeError as e:
                    src_obj = _BAD_JSON
                    src_raw = ("bad", f"failed to parse: [{e.lineno}:{e.colno}] {e.msg}")
            ops.append((action, index, meta, src_raw, src_obj, line_no))
        if not ops:
            raise validation_error("no requests added")
        missing = [n for n, op in enumerate(ops) if not op[1]]
        if missing:
            raise validation_error(*["index is missing" for _ in missing])

        items = []
        touched = set()
        with s.lock:
            st = s.stats["bulk"]
            st["requests"] += 1
            for action, index, meta, src_raw, src_obj, line_no in ops:
                st["items"] += 1
                status, res = self._write_one(action, index, meta, src_raw, src_obj, touched,
                                              line_no)
                if status >= 300 and not (action == "delete" and status == 404):
                    st["items_failed"] += 1
                else:
                    st["items_succeeded"] += 1
                items.append((action, res))
            s.persist()
        results = [r for _, r in items]
        self._finish_refresh(refresh, touched, results)
        errors = any(r.get("error") is not None for r in results)
        took = int((time.monotonic() - t0) * 1000)
        return 200, {"errors": errors, "took": took, "items": [{a: r} for a, r in items]}

    def single_write(self, req, index, doc_id, action):
        s = self.s
        self.check_params(req.params, req.path, {
            "refresh", "routing", "timeout", "wait_for_active_shards", "pipeline",
            "require_alias", "op_type", "version", "version_type", "if_seq_no",
            "if_primary_term", "include_source_on_error", "require_data_stream"})
        refresh = self.refresh_param(req.params)
        if req.params.get("op_type") == "create":
            action = "create"
        elif req.params.get("op_type") not in (None, "index", "create"):
            raise bad_request(f"opType must be 'create' or 'index', found: "
                              f"[{req.params['op_type']}]")
        meta = {"_id": doc_id} if doc_id is not None else {}
        for k in ("version", "if_seq_no", "if_primary_term"):
            if k in req.params:
                meta[k] = int(req.params[k])
        for k in ("version_type", "pipeline"):
            if k in req.params:
                meta[k] = req.params[k]
        meta["require_alias"] = parse_bool_param(req.params, "require_alias", False)
        src_raw, src_obj = None, None
        if action != "delete":
            if not req.body or not req.body.strip():
                raise EsError(400, "parse_exception", "request body is required")
            src_obj = self.json_body(req.body)
            if not isinstance(src_obj, dict):
                raise EsError(400, "document_parsing_exception",
                              "[1:1] failed to parse: source is not an object")
        touched = set()
        with s.lock:
            s.stats["bulk"]["single_doc_requests"] += 1
            status, res = self._write_one(action, index, meta, src_raw, src_obj, touched, 1)
            s.persist()
        if "error" in res:
            err = res["error"]
            e = EsError(status, err["type"], err["reason"],
                        extra={k: v for k, v in err.items()
                               if k not in ("type", "reason", "caused_by")},
                        caused_by=err.get("caused_by"))
            raise e
        self._finish_refresh(refresh, touched, [res])
        res.pop("status", None)
        return status, res

    def get_doc(self, req, index, doc_id, head=False):
        self.check_params(req.params, req.path, {
            "realtime", "refresh", "routing", "preference", "stored_fields", "_source",
            "_source_includes", "_source_excludes", "version", "version_type"})
        s = self.s
        with s.lock:
            ix = s.indices.get(index)
            if ix is None:
                if head:
                    return 404, None
                raise index_not_found(index, resource_type="index_expression")
            if parse_bool_param(req.params, "refresh", False):
                s.refresh_index(ix)
            realtime = parse_bool_param(req.params, "realtime", True)
            doc = (ix.docs if realtime else ix.visible).get(doc_id)
        if head:
            return (200 if doc else 404), None
        if doc is None:
            return 404, {"_index": index, "_id": doc_id, "found": False}
        body = {"_index": index, "_id": doc_id, "_version": doc.version, "_seq_no": doc.seq_no,
                "_primary_term": 1, "found": True}
        src = self._source_param(req.params)
        if src is not False:
            body["_source"] = filter_source(doc.source, *src) if src else doc.source
        return 200, body

    @staticmethod
    def _source_param(params):
        v = params.get("_source")
        if v == "false":
            return False
        inc = params.get("_source_includes") or (v if v not in (None, "true", "") else None)
        exc = params.get("_source_excludes")
        if inc or exc:
            return ([x for x in (inc or "").split(",") if x], [x for x in (exc or "").split(",") if x])
        return None

    # ---------------------------------------------------------------- refresh
    def refresh(self, req, index_expr=None):
        self.check_params(req.params, req.path, {"ignore_unavailable", "allow_no_indices",
                                                 "expand_wildcards"})
        s = self.s
        with s.lock:
            names = s.resolve(index_expr, req.params)
            for n in names:
                s.refresh_index(s.indices[n])
        n = len(names)
        return 200, {"_shards": {"total": 2 * n, "successful": n, "failed": 0}}

    # ---------------------------------------------------------------- indices
    def index_get(self, req, expr, what=None):
        self.check_params(req.params, req.path, {
            "ignore_unavailable", "allow_no_indices", "expand_wildcards", "flat_settings",
            "include_defaults", "local", "master_timeout", "features"})
        s = self.s
        with s.lock:
            names = s.resolve(expr, req.params)
            if not names and "*" not in (expr or "*"):
                raise index_not_found(expr)
            out = {}
            for n in names:
                d = s.indices[n].describe()
                if what == "mappings":
                    out[n] = {"mappings": d["mappings"]}
                elif what == "settings":
                    out[n] = {"settings": d["settings"]}
                else:
                    out[n] = d
        return 200, out

    def index_head(self, req, expr):
        s = self.s
        with s.lock:
            try:
                names = s.resolve(expr, req.params)
            except EsError:
                return 404, None
        return (200 if names else 404), None

    def index_create(self, req, name):
        self.check_params(req.params, req.path, {"wait_for_active_shards", "timeout",
                                                 "master_timeout"})
        body = self.json_body(req.body) or {}
        if not isinstance(body, dict):
            raise parsing_error("request body must be an object")
        for k in body:
            if k not in ("settings", "mappings", "aliases"):
                raise parsing_error(f"unknown key [{k}] for create index")
        s = self.s
        with s.lock:
            if name in s.indices:
                ix = s.indices[name]
                raise EsError(400, "resource_already_exists_exception",
                              f"index [{name}/{ix.uuid}] already exists",
                              extra={"index_uuid": ix.uuid, "index": name})
            s.create_index(name, body)
            s.persist()
        return 200, {"acknowledged": True, "shards_acknowledged": True, "index": name}

    def index_delete(self, req, expr):
        self.check_params(req.params, req.path, {"ignore_unavailable", "allow_no_indices",
                                                 "expand_wildcards", "timeout",
                                                 "master_timeout"})
        if "*" in expr or expr == "_all":
            raise bad_request("Wildcard expressions or all indices are not allowed")
        s = self.s
        with s.lock:
            names = s.resolve(expr, req.params)
            for n in names:
                del s.indices[n]
            s.search_cache.clear()
            s.persist()
        return 200, {"acknowledged": True}

    # ---------------------------------------------------------------- templates
    def template_put(self, req, name):
        self.check_params(req.params, req.path, {"create", "master_timeout", "cause"})
        body = self.json_body(req.body, required=True)
        if not isinstance(body, dict):
            raise parsing_error("request body must be an object")
        allowed = {"index_patterns", "template", "composed_of", "priority", "version", "_meta",
                   "data_stream", "allow_auto_create", "ignore_missing_component_templates",
                   "deprecated"}
        for k in body:
            if k not in allowed:
                raise EsError(400, "x_content_parse_exception",
                              f"[1:2] [index_template] unknown field [{k}]")
        pats = body.get("index_patterns")
        if isinstance(pats, str):
            pats = [pats]
        if not pats:
            raise validation_error("index patterns are missing")
        if not isinstance(pats, list) or not all(isinstance(p, str) for p in pats):
            raise EsError(400, "x_content_parse_exception",
                          "[1:2] [index_template] failed to parse field [index_patterns]")
        prio = body.get("priority", None)
        if prio is not None and (not isinstance(prio, int) or isinstance(prio, bool) or prio < 0):
            raise validation_error("index template priority must be >= 0")
        composed = body.get("composed_of") or []
        if composed:
            raise EsError(400, "invalid_index_template_exception",
                          f"index_template [{name}] invalid, cause [index template [{name}] "
                          f"specifies component templates {json.dumps(composed)} that do not "
                          f"exist]" + " " + MOCK + "component templates are not implemented")
        tpl = body.get("template") or {}
        if not isinstance(tpl, dict):
            raise parsing_error("[template] must be an object")
        for k in tpl:
            if k not in ("settings", "mappings", "aliases", "lifecycle"):
                raise EsError(400, "x_content_parse_exception",
                              f"[1:2] [template] unknown field [{k}]")
        norm_tpl = {}
        if "settings" in tpl:
            norm_tpl["settings"] = normalize_settings(tpl["settings"])
            v = (norm_tpl["settings"].get("index") or {}).get("refresh_interval")
            if v is not None:
                parse_time_ms(v, "index.refresh_interval")
        if "mappings" in tpl:
            norm_tpl["mappings"] = normalize_mappings(tpl["mappings"])
        if "aliases" in tpl:
            norm_tpl["aliases"] = tpl["aliases"]
        stored = {"index_patterns": pats, "composed_of": []}
        if norm_tpl:
            stored["template"] = norm_tpl
        for k in ("priority", "version", "_meta", "data_stream", "allow_auto_create",
                  "ignore_missing_component_templates", "deprecated"):
            if k in body:
                stored[k] = body[k]
        s = self.s
        with s.lock:
            if parse_bool_param(req.params, "create", False) and name in s.templates:
                raise bad_request(f"index template [{name}] already exists")
            for other in s.templates.values():
                if other.name == name or other.priority != (prio or 0):
                    continue
                clash = [p for p in pats if any(globs_intersect(p, q) for q in other.patterns)]
                if clash:
                    raise bad_request(
                        f"index template [{name}] has index patterns {json.dumps(pats)} matching "
                        f"patterns from existing templates [{other.name}] with patterns "
                        f"({other.name} => {json.dumps(other.patterns)}) that have the same "
                        f"priority [{prio or 0}], multiple index templates may not match during "
                        f"index creation, please use a different priority")
            s.templates[name] = Template(name, stored)
            s.persist()
        return 200, {"acknowledged": True}

    def template_get(self, req, name=None, head=False):
        self.check_params(req.params, req.path, {"flat_settings", "local", "master_timeout",
                                                 "include_defaults"})
        s = self.s
        with s.lock:
            if name in (None, "*", "_all"):
                found = list(s.templates.values())
            else:
                found = [t for t in s.templates.values()
                         if any(glob_match(p, t.name) for p in name.split(","))]
        found.sort(key=lambda t: t.name)
        if not found and name not in (None, "*", "_all") and "*" not in name:
            if head:
                return 404, None
            raise EsError(404, "resource_not_found_exception",
                          f"index template matching [{name}] not found")
        if head:
            return (200 if found else 404), None
        return 200, {"index_templates": [{"name": t.name, "index_template": copy.deepcopy(t.body)}
                                         for t in found]}

    def template_delete(self, req, name):
        self.check_params(req.params, req.path, {"master_timeout", "timeout"})
        s = self.s
        with s.lock:
            names = [n for n in s.templates if any(glob_match(p, n) for p in name.split(","))]
            if not names:
                raise EsError(404, "resource_not_found_exception",
                              f"index_template matching [{name}] not found")
            for n in names:
                del s.templates[n]
            s.persist()
        return 200, {"acknowledged": True}

    # ---------------------------------------------------------------- point in time
    def pit_open(self, req, expr):
        self.check_params(req.params, req.path, {
            "keep_alive", "ignore_unavailable", "expand_wildcards", "preference", "routing",
            "allow_partial_search_results", "max_concurrent_shard_requests"})
        ka = req.params.get("keep_alive")
        if ka is None:
            raise validation_error("[keep_alive] is not specified")
        ka_ms = parse_time_ms(ka, "keep_alive")
        s = self.s
        with s.lock:
            names = s.resolve(expr, req.params)
            snap = [(n, s.indices[n], s.indices[n].visible) for n in names]
            pid = base64.urlsafe_b64encode(b"esmock-pit:" + secrets.token_bytes(18)).decode()
            s.pits[pid] = {"snap": snap, "expires": time.monotonic() + ka_ms / 1000.0}
            s.stats["pits_opened"] += 1
        n = len(names)
        return 200, {"id": pid, "_shards": {"total": n, "successful": n, "skipped": 0,
                                            "failed": 0}}

    def pit_close(self, req):
        self.check_params(req.params, req.path, set())
        body = self.json_body(req.body, required=True)
        if not isinstance(body, dict) or not isinstance(body.get("id"), str):
            raise validation_error("id is missing")
        self._check_pit_id(body["id"])
        s = self.s
        with s.lock:
            pit = s.pits.pop(body["id"], None)
            if pit:
                s.stats["pits_closed"] += 1
        if pit is None:
            return 404, {"succeeded": True, "num_freed": 0}
        return 200, {"succeeded": True, "num_freed": len(pit["snap"])}

    @staticmethod
    def _check_pit_id(pid):
        try:
            raw = base64.urlsafe_b64decode(pid.encode() + b"=" * (-len(pid) % 4))
        except (binascii.Error, ValueError):
            raw = b""
        if not raw.startswith(b"esmock-pit:"):
            raise bad_request("invalid id: [" + pid + "]")

    # ---------------------------------------------------------------- search & count
    SEARCH_PARAMS = {"size", "from", "track_total_hits", "ignore_unavailable",
                     "allow_no_indices", "expand_wildcards", "rest_total_hits_as_int",
                     "typed_keys", "timeout", "preference", "routing", "request_cache",
                     "batched_reduce_size", "ccs_minimize_roundtrips",
                     "max_concurrent_shard_requests", "search_type", "seq_no_primary_term",
                     "version", "_source", "_source_includes", "_source_excludes", "sort", "q",
                     "track_scores", "allow_partial_search_results", "scroll",
                     "pre_filter_shard_size", "ignore_throttled", "explain", "stored_fields",
                     "docvalue_fields", "terminate_after", "analyzer", "default_operator", "df",
                     "lenient", "analyze_wildcard", "stats", "suggest_field",
                     "include_named_queries_score", "force_synthetic_source"}
    BODY_KEYS = {"query", "sort", "size", "from", "search_after", "track_total_hits", "pit",
                 "_source", "timeout", "version", "seq_no_primary_term", "track_scores",
                 "terminate_after", "stored_fields", "explain"}
    UNSUPPORTED_BODY = {"aggs", "aggregations", "collapse", "highlight", "rescore",
                        "script_fields", "suggest", "knn", "runtime_mappings", "post_filter",
                        "min_score", "indices_boost", "docvalue_fields", "fields", "slice",
                        "retriever", "rank", "stats", "profile", "ext", "sub_searches",
                        "point_in_time"}

    def search(self, req, expr=None, count=False):
        s = self.s
        t0 = time.monotonic()
        params = req.params
        self.check_params(params, req.path, self.SEARCH_PARAMS if not count else {
            "ignore_unavailable", "allow_no_indices", "expand_wildcards", "q", "min_score",
            "preference", "routing", "terminate_after", "analyzer", "analyze_wildcard",
            "default_operator", "df", "lenient", "ignore_throttled"})
        for p in ("q", "scroll"):
            if p in params:
                raise bad_request(MOCK + f"the [{p}] parameter is not implemented by the mock")
        body = self.json_body(req.body)
        if body is None and not (req.body or b"").strip():
            body = {}
        if not isinstance(body, dict):
            raise parsing_error(f"Expected [START_OBJECT] but found [{_tok(body)}]")
        if count:
            for k in body:
                if k != "query":
                    raise parsing_error(f"request does not support [{k}]")
        else:
            for k in body:
                if k in self.UNSUPPORTED_BODY:
                    raise bad_request(MOCK + f"[{k}] is not implemented by the mock")
                if k not in self.BODY_KEYS:
                    raise parsing_error(f"Unknown key for a {_tok(body[k])} in [{k}].")
        ast = parse_query(body["query"]) if "query" in body else ("all", 1.0)
        if count:
            sort_specs, size, frm, after, pit_req = [], 0, 0, None, None
        else:
            sort_specs = parse_sort(body.get("sort"))
            if "sort" in params and "sort" not in body:
                sort_specs = parse_sort(params["sort"].split(","))
            size = body.get("size", params.get("size", 10))
            frm = body.get("from", params.get("from", 0))
            try:
                size, frm = int(size), int(frm)
            except (TypeError, ValueError):
                raise bad_request("[size] and [from] must be integers")
            if size < 0:
                raise bad_request(f"[size] parameter cannot be negative, found [{size}]")
            if frm < 0:
                raise bad_request(f"[from] parameter cannot be negative, found [{frm}]")
            after = body.get("search_after")
            if after is not None and not isinstance(after, list):
                raise parsing_error("[search_after] must be an array")
            pit_req = body.get("pit")
        tth = body.get("track_total_hits", params.get("track_total_hits", DEFAULT_TRACK_TOTAL_HITS))
        if tth in ("true", True):
            tth = True
        elif tth in ("false", False):
            tth = False
        else:
            try:
                tth = int(tth)
            except (TypeError, ValueError):
                raise bad_request(f"[track_total_hits] must be a boolean or an integer")
            if tth < -1:
                raise bad_request("[track_total_hits] parameter must be positive or equals to -1")
        if after is not None and frm not in (0, -1):
            raise validation_error("`from` parameter must be set to 0 when `search_after` is used")
        if after is not None and not sort_specs:
            raise validation_error("[search_after] cannot be used without sort") \
                if pit_req is None else validation_error("[search_after] requires [sort]")

        # targets
        pit = None
        with s.lock:
            if pit_req is not None:
                if not isinstance(pit_req, dict) or not isinstance(pit_req.get("id"), str):
                    raise parsing_error("[pit] requires an [id]")
                if expr not in (None, ""):
                    raise validation_error("[indices] cannot be used with point in time. Do not "
                                           "specify any index with point in time.")
                self._check_pit_id(pit_req["id"])
                pit = s.pits.get(pit_req["id"])
                if pit is None:
                    cause = {"type": "search_context_missing_exception",
                             "reason": f"No search context found for id [{pit_req['id'][:20]}]"}
                    raise all_shards_failed(cause, ["_na_"], 404)
                if "keep_alive" in pit_req:
                    ka = parse_time_ms(pit_req["keep_alive"], "keep_alive")
                    pit["expires"] = time.monotonic() + ka / 1000.0
                targets = [(n, ix, snap, ordinal) for ordinal, (n, ix, snap)
                           in enumerate(pit["snap"])]
            else:
                names = s.resolve(expr, params)
                targets = [(n, s.indices[n], s.indices[n].visible, ordinal)
                           for ordinal, n in enumerate(names)]
        if pit is not None and sort_specs and not any(sp.field == "_shard_doc"
                                                      for sp in sort_specs):
            sort_specs.append(SortSpec("_shard_doc", False, implicit=True))
        if pit is None and any(sp.field == "_shard_doc" for sp in sort_specs):
            raise validation_error("[_shard_doc] sort field cannot be used without "
                                   "[point in time]")
        if not count and targets and frm + size > MAX_RESULT_WINDOW:
            cause = {"type": "illegal_argument_exception",
                     "reason": f"Result window is too large, from + size must be less than or "
                               f"equal to: [{MAX_RESULT_WINDOW}] but was [{frm + size}]. See the "
                               "scroll api for a more efficient way to request large data sets. "
                               "This limit can be set by changing the [index.max_result_window] "
                               "index level setting."}
            raise all_shards_failed(cause, [t[0] for t in targets])

        scoring = not sort_specs or any(sp.field == "_score" for sp in sort_specs) or \
            bool(body.get("track_scores"))
        matched, failures = self._collect(targets, ast, sort_specs, scoring, count)
        if targets and len(failures) == len(targets):
            raise all_shards_failed(failures[0]["reason"], [f["index"] for f in failures],
                                    failures[0].get("_status", 400))
        for f in failures:
            f.pop("_status", None)
        shards = {"total": len(targets), "successful": len(targets) - len(failures),
                  "skipped": 0, "failed": len(failures)}
        if failures:
            shards["failures"] = failures
        total = len(matched)
        if count:
            return 200, {"count": total, "_shards": shards}

        # search_after
        start = 0
        if after is not None:
            if len(after) != len(sort_specs):
                # Checked on each shard, so reported as every shard failing.
                cause = {"type": "illegal_argument_exception",
                         "reason": f"search_after has {len(after)} value(s) but sort has "
                                   f"{len(sort_specs)}."}
                raise all_shards_failed(cause, [t[0] for t in targets])
            after_key = SortKey(self._after_values(after, sort_specs, targets), sort_specs)
            start = _bisect_keys(matched, after_key)
        page = matched[start + max(frm, 0): start + max(frm, 0) + size]

        src_opt = body.get("_source", None)
        if src_opt is None:
            sp = self._source_param(params)
            src_opt = sp if sp is not None else True
        elif isinstance(src_opt, (str, list)):
            src_opt = ([src_opt] if isinstance(src_opt, str) else src_opt, [])
        elif isinstance(src_opt, dict):
            inc = src_opt.get("includes", src_opt.get("include", []))
            exc = src_opt.get("excludes", src_opt.get("exclude", []))
            src_opt = ([inc] if isinstance(inc, str) else inc, [exc] if isinstance(exc, str) else exc)
        want_version = body.get("version") is True or params.get("version") == "true"
        want_seq = (body.get("seq_no_primary_term") is True or
                    params.get("seq_no_primary_term") == "true")
        hits = []
        max_score = None
        for key, _tie, name, doc, score, sortvals in page:
            h = {"_index": name, "_id": doc.id}
            if want_version:
                h["_version"] = doc.version
            if want_seq:
                h["_seq_no"], h["_primary_term"] = doc.seq_no, 1
            h["_score"] = score if scoring else None
            if src_opt is not False:
                h["_source"] = doc.source if src_opt is True else filter_source(doc.source, *src_opt)
            if sort_specs:
                h["sort"] = sortvals
            hits.append(h)
        if scoring and matched:
            max_score = max(m[4] for m in matched)
        hits_obj = {}
        if tth is not False:
            if tth is True or tth == -1 or total <= tth:
                tot = {"value": total, "relation": "eq"}
            else:
                tot = {"value": tth, "relation": "gte"}
            hits_obj["total"] = tot["value"] if params.get("rest_total_hits_as_int") == "true" \
                else tot
        hits_obj["max_score"] = max_score
        hits_obj["hits"] = hits
        resp = {}
        if pit is not None:
            resp["pit_id"] = pit_req["id"]
        resp.update({"took": int((time.monotonic() - t0) * 1000), "timed_out": False,
                     "_shards": shards, "hits": hits_obj})
        return 200, resp

    def _after_values(self, after, specs, targets):
        """Turn search_after values into comparable keys (incl. the missing sentinels)."""
        out = []
        for v, sp in zip(after, specs):
            if sp.field in ("_score",):
                out.append(float(v))
                continue
            if sp.field in ("_doc", "_shard_doc"):
                try:
                    out.append(int(v))
                except (TypeError, ValueError):
                    raise bad_request(f"Failed to parse search_after value for field "
                                      f"[{sp.field}].")
                continue
            ftype = None
            for _, ix, _, _ in targets:
                fi = lookup_field(ix.mappings, sp.field)
                if fi:
                    ftype = fi[1]
                    break
            if v is None:
                out.append(MISSING)
                continue
            fam = FIELD_FAMILY.get(ftype, "string")
            if fam in ("long", "double") and v == missing_sort_value(sp, ftype) and \
                    sp.missing in ("_last", "_first"):
                out.append(MISSING)
                continue
            try:
                if ftype in DATE_TYPES:
                    out.append(parse_date_ms(v))
                elif fam == "long":
                    out.append(int(v) if not isinstance(v, str) else int(float(v)))
                elif fam == "double":
                    out.append(float(v))
                else:
                    out.append(v if isinstance(v, str) else json.dumps(v)
                               if not isinstance(v, (int, float)) else str(v))
            except (TypeError, ValueError):
                raise bad_request(f"Failed to parse search_after value for field [{sp.field}].")
        return out

    def _collect(self, targets, ast, specs, scoring, count):
        """Match + sort (cached per snapshot). Returns (sorted rows, shard failures)."""
        s = self.s
        ckey = (tuple(t[0] for t in targets), repr(ast), tuple(sp.key() for sp in specs),
                scoring, count)
        snaps = tuple(t[2] for t in targets)
        maps = tuple(t[1].mappings for t in targets)
        with s.lock:
            hit = s.search_cache.get(ckey)
        if hit is not None and len(hit[0]) == len(snaps) and \
                all(a is b for a, b in zip(hit[0], snaps)) and \
                all(a is b for a, b in zip(hit[1], maps)):
            return hit[2], [dict(f) for f in hit[3]]
        rows, failures = [], []
        for name, ix, snap, ordinal in targets:
            mappings = ix.mappings
            try:
                fn = bind_query(ast, mappings, scoring)
                getters = [self._sort_getter(sp, mappings, name, ordinal) for sp in specs]
            except EsError as e:
                failures.append({"shard": 0, "index": name, "node": NODE_ID,
                                 "reason": e.cause(), "_status": e.status})
                continue
            for doc in snap.values():
                c = DocCtx(doc)
                score = fn(c)
                if score is None:
                    continue
                if count:
                    rows.append(None)
                    continue
                vals, out = [], []
                for g in getters:
                    k, o = g(c, score)
                    vals.append(k)
                    out.append(o)
                tie = (ordinal, doc.docseq)
                if not specs:
                    key = SortKey([score], [SortSpec("_score", True)])
                else:
                    key = SortKey(vals, specs)
                rows.append((key, tie, name, doc, score, out))
        if not count:
            rows.sort(key=lambda r: (r[0], r[1]))
        with s.lock:
            if len(s.search_cache) > 16:
                s.search_cache.clear()
            s.search_cache[ckey] = (snaps, maps, rows, [dict(f) for f in failures])
        return rows, failures

    def _sort_getter(self, sp, mappings, index_name, ordinal):
        """-> fn(ctx, score) returning (comparison key, value shown in hit.sort)."""
        f = sp.field
        if f == "_score":
            return lambda c, score: (score, score)
        if f == "_doc":
            return lambda c, score: (c.doc.docseq, c.doc.docseq)
        if f == "_shard_doc":
            base = ordinal << 32
            return lambda c, score: (base + c.doc.docseq, base + c.doc.docseq)
        if f == "_id":
            raise EsError(400, "illegal_argument_exception",
                          "Fielddata access on the _id field is disallowed, you can re-enable it "
                          "by updating the dynamic cluster setting: indices.id_field_data.enabled")
        fi = lookup_field(mappings, f)
        if fi is None or fi[1] in OBJECT_TYPES:
            if sp.unmapped_type:
                ut = sp.unmapped_type
                mv = missing_sort_value(sp, ut)
                return lambda c, score: (MISSING, mv)
            raise EsError(400, "query_shard_exception",
                          f"No mapping found for [{f}] in order to sort on",
                          extra={"index_uuid": "_na_", "index": index_name})
        t = fi[1]
        if t in TEXT_TYPES:
            raise EsError(400, "illegal_argument_exception",
                          f"Fielddata is disabled on [{f}] in [{index_name}]. Text fields are "
                          "not optimised for operations that require per-document field data "
                          "like aggregations and sorting, so these operations are disabled by "
                          "default. Please use a keyword field instead. Alternatively, set "
                          f"fielddata=true on [{f}] in order to load field data by uninverting "
                          "the inverted index. Note that this can use significant memory.")
        mv = missing_sort_value(sp, t)
        mode = sp.mode or ("max" if sp.desc else "min")
        custom_missing = sp.missing not in ("_last", "_first")
        if custom_missing:
            cm = typed_values([sp.missing], t, fi[2])
            cm = cm[0] if cm else MISSING

        def get(c, score):
            vals = c.values(fi)
            if not vals:
                if custom_missing and cm is not MISSING:
                    return cm, cm
                return MISSING, mv
            if mode == "min":
                v = min(vals)
            elif mode == "max":
                v = max(vals)
            elif mode in ("sum", "avg", "median") and all(isinstance(x, (int, float)) for x in vals):
                if mode == "sum":
                    v = sum(vals)
                elif mode == "avg":
                    v = sum(vals) / len(vals)
                else:
                    sv = sorted(vals)
                    v = sv[len(sv) // 2]
            else:
                v = min(vals)
            return v, v
        return get


_BAD_JSON = object()


def _tok(v):
    return ("START_OBJECT" if isinstance(v, dict) else "START_ARRAY" if isinstance(v, list)
            else "VALUE_STRING" if isinstance(v, str) else "VALUE_BOOLEAN"
            if isinstance(v, bool) else "VALUE_NULL" if v is None else "VALUE_NUMBER")


def _bisect_keys(rows, key):
    lo, hi = 0, len(rows)
    while lo < hi:
        mid = (lo + hi) // 2
        if key.cmp(rows[mid][0]) < 0:
            hi = mid
        else:
            lo = mid + 1
    return lo


def fault_error(status, index, etype=None, reason=None, item_level=False):
    """Elasticsearch-style error type/reason for an injected status."""
    if status == 429:
        d = ("es_rejected_execution_exception",
             ("rejected execution of primary operation [coordinating_and_primary_bytes=0, "
              "replica_bytes=0, all_bytes=0, primary_operation_bytes=1024, "
              "max_coordinating_and_primary_bytes=107374182]") if item_level else
             ("rejected execution of coordinating operation [coordinating_and_primary_bytes="
              "104759862, replica_bytes=0, all_bytes=104759862, coordinating_operation_bytes="
              "20862272, max_coordinating_and_primary_bytes=107374182]"))
    elif status == 503:
        d = (("unavailable_shards_exception",
              f"[{index}][0] primary shard is not active Timeout: [1m], request: "
              f"[BulkShardRequest [[{index}][0]] containing [1] requests]") if item_level else
             ("cluster_block_exception", "blocked by: [SERVICE_UNAVAILABLE/2/no master];"))
    else:
        d = {
            500: ("exception", MOCK + "injected internal error"),
            400: ("illegal_argument_exception", MOCK + "injected bad request"),
            401: ("security_exception", "missing authentication credentials for REST request"),
            403: ("security_exception", "action is unauthorized"),
            404: ("index_not_found_exception", f"no such index [{index}]"),
            408: ("receive_timeout_transport_exception", MOCK + "injected timeout"),
            409: ("version_conflict_engine_exception", MOCK + "injected version conflict"),
        }.get(status, ("status_exception", MOCK + f"injected status {status}"))
    return etype or d[0], reason or d[1]


# --------------------------------------------------------------------------- HTTP layer

class Request:
    __slots__ = ("method", "path", "raw_path", "params", "headers", "body")

    def __init__(self, method, path, raw_path, params, headers, body):
        self.method, self.path, self.raw_path = method, path, raw_path
        self.params, self.headers, self.body = params, headers, body


ROUTES = [
    # (segments, {method: handler-name}); "{index}" etc. are path parameters
    ([], {"GET": "root", "HEAD": "root_head"}),
    (["_bulk"], {"POST": "bulk", "PUT": "bulk"}),
    (["_search"], {"GET": "search", "POST": "search"}),
    (["_count"], {"GET": "count", "POST": "count"}),
    (["_refresh"], {"GET": "refresh", "POST": "refresh"}),
    (["_pit"], {"DELETE": "pit_close"}),
    (["_index_template"], {"GET": "template_get_all"}),
    (["_cluster", "health"], {"GET": "health"}),
    (["_cluster", "health", "{index}"], {"GET": "health"}),
    (["_index_template", "{name}"], {"GET": "template_get", "HEAD": "template_head",
                                     "PUT": "template_put", "POST": "template_put",
                                     "DELETE": "template_delete"}),
    (["{index}", "_bulk"], {"POST": "bulk", "PUT": "bulk"}),
    (["{index}", "_search"], {"GET": "search", "POST": "search"}),
    (["{index}", "_count"], {"GET": "count", "POST": "count"}),
    (["{index}", "_refresh"], {"GET": "refresh", "POST": "refresh"}),
    (["{index}", "_pit"], {"POST": "pit_open"}),
    (["{index}", "_mapping"], {"GET": "index_mapping"}),
    (["{index}", "_settings"], {"GET": "index_settings"}),
    (["{index}", "_doc"], {"POST": "doc_auto"}),
    (["{index}", "_doc", "{id}"], {"GET": "doc_get", "HEAD": "doc_head", "PUT": "doc_put",
                                   "POST": "doc_put", "DELETE": "doc_delete"}),
    (["{index}", "_create", "{id}"], {"PUT": "doc_create", "POST": "doc_create"}),
    (["{index}"], {"GET": "index_get", "HEAD": "index_head", "PUT": "index_create",
                   "DELETE": "index_delete"}),
]


def match_route(segs):
    """-> (template string, methods dict, params) or (None, None, None)."""
    for pattern, methods in ROUTES:
        if len(pattern) != len(segs):
            continue
        params = {}
        ok = True
        for p, sgm in zip(pattern, segs):
            if p.startswith("{"):
                if p == "{index}" and sgm.startswith("_") and sgm != "_all":
                    ok = False
                    break
                params[p[1:-1]] = sgm
            elif p != sgm:
                ok = False
                break
        if ok:
            return "/" + "/".join(pattern), methods, params
    return None, None, None


JSON_TYPES = ("application/json", "application/x-ndjson", "application/vnd.elasticsearch+json",
              "application/vnd.elasticsearch+x-ndjson")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    store: Store = None
    api: Api = None

    def log_message(self, fmt, *args):
        if self.store.args.verbose:
            sys.stderr.write("es-mock: " + (fmt % args) + "\n")

    def send_response(self, code, message=None):
        # no Server/Date headers (Elasticsearch sends neither)
        self.log_request(code)
        self.send_response_only(code, message)

    def do_GET(self):
        self.dispatch("GET")

    def do_HEAD(self):
        self.dispatch("HEAD")

    def do_POST(self):
        self.dispatch("POST")

    def do_PUT(self):
        self.dispatch("PUT")

    def do_DELETE(self):
        self.dispatch("DELETE")

    def do_PATCH(self):
        self.dispatch("PATCH")

    def do_OPTIONS(self):
        self.dispatch("OPTIONS")

    # ---- body reading
    def read_body(self):
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        limit = self.store.args.max_content_length
        if "chunked" in te:
            chunks, total = [], 0
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise ConnectionError("eof in chunked body")
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while True:
                        trailer = self.rfile.readline(65537)
                        if trailer in (b"\r\n", b"\n", b""):
                            break
                    break
                total += size
                if total > limit:
                    raise _TooLarge()
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            data = b"".join(chunks)
        else:
            n = self.headers.get("Content-Length")
            n = int(n) if n and n.strip().isdigit() else 0
            if n > limit:
                raise _TooLarge()
            data = self.rfile.read(n) if n else b""
        enc = (self.headers.get("Content-Encoding") or "").lower().strip()
        if data and enc in ("gzip", "x-gzip"):
            data = gzip.decompress(data)
        elif data and enc == "deflate":
            data = zlib.decompress(data)
        return data

    # ---- responses
    def reply(self, status, body, headers=(), compat=None):
        payload = b""
        if body is not None:
            indent = 2 if "pretty" in self._params else None
            payload = json.dumps(body, indent=indent, ensure_ascii=False,
                                 separators=None if indent else (",", ":")).encode("utf-8")
            if indent:
                payload += b"\n"
        self.send_response(status)
        self.send_header("X-elastic-product", "Elasticsearch")
        if body is not None or self.command == "HEAD":
            ctype = (f"application/vnd.elasticsearch+json;compatible-with={compat}" if compat
                     else "application/json")
            self.send_header("Content-Type", ctype)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload) if self.command != "HEAD" else
                                               (len(payload) if body is not None else 0)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and payload:
            self.wfile.write(payload)
        with self.store.lock:
            self.store.stats["responses"][str(status)] += 1

    def send_error(self, code, message=None, explain=None):
        """Malformed HTTP (bad request line, unsupported method...): JSON, not HTML."""
        self.close_connection = True
        if code == 501:     # unknown HTTP method
            code = 405
            message = f"Incorrect HTTP method for uri [{self.path}] and method [{self.command}]"
        payload = json.dumps({"error": message or "bad request", "status": code}).encode()
        try:
            self.send_response(code)
            self.send_header("X-elastic-product", "Elasticsearch")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
        except OSError:
            pass

    def drop(self, mode):
        """Close without answering: FIN ("close") or RST ("reset")."""
        self.close_connection = True
        try:
            if mode == "reset":
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                self.rfile.close()
                self.wfile.close()
                self.connection.close()      # last reference: the kernel sends RST
                self.rfile, self.wfile = io.BytesIO(), io.BytesIO()   # for the final flush
            else:
                try:
                    self.read_body()         # drain, so the close is a clean FIN
                except Exception:
                    pass
                self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        with self.store.lock:
            self.store.stats["connections_dropped"] += 1

    # ---- main dispatch
    def dispatch(self, method):
        self._params = {}
        s = self.store
        try:
            parts = urlsplit(self.path)
            path = parts.path or "/"
            self._params = dict(parse_qsl(parts.query, keep_blank_values=True))
            segs = [unquote(x) for x in path.split("/") if x]
            compat = None
            for h in ("Accept", "Content-Type"):
                m = re.search(r"compatible-with=(\d+)", self.headers.get(h) or "")
                if m:
                    compat = m.group(1)
            if segs and segs[0] == "_mock":
                body = self.read_body()
                return self.admin(method, segs[1:], body)

            tmpl, methods, pparams = match_route(segs)
            route_key = f"{method} {tmpl}" if tmpl else f"{method} <unknown>"
            with s.lock:
                s.stats["requests_total"] += 1
                s.stats["requests"][route_key] += 1
                down = s.down
                latency = s.latency_ms
            if down:
                if down.get("mode") == "hang":
                    while True:
                        with s.lock:
                            if not s.down:
                                break
                        time.sleep(0.05)
                return self.drop(down.get("mode", "close"))
            try:
                body = self.read_body()
            except _TooLarge:
                self.close_connection = True
                return self.reply(413, None)
            except (OSError, EOFError, ValueError) as e:
                self.close_connection = True
                return self.reply(400, EsError(400, "parse_exception",
                                               f"cannot read request body: {e}").body())
            if latency:
                time.sleep(latency / 1000.0)

            # status storm
            with s.lock:
                storm = s.storm
                fire = False
                if storm and (not storm.get("match") or storm["match"] in path):
                    if storm["count"] != 0:
                        fire = True
                        if storm["count"] > 0:
                            storm["count"] -= 1
                        s.stats["storm_responses"] += 1
                    if storm["count"] == 0:
                        s.storm = None
            if fire:
                st = storm["status"]
                etype, reason = fault_error(st, segs[0] if segs else "_all", storm.get("type"),
                                            storm.get("reason"))
                hdrs = []
                if st == 429 and storm.get("retry_after", 1) is not None:
                    hdrs.append(("Retry-After", str(storm.get("retry_after", 1))))
                return self.reply(st, EsError(st, etype, reason).body(), hdrs, compat)

            # authentication
            auth_err = self.authenticate(path)
            if auth_err:
                with s.lock:
                    s.stats["auth_failures"] += 1
                return self.reply(401, auth_err.body(), auth_err.headers, compat)

            # content type
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if body and ctype and ctype not in JSON_TYPES:
                return self.reply(406, plain_error(
                    406, f"Content-Type header [{self.headers.get('Content-Type')}] is not "
                         f"supported").body(), (), compat)
            if tmpl is None:
                return self.reply(400, plain_error(
                    400, f"no handler found for uri [{self.path}] and method [{method}]").body(),
                    (), compat)
            if method == "OPTIONS":
                allow = ",".join(sorted(methods))
                return self.reply(200, None, [("Allow", allow)], compat)
            if method not in methods:
                allowed = ", ".join(sorted(methods))
                return self.reply(405, plain_error(
                    405, f"Incorrect HTTP method for uri [{self.path}] and method [{method}], "
                         f"allowed: [{allowed}]").body(), [("Allow", allowed)], compat)
            req = Request(method, path, self.path, self._params, self.headers, body)
            status, resp = self.call(methods[method], req, pparams)
            return self.reply(status, resp, (), compat)
        except EsError as e:
            return self.reply(e.status, e.body(), e.headers)
        except (ConnectionError, BrokenPipeError):
            self.close_connection = True
        except Exception as e:   # never crash: report like an ES internal error
            import traceback
            traceback.print_exc(file=sys.stderr)
            try:
                return self.reply(500, EsError(500, "exception", MOCK + f"internal error: {e!r}")
                                  .body())
            except OSError:
                self.close_connection = True

    def call(self, name, req, p):
        a = self.api
        idx = p.get("index")
        if name == "root":
            return a.root(req)
        if name == "root_head":
            return 200, None
        if name == "health":
            return a.health(req, idx)
        if name == "bulk":
            return a.bulk(req, idx)
        if name == "search":
            return a.search(req, idx)
        if name == "count":
            return a.search(req, idx, count=True)
        if name == "refresh":
            return a.refresh(req, idx)
        if name == "pit_open":
            return a.pit_open(req, idx)
        if name == "pit_close":
            return a.pit_close(req)
        if name == "template_get_all":
            return a.template_get(req, None)
        if name == "template_get":
            return a.template_get(req, p["name"])
        if name == "template_head":
            return a.template_get(req, p["name"], head=True)
        if name == "template_put":
            return a.template_put(req, p["name"])
        if name == "template_delete":
            return a.template_delete(req, p["name"])
        if name == "index_get":
            return a.index_get(req, idx)
        if name == "index_mapping":
            return a.index_get(req, idx, "mappings")
        if name == "index_settings":
            return a.index_get(req, idx, "settings")
        if name == "index_head":
            return a.index_head(req, idx)
        if name == "index_create":
            return a.index_create(req, idx)
        if name == "index_delete":
            return a.index_delete(req, idx)
        if name == "doc_auto":
            return a.single_write(req, idx, None, "index")
        if name == "doc_put":
            return a.single_write(req, idx, p["id"], "index")
        if name == "doc_create":
            return a.single_write(req, idx, p["id"], "create")
        if name == "doc_delete":
            return a.single_write(req, idx, p["id"], "delete")
        if name == "doc_get":
            return a.get_doc(req, idx, p["id"])
        if name == "doc_head":
            return a.get_doc(req, idx, p["id"], head=True)
        raise plain_error(400, f"no handler found for uri [{req.raw_path}] and method "
                               f"[{req.method}]")

    # ---- security
    def authenticate(self, path):
        a = self.store.args
        if not a.basic_auth and not a.api_key:
            return None
        hdr = self.headers.get("Authorization") or ""
        uri = self.path
        www = [("WWW-Authenticate", 'Basic realm="security", charset="UTF-8"'),
               ("WWW-Authenticate", 'Bearer realm="security"'),
               ("WWW-Authenticate", "ApiKey")]
        header_obj = {"WWW-Authenticate": [v for _, v in www]}

        def err(reason):
            e = EsError(401, "security_exception", reason, extra={"header": header_obj},
                        headers=www)
            return e
        scheme, _, cred = hdr.partition(" ")
        scheme = scheme.lower()
        cred = cred.strip()
        if scheme == "basic" and a.basic_auth:
            try:
                dec = base64.b64decode(cred, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                return err(f"missing authentication credentials for REST request [{uri}]")
            if secrets.compare_digest(dec, a.basic_auth):
                return None
            return err(f"unable to authenticate user [{dec.partition(':')[0]}] for REST "
                       f"request [{uri}]")
        if scheme == "apikey" and a.api_key:
            ok = [a.api_key]
            if ":" in a.api_key:
                ok.append(base64.b64encode(a.api_key.encode()).decode())
            if any(secrets.compare_digest(cred, k) for k in ok):
                return None
            return err("unable to authenticate with provided credentials and anonymous access "
                       "is not allowed for this request")
        if hdr:
            return err("unable to authenticate with provided credentials and anonymous access "
                       "is not allowed for this request")
        return err(f"missing authentication credentials for REST request [{uri}]")

    # ---- admin API (/_mock/...)
    def admin(self, method, segs, raw):
        s = self.store
        what = segs[0] if segs else ""
        if what == "stats" and method == "GET":
            return self.reply(200, self.stats_body())
        if what == "faults" and method == "GET":
            return self.reply(200, {"faults": self.faults_body()})
        if what == "reset" and method == "POST":
            with s.lock:
                s._reset_all()
                s.persist()
            return self.reply(200, {"acknowledged": True})
        if what == "faults" and method == "POST":
            try:
                body = json.loads(raw.decode("utf-8") or "{}")
            except (ValueError, UnicodeDecodeError) as e:
                return self.reply(400, json_error(e).body())
            try:
                self.apply_faults(body)
            except EsError as e:
                return self.reply(e.status, e.body())
            return self.reply(200, {"acknowledged": True, "faults": self.faults_body()})
        return self.reply(404, EsError(404, "resource_not_found_exception",
                                       MOCK + f"unknown admin endpoint [{method} {self.path}]; "
                                       "use GET /_mock/stats, GET|POST /_mock/faults, "
                                       "POST /_mock/reset").body())

    def apply_faults(self, body):
        s = self.store
        if not isinstance(body, dict):
            raise bad_request(MOCK + "faults body must be a JSON object")
        known = {"down", "status_storm", "fail_items", "refresh_interval_ms", "reset",
                 "clear_faults", "latency_ms"}
        unknown = [k for k in body if k not in known]
        if unknown:
            raise bad_request(MOCK + f"unknown fault keys {unknown}; known: {sorted(known)}")
        with s.lock:
            if body.get("reset"):
                s._reset_all()
                s.persist()
            if body.get("clear_faults"):
                s._reset_faults()
            if "down" in body:
                d = body["down"]
                if d in (False, None):
                    s.down = None
                else:
                    d = {} if d is True else dict(d)
                    if not isinstance(d, dict) or d.get("enabled", True) is False:
                        s.down = None
                    else:
                        mode = d.get("mode", "close")
                        if mode not in ("close", "reset", "hang"):
                            raise bad_request(MOCK + "down.mode must be close|reset|hang")
                        until = (time.monotonic() + d["for_ms"] / 1000.0) if d.get("for_ms") \
                            else None
                        s.down = {"mode": mode, "until": until}
            if "status_storm" in body:
                st = body["status_storm"]
                if not st:
                    s.storm = None
                else:
                    if not isinstance(st, dict) or not isinstance(st.get("status"), int) or \
                            not 100 <= st["status"] <= 599:
                        raise bad_request(MOCK + "status_storm needs an integer status")
                    st = dict(st)
                    st.setdefault("count", 1)
                    s.storm = st if st["count"] != 0 else None
            if "fail_items" in body:
                fi = body["fail_items"]
                if not fi:
                    s.fail_items = None
                else:
                    if not isinstance(fi, dict) or not (isinstance(fi.get("ids"), list) or
                                                        (isinstance(fi.get("every_nth"), int)
                                                         and fi["every_nth"] > 0)):
                        raise bad_request(MOCK + "fail_items needs ids: [...] or every_nth: N>0")
                    fi = dict(fi)
                    if fi.get("ids") is not None:
                        fi["ids"] = set(str(x) for x in fi["ids"])
                    fi.setdefault("status", 429)
                    fi.setdefault("times", 1)
                    s.fail_items = fi
                    s.fail_counts = Counter()
                    s.item_counter = 0
            if "refresh_interval_ms" in body:
                v = body["refresh_interval_ms"]
                if v is not None and (not isinstance(v, int) or v < -1):
                    raise bad_request(MOCK + "refresh_interval_ms must be an integer >= -1 or null")
                s.override_refresh_ms = v
            if "latency_ms" in body:
                s.latency_ms = max(0, int(body["latency_ms"] or 0))

    def faults_body(self):
        s = self.store
        with s.lock:
            fi = dict(s.fail_items) if s.fail_items else None
            if fi and isinstance(fi.get("ids"), set):
                fi["ids"] = sorted(fi["ids"])
            return {"down": dict(s.down, until=None) if s.down else False,
                    "status_storm": dict(s.storm) if s.storm else None,
                    "fail_items": fi,
                    "fail_counts": dict(s.fail_counts),
                    "latency_ms": s.latency_ms,
                    "refresh_interval_ms": s.override_refresh_ms,
                    "default_refresh_interval_ms": s.default_refresh_ms}

    def stats_body(self):
        s = self.store
        with s.lock:
            st = s.stats
            idx = {}
            for n, ix in sorted(s.indices.items()):
                idx[n] = {"docs_total": len(ix.docs), "docs_visible": len(ix.visible),
                          "template": ix.template, "create_conflicts": ix.create_conflicts,
                          "overwrites": ix.overwrites, "refreshes": ix.refreshes,
                          "refresh_interval_ms": s.effective_refresh_ms(ix),
                          "seq_no": ix.seq_no}
            b = st["bulk"]
            return {"requests_total": st["requests_total"],
                    "requests": dict(st["requests"]),
                    "responses": dict(st["responses"]),
                    "connections_dropped": st["connections_dropped"],
                    "storm_responses": st["storm_responses"],
                    "auth_failures": st["auth_failures"],
                    "bulk": {k: b.get(k, 0) for k in (
                        "requests", "single_doc_requests", "items", "items_succeeded",
                        "items_failed", "items_failed_injected", "created", "updated",
                        "deleted", "create_conflicts", "overwrites")},
                    "duplicates": {"rejected_create_conflicts": b.get("create_conflicts", 0),
                                   "overwritten_by_index": b.get("overwrites", 0)},
                    "pits": {"open": len(s.pits), "opened": st["pits_opened"],
                             "closed": st["pits_closed"]},
                    "templates": sorted(s.templates),
                    "indices": idx}


class _TooLarge(Exception):
    pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def main(argv=None):
    ap = argparse.ArgumentParser(description="Elasticsearch 8.x REST stand-in for tests")
    ap.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1 (0 = any)")
    ap.add_argument("--refresh-interval-ms", type=int, default=1000,
                    help="index.refresh_interval for indices that don't set one (-1 = never)")
    ap.add_argument("--data", help="JSON file: loaded at start, rewritten after every write")
    ap.add_argument("--basic-auth", metavar="USER:PASSWORD")
    ap.add_argument("--api-key", metavar="KEY",
                    help="accept 'Authorization: ApiKey KEY' (KEY = base64(id:api_key))")
    ap.add_argument("--es-version", default=ES_VERSION)
    ap.add_argument("--cluster-name", default="es-mock")
    ap.add_argument("--max-content-length", type=int, default=100 * 1024 * 1024)
    ap.add_argument("--bind-retry-ms", type=int, default=5000,
                    help="keep retrying the bind this long (restart on the same port)")
    ap.add_argument("--verbose", action="store_true", help="log every request to stderr")
    ap.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate chain")
    ap.add_argument("--tls-key", metavar="PEM", help="... and this private key")
    ap.add_argument("--plain-port", type=int, default=0,
                    help="with --tls-cert: also plain HTTP here, for tests (0 = any)")
    args = ap.parse_args(argv)
    if args.refresh_interval_ms < -1:
        ap.error("--refresh-interval-ms must be >= -1")
    if args.basic_auth is not None and ":" not in args.basic_auth:
        ap.error("--basic-auth must be USER:PASSWORD")

    store = Store(args)
    Handler.store = store
    Handler.api = Api(store)
    deadline = time.monotonic() + args.bind_retry_ms / 1000.0
    while True:
        try:
            httpd = Server(("127.0.0.1", args.port), Handler)
            break
        except OSError as e:
            if time.monotonic() >= deadline:
                sys.stderr.write(f"es-mock: cannot bind 127.0.0.1:{args.port}: {e}\n")
                return 1
            time.sleep(0.1)
    threading.Thread(target=store.refresher, name="refresher", daemon=True).start()
    plain = None
    if args.tls_cert:
        import ssl
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        plain = Server(("127.0.0.1", args.plain_port), Handler)
        threading.Thread(target=plain.serve_forever, name="plain", daemon=True).start()
        # The handshake happens in each request's thread, not in accept().
        httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True,
                                       do_handshake_on_connect=False)

    def stop(*_):
        threading.Thread(target=httpd.shutdown, daemon=True).start()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    line = f"listening on 127.0.0.1:{httpd.server_address[1]}"
    if plain is not None:
        line += f" tls plain 127.0.0.1:{plain.server_address[1]}"
    print(line, flush=True)
    try:
        httpd.serve_forever(poll_interval=0.25)
    finally:
        httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
