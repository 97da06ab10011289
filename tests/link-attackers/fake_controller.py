#!/usr/bin/env python3
"""A fake controller that does not know the agent's secret, for
host/tests/sealed_links.rs.

    fake_controller.py MARKER EVENTS

Listens on 127.0.0.1 (a free port, printed on stdout's first line) and speaks the
tcp-transport's records (length:u32le lane:u8 seq:u64le payload) to every agent that
connects: a challenge, then, whatever the agent answers, a welcome with a made-up MAC
and a huge fencing token, then an order (in clear, and again with 16 made-up bytes
appended, as if sealed) whose step creates MARKER. An agent that runs it, or keeps the
token, was fooled. What happened goes to EVENTS, a line each.
"""
import json
import os
import socket
import struct
import sys
import threading

MARKER = sys.argv[1]
EVENTS = open(sys.argv[2], "a", buffering=1)
CHALLENGE, HELLO, WELCOME = 2, 3, 4


def record(lane, seq, payload):
    return struct.pack("<IBQ", 9 + len(payload), lane, seq) + payload


def read_record(conn, buf):
    while True:
        if len(buf) >= 4:
            (length,) = struct.unpack("<I", buf[:4])
            if len(buf) >= 4 + length:
                rec, rest = buf[: 4 + length], buf[4 + length :]
                return rec[4], struct.unpack("<Q", rec[5:13])[0], rec[13:], rest
        data = conn.recv(1 << 16)
        if not data:
            raise EOFError
        buf += data


def order(run):
    return json.dumps(
        {
            "type": "start-run",
            "run": run,
            "job": "fake",
            "steps": [{"name": "s", "run": f"touch {MARKER}", "timeout_ms": 10000, "workdir": None}],
            "env": [],
            "mask": [],
            "token": 2**62,
        }
    ).encode()


def handle(conn):
    try:
        conn.sendall(record(0, 0, bytes([CHALLENGE]) + os.urandom(32) + b"fake-epoch"))
        lane, seq, payload, rest = read_record(conn, b"")
        EVENTS.write(f"got kind={payload[:1].hex()} len={len(payload)}\n")
        welcome = json.dumps({"received": [0, 0], "token": 2**62}).encode()
        conn.sendall(
            record(0, 0, bytes([WELCOME]) + os.urandom(32) + welcome)
            + record(0, 1, order("r-fake-1"))
            + record(0, 2, order("r-fake-2") + os.urandom(16))
        )
        EVENTS.write("sent welcome and orders\n")
        while True:
            lane, seq, payload, rest = read_record(conn, rest)
    except (EOFError, OSError):
        EVENTS.write("agent went away\n")
    finally:
        conn.close()


def main():
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    print(listener.getsockname()[1], flush=True)
    while True:
        conn, _ = listener.accept()
        EVENTS.write("connection\n")
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
