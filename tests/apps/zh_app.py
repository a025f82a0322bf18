#!/usr/bin/env python3
"""A test app in Python: `zh_app.py asyncio|blocking [port]`.

Answers one upgrade-style request head per connection with a 101, then runs the command
named by the request path (every byte checked, see stamp.py):

  /source/SEED/N   write N bytes, shut down writing, read to EOF
  /sink/SEED/N     read to EOF and check the N bytes
  /both/S1/N1/S2/N2  write N1 bytes of S1 while checking N2 bytes of S2
  /echo            write back everything until EOF, then shut down writing
  /reset/N         read N bytes, then reset the connection
  /hold            read to EOF

Prints `listening PORT`, then one `done CMD ok|bad DETAIL` line per connection. A check
that fails resets the connection (the client sees a reset instead of a clean end).
"""
import asyncio
import os
import socket
import struct
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stamp  # noqa: E402

CHUNK = 256 * 1024
RESPONSE = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: zh\r\n\r\n"


def report(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def parse(head):
    path = head.split(b"\r\n", 1)[0].split(b" ")[1].decode()
    return [p for p in path.split("/") if p]


def linger_zero(sock):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# ---------------------------------------------------------------- asyncio

async def a_source(reader, writer, seed, n):
    sent = 0
    while sent < n:
        take = min(CHUNK, n - sent)
        writer.write(stamp.chunk(seed, sent, take))
        await writer.drain()
        sent += take
    writer.write_eof()
    while await reader.read(CHUNK):
        pass
    return "ok %d" % sent


async def a_sink(reader, seed, n):
    v = stamp.Verifier(seed)
    while True:
        data = await reader.read(CHUNK)
        if not data:
            break
        if not v.feed(data):
            return "bad at %d" % v.bad
    if v.received != n:
        return "bad count %d" % v.received
    return "ok %d" % n


async def a_conn(reader, writer):
    sock = writer.get_extra_info("socket")
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        cmd = parse(head)
        writer.write(RESPONSE)
        await writer.drain()
        name = cmd[0]
        if name == "source":
            result = await a_source(reader, writer, int(cmd[1]), int(cmd[2]))
        elif name == "sink":
            result = await a_sink(reader, int(cmd[1]), int(cmd[2]))
            if result.startswith("ok"):
                writer.write_eof()
        elif name == "both":
            out = asyncio.ensure_future(a_source_only(writer, int(cmd[1]), int(cmd[2])))
            inn = await a_sink(reader, int(cmd[3]), int(cmd[4]))
            await out
            result = inn if not inn.startswith("ok") else "ok %s/%s" % (cmd[2], cmd[4])
        elif name == "echo":
            count = 0
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
                count += len(data)
            writer.write_eof()
            result = "ok %d" % count
        elif name == "reset":
            want, got = int(cmd[1]), 0
            while got < want:
                data = await reader.read(CHUNK)
                if not data:
                    break
                got += len(data)
            linger_zero(sock)
            result = "ok reset after %d" % got
        else:  # hold
            while await reader.read(CHUNK):
                pass
            writer.write_eof()
            result = "ok"
        if not result.startswith("ok"):
            linger_zero(sock)
        report("done %s %s" % (name, result))
    except (ConnectionError, OSError, asyncio.IncompleteReadError) as e:
        report("done error %r" % e)
    finally:
        writer.close()


async def a_source_only(writer, seed, n):
    sent = 0
    while sent < n:
        take = min(CHUNK, n - sent)
        writer.write(stamp.chunk(seed, sent, take))
        await writer.drain()
        sent += take
    writer.write_eof()


async def a_main(port):
    server = await asyncio.start_server(a_conn, os.environ.get("ZH_BIND", "127.0.0.1"), port, backlog=4096, limit=1 << 20)
    report("listening %d" % server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


# ---------------------------------------------------------------- blocking

def recv_head(sock):
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError("closed in head")
        buf += data
    head, rest = buf.split(b"\r\n\r\n", 1)
    return head, rest


def b_sink(sock, seed, n, first):
    v = stamp.Verifier(seed)
    if first and not v.feed(first):
        return "bad at %d" % v.bad
    while True:
        data = sock.recv(CHUNK)
        if not data:
            break
        if not v.feed(data):
            return "bad at %d" % v.bad
    if v.received != n:
        return "bad count %d" % v.received
    return "ok %d" % n


def b_source(sock, seed, n):
    sent = 0
    while sent < n:
        take = min(CHUNK, n - sent)
        sock.sendall(stamp.chunk(seed, sent, take))
        sent += take
    sock.shutdown(socket.SHUT_WR)


def b_conn(sock):
    name = "?"
    try:
        head, rest = recv_head(sock)
        cmd = parse(head)
        name = cmd[0]
        sock.sendall(RESPONSE)
        if name == "source":
            b_source(sock, int(cmd[1]), int(cmd[2]))
            while sock.recv(CHUNK):
                pass
            result = "ok %s" % cmd[2]
        elif name == "sink":
            result = b_sink(sock, int(cmd[1]), int(cmd[2]), rest)
            if result.startswith("ok"):
                sock.shutdown(socket.SHUT_WR)
        elif name == "both":
            t = threading.Thread(target=b_source, args=(sock, int(cmd[1]), int(cmd[2])))
            t.start()
            inn = b_sink(sock, int(cmd[3]), int(cmd[4]), rest)
            t.join()
            result = inn if not inn.startswith("ok") else "ok %s/%s" % (cmd[2], cmd[4])
        elif name == "echo":
            count = len(rest)
            if rest:
                sock.sendall(rest)
            while True:
                data = sock.recv(CHUNK)
                if not data:
                    break
                sock.sendall(data)
                count += len(data)
            sock.shutdown(socket.SHUT_WR)
            result = "ok %d" % count
        elif name == "reset":
            want, got = int(cmd[1]), len(rest)
            while got < want:
                data = sock.recv(CHUNK)
                if not data:
                    break
                got += len(data)
            linger_zero(sock)
            result = "ok reset after %d" % got
        else:
            while sock.recv(CHUNK):
                pass
            sock.shutdown(socket.SHUT_WR)
            result = "ok"
        if not result.startswith("ok"):
            linger_zero(sock)
        report("done %s %s" % (name, result))
    except OSError as e:
        report("done %s error %r" % (name, e))
    finally:
        sock.close()


def b_main(port):
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((os.environ.get("ZH_BIND", "127.0.0.1"), port))
    ls.listen(4096)
    report("listening %d" % ls.getsockname()[1])
    while True:
        sock, _ = ls.accept()
        threading.Thread(target=b_conn, args=(sock,), daemon=True).start()


if __name__ == "__main__":
    kind = sys.argv[1]
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    if kind == "asyncio":
        asyncio.run(a_main(port))
    else:
        b_main(port)
