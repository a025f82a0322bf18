"""Writes the seed corpus of each fuzz target (fuzz/seeds/<target>/): small inputs that
reach each part of the HTTP front end, the smuggling cases of tests/tests/smuggling.rs,
and the regression inputs the runs found; and fuzz/regressions/<target>/, inputs replayed
once per run. Run it from anywhere: python3 make_seeds.py"""
import os, struct
root = os.path.dirname(os.path.abspath(__file__))
T = b"X-Iterate-Proxy-Target-Host: localhost:4096\r\n"
S = b"X-Iterate-Project-Ingress-Secret: fuzz-secret\r\n"
FAKE = b"POST /smuggled-fake HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
# name -> connection bytes (one or more requests)
conns = {
 'get': b"GET /a?b=1 HTTP/1.1\r\nHost: h\r\n" + T + b"\r\n",
 'post-length': b"POST /u HTTP/1.1\r\nHost: h\r\n" + T + b"Content-Length: 5\r\n\r\nhello",
 'chunked-ext-trailers': b"POST /c HTTP/1.1\r\nHost: h\r\n" + T + b"Transfer-Encoding: gzip, chunked\r\n\r\n5;name=\"v\"\r\nhello\r\n00006 \r\n world\r\n0\r\nX-T: 1\r\nY: 2\r\n\r\n",
 'pipelined': b"GET /1 HTTP/1.1\r\n" + T + b"\r\nPOST /2 HTTP/1.1\r\n" + T + b"Content-Length: 3\r\n\r\nabcGET /3 HTTP/1.1\r\n" + T + b"Connection: close\r\n\r\n",
 'lf-only-hides-cl-te': b"POST /a HTTP/1.1\nHost: h\n" + T.replace(b"\r\n", b"\n") + b"Content-Length: %d\n\n" % len(FAKE) + FAKE + b"GET /innocent HTTP/1.1\r\n" + T + b"\r\nPOST /smuggled HTTP/1.1\r\n" + T + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
 'leading-empty-line': b"\r\nGET /after-empty-line HTTP/1.1\r\nHost: h\r\n" + T + b"\r\n",
 'upgrade-without-connection': b"POST /not-an-upgrade HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n" + T + b"Content-Length: 4\r\n\r\nabcdGET /next HTTP/1.1\r\n" + T + b"\r\n",
 'cl-list': b"POST /x HTTP/1.1\r\n" + T + b"Content-Length: 5, 5\r\n\r\nhello",
 'cl-duplicate-equal': b"POST /x HTTP/1.1\r\n" + T + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
 'chunk-size-overflow': b"POST /u HTTP/1.1\r\n" + T + b"Transfer-Encoding: chunked\r\n\r\n10000000000000000\r\n",
 'chunk-size-max': b"POST /u HTTP/1.1\r\n" + T + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nabc",
 'chunk-bare-lf': b"POST /u HTTP/1.1\r\n" + T + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
 'cl-te': b"POST /smuggled HTTP/1.1\r\nHost: h\r\n" + T + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled-tail HTTP/1.1\r\n\r\n",
 'te-cl-lf': b"POST /smuggled HTTP/1.1\nHost: h\n" + T.replace(b"\r\n", b"\n") + b"Transfer-Encoding: \tchunked\nCONTENT-LENGTH: 5\n\n0\r\n\r\n",
 'te-identity': b"POST /x HTTP/1.1\r\n" + T + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
 'te-trailing-comma': b"POST /x HTTP/1.1\r\n" + T + b"Transfer-Encoding: chunked,\r\n\r\n0\r\n\r\n",
 'te-http10': b"POST /x HTTP/1.0\r\n" + T + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
 'two-hosts': b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n" + T + b"\r\n",
 'websocket-upgrade': b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: https://o\r\n" + T + b"\r\nhello tunnel",
 'http10-keep-alive': b"GET /k HTTP/1.0\r\nConnection: Keep-Alive\r\n" + T + b"\r\nGET /k2 HTTP/1.0\r\n" + T + b"\r\n",
 'close-then-more': b"GET /c HTTP/1.1\r\nConnection: close\r\n" + T + b"\r\nGET /never HTTP/1.1\r\n" + T + b"\r\n",
 'obs-fold': b"GET / HTTP/1.1\r\nX-Folded: a\r\n b\r\n" + T + b"\r\n",
 'expect-continue': b"PUT /e HTTP/1.1\r\nExpect: 100-continue\r\n" + T + b"Content-Length: 2\r\n\r\nok",
 'hop-by-hop-and-own-fields': b"GET /p HTTP/1.1\r\nHost: 4096__m.iterate.town\r\n" + T + S + b"X-Iterate-Proxy-Via: spoof\r\nConnection: keep-alive, X-Hop, x-request-id\r\nX-Hop: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\nProxy-Authorization: Basic x\r\nX-Request-Id: abc\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n",
 'many-connection-tokens': b"GET / HTTP/1.1\r\nConnection: " + b", ".join(b"x-%d" % i for i in range(20)) + b"\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(20)) + T + b"\r\n",
 'request-id-twice': b"GET / HTTP/1.1\r\nX-Request-Id: a\r\nX-Request-Id: b\r\n" + T + b"\r\n",
 'trailer-bad-name': b"POST /t HTTP/1.1\r\n" + T + b"Transfer-Encoding: chunked\r\n\r\n0\r\nX y: z\r\nnocolon\r\n\r\n",
 'trailer-bare-lf': b"POST /t HTTP/1.1\r\n" + T + b"Transfer-Encoding: chunked\r\n\r\n0\r\nX: a\nY: b\r\n\r\n",
 'chunk-ext-control': b"POST /t HTTP/1.1\r\n" + T + b"Transfer-Encoding: chunked\r\n\r\n3;a\x01b\r\nabc\r\n0\r\n\r\n",
 'cl-max': b"POST /x HTTP/1.1\r\n" + T + b"Content-Length: 18446744073709551615\r\n\r\nabc",
 'head-connect-absolute-star': b"HEAD /h HTTP/1.1\r\n" + T + b"\r\nOPTIONS * HTTP/1.1\r\n" + T + b"\r\nGET http://other/ HTTP/1.1\r\n" + T + b"\r\nCONNECT x:443 HTTP/1.1\r\n" + T + b"\r\n",
 'odd-target-bytes': b"GET //a/%2F/..\\b?x=*&q=\"{|}\" HTTP/1.1\r\n" + T + b"\r\n",
 'health': b"GET /health?x HTTP/1.1\r\n\r\nPOST /health HTTP/1.1\r\nContent-Length: 2\r\n\r\nok",
 'bare-host-v6-fallback': b"GET /v6 HTTP/1.1\r\nX-Iterate-Proxy-Target-Host: mach_123.iterate.town\r\n\r\n",
 'bad-targets': b"GET / HTTP/1.1\r\nX-Iterate-Proxy-Target-Host: 70000__x\r\n\r\nGET / HTTP/1.1\r\nX-Iterate-Proxy-Target-Host: localhost:8080\r\n\r\nGET / HTTP/1.1\r\n\r\n",
}
grammar = ["4096__mach_123.iterate.town", "0080__x", "abc__x", "70000__x", "0__x", "80__", "__x",
  "localhost:8080", "LOCALHOST:1", "127.0.0.1:5173", "example.com:80", "[::1]:80", "127.0.0.2:80",
  "localhost.evil.com:80", "mach_123.iterate.town", " \t4096__m ", "localhost:80:81", "é__x", "", "   ",
  "000000000000000080__x", "99999999999999999999__x", "localhost:", "\u00a04096__x"]

def write(target, name, data):
    d = os.path.join(root, target); os.makedirs(d, exist_ok=True)
    open(os.path.join(d, name), 'wb').write(data)

for name, c in conns.items():
    write('framing_vs_hyper', name, c)
    # header_rewrite: 2 bytes of port (little endian), then the first head
    write('header_rewrite', name, struct.pack('<H', 4096) + c)
    # front_end: mode byte (bits 0-2 upstream answer, bit 7 the secured daemon)
    write('front_end', name, bytes([0]) + c)
for i, name in enumerate(['chunked-ext-trailers', 'pipelined', 'websocket-upgrade', 'expect-continue', 'http10-keep-alive', 'post-length', 'head-connect-absolute-star', 'upgrade-without-connection']):
    mode = (i % 7) + 1
    write('front_end', f'{name}-mode{mode}', bytes([mode]) + conns[name])
write('front_end', 'secured-websocket-upgrade-mode5', bytes([0x85]) + conns['websocket-upgrade'].replace(b"Host: h\r\n", b"Host: h\r\n" + S))
write('front_end', 'secured-pipelined', bytes([0x80]) + conns['pipelined'].replace(T, T + S))
write('front_end', 'secured-wrong-secret', bytes([0x80]) + b"GET / HTTP/1.1\r\nX-Iterate-Project-Ingress-Secret: nope\r\n" + T + b"\r\n" * 1 + b"GET / HTTP/1.1\r\n" + T + b"\r\n")
for i, g in enumerate(grammar):
    write('target_grammar', f'{i:02}', g.encode())
# Inputs the runs found (minimised).
write('target_grammar', 'crash-multibyte-first-char', "\u02c2__\u0001".encode())
# A fragment in the target: hyper's Uri drops it, the daemon forwards it (a harness fix).
write('framing_vs_hyper', 'fragment-in-target', b"POST /seuggled# HTTP/1.1\nTrailer: -Iterate-Prox{-fer-EncodNT-LENGTH: 5\n\n2\r\n\r\n")
# hyper's chunked limits at their boundary: replayed once per run (regressions/), not
# mutated (inputs this large would slow every run down).
def write_regression(target, name, data):
    d = os.path.join(root, '..', 'regressions', target); os.makedirs(d, exist_ok=True)
    open(os.path.join(d, name), 'wb').write(data)
lim = 16 * 1024
def chunked(body):
    return b"POST /limit HTTP/1.1\r\n" + T + b"Transfer-Encoding: chunked\r\n\r\n" + body
for n, tag in [(lim - 1, 'under'), (lim, 'at')]:
    write_regression('framing_vs_hyper', f'chunk-extension-limit-{tag}', chunked(b"1;" + b"e" * n + b"\r\na\r\n0\r\n\r\n"))
    value = b"v" * (n - len(b"X: \r\n\r\n"))
    write_regression('framing_vs_hyper', f'trailer-limit-{tag}', chunked(b"0\r\nX: " + value + b"\r\n\r\n"))
