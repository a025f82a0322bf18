#!/usr/bin/env node
// A test app in Node: `node zh_app.js net|ws [PORT]` (listens on 127.0.0.1, or ZH_BIND).
//
// net: answers one upgrade-style request head per connection with a 101, then runs the
// command in the request path, like tests/apps/zh_app.py:
//   /source/SEED/N  /sink/SEED/N  /both/S1/N1/S2/N2  /echo  /reset/N  /hold
// ws: a WebSocket server (the `ws` package) with the same commands on the upgrade path;
// data travels as binary messages (source: messages of up to 256 KiB; the stream is the
// concatenation of the messages), and the end of a stream is a close frame (1000).
//
// Prints `listening PORT`, then one `done CMD ok|bad DETAIL` line per connection; a check
// that fails resets the connection.
'use strict';

const net = require('net');
const http = require('http');
const path = require('path');
const stamp = require(path.join(__dirname, 'stamp.js'));

const CHUNK = 256 * 1024;
const RESPONSE = 'HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: zh\r\n\r\n';

function report(line) {
  process.stdout.write(line + '\n');
}

function parse(url) {
  return url.split('/').filter((p) => p.length > 0);
}

// Writes N bytes of stream `seed` with backpressure (write() false → wait for 'drain').
function source(sock, seed, n, done) {
  let sent = 0;
  function more() {
    while (sent < n) {
      const take = Math.min(CHUNK, n - sent);
      const ok = sock.write(stamp.chunk(seed, sent, take));
      sent += take;
      if (!ok) {
        sock.once('drain', more);
        return;
      }
    }
    sock.end();
    done();
  }
  more();
}

function netConn(sock) {
  let buf = Buffer.alloc(0);
  let started = false;
  let name = '?';
  sock.on('error', (e) => report(`done ${name} error ${e.code || e.message}`));
  function onHead(data) {
    buf = Buffer.concat([buf, data]);
    const end = buf.indexOf('\r\n\r\n');
    if (end < 0) return;
    sock.removeListener('data', onHead);
    started = true;
    const head = buf.subarray(0, end).toString();
    const rest = buf.subarray(end + 4);
    const cmd = parse(head.split('\r\n')[0].split(' ')[1]);
    name = cmd[0];
    sock.write(RESPONSE);
    run(cmd, rest);
  }
  function run(cmd, rest) {
    const num = (i) => Number(cmd[i] || 0);
    if (name === 'source') {
      source(sock, num(1), num(2), () => {});
      sock.on('data', () => {});
      sock.on('end', () => report(`done source ok ${num(2)}`));
    } else if (name === 'sink' || name === 'both') {
      const [seed, n] = name === 'sink' ? [num(1), num(2)] : [num(3), num(4)];
      const v = new stamp.Verifier(seed);
      let bad = v.feed(rest) ? null : `bad at ${v.bad}`;
      if (name === 'both') source(sock, num(1), num(2), () => {});
      sock.on('data', (d) => {
        if (bad === null && !v.feed(d)) {
          bad = `bad at ${v.bad}`;
          report(`done ${name} ${bad}`);
          sock.resetAndDestroy();
        }
      });
      sock.on('end', () => {
        if (bad !== null) return;
        if (v.received !== n) {
          report(`done ${name} bad count ${v.received}`);
          sock.resetAndDestroy();
          return;
        }
        if (name === 'sink') sock.end();
        report(`done ${name} ok ${n}`);
      });
    } else if (name === 'echo') {
      let count = rest.length;
      if (rest.length) sock.write(rest);
      sock.on('data', (d) => {
        count += d.length;
        if (!sock.write(d)) {
          sock.pause();
          sock.once('drain', () => sock.resume());
        }
      });
      sock.on('end', () => {
        sock.end();
        report(`done echo ok ${count}`);
      });
    } else if (name === 'reset') {
      let got = rest.length;
      const want = num(1);
      const check = () => {
        if (got >= want) {
          report(`done reset ok reset after ${got}`);
          sock.resetAndDestroy();
        }
      };
      sock.on('data', (d) => {
        got += d.length;
        check();
      });
      check();
    } else {
      sock.on('data', () => {});
      sock.on('end', () => {
        sock.end();
        report('done hold ok');
      });
    }
  }
  sock.on('data', onHead);
  sock.on('close', () => {
    if (!started) report('done error closed before the head');
  });
}

function wsMain(port, host) {
  const { WebSocketServer } = require('ws');
  const wss = new WebSocketServer({ noServer: true, maxPayload: 64 * 1024 * 1024 });
  const server = http.createServer((req, res) => {
    res.writeHead(400);
    res.end();
  });
  server.on('upgrade', (req, sock, head) => {
    wss.handleUpgrade(req, sock, head, (ws) => wsConn(ws, parse(req.url)));
  });
  server.listen(port, host, () => report(`listening ${server.address().port}`));
}

function wsConn(ws, cmd) {
  const name = cmd[0];
  const num = (i) => Number(cmd[i] || 0);
  ws.on('error', (e) => report(`done ${name} error ${e.code || e.message}`));
  function sendStream(seed, n) {
    let sent = 0;
    function more() {
      // ws queues without limit: keep at most 4 MiB buffered, as an app with
      // backpressure would.
      while (sent < n && ws.bufferedAmount < 4 * 1024 * 1024) {
        const take = Math.min(CHUNK, n - sent);
        ws.send(stamp.chunk(seed, sent, take), { binary: true });
        sent += take;
      }
      if (sent < n) setTimeout(more, 1);
      else if (name === 'source') ws.close(1000);
    }
    more();
  }
  if (name === 'source') {
    sendStream(num(1), num(2));
    ws.on('close', () => report(`done source ok ${num(2)}`));
  } else if (name === 'sink' || name === 'both') {
    const [seed, n] = name === 'sink' ? [num(1), num(2)] : [num(3), num(4)];
    const v = new stamp.Verifier(seed);
    let bad = null;
    if (name === 'both') sendStream(num(1), num(2));
    ws.on('message', (d) => {
      if (bad === null && !v.feed(d)) {
        bad = `bad at ${v.bad}`;
        report(`done ${name} ${bad}`);
        ws.terminate();
      }
    });
    ws.on('close', () => {
      if (bad !== null) return;
      report(v.received === n ? `done ${name} ok ${n}` : `done ${name} bad count ${v.received}`);
    });
  } else if (name === 'echo') {
    let count = 0;
    ws.on('message', (d, binary) => {
      count += d.length;
      ws.send(d, { binary });
    });
    ws.on('close', () => report(`done echo ok ${count}`));
  } else {
    // hold: a clean close is 1000; a dropped connection shows as 1006.
    ws.on('message', () => {});
    ws.on('close', (code) => report(code === 1000 ? `done ${name} ok` : `done ${name} error close ${code}`));
  }
}

const kind = process.argv[2];
const port = Number(process.argv[3] || 0);
const host = process.env.ZH_BIND || '127.0.0.1';
if (kind === 'ws') {
  wsMain(port, host);
} else {
  // Half-open: a client that finishes sending first must not end the app's own stream
  // (Node ends the writable side at the readable side's end otherwise).
  const server = net.createServer({ noDelay: true, allowHalfOpen: true }, netConn);
  server.listen({ port, host, backlog: 4096 }, () => report(`listening ${server.address().port}`));
}
