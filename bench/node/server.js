// The platform's current ingress proxy design, as a benchmark peer: the npm `http-proxy`
// package with no agent, so every proxied request opens a new upstream connection with
// `Connection: close` (http-proxy's default without an agent), and the upstream's close is
// relayed to the client. Routes by `X-Iterate-Proxy-Target-Host: localhost:<port>` to
// 127.0.0.1:<port>, rewrites Host, and tunnels upgrades with proxy.ws.
'use strict';
const http = require('http');
const httpProxy = require('http-proxy');

const listen = process.argv[2] || '0.0.0.0:8000';
const [host, port] = [listen.slice(0, listen.lastIndexOf(':')), Number(listen.slice(listen.lastIndexOf(':') + 1))];

const proxy = httpProxy.createProxyServer({ ws: true });
proxy.on('error', (err, req, res) => {
  try {
    if (res && typeof res.writeHead === 'function' && !res.headersSent) {
      res.writeHead(502, { 'content-type': 'application/json' });
      res.end('{"error":"bad gateway"}');
    } else if (res && typeof res.destroy === 'function') {
      res.destroy();
    }
  } catch (_) { /* ignore */ }
});

function target(req) {
  const m = /^localhost:(\d+)$/.exec(req.headers['x-iterate-proxy-target-host'] || '');
  if (!m) return null;
  req.headers.host = `localhost:${m[1]}`;
  return `http://127.0.0.1:${m[1]}`;
}

const server = http.createServer((req, res) => {
  const t = target(req);
  if (!t) {
    res.writeHead(400);
    res.end('missing target');
    return;
  }
  proxy.web(req, res, { target: t });
});
server.on('upgrade', (req, socket, head) => {
  const t = target(req);
  if (!t) {
    socket.destroy();
    return;
  }
  proxy.ws(req, socket, head, { target: t });
});
server.keepAliveTimeout = 65000;
server.headersTimeout = 66000;
server.requestTimeout = 0;
server.listen(port, host, () => console.log(`listening on ${listen}`));
process.on('SIGTERM', () => process.exit(0));
