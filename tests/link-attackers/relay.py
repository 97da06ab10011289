#!/usr/bin/env python3
"""A man in the middle of the TCP transport, for host/tests/sealed_links.rs.

    relay.py UPSTREAM_PORT RECORDING EVENTS

Listens on 127.0.0.1 (a free port, printed on stdout's first line) and relays every
connection to 127.0.0.1:UPSTREAM_PORT, parsing the tcp-transport's records
(length:u32le lane:u8 seq:u64le payload) in both directions and appending every byte to
RECORDING. Commands, one per line on stdin, act on the next suitable record:

    flip a2c | flip c2a       flip one byte in the payload of the next frame of at least
                              17 bytes going agent->controller / controller->agent
    replay a2c | replay c2a   put again into that direction the largest frame record
                              (seq > 0) seen in it so far, on any connection
    hold a2c | hold c2a       forward nothing more in that direction on the connections
                              open now (what the peer would lose if the other end died
                              before it was sent); later connections are relayed whole

What it did goes to EVENTS, a line per action ("flipped c2a lane=0 seq=3"), plus
"connection" for each connection and "handshook" once a connection carried two records
controller->agent (the challenge and the welcome: frames put in after that reach a
sealed link, not a handshake that would discard them).
"""
import socket
import struct
import sys
import threading

UPSTREAM = int(sys.argv[1])
RECORDING = open(sys.argv[2], "ab", buffering=0)
EVENTS = open(sys.argv[3], "a", buffering=1)
lock = threading.Lock()
pending = {"a2c": [], "c2a": []}
largest = {"a2c": None, "c2a": None}
open_connections = set()
held = set()  # (connection, direction)


def event(text):
    with lock:
        EVENTS.write(text + "\n")


def pump(src, dst, direction, conn):
    buf = b""
    records = 0
    said_handshook = False
    try:
        while True:
            data = src.recv(1 << 16)
            if not data:
                break
            with lock:
                RECORDING.write(data)
            buf += data
            out = b""
            while len(buf) >= 4:
                (length,) = struct.unpack("<I", buf[:4])
                if len(buf) < 4 + length:
                    break
                record, buf = buf[: 4 + length], buf[4 + length :]
                lane, seq = record[4], struct.unpack("<Q", record[5:13])[0]
                payload_len = length - 9
                with lock:
                    todo = pending[direction]
                    action = todo[0] if todo else None
                    if action == "flip" and payload_len >= 17:
                        todo.pop(0)
                        b = bytearray(record)
                        b[13 + payload_len // 2] ^= 0x01
                        record = bytes(b)
                        EVENTS.write(f"flipped {direction} lane={lane} seq={seq}\n")
                    elif action == "replay" and largest[direction] is not None:
                        todo.pop(0)
                        out += largest[direction]
                        EVENTS.write(f"replayed {direction}\n")
                    if seq > 0 and (
                        largest[direction] is None or len(record) > len(largest[direction])
                    ):
                        largest[direction] = record
                    if (conn, direction) in held:
                        EVENTS.write(f"held {direction} lane={lane} seq={seq}\n")
                        continue
                out += record
                records += 1
            if out:
                dst.sendall(out)
            if direction == "c2a" and records >= 2 and not said_handshook:
                said_handshook = True
                event("handshook")
    except OSError:
        pass
    finally:
        with lock:
            open_connections.discard(conn)
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(listener):
    conn = 0
    while True:
        agent, _ = listener.accept()
        try:
            controller = socket.create_connection(("127.0.0.1", UPSTREAM))
        except OSError:
            agent.close()
            continue
        conn += 1
        with lock:
            open_connections.add(conn)
        event("connection")
        threading.Thread(target=pump, args=(agent, controller, "a2c", conn), daemon=True).start()
        threading.Thread(target=pump, args=(controller, agent, "c2a", conn), daemon=True).start()


def main():
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    print(listener.getsockname()[1], flush=True)
    threading.Thread(target=serve, args=(listener,), daemon=True).start()
    for line in sys.stdin:
        parts = line.split()
        if len(parts) == 2 and parts[0] in ("flip", "replay") and parts[1] in pending:
            with lock:
                pending[parts[1]].append(parts[0])
        elif len(parts) == 2 and parts[0] == "hold" and parts[1] in pending:
            with lock:
                held.update((c, parts[1]) for c in open_connections)
                EVENTS.write(f"holding {parts[1]} on {len(open_connections)} connection(s)\n")


if __name__ == "__main__":
    main()
