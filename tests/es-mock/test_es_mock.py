"""Tests for es_mock.py (stdlib unittest; the mock runs as a subprocess on loopback).

    python3 -m unittest tests/es-mock/test_es_mock.py -v      (from the repository root)
"""

import base64
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
MOCK = os.path.join(HERE, "es_mock.py")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MockServer:
    def __init__(self, *args, port=None):
        self.port = port or free_port()
        self.args = args
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, MOCK, "--port", str(self.port), *self.args],
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if line != f"listening on 127.0.0.1:{self.port}":
            self.proc.kill()
            raise RuntimeError(f"mock did not start: {line!r}")
        return self

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc:
            self.proc.stdout.close()

    # ---- HTTP helpers
    def call(self, method, path, body=None, headers=None, ctype=None, timeout=10):
        data = None
        h = {}
        if body is not None:
            if isinstance(body, (dict, list)):
                data = json.dumps(body).encode()
                h["Content-Type"] = "application/json"
            else:
                data = body.encode() if isinstance(body, str) else body
                h["Content-Type"] = ctype or "application/json"
        if ctype:
            h["Content-Type"] = ctype
        h.update(headers or {})
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                     method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, hdrs, raw = r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            status, hdrs, raw = e.code, e.headers, e.read()
        return status, hdrs, (json.loads(raw) if raw else None)

    def bulk(self, ops, path="/_bulk", query=""):
        lines = []
        for action, meta, src in ops:
            lines.append(json.dumps({action: meta}))
            if src is not None:
                lines.append(json.dumps(src))
        return self.call("POST", path + query, "\n".join(lines) + "\n",
                         ctype="application/x-ndjson")

    def admin(self, **faults):
        st, _, body = self.call("POST", "/_mock/faults", faults)
        assert st == 200, body
        return body

    def stats(self):
        return self.call("GET", "/_mock/stats")[2]

    def count(self, index, query=None):
        st, _, body = self.call("POST", f"/{index}/_count",
                                {"query": query} if query else None)
        assert st == 200, body
        return body["count"]


class EsMockCase(unittest.TestCase):
    server = None
    server_args = ()

    @classmethod
    def setUpClass(cls):
        cls.server = MockServer(*cls.server_args).start()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def setUp(self):
        self.es = self.server
        self.es.admin(reset=True)

    def assertEsError(self, resp, status, etype):
        st, _, body = resp
        self.assertEqual(st, status, body)
        self.assertEqual(body["status"], status)
        self.assertEqual(body["error"]["type"], etype, body)
        self.assertTrue(body["error"]["root_cause"], body)
        return body


class BulkAndDocumentTests(EsMockCase):
    def test_root_info_and_product_header(self):
        st, hdrs, body = self.es.call("GET", "/")
        self.assertEqual(st, 200)
        self.assertEqual(hdrs["X-elastic-product"], "Elasticsearch")
        self.assertEqual(body["version"]["number"], "8.15.0")
        self.assertEqual(body["tagline"], "You Know, for Search")
        st, _, body = self.es.call("GET", "/_cluster/health")
        self.assertEqual((st, body["status"]), (200, "green"))

    def test_bulk_index_and_create_item_results(self):
        st, _, body = self.es.bulk([
            ("create", {"_index": "logs-a", "_id": "a"}, {"n": 1}),
            ("create", {"_index": "logs-a", "_id": "b"}, {"n": 2}),
            ("index", {"_index": "logs-a"}, {"n": 3}),            # generated _id
        ])
        self.assertEqual(st, 200)
        self.assertFalse(body["errors"])
        self.assertIsInstance(body["took"], int)
        items = body["items"]
        self.assertEqual([list(i)[0] for i in items], ["create", "create", "index"])
        for it in items:
            r = list(it.values())[0]
            self.assertEqual((r["status"], r["result"], r["_version"]), (201, "created", 1))
            self.assertEqual(r["_index"], "logs-a")
            self.assertEqual(r["_shards"]["failed"], 0)
        self.assertEqual(len(items[2]["index"]["_id"]), 20)
        self.assertEqual([i[list(i)[0]]["_seq_no"] for i in items], [0, 1, 2])

        # create on an existing _id -> per-item 409; index on an existing _id -> updated
        st, _, body = self.es.bulk([
            ("create", {"_id": "a"}, {"n": 10}),
            ("index", {"_id": "b"}, {"n": 20}),
        ], path="/logs-a/_bulk")
        self.assertEqual(st, 200)
        self.assertTrue(body["errors"])
        c = body["items"][0]["create"]
        self.assertEqual(c["status"], 409)
        self.assertEqual(c["error"]["type"], "version_conflict_engine_exception")
        self.assertIn("document already exists", c["error"]["reason"])
        u = body["items"][1]["index"]
        self.assertEqual((u["status"], u["result"], u["_version"]), (200, "updated", 2))

        st, _, doc = self.es.call("GET", "/logs-a/_doc/a")     # real-time GET
        self.assertEqual((st, doc["found"], doc["_source"]), (200, True, {"n": 1}))
        st, _, doc = self.es.call("GET", "/logs-a/_doc/b")
        self.assertEqual(doc["_source"], {"n": 20})
        st, _, doc = self.es.call("GET", "/logs-a/_doc/zzz")
        self.assertEqual((st, doc["found"]), (404, False))

        stats = self.es.stats()
        self.assertEqual(stats["duplicates"], {"rejected_create_conflicts": 1,
                                               "overwritten_by_index": 1})
        self.assertEqual(stats["indices"]["logs-a"]["docs_total"], 3)

    def test_single_document_apis(self):
        st, _, r = self.es.call("PUT", "/docs/_create/x", {"a": 1})
        self.assertEqual((st, r["result"]), (201, "created"))
        self.assertEsError(self.es.call("PUT", "/docs/_create/x", {"a": 2}), 409,
                           "version_conflict_engine_exception")
        st, _, r = self.es.call("PUT", "/docs/_doc/x", {"a": 3})
        self.assertEqual((st, r["result"], r["_version"]), (200, "updated", 2))
        st, _, r = self.es.call("DELETE", "/docs/_doc/x")
        self.assertEqual((st, r["result"]), (200, "deleted"))

    def test_malformed_requests_get_es_errors(self):
        es = self.es
        b = self.assertEsError(es.call("POST", "/_bulk", '{"index":{"_index":"x"}}\n{"a":1}',
                                       ctype="application/x-ndjson"), 400,
                               "illegal_argument_exception")
        self.assertIn("terminated by a newline", b["error"]["reason"])
        self.assertEsError(es.call("POST", "/_bulk", '{"index":{"_index":\n{}\n',
                                   ctype="application/x-ndjson"), 400, "x_content_parse_exception")
        self.assertEsError(es.call("POST", "/_bulk", '{"explode":{"_index":"x"}}\n{}\n',
                                   ctype="application/x-ndjson"), 400, "illegal_argument_exception")
        self.assertEsError(es.call("POST", "/_bulk", '{"index":{}}\n{"a":1}\n',
                                   ctype="application/x-ndjson"), 400,
                           "action_request_validation_exception")
        self.assertEsError(es.call("POST", "/_bulk", b"", ctype="application/x-ndjson"), 400,
                           "parse_exception")
        # a broken source line fails only that item
        st, _, body = es.call("POST", "/_bulk",
                              '{"index":{"_index":"m","_id":"1"}}\n{"a":\n'
                              '{"index":{"_index":"m","_id":"2"}}\n{"a":1}\n',
                              ctype="application/x-ndjson")
        self.assertEqual(st, 200)
        self.assertTrue(body["errors"])
        self.assertEqual(body["items"][0]["index"]["status"], 400)
        self.assertEqual(body["items"][0]["index"]["error"]["type"], "document_parsing_exception")
        self.assertEqual(body["items"][1]["index"]["status"], 201)
        # mapping conflict: a long field receiving text
        st, _, body = es.bulk([("index", {"_index": "m", "_id": "3"}, {"a": "not a number"})])
        self.assertEqual(body["items"][0]["index"]["error"]["type"], "document_parsing_exception")
        # search bodies
        self.assertEsError(es.call("POST", "/m/_search", "{nope"), 400, "x_content_parse_exception")
        self.assertEsError(es.call("POST", "/m/_search", {"query": {"fuzzy_thing": {}}}), 400,
                           "parsing_exception")
        self.assertEsError(es.call("POST", "/m/_search", {"size": 10001}), 400,
                           "search_phase_execution_exception")
        # search_after is checked on the shards (as OpenSearch 2.19 and Elasticsearch do)
        b = self.assertEsError(es.call("POST", "/m/_search",
                                       {"sort": [{"a": "asc"}], "search_after": [1, 2]}),
                               400, "search_phase_execution_exception")
        self.assertEqual(b["error"]["root_cause"][0]["type"], "illegal_argument_exception")
        # a get on a missing index names an index expression, a search an index or alias
        b = self.assertEsError(es.call("GET", "/nosuch/_doc/1"), 404, "index_not_found_exception")
        self.assertEqual(b["error"]["resource.type"], "index_expression")
        b = self.assertEsError(es.call("POST", "/nosuch/_search", {}), 404,
                               "index_not_found_exception")
        self.assertEqual(b["error"]["resource.type"], "index_or_alias")
        b = self.assertEsError(es.call("POST", "/m/_search", {"sort": [{"nosuch": "asc"}]}),
                               400, "search_phase_execution_exception")
        self.assertEqual(b["error"]["root_cause"][0]["type"], "query_shard_exception")
        st, _, _ = es.call("POST", "/m/_search",
                           {"sort": [{"nosuch": {"order": "asc", "unmapped_type": "long"}}]})
        self.assertEqual(st, 200)
        self.assertEsError(es.call("GET", "/m/_search?bogus=1"), 400, "illegal_argument_exception")
        # routing-level errors (plain string bodies, like Elasticsearch)
        st, _, body = es.call("GET", "/_bulk")
        self.assertEqual(st, 405)
        self.assertIn("Incorrect HTTP method", body["error"])
        st, _, body = es.call("GET", "/m/_nothing_here")
        self.assertEqual(st, 400)
        self.assertIn("no handler found", body["error"])
        st, _, body = es.call("POST", "/m/_search", "{}", ctype="text/plain")
        self.assertEqual(st, 406)
        # and the server is still fine
        self.assertEqual(es.call("GET", "/")[0], 200)


class VisibilityTests(EsMockCase):
    def test_documents_invisible_until_refresh(self):
        es = self.es
        es.admin(refresh_interval_ms=60000)
        st, _, body = es.bulk([("create", {"_index": "nrt", "_id": str(i)}, {"i": i})
                               for i in range(5)])
        self.assertFalse(body["errors"])
        self.assertEqual(es.count("nrt"), 0)
        st, _, res = es.call("POST", "/nrt/_search", {"query": {"match_all": {}}})
        self.assertEqual(res["hits"]["total"], {"value": 0, "relation": "eq"})
        self.assertEqual(es.call("GET", "/nrt/_doc/3")[2]["found"], True)   # GET is real-time
        nrt = es.stats()["indices"]["nrt"]
        self.assertEqual((nrt["docs_total"], nrt["docs_visible"]), (5, 0))
        st, _, r = es.call("POST", "/nrt/_refresh")
        self.assertEqual((st, r["_shards"]["failed"]), (200, 0))
        self.assertEqual(es.count("nrt"), 5)

        # periodic refresh: visible only after the interval
        es.admin(refresh_interval_ms=300)
        t0 = time.monotonic()
        es.bulk([("create", {"_index": "nrt", "_id": f"p{i}"}, {"i": i}) for i in range(3)])
        self.assertEqual(es.count("nrt"), 5)
        while es.count("nrt") != 8:
            self.assertLess(time.monotonic() - t0, 5, "periodic refresh never happened")
            time.sleep(0.05)
        self.assertGreaterEqual(time.monotonic() - t0, 0.28)

        # ?refresh=true makes the batch visible before the response
        es.admin(refresh_interval_ms=60000)
        st, _, body = es.bulk([("create", {"_index": "nrt", "_id": "r1"}, {"i": 1})],
                              query="?refresh=true")
        self.assertTrue(body["items"][0]["create"]["forced_refresh"])
        self.assertEqual(es.count("nrt"), 9)
        # ?refresh=wait_for waits for the next (periodic) refresh
        es.admin(refresh_interval_ms=300)
        t0 = time.monotonic()
        es.bulk([("create", {"_index": "nrt", "_id": "w1"}, {"i": 1})], query="?refresh=wait_for")
        self.assertGreaterEqual(time.monotonic() - t0, 0.28)
        self.assertEqual(es.count("nrt"), 10)


class SearchTests(EsMockCase):
    def load(self, index, n, step_values=("checkout", "build", "test")):
        seqs = list(range(n))
        random.Random(7).shuffle(seqs)
        ops = [("create", {"_index": index, "_id": f"d{s}"},
                {"event": {"sequence": s}, "labels": {"step": step_values[s % len(step_values)]},
                 "message": f"line {s}"}) for s in seqs]
        st, _, body = self.es.bulk(ops, query="?refresh=true")
        self.assertEqual(st, 200)
        self.assertFalse(body["errors"])

    def test_search_after_pages_2500_docs_exactly_once_in_order(self):
        self.load("paging", 2500)
        seen = []
        after = None
        pages = 0
        while True:
            q = {"size": 100, "query": {"match_all": {}},
                 "sort": [{"event.sequence": {"order": "asc"}}]}
            if after is not None:
                q["search_after"] = after
            st, _, r = self.es.call("POST", "/paging/_search", q)
            self.assertEqual(st, 200, r)
            self.assertEqual(r["hits"]["total"], {"value": 2500, "relation": "eq"})
            hits = r["hits"]["hits"]
            if not hits:
                break
            pages += 1
            for h in hits:
                self.assertIsNone(h["_score"])
                self.assertEqual(h["sort"], [h["_source"]["event"]["sequence"]])
            seen.extend(h["_source"]["event"]["sequence"] for h in hits)
            after = hits[-1]["sort"]
        self.assertEqual(pages, 25)
        self.assertEqual(seen, list(range(2500)))

    def test_pit_paging_with_implicit_shard_doc_tiebreaker(self):
        self.load("pitpage", 700, step_values=("a", "b", "c", "d", "e", "f", "g"))
        st, _, pit = self.es.call("POST", "/pitpage/_pit?keep_alive=1m")
        self.assertEqual(st, 200)
        pit_id = pit["id"]
        ids = []
        after = None
        while True:
            q = {"size": 64, "pit": {"id": pit_id, "keep_alive": "1m"},
                 "sort": [{"labels.step.keyword": "desc"}]}        # not unique on its own
            if after:
                q["search_after"] = after
            st, _, r = self.es.call("POST", "/_search", q)
            self.assertEqual(st, 200, r)
            self.assertIn("pit_id", r)
            pit_id = r["pit_id"]
            hits = r["hits"]["hits"]
            if not hits:
                break
            for h in hits:
                self.assertEqual(len(h["sort"]), 2)              # value + _shard_doc
                self.assertIsInstance(h["sort"][1], int)
            ids.extend(h["_id"] for h in hits)
            after = hits[-1]["sort"]
        self.assertEqual(len(ids), 700)
        self.assertEqual(len(set(ids)), 700)

    def test_pit_snapshot_does_not_see_later_documents(self):
        es = self.es
        self.load("snap", 10)
        st, _, pit = es.call("POST", "/snap/_pit?keep_alive=1m")
        es.bulk([("create", {"_index": "snap", "_id": f"late{i}"}, {"event": {"sequence": 100 + i}})
                 for i in range(5)], query="?refresh=true")
        self.assertEqual(es.count("snap"), 15)
        st, _, r = es.call("POST", "/_search", {"pit": {"id": pit["id"]}, "size": 100,
                                                "sort": [{"event.sequence": "asc"}]})
        self.assertEqual(st, 200, r)
        self.assertEqual(r["pit_id"], pit["id"])
        self.assertEqual(r["hits"]["total"]["value"], 10)
        self.assertFalse(any(h["_id"].startswith("late") for h in r["hits"]["hits"]))
        # a PIT search must not name an index
        self.assertEsError(es.call("POST", "/snap/_search", {"pit": {"id": pit["id"]}}), 400,
                           "action_request_validation_exception")
        self.assertEsError(es.call("POST", "/snap/_pit"), 400,
                           "action_request_validation_exception")     # keep_alive missing
        st, _, r = es.call("DELETE", "/_pit", {"id": pit["id"]})
        self.assertEqual((st, r), (200, {"succeeded": True, "num_freed": 1}))
        st, _, r = es.call("DELETE", "/_pit", {"id": pit["id"]})
        self.assertEqual((st, r["num_freed"]), (404, 0))
        self.assertEsError(es.call("POST", "/_search", {"pit": {"id": pit["id"]}}), 404,
                           "search_phase_execution_exception")

    def test_queries_count_and_index_patterns(self):
        es = self.es
        self.load("logs-1", 30)
        self.load("logs-2", 12)
        q_step = {"term": {"labels.step": "build"}}
        self.assertEqual(es.count("logs-1", q_step), 10)
        self.assertEqual(es.count("logs-1", {"term": {"labels.step.keyword": "build"}}), 10)
        self.assertEqual(es.count("logs-1", {"term": {"labels.step.keyword": "Build"}}), 0)
        self.assertEqual(es.count("logs-1", {"term": {"event.sequence": 7}}), 1)
        self.assertEqual(es.count("logs-1", {"range": {"event.sequence": {"gte": 10, "lt": 20}}}),
                         10)
        self.assertEqual(es.count("logs-1", {"range": {"event.sequence": {"gt": 25}}}), 4)
        self.assertEqual(es.count("logs-1", {"bool": {
            "filter": [q_step, {"range": {"event.sequence": {"lte": 14}}}],
            "must_not": [{"term": {"event.sequence": 1}}]}}), 4)
        self.assertEqual(es.count("logs-1", {"bool": {"must": [{"match_all": {}}]}}), 30)
        self.assertEqual(es.count("logs-*"), 42)
        self.assertEqual(es.count("logs-1,logs-2"), 42)
        self.assertEqual(es.count("logs-*,-logs-2"), 30)
        st, _, r = es.call("POST", "/logs-*/_search", {"query": q_step, "size": 3,
                                                       "sort": [{"event.sequence": "desc"}]})
        self.assertEqual([h["sort"][0] for h in r["hits"]["hits"]], [28, 25, 22])
        self.assertEqual(r["_shards"]["total"], 2)
        self.assertEqual(r["hits"]["total"], {"value": 14, "relation": "eq"})
        # missing concrete index -> 404; wildcard matching nothing -> empty result
        self.assertEsError(es.call("POST", "/nope/_search", {}), 404, "index_not_found_exception")
        self.assertEsError(es.call("POST", "/nope/_count"), 404, "index_not_found_exception")
        st, _, r = es.call("POST", "/nope-*/_search", {})
        self.assertEqual((st, r["hits"]["hits"], r["hits"]["total"]["value"]), (200, [], 0))
        # track_total_hits
        st, _, r = es.call("POST", "/logs-1/_search", {"track_total_hits": 5, "size": 0})
        self.assertEqual(r["hits"]["total"], {"value": 5, "relation": "gte"})
        st, _, r = es.call("POST", "/logs-1/_search", {"track_total_hits": False})
        self.assertNotIn("total", r["hits"])
        # default size is 10, default order is by score, then index order
        st, _, r = es.call("GET", "/logs-1/_search")
        self.assertEqual(len(r["hits"]["hits"]), 10)
        self.assertEqual(r["hits"]["max_score"], 1.0)


class TemplateTests(EsMockCase):
    TEMPLATE = {
        "index_patterns": ["trellis-logs-*"], "priority": 200,
        "template": {"settings": {"number_of_shards": 1, "refresh_interval": "5s"},
                     "mappings": {"dynamic": "strict",
                                  "properties": {"labels.step": {"type": "keyword"},
                                                 "event.sequence": {"type": "long"},
                                                 "message": {"type": "text"}}}}}

    def test_template_applied_to_auto_created_index(self):
        es = self.es
        st, _, r = es.call("PUT", "/_index_template/trellis-logs", self.TEMPLATE)
        self.assertEqual((st, r), (200, {"acknowledged": True}))
        st, _, r = es.call("GET", "/_index_template/trellis-logs")
        self.assertEqual(st, 200)
        self.assertEqual(r["index_templates"][0]["name"], "trellis-logs")
        self.assertEqual(r["index_templates"][0]["index_template"]["index_patterns"],
                         ["trellis-logs-*"])
        self.assertEqual(r["index_templates"][0]["index_template"]["priority"], 200)
        self.assertEsError(es.call("GET", "/_index_template/missing"), 404,
                           "resource_not_found_exception")
        self.assertEqual(es.call("HEAD", "/trellis-logs-1")[0], 404)
        self.assertEsError(es.call("GET", "/trellis-logs-1"), 404, "index_not_found_exception")

        st, _, body = es.bulk([("create", {"_index": "trellis-logs-1", "_id": "1"},
                                {"labels": {"step": "Build-Step"}, "event": {"sequence": 1},
                                 "message": "hello"})], query="?refresh=true")
        self.assertFalse(body["errors"], body)
        self.assertEqual(es.call("HEAD", "/trellis-logs-1")[0], 200)
        st, _, r = es.call("GET", "/trellis-logs-1")
        ix = r["trellis-logs-1"]
        self.assertEqual(ix["settings"]["index"]["refresh_interval"], "5s")
        self.assertEqual(ix["settings"]["index"]["number_of_shards"], "1")
        self.assertEqual(ix["mappings"]["properties"]["labels"]["properties"]["step"],
                         {"type": "keyword"})
        self.assertEqual(es.stats()["indices"]["trellis-logs-1"]["template"], "trellis-logs")
        self.assertEqual(es.count("trellis-logs-1", {"term": {"labels.step": "Build-Step"}}), 1)
        self.assertEqual(es.count("trellis-logs-1", {"term": {"labels.step": "build"}}), 0)
        # "dynamic": "strict" from the template rejects unknown fields
        st, _, body = es.bulk([("create", {"_index": "trellis-logs-1", "_id": "2"},
                                {"surprise": 1})])
        self.assertEqual(body["items"][0]["create"]["error"]["type"],
                         "strict_dynamic_mapping_exception")
        # an index outside the pattern gets dynamic mappings and no template
        es.bulk([("create", {"_index": "other", "_id": "1"}, {"x": 1})])
        self.assertIsNone(es.stats()["indices"]["other"]["template"])
        # overlapping patterns with the same priority are rejected, like Elasticsearch
        dup = dict(self.TEMPLATE, index_patterns=["trellis-*"])
        self.assertEsError(es.call("PUT", "/_index_template/other", dup), 400,
                           "illegal_argument_exception")
        self.assertEsError(es.call("PUT", "/_index_template/bad", {"template": {}}), 400,
                           "action_request_validation_exception")
        self.assertEsError(es.call("PUT", "/_index_template/bad2", {
            "index_patterns": ["x-*"], "template": {"mappings": {"properties": {
                "f": {"type": "no_such_type"}}}}}), 400, "mapper_parsing_exception")


class AuthTests(EsMockCase):
    API_KEY = base64.b64encode(b"key-id:key-secret").decode()
    server_args = ("--basic-auth", "elastic:changeme", "--api-key", API_KEY)

    def test_auth_required(self):
        es = self.es
        st, hdrs, body = es.call("GET", "/")
        self.assertEqual(st, 401)
        self.assertEqual(body["error"]["type"], "security_exception")
        self.assertEqual(body["status"], 401)
        www = hdrs.get_all("WWW-Authenticate")
        self.assertTrue(any(v.startswith("Basic") for v in www))
        self.assertIn("ApiKey", www)
        bad = base64.b64encode(b"elastic:wrong").decode()
        self.assertEqual(es.call("GET", "/", headers={"Authorization": f"Basic {bad}"})[0], 401)
        good = base64.b64encode(b"elastic:changeme").decode()
        self.assertEqual(es.call("GET", "/", headers={"Authorization": f"Basic {good}"})[0], 200)
        self.assertEqual(es.call("GET", "/", headers={"Authorization": f"ApiKey {self.API_KEY}"}
                                 )[0], 200)
        self.assertEqual(es.call("GET", "/", headers={"Authorization": "ApiKey bm9wZTpub3Bl"}
                                 )[0], 401)
        self.assertEqual(es.call("GET", "/_mock/stats")[0], 200)    # admin API is exempt


class FaultTests(EsMockCase):
    def expect_dropped(self, path="/", timeout=5):
        with self.assertRaises((urllib.error.URLError, http.client.HTTPException,
                                ConnectionError, TimeoutError, OSError)):
            self.es.call("GET", path, timeout=timeout)

    def test_down_closes_connections_then_recovers(self):
        es = self.es
        es.admin(down=True)
        self.expect_dropped()
        es.admin(down={"mode": "reset"})
        with self.assertRaises((ConnectionResetError, urllib.error.URLError)) as cm:
            self.es.call("POST", "/_bulk", '{"index":{"_index":"x"}}\n{}\n',
                         ctype="application/x-ndjson")
        exc = getattr(cm.exception, "reason", cm.exception)
        self.assertIsInstance(exc, ConnectionResetError)                 # a real RST ...
        self.assertNotIsInstance(exc, http.client.RemoteDisconnected)    # ... not a FIN
        self.assertEqual(es.stats()["connections_dropped"], 2)     # admin API still answers
        es.admin(down=False)
        self.assertEqual(es.call("GET", "/")[0], 200)
        es.admin(down={"mode": "hang", "for_ms": 400})
        self.expect_dropped(timeout=0.2)
        time.sleep(0.5)
        self.assertEqual(es.call("GET", "/")[0], 200)

    def test_status_storm(self):
        es = self.es
        es.admin(status_storm={"status": 429, "count": 3})
        for _ in range(3):
            st, hdrs, body = es.bulk([("index", {"_index": "s"}, {"a": 1})])
            self.assertEqual(st, 429)
            self.assertEqual(hdrs["Retry-After"], "1")
            self.assertEqual(body["error"]["type"], "es_rejected_execution_exception")
            self.assertEqual(body["status"], 429)
        st, _, body = es.bulk([("index", {"_index": "s"}, {"a": 1})])
        self.assertEqual(st, 200)
        self.assertEqual(es.stats()["indices"]["s"]["docs_total"], 1)   # rejected ones never wrote
        es.admin(status_storm={"status": 503, "count": 1, "match": "_search"})
        self.assertEqual(es.call("GET", "/")[0], 200)
        st, _, body = es.call("POST", "/s/_search", {})
        self.assertEqual((st, body["error"]["type"]), (503, "cluster_block_exception"))
        self.assertEqual(es.call("POST", "/s/_search", {})[0], 200)

    def test_fail_items_by_id_then_retry_without_duplicates(self):
        es = self.es
        es.admin(fail_items={"ids": ["b", "d"], "status": 429, "times": 1})
        ops = [("create", {"_index": "f", "_id": i}, {"v": i}) for i in "abcde"]
        st, _, body = es.bulk(ops)
        self.assertEqual(st, 200)
        self.assertTrue(body["errors"])
        statuses = {it["create"]["_id"]: it["create"]["status"] for it in body["items"]}
        self.assertEqual(statuses, {"a": 201, "b": 429, "c": 201, "d": 429, "e": 201})
        self.assertEqual(body["items"][1]["create"]["error"]["type"],
                         "es_rejected_execution_exception")
        retry = [op for op in ops if op[1]["_id"] in ("b", "d")]
        st, _, body = es.bulk(retry)
        self.assertFalse(body["errors"])
        st, _, body = es.bulk(ops)          # a client re-sending everything is caught
        self.assertTrue(all(it["create"]["status"] == 409 for it in body["items"]))
        stats = es.stats()
        self.assertEqual(stats["indices"]["f"]["docs_total"], 5)
        self.assertEqual(stats["bulk"]["items_failed_injected"], 2)
        self.assertEqual(stats["duplicates"]["rejected_create_conflicts"], 5)

    def test_fail_items_every_nth(self):
        es = self.es
        es.admin(fail_items={"every_nth": 3, "status": 503})
        ops = [("create", {"_index": "n", "_id": str(i)}, {"v": i}) for i in range(1, 7)]
        st, _, body = es.bulk(ops)
        failed = [it["create"]["_id"] for it in body["items"] if it["create"]["status"] != 201]
        self.assertEqual(failed, ["3", "6"])
        self.assertEqual(body["items"][2]["create"]["error"]["type"],
                         "unavailable_shards_exception")
        st, _, body = es.bulk([op for op in ops if op[1]["_id"] in failed])
        self.assertFalse(body["errors"], body)
        self.assertEqual(es.stats()["indices"]["n"]["docs_total"], 6)


class RestartTests(unittest.TestCase):
    def test_kill_and_restart_on_same_port_keeps_data(self):
        with tempfile.TemporaryDirectory() as tmp:
            data = os.path.join(tmp, "es.json")
            a = MockServer("--data", data, "--refresh-interval-ms", "60000").start()
            try:
                st, _, r = a.call("PUT", "/_index_template/t", {"index_patterns": ["keep-*"]})
                self.assertEqual(st, 200)
                st, _, body = a.bulk([("create", {"_index": "keep-1", "_id": str(i)}, {"i": i})
                                      for i in range(10)])
                self.assertFalse(body["errors"])
                self.assertEqual(a.count("keep-1"), 0)        # not refreshed yet
            finally:
                a.stop(signal.SIGKILL)                        # no clean shutdown
            with self.assertRaises(urllib.error.URLError):     # now really refused
                a.call("GET", "/", timeout=2)
            b = MockServer("--data", data, port=a.port).start()
            try:
                self.assertEqual(b.count("keep-1"), 10)       # recovered and searchable
                self.assertEqual(b.call("GET", "/_index_template/t")[0], 200)
                st, _, body = b.bulk([("create", {"_index": "keep-1", "_id": "3"}, {"i": 3})])
                self.assertEqual(body["items"][0]["create"]["status"], 409)
                self.assertEqual(b.stats()["indices"]["keep-1"]["template"], "t")
            finally:
                b.stop()


if __name__ == "__main__":
    unittest.main()
