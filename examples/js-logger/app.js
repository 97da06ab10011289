// A Trellis logging method in JavaScript: each run's events as JSON lines (JEP-212's
// fields: id, message, timestamp, data, plus the log's metadata) in a directory the
// operator grants, in the default file store's layout, so `file-browser` reads it:
//
//     <directory>/<job-id>/<loggable-id>.jsonl   one event per line, in seq order
//     <directory>/<job-id>/<loggable-id>.count   the final event count, at close
//
// Built with componentize-js against the project's WIT (`cargo xtask bundle` does it).
// The host keeps every batch in its durable buffer until `write` returns, and sends a
// batch again after a failure, so each event is stored at most once: events at or
// below the highest seq already in the file are skipped.
//
// How the WIT maps to JavaScript here: exported interfaces are objects named in camel
// case (`lifecycle`, `loggingMethod`), a resource is a class (`Writer`), u64 values are
// BigInts, `list<u8>` is a Uint8Array, and an `error` result is thrown as its variant:
// `throw { tag: "retryable", val: "why" }`.

import { getDirectories } from "wasi:filesystem/preopens@0.2.12";

let root = null;
const encoder = new TextEncoder();
const decoder = new TextDecoder();

const fail = (tag, val) => ({ tag, val });

// A WASI filesystem call's error (thrown with its error code) as one of ours.
function io(what, e) {
  const code = e && e.payload !== undefined ? e.payload : String(e);
  return fail("retryable", `${what}: ${code}`);
}

export const lifecycle = {
  init(config) {
    let c;
    try {
      c = JSON.parse(config || "{}");
    } catch (e) {
      throw fail("bad-config", `config is not JSON: ${e}`);
    }
    const want = c.directory === undefined ? "/logs" : c.directory;
    if (typeof want !== "string") {
      throw fail("bad-config", "config key `directory`: expected a string");
    }
    // Without a grant the directory is not there in the sandbox: say so plainly.
    const found = getDirectories().find(([, path]) => path === want);
    if (!found) {
      throw fail(
        "denied",
        `directory \`${want}\` is not available: grant it read-write in [[plugins.js-logger.dirs]]`,
      );
    }
    root = found[0];
  },
};

// The packed `event-batch` (layout in wit/types.wit): little-endian integers, strings
// with a u32 length prefix.
function* events(batch) {
  const view = new DataView(batch.buffer, batch.byteOffset, batch.byteLength);
  let at = 0;
  const u32 = () => {
    const v = view.getUint32(at, true);
    at += 4;
    return v;
  };
  const text = () => {
    const n = u32();
    const s = decoder.decode(batch.subarray(at, at + n));
    at += n;
    return s;
  };
  const count = u32();
  for (let i = 0; i < count; i++) {
    const seq = Number(view.getBigUint64(at, true));
    const timestamp = Number(view.getBigInt64(at + 8, true));
    at += 16;
    const step = text();
    const message = text();
    const data = {};
    const pairs = u32();
    for (let j = 0; j < pairs; j++) {
      const k = text();
      data[k] = text();
    }
    yield { seq, timestamp, step, message, data };
  }
}

function safeName(part) {
  if (!part || part === "." || part === ".." || /[/\\\0]/.test(part)) {
    throw fail("permanent", `\`${part}\` cannot be used as a file name`);
  }
  return part;
}

const WRITE = { read: true, write: true };
// A directory is opened to create and rename files in, not to write.
const DIRECTORY = { read: true, mutateDirectory: true };

// Give a WASI handle back now rather than when the garbage collector gets to it (an
// instance may hold only so many).
function release(handle) {
  const dispose = handle[Symbol.dispose] || handle[Symbol.for("dispose")];
  if (dispose) dispose.call(handle);
}

// The whole content of an open file.
function readAll(file) {
  const parts = [];
  let offset = 0n;
  for (;;) {
    const [chunk, eof] = file.read(1n << 20n, offset);
    parts.push(chunk);
    offset += BigInt(chunk.length);
    if (eof || chunk.length === 0) break;
  }
  const all = new Uint8Array(Number(offset));
  let at = 0;
  for (const p of parts) {
    all.set(p, at);
    at += p.length;
  }
  return all;
}

class Writer {
  constructor(meta) {
    this.meta = meta;
    const job = safeName(meta.jobId);
    this.run = safeName(meta.loggableId);
    try {
      root.createDirectoryAt(job);
    } catch (e) {
      if (!(e && e.payload === "exist")) throw io(`create ${job}`, e);
    }
    try {
      this.dir = root.openAt({}, job, { directory: true }, DIRECTORY);
    } catch (e) {
      throw io(`open ${job}`, e);
    }
    let existing;
    try {
      this.file = this.dir.openAt({}, `${this.run}.jsonl`, { create: true }, WRITE);
      existing = readAll(this.file);
    } catch (e) {
      throw io(`open ${this.run}.jsonl`, e);
    }
    // Resume after the highest seq already stored (a resent batch writes nothing twice).
    this.end = BigInt(existing.length);
    this.last = 0;
    for (const line of decoder.decode(existing).split("\n")) {
      try {
        this.last = Math.max(this.last, JSON.parse(line).seq || 0);
      } catch {
        // a line cut short by a crash: it is written again
      }
    }
  }

  write(batch) {
    const lines = [];
    let last = this.last;
    for (const e of events(batch)) {
      if (e.seq <= this.last) continue;
      if (e.seq !== last + 1) {
        throw fail("permanent", `gap in the log: expected seq ${last + 1}, got ${e.seq}`);
      }
      lines.push(
        JSON.stringify({
          id: `${this.meta.loggableId}:${e.seq}`,
          seq: e.seq,
          timestamp: e.timestamp,
          message: e.message,
          data: e.data,
          instance_id: this.meta.instanceId,
          loggable_type: this.meta.loggableType,
          loggable_id: this.meta.loggableId,
          job_id: this.meta.jobId,
          step_id: e.step,
        }),
      );
      last = e.seq;
    }
    if (lines.length === 0) return;
    const bytes = encoder.encode(lines.join("\n") + "\n");
    try {
      let done = 0;
      while (done < bytes.length) {
        const n = this.file.write(bytes.subarray(done), this.end + BigInt(done));
        done += Number(n);
      }
    } catch (e) {
      throw io(`append to ${this.run}.jsonl`, e);
    }
    this.end += BigInt(bytes.length);
    this.last = last;
  }

  flush() {}

  close(finalCount) {
    if (Number(finalCount) !== this.last) {
      throw fail("permanent", `closing with ${finalCount} events but ${this.last} are stored`);
    }
    // Written aside and renamed, so a browser never reads half a count.
    const tmp = `${this.run}.count.tmp`;
    try {
      this.file.syncData();
      const f = this.dir.openAt({}, tmp, { create: true, truncate: true }, WRITE);
      f.write(encoder.encode(String(finalCount)), 0n);
      release(f);
      this.dir.renameAt(tmp, this.dir, `${this.run}.count`);
    } catch (e) {
      throw io("record the final count", e);
    }
  }
}

export const loggingMethod = {
  Writer,
  runsOn() {
    return "controller";
  },
  open(meta) {
    if (root === null) throw fail("permanent", "open before init");
    return new Writer(meta);
  },
};
