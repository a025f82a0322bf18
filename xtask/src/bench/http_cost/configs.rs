//! The configs of the probe's upstream app (nginx) and its peers (nginx, HAProxy).

use std::path::Path;

use super::{TARGET, UPSTREAM_PORT};

fn temp_paths(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fastcgi; \
         uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;"
    )
}

/// The upstream app: nginx, 1 worker, `GET /` → 200 "ok\n" (3 bytes), 421 for a request
/// not rewritten as a proxy must (Host `localhost:9000`, no target header).
pub fn upstream_nginx(dir: &Path) -> String {
    let d = dir.display();
    let temp = temp_paths(dir);
    format!(
        r#"worker_processes 1;
pid {d}/upstream-nginx.pid;
error_log {d}/upstream-nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    {temp}
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    map "$http_host|$http_x_iterate_proxy_target_host" $misrouted {{
        "{TARGET}|" 0;
        default 1;
    }}
    server {{
        listen 127.0.0.1:{UPSTREAM_PORT} backlog=4096;
        location / {{
            if ($misrouted) {{ return 421; }}
            return 200 "ok\n";
        }}
    }}
}}
"#
    )
}

/// nginx as the issue's reference: 2 workers, a named `upstream` block with keepalive
/// (pooled; it lists the one port), access log off.
pub fn proxy_nginx(dir: &Path, port: u16) -> String {
    let d = dir.display();
    let temp = temp_paths(dir);
    format!(
        r#"worker_processes 2;
pid {d}/nginx-{port}.pid;
error_log {d}/nginx-{port}-error.log warn;
events {{ worker_connections 4096; multi_accept on; }}
http {{
    access_log off;
    {temp}
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    map $http_x_iterate_proxy_target_host $target_port {{
        "~^localhost:(?<p>[0-9]+)$" $p;
        default "";
    }}
    upstream app{UPSTREAM_PORT} {{ server 127.0.0.1:{UPSTREAM_PORT}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            if ($target_port = "") {{ return 400; }}
            proxy_pass http://app{UPSTREAM_PORT};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host localhost:$target_port;
            proxy_set_header X-Iterate-Proxy-Target-Host "";
            proxy_set_header X-Iterate-Proxy-Via $http_host;
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"#
    )
}

/// HAProxy 2.6, 2 threads: the port from the header (`set-dst-port`, any port).
pub fn haproxy(port: u16) -> String {
    format!(
        r#"global
    maxconn 7900
    nbthread 2

defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s
    option http-keep-alive

frontend fe
    bind 127.0.0.1:{port}
    default_backend app

backend app
    http-request set-var(txn.port) req.hdr(x-iterate-proxy-target-host),regsub(^localhost:,)
    http-request return status 400 unless {{ var(txn.port) -m reg ^[0-9]+$ }}
    http-request set-header X-Iterate-Proxy-Via %[req.hdr(host)]
    http-request set-header Host localhost:%[var(txn.port)]
    http-request del-header X-Iterate-Proxy-Target-Host
    http-request set-dst-port var(txn.port)
    server app 127.0.0.1:0
"#
    )
}
